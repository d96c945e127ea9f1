"""Multi-GPU check of data-parallel and FSDP2-sharded unlearning (one node, torchrun, NCCL).

Runs the same unlearning job three ways and compares them:

1. one process (the reference),
2. ``torchrun --nproc_per_node N`` data parallel,
3. ``torchrun --nproc_per_node N ... --shard-base`` (FSDP2 over the frozen base),

then checks that 2 and 3 reach the reference's unlearning-layer weights and Gram matrices, and
prints a table: update time, tokens/s in total and per GPU, and the modelled communication per
step (unlearning-layer gradients all-reduced under data parallelism, plus the base's
all-gathers under FSDP2). Writes everything as JSON with ``--json``.

On a node with N GPUs (≤ 10 minutes with the defaults; the model is a random-weight Llama and
the tokenizer is character-level, both built here, so nothing is downloaded):

    python benchmarks/multi_gpu_check.py --nproc 8 --json multi_gpu.json
    python benchmarks/multi_gpu_check.py --nproc 8 --shape 1b --dtype bfloat16 --steps 30  # throughput

The equivalence check runs in fp32 (``--dtype float32``, default; a bf16 base gives ~1e-2
differences between batch splits, which is rounding, not a bug; the check then only reports).
On a CPU (gloo), as a smoke test of the script itself:

    python benchmarks/multi_gpu_check.py --nproc 2 --device cpu --shape tiny

Nothing here has run on GPUs yet: the README's "Distributed" table is a model, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import results_io

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # hidden, blocks, intermediate, heads, kv heads, vocab
    "tiny": (64, 4, 128, 4, 2, 128),
    "small": (512, 8, 1536, 8, 4, 128),
    "1b": (2048, 16, 8192, 32, 8, 128256),  # Llama-3.2-1B-shaped (the char tokenizer uses 128 ids)
}


def build(work: Path, shape: str, n_forget: int, n_retain: int, dtype: str) -> None:
    import torch
    import transformers as tf

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import SPECIALS, make_tokenizer

    d, n, ff, heads, kv, vocab = SHAPES[shape]
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=ff, num_hidden_layers=n,
                            num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=1024,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    model = tf.LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(work / "model")
    make_tokenizer("causal").save_pretrained(work / "model")
    assert len(SPECIALS) < 128
    words = ["alpha", "bravo", "delta", "kilo", "lima", "oscar", "tango", "zulu", "river", "stone"]
    for name, count, fmt in (("forget", n_forget, "Secret {i}: the code of vault {i} is"),
                             ("retain", n_retain, "Fact {i}: the colour of house {i} is")):
        with open(work / f"{name}.jsonl", "w") as f:
            for i in range(count):
                answer = " ".join(words[(i * 7 + k) % len(words)] for k in range(1 + i % 4))
                f.write(json.dumps({"prompt": fmt.format(i=i), "response": " " + answer}) + "\n")


def worker(runs_json: str) -> int:
    """Run under torchrun (or alone): seed, then the CLI (the layers' initial weights are rank 0's)."""
    import torch

    from unlearn_fast import cli

    for argv in json.loads(runs_json):
        torch.manual_seed(0)
        rc = cli.main(argv)
        if rc:
            return rc
    return 0


def launch(nproc: int, argv: list[str], env: dict) -> None:
    runs = json.dumps([argv])
    if nproc == 1:
        cmd = [sys.executable, __file__, "--worker", runs]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               __file__, "--worker", runs]
    print("$", " ".join(cmd[:-1]), "'[[...]]'", flush=True)
    subprocess.run(cmd, check=True, env=env)


def compare(reference: Path, other: Path) -> dict:
    from safetensors.torch import load_file

    a = load_file(str(reference / "unlearning_layers.safetensors"))
    b = load_file(str(other / "unlearning_layers.safetensors"))

    def rel(x, y):
        x, y = x.double(), y.double()
        return float((x - y).norm() / x.norm().clamp_min(1e-30))

    layers = [k for k in a if not k.endswith(".gram")]
    grams = [k for k in a if k.endswith(".gram")]
    return {"layers_rel": max(rel(a[k], b[k]) for k in layers), "grams_rel": max(rel(a[k], b[k]) for k in grams)}


def modelled_communication(manifest: dict, world: int, base_bytes: int, shard: bool) -> dict:
    """Bytes each GPU moves per step (ring algorithms): 2(N-1)/N × the fp32 layer gradients for
    the all-reduce; under FSDP2 also 3 × (N-1)/N × the sharded base (teacher forward, student
    forward, student backward re-gather)."""
    params = sum(rec["dim"] * r * 2 + r + rec["dim"] for rec in manifest["layers"]["sites"] for r in rec["ranks"])
    grads = 4 * params
    out = {"layer_gradient_bytes": grads, "allreduce_bytes_per_gpu": 2 * (world - 1) / world * grads}
    if shard:
        out["allgather_bytes_per_gpu"] = 3 * (world - 1) / world * base_bytes
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--nproc", type=int, default=None, help="processes (default: number of GPUs)")
    p.add_argument("--device", default=None, help="cuda (default if available) or cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rank", type=int, default=None, help="unlearning-layer rank (default: d/16)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (rows of each set; default 4×nproc)")
    p.add_argument("--forget", type=int, default=64, help="forget rows")
    p.add_argument("--retain", type=int, default=256, help="retain rows")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--modes", default="reference,ddp,fsdp")
    p.add_argument("--work", help="working directory (default: a temporary one, removed)")
    p.add_argument("--json", help="write the results here")
    results_io.add_argument(p)  # by default a results file for runs on GPUs only
    args = p.parse_args()
    if args.worker is not None:
        return worker(args.worker)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    nproc = args.nproc or (torch.cuda.device_count() if device == "cuda" else 2)
    batch = args.batch_size or 4 * nproc
    work = Path(args.work or tempfile.mkdtemp(prefix="uf_multi_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    try:
        if not (work / "model").is_dir():
            build(work, args.shape, args.forget, args.retain, args.dtype)
        d = SHAPES[args.shape][0]
        common = ["unlearn", "--model", str(work / "model"), "--forget", str(work / "forget.jsonl"),
                  "--retain", str(work / "retain.jsonl"), "--device", device, "--dtype", args.dtype,
                  "--rank", str(args.rank or max(1, d // 16)), "--batch-size", str(batch), "--epochs", "100",
                  "--max-steps", str(args.steps), "--lr", "1e-3", "--no-eval", "--no-progress", "--overwrite"]
        modes = args.modes.split(",")
        results = {}
        for mode in modes:
            world = 1 if mode == "reference" else nproc
            out = work / mode
            launch(world, common + ["--out", str(out)] + (["--shard-base"] if mode == "fsdp" else []), env)
            m = json.loads((out / "manifest.json").read_text())
            wall = max(m["update_time"]["per_rank_s"])
            tokens = m["metrics"]["train_tokens"]
            row = {"world": world, "update_time_s": wall, "per_rank_s": m["update_time"]["per_rank_s"],
                   "tokens": tokens, "tokens_per_s": tokens / wall, "tokens_per_s_per_gpu": tokens / wall / world,
                   "sharded_params": m["distributed"].get("sharded_params", 0)}
            base = row["sharded_params"] * (2 if args.dtype == "bfloat16" else 4)
            row.update(modelled_communication(m, world, base, mode == "fsdp"))
            if mode != "reference" and "reference" in results:
                row.update(compare(work / "reference", out))
            results[mode] = row
        print(f"\n{args.shape} Llama, {args.dtype}, {device}, {nproc} processes, global batch {batch}+{batch} "
              f"rows, {args.steps} steps")
        print(f"{'mode':10}{'ranks':>6}{'update s':>10}{'tok/s':>10}{'tok/s/GPU':>11}{'all-red MB':>11}"
              f"{'all-gat MB':>11}{'layers rel':>12}{'grams rel':>11}")
        for mode, r in results.items():
            print(f"{mode:10}{r['world']:>6}{r['update_time_s']:>10.2f}{r['tokens_per_s']:>10.0f}"
                  f"{r['tokens_per_s_per_gpu']:>11.0f}{r['allreduce_bytes_per_gpu'] / 1e6:>11.2f}"
                  f"{r.get('allgather_bytes_per_gpu', 0) / 1e6:>11.1f}"
                  f"{r.get('layers_rel', float('nan')):>12.2e}{r.get('grams_rel', float('nan')):>11.2e}")
        ok = all(r.get("layers_rel", 0) <= 1e-4 and r.get("grams_rel", 0) <= 1e-4 for r in results.values())
        if args.dtype == "float32":
            print("equivalence (fp32, rel ≤ 1e-4):", "PASS" if ok else "FAIL")
        if args.json:
            Path(args.json).write_text(json.dumps({"shape": args.shape, "dtype": args.dtype, "device": device,
                                                   "nproc": nproc, "batch": batch, "steps": args.steps,
                                                   "results": results}, indent=2))
        where = results_io.results_dir(args.results, dry_run=device != "cuda")
        if where:
            rows = [{"mode": mode, "processes": r["world"], "update_time_s": results_io.sig(r["update_time_s"]),
                     "tokens_per_s": round(r["tokens_per_s"]), "tokens_per_s_per_gpu": round(r["tokens_per_s_per_gpu"]),
                     "allreduce_mb_per_gpu": results_io.sig(r["allreduce_bytes_per_gpu"] / 1e6),
                     "allgather_mb_per_gpu": results_io.sig(r.get("allgather_bytes_per_gpu", 0) / 1e6),
                     "layers_rel": results_io.sig(r.get("layers_rel"), 2),
                     "grams_rel": results_io.sig(r.get("grams_rel"), 2)}
                    for mode, r in results.items()]
            notes = f"{args.shape} Llama, {args.dtype}, {device}, global batch {batch}+{batch} rows, {args.steps} steps"
            path = results_io.write_results(where, results_io.make_results("multi_gpu", rows,
                                                                           results_io.command_line(__file__), notes))
            print(f"results: {path}")
        return 0 if ok or args.dtype != "float32" else 1
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
