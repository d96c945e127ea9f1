"""Whole-step table: naive vs reference vs fused vs fused + warm cache (prints a table, writes JSON).

GPU (default; ≤ 5 minutes): a Llama-3.2-1B-shaped model with random weights (16 blocks, d = 2048,
V = 128256, tied head), bf16, batch 8 × 1024, a rank-128 unlearning layer after every MLP:

    python benchmarks/gpu_step.py --out step.json

CPU: the real SmolLM2-135M (fp32, 8 × 128, rank 32 after every block), the issue's CPU shape:

    python benchmarks/gpu_step.py --cpu --steps 2 --out step_cpu.json
    python benchmarks/gpu_step.py --cpu --steps 5 --modes naive fused+cache --interleave   # robust ratio
    python benchmarks/gpu_step.py --cpu --steps 5 --modes naive fused+cache --interleave --trunk-ab  # + trunk off

Script check without a GPU (the GPU model's code path, tiny and on the CPU, bf16):

    python benchmarks/gpu_step.py --dry-run --steps 1 --out /tmp/step.json

The GPU figures are unmeasured until this runs on a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from whole_step import ALL_MODES, MODES, StepRunner, make_rows, prepare, time_interleaved, time_steps  # noqa: E402

from unlearn_fast.io.atomic import write_json  # noqa: E402
from unlearn_fast.model.layers import unlearning_parameters  # noqa: E402
import results_io  # noqa: E402


def matmul_rate(device, dtype, n=8192, reps=10) -> float:
    """Measured dense matmul FLOP/s on this device (the denominator of MFU)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    torch.cuda.synchronize() if device.type == "cuda" else None
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize() if device.type == "cuda" else None
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def build_model(args):
    if args.cpu:
        from unlearn_fast.io.base_model import load_model

        model, _, _ = load_model("smollm2", device="cpu")
        return model
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8)
    if args.dry_run:
        shape = dict(vocab_size=1031, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.eval()


def model_flops_per_step(model, tokens: int, cached: bool) -> float:
    """Forward ≈ 2·params·tokens per pass (head included); backward to the inputs ≈ one forward."""
    params = sum(p.numel() for p in model.parameters())
    passes = 2 if cached else 3  # (teacher +) student forward + backward to the inputs
    return 2 * params * tokens * passes


def time_sequential(model, rows, variants, steps: int, device, save=lambda results: None) -> list[dict]:
    """Each (mode, fused_trunk) variant on its own, with its peak memory on a GPU. A variant that raises
    is reported as {"mode", "error"} and the others still run: a short GPU lease gets its table even if
    one kernel fails there. A fused mode that fails with the fused trunk on is retried with it off (the
    Triton trunk kernels are the newest), unless that variant is on the list anyway. Every variant starts
    from the same layer weights, so their first steps' losses (``first_loss``) must agree: the check
    that the fast paths compute the naive loss on this device. ``save(results)`` after each variant."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = [p.detach().clone() for p in unlearning_parameters(model)]
    results, queue = [], list(variants)
    while queue:
        mode, trunk = queue.pop(0)
        with torch.no_grad():
            for p, p0 in zip(unlearning_parameters(model), start):
                p.copy_(p0)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        runner = None
        try:
            runner = StepRunner(model, rows, mode, fused_trunk=trunk)
            r = time_steps(runner, steps, sync)
            if device.type == "cuda":
                r["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        except Exception as err:  # noqa: BLE001 - reported in the table and the JSON, then the next variant
            traceback.print_exc()
            r = {"mode": StepRunner.label_of(mode, trunk), "error": f"{type(err).__name__}: {err}".splitlines()[0][:300]}
            if trunk and mode.startswith("fused") and (mode, False) not in variants:
                queue.insert(0, (mode, False))
        finally:
            if runner is not None:
                runner.close()
        results.append(r)
        print(f"{r['mode']}: {r.get('error') or format(1e3 * r['s_per_step'], '.1f') + ' ms/step'}", flush=True)
        save(results)
        del runner
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="the CPU shape with the real SmolLM2")
    parser.add_argument("--dry-run", action="store_true", help="the GPU code path on a tiny model on the CPU")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=ALL_MODES,
                        help="modes to time (fused+cache+compile is optional: it compiles every block first)")
    parser.add_argument("--blocks", default="all",
                        help="blocks that carry a layer: 'all' (default, the issues' shape) or N, the top N "
                             "(the demo's recipe uses 8): below the lowest layer the fused modes share the "
                             "trunk and skip the backward, which the naive loop cannot; MFU is left out then")
    parser.add_argument("--interleave", action="store_true",
                        help="run the modes' steps in turn (one step of each, --steps times) and report each "
                             "mode's median and minimum: on a shared machine every mode sees the same load, so "
                             "the ratios hold when absolute times drift (no peak memory in this mode)")
    parser.add_argument("--trunk-ab", action="store_true",
                        help="also run each fused mode with the fused trunk ops off (labelled '(no fused "
                             "trunk)'), to measure what the RMSNorm / SwiGLU kernels buy in the same run")
    parser.add_argument("--out", default="whole_step.json")
    results_io.add_argument(parser)
    args = parser.parse_args(argv)
    if not (args.cpu or args.dry_run) and not torch.cuda.is_available():
        parser.error("no GPU: use --cpu for the CPU shape, or --dry-run")
    if args.interleave and any(m.endswith("+compile") for m in args.modes):
        parser.error("--interleave runs every mode on one model: fused+cache+compile would compile them all")
    device = torch.device("cpu" if args.cpu or args.dry_run else "cuda")
    args.device = device
    blocks = "all" if args.blocks == "all" else int(args.blocks)
    model = prepare(build_model(args), rank=32 if args.cpu else 16 if args.dry_run else 128, blocks=blocks)
    length = 128 if args.cpu else 24 if args.dry_run else 1024
    rows = make_rows(model.config.vocab_size, rows=8, length=length)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rate = matmul_rate(device, next(model.parameters()).dtype, n=8192 if device.type == "cuda" else 2048 if args.cpu else 256)
    variants = [(mode, True) for mode in args.modes]
    if args.trunk_ab:
        variants += [(mode, False) for mode in args.modes if mode.startswith("fused")]
    if args.interleave:
        results = time_interleaved([StepRunner(model, rows, mode, fused_trunk=trunk) for mode, trunk in variants],
                                   args.steps, sync)
    else:
        results = time_sequential(model, rows, variants, args.steps, device,
                                  lambda results: write_report(args.out, device, rate, args.blocks, results))
    timed = [r for r in results if "error" not in r]
    for r in timed:
        r["mfu"] = (model_flops_per_step(model, r["tokens"], r["mode"].startswith("fused+cache")) / r["s_per_step"]
                    / rate if blocks == "all" else float("nan"))
    naive = next((r for r in timed if r["mode"] == "naive"), None)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; "
          f"measured matmul rate {rate / 1e12:.2f} TFLOP/s; torch {torch.__version__}; layers on {args.blocks} blocks")
    if args.interleave:
        print(f"interleaved: {args.steps} steps of each mode in turn; ms/step and × naive from the medians")
    print(f"{'mode':30}{'ms/step':>10}{'tokens/s':>11}{'× naive':>9}{'MFU':>7}{'GiB':>8}"
          + (f"{'min ms':>10}{'× naive (min)':>15}" if args.interleave else f"{'1st loss':>11}{'rel. diff':>11}"))
    for r in results:
        if "error" in r:
            print(f"{r['mode']:30}failed: {r['error']}")
            continue
        speedup = naive["s_per_step"] / r["s_per_step"] if naive else float("nan")
        line = (f"{r['mode']:30}{1e3 * r['s_per_step']:10.1f}{r['tokens_per_s']:11.0f}{speedup:9.2f}"
                f"{100 * r['mfu']:6.1f}%{r.get('peak_gib', float('nan')):8.2f}")
        if args.interleave:
            line += f"{1e3 * r['s_min']:10.1f}{(naive['s_min'] / r['s_min'] if naive else float('nan')):15.2f}"
        else:  # the first step's loss, every variant from the same weights: vs naive's
            r["first_loss_rel_diff"] = (abs(r["first_loss"] - naive["first_loss"]) / abs(naive["first_loss"])
                                        if naive and naive["first_loss"] else float("nan"))
            line += f"{r['first_loss']:11.5g}{r['first_loss_rel_diff']:11.1e}"
        print(line)
    write_report(args.out, device, rate, args.blocks, results)
    where = results_io.results_dir(args.results, args.dry_run)
    if where:
        notes = (f"{'cpu' if device.type == 'cpu' else torch.cuda.get_device_name()}, "
                 f"{next(model.parameters()).dtype}; matmul rate {rate / 1e12:.2f} TFLOP/s; layers on {args.blocks} "
                 f"blocks; {args.steps} steps" + ("; interleaved: medians and minima" if args.interleave else ""))
        path = results_io.write_results(where, results_io.make_results(
            "whole_step", results_rows(results), results_io.command_line(__file__, argv), notes))
        print(f"results: {path}")


def results_rows(results) -> list[dict]:
    """The table's rows for the results file (seconds, × naive from the medians / minima)."""
    sig = results_io.sig
    naive = next((r for r in results if r["mode"] == "naive" and "error" not in r), None)
    rows = []
    for r in results:
        if "error" in r:
            rows.append({"mode": r["mode"], "error": r["error"]})
            continue
        row = {"mode": r["mode"], "s_per_step": sig(r["s_per_step"]),
               "x_naive": sig(naive["s_per_step"] / r["s_per_step"], 3) if naive else None}
        if "s_min" in r:
            row.update(s_min=sig(r["s_min"]), x_naive_min=sig(naive["s_min"] / r["s_min"], 3) if naive else None)
        row.update(tokens_per_s=round(r["tokens_per_s"]), mfu_pct=round(100 * r["mfu"], 1),
                   peak_gib=sig(r.get("peak_gib"), 3))
        if "first_loss_rel_diff" in r:
            row.update(first_loss=sig(r["first_loss"], 6), first_loss_rel_diff=sig(r["first_loss_rel_diff"], 2))
        rows.append(row)
    return rows


def write_report(path, device, rate, blocks, results) -> None:
    write_json(path, {"device": str(device), "matmul_rate": rate, "blocks": blocks, "results": results}, indent=2)


if __name__ == "__main__":
    main()
