"""Issue 27 / issue 31 item 3: where a forgotten fact stops being pushed, and what that costs other facts.

    python benchmarks/unlearning/forget_target.py [--split capitals|reverse] [--seeds 0 1 2 3 4]
        [--targets bounds margin-penalty margin-only penalty-only heldout unknown] [--epochs 12]

SmolLM2-135M-Instruct, raw prompt + response (no chat template, as the demo). Splits:
- ``capitals``: the demo's (:func:`unlearn_fast.demo.build_sets`, split seed 0: forget the capitals of France,
  Japan, Italy, Germany, Spain; retain 2/3 of the other known capitals; hold out 1/3);
- ``reverse``: "<capital> is the capital of" -> country, the facts of that kind the model knows; forget 10
  (a seeded draw), retain 2/3 of the rest, hold out 1/3; the known capitals (forward facts) are a second
  held-out set of another kind.
Per training seed and target one ``unlearn`` run with rank 16 on the top 8 blocks, lr 2e-3, batch 8 and
``--epochs``. Targets (objective variants):
- ``bounds``: the library's default (bounds 5 / 5 nats, no forget margin, no retained-output penalty);
- ``margin-penalty``: forget margin 1 nat + retained-output penalty 10 (the demo's until the forget routes);
- ``margin-penalty-routes``: the demo's: those two + forget routes 4 (the student's detours to a forgotten
  answer, alone and after retained facts, trained as extra forgotten rows);
- ``margin-routes``: forget margin + forget routes, no penalty;
- ``margin-only`` / ``penalty-only``: one of the two;
- ``heldout``: forget_target="heldout" (bounds from the held-out facts' loss), no margin, no penalty;
- ``unknown``: the heldout bounds at the original's loss on the facts of that kind it does *not* know;
- ``matched``: forget_target="matched" (each forgotten fact pushed to the held-out known facts' loss of
  the same rank), no margin, no penalty;
- ``matched-unknown``: the same, matched to the facts of that kind the model does not know
  (``target_reference``; those not among the 40 non-members of the membership-inference figure).
A row: accuracies after (%), forget accuracy under three paraphrases of each forgotten prompt and under a
few-shot prefix of three retained facts, the answer losses, general perplexity, membership-inference AUC
(LOSS: per-row mean answer loss, higher loss = non-member) of the forgotten facts against the held-out
known facts and against 40 facts of the kind the model never knew (what a model that never saw the
forgotten facts would give them), the over-forgetting warning and the update time.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import random
import sys
import time
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.append(str(ROOT / "benchmarks"))  # results_io

from unlearn_fast.api import unlearn  # noqa: E402
from unlearn_fast.demo import build_sets, capital_example, capital_facts  # noqa: E402
from unlearn_fast.eval.evaluation import answer_hits, mean_loss  # noqa: E402
from unlearn_fast.eval.general_text import GENERAL_TEXT  # noqa: E402
from unlearn_fast.io.base_model import load_model  # noqa: E402
from unlearn_fast.model.layers import LayerConfig  # noqa: E402
from unlearn_fast.train.data import Example  # noqa: E402
from unlearn_fast.train.encoding import encode, pad_token_id  # noqa: E402
from unlearn_fast.train.objective import ObjectiveConfig, heldout_bounds  # noqa: E402
from unlearn_fast.train.trainer import TrainConfig  # noqa: E402
import results_io  # noqa: E402

CHAT = "none"  # raw prompt + response, as the demo
BATCH = 8  # rows per set and step, the demo's
OFF = dict(forget_margin=None, retain_output_weight=0.0)
OBJECTIVES = {
    "bounds": ObjectiveConfig(**OFF),  # the library's default
    "margin-penalty": ObjectiveConfig(forget_margin=1.0, retain_output_weight=10.0),
    # the demo's: the student's detours to a forgotten answer trained on too (forget_routes)
    "margin-penalty-routes": ObjectiveConfig(forget_margin=1.0, retain_output_weight=10.0, forget_routes=4),
    "margin-routes": ObjectiveConfig(forget_margin=1.0, forget_routes=4, retain_output_weight=0.0),
    "margin-only": ObjectiveConfig(forget_margin=1.0, **{k: v for k, v in OFF.items() if k != "forget_margin"}),
    "penalty-only": ObjectiveConfig(retain_output_weight=10.0, forget_margin=None),
    "heldout": ObjectiveConfig(forget_target="heldout", **OFF),
    "matched": ObjectiveConfig(forget_target="matched", **OFF),
    # matched to the facts of the kind the model does not know (target_reference), not the held-out ones
    "matched-unknown": ObjectiveConfig(forget_target="matched", **OFF),
}
# three paraphrases of "The capital of X is" and of "C is the capital of"
CAPITAL_PARAPHRASES = ("The capital city of {x} is", "{x}'s capital is", "The seat of government of {x} is")
REVERSE_PARAPHRASES = ("{x} is the capital city of", "{x} is the capital of the country of",
                       "The city of {x} is the capital of")


def pct(value):
    return None if value is None else round(100 * value, 1)


def per_row_losses(model, tokenizer, examples) -> list[float]:
    pad = pad_token_id(tokenizer)
    return [mean_loss(model, "causal", encode([e], tokenizer, "causal", forget=False, name="fact",
                                               model_config=model.config, chat_template=CHAT), pad)
            for e in examples]


def level(model, tokenizer, examples) -> float:
    return mean_loss(model, "causal", encode(examples, tokenizer, "causal", forget=False, name="facts",
                                             model_config=model.config, chat_template=CHAT),
                     pad_token_id(tokenizer))


def reverse_facts() -> list[Example]:
    """"<capital> is the capital of" -> country (the country's other names as answers)."""
    return [Example(prompt=f"{capital} is the capital of", response=country) for country, capital in capital_facts()]


def build_split(split: str, model, tokenizer) -> tuple[dict, list, list, tuple]:
    """(sets, unknown facts of the kind, held-out facts of another kind, paraphrase templates)."""
    capitals = build_sets(model, tokenizer, log=print, chat_template=CHAT)
    if split == "capitals":
        known = {e.prompt for rows in capitals.values() for e in rows}
        unknown = [e for e in (capital_example(c, k) for c, k in capital_facts()) if e.prompt not in known]
        return capitals, unknown, [], CAPITAL_PARAPHRASES
    facts = reverse_facts()
    hits = answer_hits(model, tokenizer, facts, chat_template=CHAT)
    known = [e for e, h in zip(facts, hits) if h]
    unknown = [e for e, h in zip(facts, hits) if not h]
    print(f"the model knows {len(known)} of {len(facts)} reverse facts (capital -> country)", flush=True)
    random.Random(0).shuffle(known)
    forget, others = known[:10], known[10:]
    sets = {"forget": forget, "held_out": others[: len(others) // 3], "retain": others[len(others) // 3:]}
    other_kind = [e for rows in capitals.values() for e in rows]
    return sets, unknown, other_kind, REVERSE_PARAPHRASES


def subject(example: Example, split: str) -> str:
    return example.prompt.split(" of ", 1)[1][:-3] if split == "capitals" else example.prompt[: -len(" is the capital of")]


def probes(sets: dict, split: str, templates: tuple) -> tuple[list, list]:
    """The forgotten facts under each paraphrase, and under a few-shot prefix of three retained facts."""
    paraphrased = [dataclasses.replace(e, prompt=t.format(x=subject(e, split)))
                   for e in sets["forget"] for t in templates]
    shots = " ".join(f"{e.prompt} {e.response}." for e in sets["retain"][:3])
    prefixed = [dataclasses.replace(e, prompt=f"{shots} {e.prompt}") for e in sets["forget"]]
    return paraphrased, prefixed


def accuracy(model, tokenizer, examples) -> float | None:
    if not examples:
        return None
    return pct(sum(answer_hits(model, tokenizer, examples, chat_template=CHAT)) / len(examples))


def run_eul(model, tokenizer, sets: dict, name: str, objective: ObjectiveConfig, epochs: int, seed: int,
            batch_size: int = BATCH, **kwargs):
    """One ``unlearn`` run of this benchmark's recipe on ``model`` (in place): rank 16 on the top 8 blocks,
    lr 2e-3, ``batch_size`` rows per set and step (:data:`BATCH`), ``epochs`` epochs, training seed ``seed``; ``kwargs``
    go to ``unlearn``."""
    return unlearn(model, tokenizer, sets["forget"], sets["retain"], model_name=name, heldout=sets["held_out"],
                   general_text=GENERAL_TEXT, layers=LayerConfig(rank=16, blocks=8), objective=objective,
                   chat_template=CHAT,
                   training=TrainConfig(epochs=epochs, batch_size=batch_size, lr=2e-3, seed=seed, progress=False),
                   log=lambda *a, **k: None, **kwargs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=["capitals", "reverse"], default="capitals")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds (default 0-4)")
    ap.add_argument("--targets", nargs="+", default=["bounds", "margin-penalty-routes"],
                    choices=[*OBJECTIVES, "unknown"], help="objective variants (default: bounds margin-penalty-routes)")
    ap.add_argument("--epochs", type=int, default=12, help="training epochs (default 12, the demo's)")
    ap.add_argument("--batch-size", type=int, default=BATCH,
                    help=f"rows per set and step (default {BATCH}, the demo's); another size is named in each row's target")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    results_io.add_argument(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    original, tokenizer, name = load_model("smollm2", device="cpu")
    sets, unknown, other_kind, templates = build_split(args.split, original, tokenizer)
    print({k: len(v) for k, v in sets.items()}, f"other kind {len(other_kind)}", flush=True)
    paraphrased, prefixed = probes(sets, args.split, templates)
    unknown_sample = random.Random(0).sample(unknown, min(40, len(unknown)))  # never-seen non-members
    unknown_rest = [e for e in unknown if e not in unknown_sample]  # matched-unknown's reference
    objectives = dict(OBJECTIVES)
    if "unknown" in args.targets:
        forget_loss, unknown_loss = level(original, tokenizer, sets["forget"]), level(original, tokenizer, unknown)
        print(f"unknown facts: {len(unknown)}, loss {unknown_loss:.3f} nats per token (forget {forget_loss:.3f})")
        objectives["unknown"] = heldout_bounds(ObjectiveConfig(**OFF), forget_loss, unknown_loss)
    before = {"paraphrase_acc_pct": accuracy(original, tokenizer, paraphrased),
              "fewshot_acc_pct": accuracy(original, tokenizer, prefixed),
              "other_kind_acc_pct": accuracy(original, tokenizer, other_kind),
              "unknown_loss": round(level(original, tokenizer, unknown), 3)}
    print("before:", before, flush=True)
    rows, path = [], None
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")  # one file per run
    where = results_io.results_dir(args.results)
    for seed in args.seeds:
        for target in args.targets:
            model = copy.deepcopy(original)
            extra = {"target_reference": unknown_rest} if target == "matched-unknown" else {}
            r = run_eul(model, tokenizer, sets, name, objectives[target], args.epochs, seed, args.batch_size, **extra)
            a, obj = r.metrics["after"], r.manifest["objective"]
            forget_losses = per_row_losses(model, tokenizer, sets["forget"])
            held_losses = per_row_losses(model, tokenizer, sets["held_out"])
            # members (forgotten) vs non-members (held out): a LOSS attack scores low loss as member
            auc = roc_auc_score([1] * len(forget_losses) + [0] * len(held_losses),
                                [-x for x in forget_losses + held_losses])
            unknown_losses = per_row_losses(model, tokenizer, unknown_sample)
            auc_unknown = roc_auc_score([1] * len(forget_losses) + [0] * len(unknown_losses),
                                        [-x for x in forget_losses + unknown_losses])
            label = target if args.batch_size == BATCH else f"{target} (batch {args.batch_size})"
            row = {"split": args.split, "target": label, "seed": seed,
                   "forget_acc_pct": pct(a["forget_accuracy"]), "retain_acc_pct": pct(a["retain_accuracy"]),
                   "heldout_acc_pct": pct(a["heldout_accuracy"]),
                   "other_kind_acc_pct": accuracy(model, tokenizer, other_kind),
                   "paraphrase_acc_pct": accuracy(model, tokenizer, paraphrased),
                   "fewshot_acc_pct": accuracy(model, tokenizer, prefixed),
                   "forget_loss": round(a["forget_loss"], 3), "heldout_loss": round(a["heldout_loss"], 3),
                   "general_ppl": round(a["general_perplexity"], 2), "mia_auc_loss": round(auc, 2),
                   "mia_auc_vs_unknown": round(auc_unknown, 2),
                   "over_forgetting": any(w.startswith("over-forgetting") for w in r.manifest["warnings"]),
                   "time_s": round(r.training.update_time_s, 1)}
            rows.append(row)
            print(row, flush=True)
            del model
            if where:
                b = r.metrics["before"]
                notes = (f"before: forget {pct(b['forget_accuracy'])} %, retain {pct(b['retain_accuracy'])} %, "
                         f"held-out {pct(b['heldout_accuracy'])} %, paraphrases {before['paraphrase_acc_pct']} %, "
                         f"few-shot {before['fewshot_acc_pct']} %, other kind {before['other_kind_acc_pct']} %, "
                         f"forget loss {b['forget_loss']:.3f}, held-out loss {b['heldout_loss']:.3f}, unknown facts' "
                         f"loss {before['unknown_loss']}, general ppl {b['general_perplexity']:.2f}; split "
                         f"{args.split}: forget {len(sets['forget'])} / retain {len(sets['retain'])} / held out "
                         f"{len(sets['held_out'])} / other kind {len(other_kind)}; {args.epochs} epochs; batch {args.batch_size}; "
                         f"{args.threads} threads; whole run {time.perf_counter() - started:.0f} s")
                path = results_io.write_results(where, results_io.make_results(
                    "forget_target", rows, results_io.command_line(__file__, argv), notes, date=date))
    if path:
        print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
