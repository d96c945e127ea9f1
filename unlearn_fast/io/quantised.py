"""A quantised frozen base on CUDA: ``--dtype int8`` or ``--dtype nf4`` (alias ``--base-dtype``).

The base's linear maps are quantised by ``bitsandbytes`` as transformers loads them
(``BitsAndBytesConfig``): ``int8`` is LLM.int8() (one int8 per weight and one fp32 scale per output
row), ``nf4`` 4-bit NormalFloat (two weights a byte and one fp32 absmax per block of
:data:`NF4_BLOCK` weights) with bf16 compute. Everything else stays in bf16: embeddings, norms and
the output head. The head must: the fused loss head reads it as a ``[V, d]`` matrix, which a
bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` weight is not, so its module is named in
``llm_int8_skip_modules`` (see :func:`skip_modules`). The unlearning layers are fp32 as always: only
the frozen base is quantised, and nothing of it is trained.

bitsandbytes and accelerate (transformers needs both to quantise) are optional dependencies (the
``quant`` extra); only their presence is checked here, nothing imports them.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
from typing import Optional

import torch
from torch import nn
from transformers import BitsAndBytesConfig

from ..errors import ModelError

BASE_QUANTISATIONS = ("int8", "nf4")
LABELS = {"int8": "an 8-bit (LLM.int8())", "nf4": "a 4-bit NF4"}
COMPUTE_DTYPE = torch.bfloat16  # the unquantised parts of the base and nf4's matmuls
NF4_BLOCK = 64  # bitsandbytes' 4-bit block: one fp32 absmax per block
INSTALL = "pip install bitsandbytes"


def is_quantised(dtype) -> bool:
    """Whether ``dtype`` (a torch dtype, a string or None) names a quantised base."""
    return isinstance(dtype, str) and dtype in BASE_QUANTISATIONS


def package_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def missing(device=None) -> list[str]:
    """What a quantised base lacks here (empty: nothing): CUDA, bitsandbytes, accelerate, each with
    how to get it. ``device``: the one asked for (None: the default)."""
    out = []
    if device is not None and torch.device(device).type != "cuda":
        out.append(f"CUDA (the device asked for is {torch.device(device).type})")
    elif torch.version.cuda is None:
        out.append(f"CUDA (this torch, {torch.__version__}, is a CPU build)")
    elif not torch.cuda.is_available():
        out.append("CUDA (torch sees no GPU)")
    if not package_available("bitsandbytes"):
        out.append(f"bitsandbytes ({INSTALL})")
    if not package_available("accelerate"):
        out.append("accelerate (pip install accelerate)")
    return out


def check_quantised_base(kind: str, device=None) -> torch.device:
    """The CUDA device a ``kind`` base loads on; a one-line ModelError naming what is missing. Called
    before any weight is read."""
    if kind not in BASE_QUANTISATIONS:
        raise ModelError(f"unknown base quantisation {kind!r}; use one of {', '.join(BASE_QUANTISATIONS)}")
    lacking = missing(device)
    if lacking:
        raise ModelError(f"{LABELS[kind]} base (--dtype {kind}) needs CUDA and bitsandbytes; missing here: "
                         f"{'; '.join(lacking)}. Without a GPU, leave out --dtype {kind} (or use float32 / bfloat16)")
    device = torch.device(device if device is not None else "cuda")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def check_not_prequantised(config, kind: str) -> None:
    """Refuse quantising a checkpoint that already is (GPTQ, AWQ, a saved bitsandbytes model, ...)."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else \
            getattr(quantization, "quant_method", "?")
        raise ModelError(f"the checkpoint is already quantised ({getattr(method, 'value', method)}); --dtype {kind} "
                         "quantises a float checkpoint: leave it out to load this one as it is")


