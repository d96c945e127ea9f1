"""``unlearn-fast plan``: the peak memory and FLOPs of an unlearning run, from the model's config alone."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, LlamaConfig

from ..errors import ModelError
from ..io.base_model import SMOLLM2_ALIASES
from ..model.layers import LayerConfig
from ..train.plan import (PARTS, SMOLLM2_135M, PlanSettings, candidates, estimate, fit, format_size,
                          model_shape, parse_size)
from ..train.step_cache import TEACHER_CACHES
from .common import BASE_DTYPES, block_spec


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="estimate the peak memory and FLOPs of an unlearning run before loading any weight",
        description="Estimate, from the model's config alone (no weight is loaded), the peak memory of one "
                    "training step by part (frozen base, activations kept for the backward above the lowest "
                    "unlearning layer, loss-head chunk, teacher cache, layers + optimizer) and its FLOPs; with "
                    "--memory, the cheapest settings that fit. Exit status 1 when nothing fits --memory. The "
                    "options mean what they mean for `unlearn`. Causal language models.")
    p.add_argument("--model", required=True,
                   help="local transformers model directory (only its config.json is read), or 'smollm2'")
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda (default cpu): picks the default dtype; cuda adds the CUDA context")
    p.add_argument("--dtype", "--base-dtype", dest="dtype", choices=BASE_DTYPES,
                   help="base model dtype (default: float32 on cpu, bfloat16 on cuda); int8 / nf4 (with --device "
                        "cuda): the base's linear maps quantised by bitsandbytes, the rest and the activations bf16")
    p.add_argument("--batch-size", type=int, default=8,
                   help="rows per forward pass, per set in the mixed schedule (default 8)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per row (default 256)")
    p.add_argument("--accumulate", type=int, default=1, metavar="N", help="micro-batches per optimiser step (default 1)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="estimate with gradient checkpointing (default: off)")
    p.add_argument("--schedule", choices=["mixed", "alternate"], default="mixed",
                   help="mixed (default): each forward holds a batch of each set; alternate: one set")
    p.add_argument("--rank", type=int, help="bottleneck width r (default: hidden size / reduction factor)")
    p.add_argument("--reduction-factor", type=int, default=16, help="d / r when --rank is not given (default 16)")
    p.add_argument("--blocks", type=block_spec, default="all",
                   help="'all' (default), 'top:K' for the top K blocks, or indices like 0,5,11")
    p.add_argument("--rows", type=int, default=1000,
                   help="training rows (forget + retain) the teacher cache holds (default 1000)")
    p.add_argument("--teacher-cache", choices=list(TEACHER_CACHES), default="gpu",
                   help="where the teacher cache is kept, as for `unlearn`: 'gpu' (default) counts it on the "
                        "device; 'cpu' (on a GPU run) and 'disk' count it outside the device estimate; 'off' "
                        "keeps none and adds the teacher's forward to every step")
    p.add_argument("--memory", metavar="SIZE",
                   help="memory available, e.g. 40GiB or 80GB: print the cheapest settings that fit (default: none)")


def load_config(spec: str):
    """The transformers config of ``--model``: read from the directory's config.json (no weights), or
    SmolLM2-135M's for the embedded default."""
    if spec.lower() in SMOLLM2_ALIASES:
        return LlamaConfig(**SMOLLM2_135M)
    if not (Path(spec).expanduser() / "config.json").is_file():
        raise ModelError(f"model not found: {spec!r} is not a directory with a config.json "
                         f"('{SMOLLM2_ALIASES[0]}' names the embedded default)")
    return AutoConfig.from_pretrained(Path(spec).expanduser())


def run(args) -> int:
    memory = parse_size(args.memory) if args.memory else None
    layers = LayerConfig(rank=args.rank, reduction_factor=args.reduction_factor, blocks=args.blocks)
    shape = model_shape(load_config(args.model), layers)
    settings = PlanSettings(batch_size=args.batch_size, max_length=args.max_length, accumulate=args.accumulate,
                            gradient_checkpointing=args.gradient_checkpointing, schedule=args.schedule,
                            device=args.device, dtype=args.dtype, rows=args.rows, teacher_cache=args.teacher_cache)
    plan = estimate(shape, settings)
    blocks = sorted({b for b, _ in shape.sites})
    ranks = sorted({r for _, r in shape.sites})
    print(f"{args.model}: {shape.model_type}, {shape.layers} blocks, d={shape.hidden}, d_ff={shape.intermediate}, "
          f"V={shape.vocab}, {shape.params / 1e6:.1f} M parameters, {settings.dtype} on {settings.device}")
    print(f"unlearning layers: {len(shape.sites)} of rank {'/'.join(map(str, ranks))} on blocks "
          f"{_ranges(blocks)} ({shape.layer_params / 1e6:.2f} M weights)")
    print(f"each forward: {settings.rows_per_forward} rows x {settings.max_length} tokens ({settings.flags()}, "
          f"{settings.schedule} schedule); {settings.accumulate} per optimiser step\n")
    for name in PARTS:
        if name == "CUDA context" and not plan.parts[name]:
            continue
        label = f"{name} ({settings.rows} rows)" if name == "teacher cache" else name
        if name == "teacher cache" and settings.cache_place != "device":
            label = f"{name} ({'off' if settings.teacher_cache == 'off' else settings.cache_place})"
        print(f"  {label:34}{format_size(plan.parts[name]):>12}")
    print(f"  {'estimated peak':34}{format_size(plan.total):>12}")
    for place, size in plan.elsewhere.items():
        print(f"  {'not on the device: teacher cache':34}{format_size(size):>12} in {place} ({settings.rows} rows)")
    print(f"\nFLOPs per optimiser step: {_tflop(plan.flops['step'])} (first epoch, with the teacher's forward: "
          f"{_tflop(plan.flops['first_epoch'])})")
    if not settings.device.startswith("cuda"):
        print("CPU: the tensors' peak; with glibc's default heap the process can hold up to ~1.8x this "
              "(MALLOC_MMAP_THRESHOLD_=131072 keeps it close)")
    if memory is None:
        return 0
    if plan.fits(memory):
        print(f"\nfits in {format_size(memory)} as given")
        return 0
    best = fit(shape, settings, memory)
    if best is not None:
        print(f"\ndoes not fit in {format_size(memory)} as given; fits with {best.settings.flags()} "
              f"(peak {format_size(best.total)}, {_tflop(best.flops['step'])} per step)")
        return 0
    smallest = candidates(shape, settings)[-1]
    print(f"\ndoes not fit in {format_size(memory)} even with every saving ({smallest.settings.flags()}): that "
          f"needs {format_size(smallest.total)}, of which the frozen base {format_size(smallest.parts['frozen base'])}"
          f" and the teacher cache {format_size(smallest.parts['teacher cache'])} on the device. Try fewer or higher --blocks, "
          f"a smaller --max-length, a 16-bit --dtype (int8 / nf4 on CUDA), or --shard-base over several GPUs")
    return 1


def _tflop(flops: float) -> str:
    return f"{flops / 1e12:.3g} TFLOP"


def _ranges(indices: list[int]) -> str:
    """'0-5, 9, 11-12' for [0, 1, 2, 3, 4, 5, 9, 11, 12]."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
