"""Command line: ``unlearn-fast {unlearn,eval,demo,fuse,ledger,export,plan,bench} --help``, one module per verb.

User mistakes (bad files, wrong model, existing output) print ``error: ...`` and exit with
status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..errors import UnlearnFastError
from ..train import checkpoint
from . import bench, demo, eval, export, fuse, ledger, plan, unlearn
from .common import use_help_formatter
from .config_file import add_config_args, config_text, parse_args

VERBS = {"unlearn": unlearn, "eval": eval, "demo": demo, "fuse": fuse, "ledger": ledger, "export": export,
         "plan": plan, "bench": bench}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unlearn-fast",
        description="Remove chosen data from a trained language model with EUL unlearning layers "
                    "(small adapters trained on a frozen base with a selective teacher-student objective).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for verb in VERBS.values():
        verb.add_parser(sub)
    for verb_parser in sub.choices.values():  # --config / --print-config where a verb has no sub-commands
        if not any(isinstance(a.choices, dict) for a in verb_parser._actions):
            add_config_args(verb_parser)
    use_help_formatter(parser)  # every option's default in --help
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)  # with the options of a --config file, if one is given
    if not args.command:
        parser.print_help()
        return 2
    if getattr(args, "print_config", False):
        print(config_text(args), end="")
        return 0
    try:
        return VERBS[args.command].run(args)
    except UnlearnFastError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; nothing was written{where_to_resume(args)}", file=sys.stderr)
        return 130


def where_to_resume(args) -> str:
    """For an interrupted run with checkpoints: which one a rerun with --resume continues from."""
    directory = getattr(args, "checkpoint_dir", None)
    if not directory:
        return ""
    newest = checkpoint.latest(directory)
    if newest is None:
        return f"; no checkpoint was saved in {directory} yet"
    return (f"; the run stopped after {newest.name} (saved in {directory}): run the same command with "
            f"--resume to continue from there")