def skip_modules(model: nn.Module) -> list[str]:
    """Modules bitsandbytes must leave unquantised: the output head (the fused loss head reads its
    weight as a bf16 matrix; with tied embeddings it is the embedding table), or a classifier's last
    module. Read from ``model``'s structure, e.g. one built on the meta device."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [name for name, module in model.named_modules() if head is not None and module is head]
    if not names:  # a sequence classifier: its head (score / classifier) holds the last parameters
        last = list(model.named_parameters())[-1][0]
        names = [last.rsplit(".", 1)[0]]
    return names


def bnb_config(kind: str, skip: list[str]) -> BitsAndBytesConfig:
    """The transformers quantisation config of a ``kind`` base that leaves the ``skip`` modules as they are."""
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip))
    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=COMPUTE_DTYPE,
                                  llm_int8_skip_modules=list(skip))
    raise ModelError(f"unknown base quantisation {kind!r}; use one of {', '.join(BASE_QUANTISATIONS)}")


def meta_model(model_class, config) -> nn.Module:
    """``model_class`` built from ``config`` on the meta device: its structure, no memory, no weights."""
    with torch.device("meta"):
        return model_class.from_config(copy.deepcopy(config))  # from_config may set fields on it


def load_kwargs(kind: str, model_class, config, device: torch.device) -> dict:
    """The ``from_pretrained`` arguments that load ``model_class`` quantised as ``kind`` on ``device``:
    the unquantised parts in bf16, placed by transformers (a bitsandbytes model cannot be moved
    with ``.to`` afterwards)."""
    skip = skip_modules(meta_model(model_class, config))
    return {"quantization_config": bnb_config(kind, skip), "dtype": COMPUTE_DTYPE, "device_map": {"": device}}


def skipped(name: str, skip: list[str]) -> bool:
    """Whether bitsandbytes leaves the module ``name`` alone under ``skip`` (a prefix up to a module
    boundary, or a suffix, as transformers matches them)."""
    return any(name == k or name.startswith(k + ".") or name.endswith("." + k) for k in skip)


def quantised_linears(model: nn.Module, skip: Optional[list[str]] = None) -> list[tuple[int, int]]:
    """(out_features, in_features) of each linear map bitsandbytes replaces in ``model``: every
    ``nn.Linear`` (and GPT-2 ``Conv1D``) outside :func:`skip_modules` and transformers'
    keep-in-fp32 modules."""
    skip = list(skip if skip is not None else skip_modules(model))
    skip += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    out = []
    for name, module in model.named_modules():
        if skipped(name, skip):
            continue
        if type(module) is nn.Linear:
            out.append((module.out_features, module.in_features))
        elif type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
            n_in, n_out = module.weight.shape
            out.append((n_out, n_in))
    return out


def quantised_bytes(rows: int, cols: int, kind: str) -> int:
    """Bytes one ``[rows, cols]`` weight takes quantised (its bias stays in bf16 and is not counted):
    int8: a byte a weight + an fp32 scale a row; nf4: half a byte a weight + an fp32 absmax a block
    of :data:`NF4_BLOCK` (without double quantisation; the 16-value code table is left out)."""
    n = rows * cols
    if kind == "int8":
        return n + 4 * rows
    if kind == "nf4":
        return (n + 1) // 2 + 4 * math.ceil(n / NF4_BLOCK)
    raise ModelError(f"unknown base quantisation {kind!r}; use one of {', '.join(BASE_QUANTISATIONS)}")


def silence_int8_cast_warning() -> None:
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16" on every
    int8 matmul of a bf16 input, an expected cast here (the int8 product runs in fp16, its output comes
    back in bf16): keep its logger to errors."""
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


def base_quantisation(model: nn.Module) -> Optional[str]:
    """"int8" / "nf4" (or another 4-bit type) for a model bitsandbytes quantised, else None."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    method = get("quant_method")
    if str(getattr(method, "value", method)) != "bitsandbytes":
        return None
    if get("load_in_8bit") or get("_load_in_8bit"):
        return "int8"
    if get("load_in_4bit") or get("_load_in_4bit"):
        return str(get("bnb_4bit_quant_type", "nf4"))
    return None
