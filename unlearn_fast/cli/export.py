"""``unlearn-fast export``: a base model with its unlearning layers, as a directory that loads without
this package (``--format hf``: a transformers model directory with its modelling code; ``--format adapters``:
an AdapterHub ``adapters`` bottleneck adapter of the layers alone)."""

from __future__ import annotations

import sys

import torch

from ..api import export
from ..io.adapters_export import ADAPTER_NAME, PLACEMENTS
from ..io.export import AUTO_CLASSES, FORMATS


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="write a model with its unlearning layers as a standalone transformers directory",
        description="Write the base model with the unlearning layers of one artifact, several (their layers run "
                    "summed, as with eval --layers) or a fused one, as a directory that loads where unlearn_fast "
                    "is not installed. --format hf: a transformers model directory (config.json, safetensors "
                    "weights of the base and the layers, tokenizer files, modelling code unlearning_layers.py); "
                    f"load it with {' / '.join(AUTO_CLASSES.values())}.from_pretrained(DIR, trust_remote_code=True). "
                    "The layers' provenance (base model fingerprint, request ids) goes into config.json and "
                    "unlearning_export.json; no data, no Gram matrices. --format adapters: the layers alone as an "
                    "AdapterHub adapters bottleneck adapter (adapter_config.json, pytorch_adapter.bin) for the same base "
                    f"model: adapters.init(model); model.load_adapter(DIR); model.set_active_adapters('{ADAPTER_NAME}'); "
                    f"for {', '.join(PLACEMENTS)} models (others are refused, saying why).")
    p.add_argument("--model", required=True,
                   help="local transformers model directory, or 'smollm2' for the embedded default")
    p.add_argument("--layers", required=True, nargs="+", metavar="DIR",
                   help="unlearning artifact(s) to include; several are summed in each block")
    p.add_argument("--format", default="hf", choices=FORMATS, help="output format (default: hf)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (must not exist)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output of unlearn-fast at --out")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the exported base weights (default: the checkpoint's own; the layers stay float32)")


def run(args) -> int:
    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = export(args.model, args.layers, args.out, format=args.format, overwrite=args.overwrite, dtype=dtype,
                 log=lambda message: print(message, file=sys.stderr))
    print(f"exported {args.model} with {len(args.layers)} artifact(s) to {out} (format {args.format})")
    return 0
