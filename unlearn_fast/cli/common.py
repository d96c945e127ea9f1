"""What the verbs share: the model and data options, reading them back, loading the base model."""

from __future__ import annotations

import argparse
import os
import re

import torch
import transformers

from ..eval.general_text import GENERAL_TEXT, load_general_text
from ..io.base_model import load_model
from ..io.quantised import BASE_QUANTISATIONS
from ..train.data import Columns
from ..train.encoding import CHAT_TEMPLATE_MODES


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default in ``--help``: help that does not name its default already gets
    ``(default: X)`` (``off`` for a flag, ``none`` for an unset option), a required option
    ``(required)``; argparse's ArgumentDefaultsHelpFormatter with the defaults said in words."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or says_default(text):
            return text
        if action.required:
            return text if "required" in text else f"{text} (required)"
        if action.nargs == 0 and action.const is True:  # a store_true flag
            return f"{text} (default: off)"
        if action.default is None:
            return f"{text} (default: none)"
        shown = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


def says_default(text: str) -> bool:
    """Does an option's help name its default (``(default 16)``, ``default: none``, ``'all' (default)``)
    or say that it is required?"""
    return bool(re.search(r"\(default\b|\bdefault:|\bdefault \d|\(required\)", text or ""))


def use_help_formatter(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` and every sub-command's parser below it :class:`HelpFormatter`."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action.choices, dict):  # a sub-command action: name -> parser
            for sub in action.choices.values():
                use_help_formatter(sub)


def quiet_progress() -> None:
    """Silence every progress bar: transformers' (loading and writing weights) and the Hub's.
    The trainer's own bar follows ``TrainConfig.progress``."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    transformers.utils.logging.disable_progress_bar()


def general_text(args):
    """The general text whose perplexity is reported: ``--ppl-text FILE`` or the shipped one."""
    return load_general_text(args.ppl_text) if args.ppl_text else GENERAL_TEXT


def block_spec(value: str):
    """'all', 'top:K' (or a bare K) or a comma list of block indices."""
    value = value.strip().lower()
    if value == "all":
        return "all"
    if value.startswith("top:"):
        return int(value[4:])
    if "," in value:
        return [int(v) for v in value.split(",") if v.strip()]
    return int(value)


def model_verb_parser(sub, name: str, *, help: str, description: str, data_required: bool):
    """A verb's parser with the options every model verb takes: --model/--device/--dtype and the data."""
    p = sub.add_parser(name, help=help, description=description)
    add_model_args(p)
    add_data_args(p, required=data_required)
    return p


def add_data_args(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("data (CSV, JSONL, JSON or Parquet files, or directories written by datasets' "
                             "save_to_disk; TOFU's question / answer columns are found without options)")
    g.add_argument("--forget", "--forgot_data", dest="forget", required=required, metavar="FILE",
                   help="examples to forget")
    g.add_argument("--retain", "--retained_data", dest="retain", required=required, metavar="FILE",
                   help="examples to keep")
    g.add_argument("--text-column", help="column with plain text (default: 'text')")
    g.add_argument("--prompt-column", help="column with prompts (default: 'prompt', with --response-column)")
    g.add_argument("--response-column", help="column with responses (default: 'response')")
    g.add_argument("--label-column", help="column with class labels (default: 'label' if present)")
    g.add_argument("--perturbed-column",
                   help="with prompt/response data: column of wrong answers for the truth ratio, a list of strings "
                        "(a JSON list in a CSV cell, e.g. [\"Rome\", \"Oslo\"]; default: 'perturbed_answer' if present)")
    g.add_argument("--paraphrased-column",
                   help="with prompt/response data: column of paraphrased right answers for the truth ratio "
                        "(default: 'paraphrased_answer' if present, else the response)")
    g.add_argument("--generic-prompts-column",
                   help="with prompt/response data: column of generic prompts, the prompt with the forgotten "
                        "subject replaced by others (one string, or a list; a JSON list in a CSV cell; default: "
                        "'generic_prompts' if present). EUL then forgets only the subject-specific answer tokens "
                        "(see --subject-margin)")
    g.add_argument("--answers-column",
                   help="with prompt/response data: column of other acceptable answers (a list of strings, or one; "
                        "a JSON list in a CSV cell; default: 'answers' if present); a fact counts as known when the "
                        "completion holds the response or any of them, and the strict score (response only) is "
                        "shown beside it")
    g.add_argument("--heldout", metavar="FILE",
                   help="reference set: examples like the forget set that the model knows and nobody asked to "
                        "delete (for a classifier: a labelled test split); its accuracy and loss are reported "
                        "beside forget and retain; unlearn warns of over-forgetting when the forget accuracy "
                        "after is below the lower end of the 95 %% Wilson interval of the held-out accuracy "
                        "after (default: none)")
    g.add_argument("--ppl-text", metavar="FILE",
                   help="plain UTF-8 text, one passage per line, whose perplexity is reported for causal LMs "
                        "(default: a short English text shipped with the package)")
    g.add_argument("--max-length", type=int, default=256, help="tokens kept per example (default 256)")


BASE_DTYPES = ["float32", "bfloat16", "float16", *BASE_QUANTISATIONS]


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="local transformers model directory, or 'smollm2' for the embedded default")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", "--base-dtype", dest="dtype", choices=BASE_DTYPES,
                   help="base model dtype (default: float32 on CPU, bfloat16 on GPU); int8 / nf4: the frozen base "
                        "quantised by bitsandbytes (8-bit, 4-bit NF4) on CUDA, pip install bitsandbytes; the head, "
                        "norms and embeddings stay bf16, the unlearning layers fp32")


def data_columns(args, name: str):
    """The data columns the options name, for the set ``name`` (None: pick automatically)."""
    given = {"text": args.text_column, "prompt": args.prompt_column, "response": args.response_column,
             "label": args.label_column, "perturbed": args.perturbed_column,
             "paraphrased": args.paraphrased_column, "generic_prompts": args.generic_prompts_column,
             "answers": args.answers_column}
    return Columns(**given).for_set(name) if any(given.values()) else None


CHAT_TEMPLATE_HELP = ("prompt/response rows of a causal LM: 'auto' encodes them through the tokenizer's chat template "
                      "where it has one (user turn = prompt, assistant turn = response, the loss on the answer's "
                      "tokens; answers generated after the template's generation prompt), for training and "
                      "evaluation alike; 'none': raw prompt + response")


def add_chat_template_arg(p: argparse.ArgumentParser, default="auto", default_help: str = "") -> None:
    """``--chat-template auto|none`` (see :func:`unlearn_fast.train.encoding.encode`)."""
    p.add_argument("--chat-template", choices=list(CHAT_TEMPLATE_MODES), default=default,
                   help=CHAT_TEMPLATE_HELP + (f" ({default_help})" if default_help else ""))


def load_base(args):
    dtype = args.dtype if args.dtype in BASE_QUANTISATIONS else getattr(torch, args.dtype) if args.dtype else None
    return load_model(args.model, dtype=dtype, device=args.device)


RHO_HELP = ("ridge ρ, relative to the inputs' mean per-feature spread (the mean diagonal of the centred summed "
             "Gram matrix); default 0.03; the bias is not penalised; 0 = exact solve, fails on a singular Gram")
