"""Issue 31 item 3 / issue 27: the forget target, default ``bound`` against ``heldout``, on the demo's split.

    python benchmarks/unlearning/forget_target.py [--seeds 0 1] [--targets bound heldout]

SmolLM2-135M-Instruct and the sets of ``unlearn-fast demo`` (:func:`unlearn_fast.demo.build_sets`, split seed
0: forget 5 capitals, retain 35, hold out 17) with the demo's recipe (rank 16 on the top 8 blocks, 6 epochs,
lr 2e-3, α = 0.8, γ = 0.2, guard on); per training seed and forget target one run of ``unlearn`` with the
held-out facts as ``heldout``. Target ``unknown`` (LMs: "how far a never-seen fact sits"): the bounds
of :func:`unlearn_fast.train.objective.heldout_bounds` with the original's mean loss on the capitals it does
*not* know as the reference level instead of the held-out (known) facts' loss. A row: accuracies after (%), the forget / held-out answer loss after, general
perplexity after, the bounds used, whether the over-forgetting warning fired, and the update time.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.append(str(ROOT / "benchmarks"))  # results_io

from unlearn_fast.api import unlearn  # noqa: E402
from unlearn_fast.demo import build_sets, capital_example, capital_facts  # noqa: E402
from unlearn_fast.eval.evaluation import mean_loss  # noqa: E402
from unlearn_fast.eval.general_text import GENERAL_TEXT  # noqa: E402
from unlearn_fast.io.base_model import load_model  # noqa: E402
from unlearn_fast.model.layers import LayerConfig  # noqa: E402
from unlearn_fast.train.encoding import encode, pad_token_id  # noqa: E402
from unlearn_fast.train.objective import ObjectiveConfig, heldout_bounds  # noqa: E402
from unlearn_fast.train.trainer import TrainConfig  # noqa: E402
import results_io  # noqa: E402


def pct(value):
    return None if value is None else round(100 * value, 1)


def unknown_level(model, tokenizer, sets) -> ObjectiveConfig:
    """The demo's objective with heldout_bounds at the original's loss on the capitals it does not know."""
    known = {e.prompt for rows in sets.values() for e in rows}
    unknown = [capital_example(c, k) for c, k in capital_facts()]
    unknown = [e for e in unknown if e.prompt not in known]
    pad = pad_token_id(tokenizer)

    def level(examples):
        return mean_loss(model, "causal", encode(examples, tokenizer, "causal", forget=False, name="facts",
                                                 model_config=model.config), pad)

    forget_loss, unknown_loss = level(sets["forget"]), level(unknown)
    print(f"unknown capitals: {len(unknown)}, loss {unknown_loss:.3f} nats per token (forget {forget_loss:.3f})",
          flush=True)
    return heldout_bounds(ObjectiveConfig(), forget_loss, unknown_loss)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default 0 1)")
    ap.add_argument("--targets", nargs="+", default=["bound", "heldout"], choices=["bound", "heldout", "unknown"],
                    help="forget targets (default: bound heldout)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    results_io.add_argument(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    original, tokenizer, name = load_model("smollm2", device="cpu")
    sets = build_sets(original, tokenizer, log=print)
    print({k: len(v) for k, v in sets.items()}, flush=True)
    where = results_io.results_dir(args.results)
    objectives = {t: ObjectiveConfig(forget_target=t) for t in ("bound", "heldout")}
    if "unknown" in args.targets:
        objectives["unknown"] = unknown_level(original, tokenizer, sets)
    rows, before = [], None
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")  # one file per run
    for seed in args.seeds:
        for target in args.targets:
            model = copy.deepcopy(original)
            r = unlearn(model, tokenizer, sets["forget"], sets["retain"], model_name=name, heldout=sets["held_out"],
                        general_text=GENERAL_TEXT, layers=LayerConfig(rank=16, blocks=8),
                        objective=objectives[target],
                        training=TrainConfig(epochs=6, batch_size=8, lr=2e-3, seed=seed, progress=False),
                        log=lambda *a, **k: None)
            before = r.metrics["before"]
            a, obj = r.metrics["after"], r.manifest["objective"]
            row = {"target": target, "seed": seed,
                   "forget_acc_pct": pct(a["forget_accuracy"]), "retain_acc_pct": pct(a["retain_accuracy"]),
                   "heldout_acc_pct": pct(a["heldout_accuracy"]),
                   "forget_loss": round(a["forget_loss"], 3), "heldout_loss": round(a["heldout_loss"], 3),
                   "general_ppl": round(a["general_perplexity"], 2),
                   "lm_bound": round(obj["forget_lm_bound"], 3), "kl_bound": round(obj["forget_kl_bound"], 3),
                   "over_forgetting": any(w.startswith("over-forgetting") for w in r.manifest["warnings"]),
                   "time_s": round(r.training.update_time_s, 1)}
            rows.append(row)
            print(row, flush=True)
            del model
            if where:
                notes = (f"before: forget {pct(before['forget_accuracy'])} %, retain {pct(before['retain_accuracy'])} %,"
                         f" held-out {pct(before['heldout_accuracy'])} %, forget loss {before['forget_loss']:.3f}, "
                         f"held-out loss {before['heldout_loss']:.3f}, general ppl {before['general_perplexity']:.2f};"
                         f" demo split (seed 0) of forget {len(sets['forget'])} / retain {len(sets['retain'])} / "
                         f"held out {len(sets['held_out'])}; {args.threads} threads; "
                         f"whole run {time.perf_counter() - started:.0f} s")
                path = results_io.write_results(where, results_io.make_results(
                    "forget_target", rows, results_io.command_line(__file__, argv), notes, date=date))
    if where and rows:
        print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
