"""Issue 26: the memory plan (``unlearn-fast plan``) of Llama-3.2-1B, Llama-3.1-8B and Qwen2.5-7B at 8 × 1024.

    python benchmarks/plan_shapes.py [--batch-size 8] [--max-length 1024] [--rows 1000]

The three models' configs are built in code with their published sizes (hidden, intermediate, blocks,
heads, key-value heads, vocabulary; Llama-3.2-1B ties its embeddings), so nothing is downloaded, and
:mod:`unlearn_fast.train.plan` estimates one training step on a GPU (bf16 base, CUDA context
included) with the default unlearning layers (rank d / 16 after every block) and 1000 training rows in
the teacher cache: as given, with each saving (gradient checkpointing, ``--teacher-cache cpu``,
``--teacher-cache off``) and with checkpointing + the cache in CPU memory; then, per budget (40 GiB,
80 GiB), the cheapest settings ``plan --memory`` proposes. Estimates, not measurements: the numbers
depend on the code and the shapes only (tests/train/test_plan.py holds the estimate within 25 % of
a measured CPU step).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))  # results_io

from transformers import LlamaConfig, Qwen2Config  # noqa: E402

from unlearn_fast.model.layers import LayerConfig  # noqa: E402
from unlearn_fast.train.plan import GiB, PlanSettings, estimate, fit, model_shape  # noqa: E402
import results_io  # noqa: E402

# the published sizes (config.json of each model on the Hub, transcribed)
SHAPES = {
    "Llama-3.2-1B": (LlamaConfig, dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                       num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                       vocab_size=128256, tie_word_embeddings=True, rms_norm_eps=1e-5,
                                       rope_theta=500000.0, max_position_embeddings=131072)),
    "Llama-3.1-8B": (LlamaConfig, dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                       num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                       vocab_size=128256, tie_word_embeddings=False, rms_norm_eps=1e-5,
                                       rope_theta=500000.0, max_position_embeddings=131072)),
    "Qwen2.5-7B": (Qwen2Config, dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                     tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1000000.0,
                                     max_position_embeddings=131072, use_sliding_window=False)),
}
# the savings compared, as changes to the settings (the name is the unlearn flags)
VARIANTS = {
    "as given": {},
    "--gradient-checkpointing": {"gradient_checkpointing": True},
    "--teacher-cache cpu": {"teacher_cache": "cpu"},
    "--teacher-cache off": {"teacher_cache": "off"},
    "--gradient-checkpointing --teacher-cache cpu": {"gradient_checkpointing": True, "teacher_cache": "cpu"},
}
BUDGETS = {"40GiB": 40 * GiB, "80GiB": 80 * GiB}


def gib(n: float) -> float:
    return round(n / GiB, 2)


def plan_row(name: str, params: int, label: str, plan) -> dict:
    p = plan.parts
    return {"model": name, "params_b": round(params / 1e9, 2), "settings": label,
            "peak_gib": gib(plan.total), "base_gib": gib(p["frozen base"]),
            "layers_adamw_gib": gib(p["unlearning layers + AdamW"]), "teacher_cache_gib": gib(p["teacher cache"]),
            "activations_gib": gib(p["activations for the backward"]), "working_gib": gib(p["working memory"]),
            "head_chunk_gib": gib(p["loss-head chunk"]), "cache_off_device_gib": gib(sum(plan.elsewhere.values())),
            "tflop_step": round(plan.flops["step"] / 1e12, 1),
            **{f"fits_{b.lower()}": plan.fits(m) for b, m in BUDGETS.items()}}


def rows_for(name: str, config, settings: PlanSettings) -> list[dict]:
    shape = model_shape(config, LayerConfig())
    rows = [plan_row(name, shape.params, label, estimate(shape, replace(settings, **change)))
            for label, change in VARIANTS.items()]
    for budget, memory in BUDGETS.items():
        best = fit(shape, settings, memory)
        label = f"plan --memory {budget}: " + (best.settings.flags() if best else "does not fit")
        if best is not None:
            rows.append(plan_row(name, shape.params, label, best))
        else:
            rows.append({"model": name, "params_b": round(shape.params / 1e9, 2), "settings": label})
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'model':14}{'settings':62}{'peak':>8}{'base':>7}{'acts':>7}{'cache':>7}{'off-dev':>8}{'TFLOP':>7}  40G 80G"
    print(head)
    for r in rows:
        if "peak_gib" not in r:
            print(f"{r['model']:14}{r['settings']:62}")
            continue
        print(f"{r['model']:14}{r['settings']:62}{r['peak_gib']:8.1f}{r['base_gib']:7.1f}{r['activations_gib']:7.1f}"
              f"{r['teacher_cache_gib']:7.1f}{r['cache_off_device_gib']:8.1f}{r['tflop_step']:7.0f}  "
              f"{'yes' if r['fits_40gib'] else 'no':>3} {'yes' if r['fits_80gib'] else 'no':>3}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=8, help="rows per forward pass, per set (default 8)")
    ap.add_argument("--max-length", type=int, default=1024, help="tokens per row (default 1024)")
    ap.add_argument("--rows", type=int, default=1000, help="training rows in the teacher cache (default 1000)")
    results_io.add_argument(ap)
    args = ap.parse_args(argv)
    settings = PlanSettings(batch_size=args.batch_size, max_length=args.max_length, rows=args.rows,
                            device="cuda", dtype="bfloat16")
    rows = []
    for name, (kind, sizes) in SHAPES.items():
        rows += rows_for(name, kind(**sizes), settings)
    print(f"batch {args.batch_size} x {args.max_length} tokens per set (mixed schedule: "
          f"{settings.rows_per_forward} rows per forward), bf16 base on a GPU, rank d/16 on every block, "
          f"{args.rows} rows cached; GiB (1024^3 bytes)\n")
    print_table(rows)
    where = results_io.results_dir(args.results)
    if where:
        notes = (f"Estimates from the configs (unlearn_fast.train.plan), not measurements: batch {args.batch_size} "
                 f"x {args.max_length} tokens per set, mixed schedule ({settings.rows_per_forward} rows per forward), "
                 f"bf16 base on a GPU with the CUDA context, rank d/16 on every block, {args.rows} rows in the "
                 "teacher cache; the fit rows are what plan --memory proposes.")
        machine = {**results_io.machine(), "description": "estimate (no hardware involved)"}
        path = results_io.write_results(where, results_io.make_results(
            "plan_shapes", rows, results_io.command_line(__file__, argv), notes, machine_info=machine))
        print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
