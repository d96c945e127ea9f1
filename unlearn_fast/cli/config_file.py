"""``--config FILE`` and ``--print-config``: a verb's options from a YAML or JSON file.

The file maps option names, as on the command line without the dashes (``batch-size`` or
``batch_size``; an alias such as ``lambda`` or ``output_dir`` too), to values::

    # run.yaml
    model: smollm2
    forget: forget.jsonl
    retain: retain.jsonl
    out: layers/
    lr: 3.0e-4
    blocks: top:8
    accumulate: 4
    gradient_checkpointing: true

Values are read as the command line reads them (``blocks: top:8`` or ``blocks: [0, 5, 11]``), a
flag takes true or false, null leaves an option unset, and the options the file gives are no
longer required on the command line. Options given on the command line override the file. ``--print-config`` prints the
resolved options (defaults, file, command line) as YAML and exits without running: the output is
itself a valid ``--config`` file. ``unlearn`` stores them in the artifact's manifest (``run_config``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import yaml

# not options of a run: the file itself, and argparse's bookkeeping
NOT_OPTIONS = ("config", "print_config", "help", "command")


def add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("config file")
    g.add_argument("--config", metavar="FILE",
                   help="YAML or JSON file of options (names as the long options without dashes, e.g. "
                        "'batch_size: 16'); options on the command line override it (default: none)")
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved options (defaults, --config file, command line) as YAML and exit "
                        "without running; the output is a valid --config file (default: off)")


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with the options of a ``--config`` file as the verb's defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    found, _ = pre.parse_known_args(argv)
    if found.config:
        verb = _verb_parser(parser, argv)
        if verb is None or not any(a.dest == "config" for a in verb._actions):
            parser.error("--config belongs to a command that takes it, e.g. unlearn-fast unlearn --config run.yaml")
        try:
            apply_config(verb, read_config(found.config))
        except ValueError as err:
            verb.error(f"--config {found.config}: {err}")
    return parser.parse_args(argv)


def read_config(path: str) -> dict:
    """The option mapping in a YAML or JSON file (JSON is YAML too, but its errors read better as JSON)."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ValueError(f"cannot read it ({err.strerror})") from None
    try:
        values = json.loads(text) if path.lower().endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"not valid {'JSON' if path.lower().endswith('.json') else 'YAML'}: {err}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError("expected a mapping of option names to values, e.g. 'batch_size: 16'")
    return values


def apply_config(verb: argparse.ArgumentParser, values: dict) -> None:
    """Make ``values`` the defaults of ``verb``'s options (converted and checked as on the command line)."""
    options = {}
    for action in verb._actions:
        if action.option_strings and action.dest not in NOT_OPTIONS:
            for name in action.option_strings:
                options[name.lstrip("-").replace("-", "_")] = action
    defaults = {}
    for key, value in values.items():
        action = options.get(str(key).replace("-", "_"))
        if action is None:
            raise ValueError(f"unknown option {key!r}; this command takes: "
                             f"{', '.join(sorted({a.dest for a in options.values()}))}")
        defaults[action.dest] = _convert(action, key, value)
        action.required = False
    verb.set_defaults(**defaults)


def _convert(action: argparse.Action, key, value):
    if value is None:  # null: unset, as when the option is not given (what --print-config writes for those)
        return None
    if action.nargs == 0:  # a flag
        if not isinstance(value, bool):
            raise ValueError(f"{key}: a flag takes true or false, got {value!r}")
        return value
    many = action.nargs in ("+", "*")
    items = value if isinstance(value, list) and many else [value]
    out = []
    for item in items:
        if isinstance(item, str) and action.type is not None:
            try:
                item = action.type(item)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
                raise ValueError(f"{key}: cannot read {item!r} ({err})") from None
        if action.choices is not None and item not in action.choices:
            raise ValueError(f"{key}: {item!r} is not one of {', '.join(map(str, action.choices))}")
        out.append(item)
    return out if many else out[0]


def resolved(args: argparse.Namespace) -> dict:
    """Every option of the run, as a --config file holds them."""
    return {k: v for k, v in vars(args).items() if k not in NOT_OPTIONS and not callable(v)}


def config_text(args: argparse.Namespace) -> str:
    return yaml.safe_dump(resolved(args), sort_keys=False, allow_unicode=True)


def _verb_parser(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Optional[argparse.ArgumentParser]:
    """The sub-command parser the command line names (its first word that is a command)."""
    for action in parser._actions:
        if isinstance(action.choices, dict):
            return next((action.choices[w] for w in argv if w in action.choices), None)
    return None
