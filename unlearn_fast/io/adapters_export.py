"""Exports: the unlearning layers as an AdapterHub ``adapters`` bottleneck adapter (``--format adapters``).

An unlearning layer is a sequential bottleneck after a block's feed-forward sublayer: with ``f`` the
feed-forward output (before the block's residual add, and for BERT before dropout + LayerNorm), the
block computes ``f + Σ_k (U_k · act(D_k · f + b_k) + c_k)`` and then its own residual / LayerNorm.
``adapters``' bottleneck adapter at its ``output_adapter`` location computes, for a config with
``original_ln_before=False``, ``residual_before_ln=True``, ``original_ln_after=True``, no adapter
LayerNorm, no gating and ``scaling=1.0``, exactly ``f + U · act(D · f + b) + c`` followed by the
block's own residual add (and LayerNorm, where the model has one there). That is ``seq_bn``
(``SeqBnConfig``, the Pfeiffer placement after the FFN) with one difference, written out in the
config: ``original_ln_before=False``, because ``seq_bn`` feeds the adapter ``f`` plus the residual
stream (after the block's LayerNorm where there is one), which is not what an unlearning layer reads.

Several layers in one block (several artifacts summed, as ``eval --layers`` runs them) become one
bottleneck with the widths concatenated: the activation is elementwise and nothing normalises
inside, so ``Σ_k U_k act(D_k f + b_k) + c_k = [U_1 … U_K] act([D_1; …; D_K] f + [b_1; …; b_K]) + Σ c_k``
exactly (in exact arithmetic; fp32 rounding differs by a few ulps). A fused artifact has one layer
per block already. Per-block widths go into ``reduction_factor`` as a mapping (``adapters`` takes
``int(hidden // factor)`` as the width); blocks without layers are in ``leave_out``.

The directory::

    adapter_config.json      what ``model.load_adapter(DIR)`` reads: the bottleneck config, the
                             adapter's name (:data:`ADAPTER_NAME`), the model type, and under
                             ``unlearn_fast`` the provenance (base fingerprint, request ids; no data)
    pytorch_adapter.bin      the weights, keyed as ``adapters`` names its modules (torch.save of a
                             dict of tensors: loads with ``weights_only=True``)
    adapter.safetensors      the same tensors (for ``load_adapter(DIR, use_safetensors=True)``)
    unlearning_export.json   written last: package, format, provenance, sha256 of each other file

Only the model families in :data:`PLACEMENTS` are written: those where ``adapters`` (checked with
:data:`ADAPTERS_VERSION`) has a built-in output adapter at the place the unlearning layer sits. Any
other family is refused, saying why, rather than written as something that computes other logits.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import ModelError
from ..model.family import detect_task
from ..model.layers import block_lists, sites
from ..version import __version__
from .artifacts import DONE_FILES, EXPORT_FILE, check_writable, sha256_file
from .atomic import atomic_directory

ADAPTERS_FORMAT = "unlearn_fast.adapters/1"
ADAPTERS_VERSION = "1.3.0"  # the adapters release whose format this writes and that the tests load it with
ADAPTER_NAME = "unlearning"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "pytorch_adapter.bin"
ADAPTER_SAFE_WEIGHTS_FILE = "adapter.safetensors"
# our activation -> adapters' non_linearity (transformers' ACT2FN names: "gelu" is the exact erf GELU,
# as F.gelu; the config carries a "version", so adapters does not rename it to the tanh "gelu_new")
NON_LINEARITIES = {"relu": "relu", "gelu": "gelu", "silu": "silu"}


@dataclass(frozen=True)
class Placement:
    """Where ``adapters`` keeps the output adapter of the block whose feed-forward module is ``pattern``.

    ``pattern`` matches an unlearning site's module path (named groups fill ``module``, and ``i`` is
    the block index); ``module`` is the module that holds ``adapters.<name>``; ``offset`` names the
    config field added to ``i`` to get adapters' layer index (T5's decoder blocks come after the
    encoder's).
    """

    pattern: str
    module: str
    offset: Optional[str] = None


_PREFIX = r"(?P<p>(?:\w+\.)*)"
_DECODER_MLP = (Placement(_PREFIX + r"layers\.(?P<i>\d+)\.mlp", "{p}layers.{i}.output_adapters"),)
# model type -> placements. adapters' own forward of each (checked with ADAPTERS_VERSION):
#   llama, mistral: output_adapters(mlp(post_attention_layernorm(h)), h, None)
#   gpt2:           output_adapters(mlp(ln_2(h)), h, None)
#   t5:             T5LayerFF: bottleneck(dropout(DenseReluDense(layer_norm(h))), h, None)
#   bert:           BertOutput: bottleneck(dropout(dense(x)), input_tensor, LayerNorm)
# so the adapter reads the feed-forward output, as the unlearning layer does. At inference dropout is
# off; in training mode adapters applies the FFN's dropout before the bottleneck (T5, BERT), ours after.
PLACEMENTS = {
    "llama": _DECODER_MLP,
    "mistral": _DECODER_MLP,
    "gpt2": (Placement(_PREFIX + r"h\.(?P<i>\d+)\.mlp", "{p}h.{i}.output_adapters"),),
    "t5": (Placement(r"encoder\.block\.(?P<i>\d+)\.layer\.(?P<j>\d+)\.DenseReluDense", "encoder.block.{i}.layer.{j}"),
           Placement(r"decoder\.block\.(?P<i>\d+)\.layer\.(?P<j>\d+)\.DenseReluDense", "decoder.block.{i}.layer.{j}",
                     offset="num_layers")),
    "bert": (Placement(_PREFIX + r"encoder\.layer\.(?P<i>\d+)\.output\.dense", "{p}encoder.layer.{i}.output"),),
}
# Families the unlearning layers attach to whose adapters placement differs, or that adapters lacks:
# why each is refused (anything else not in PLACEMENTS gets the generic reason).
NOT_EXPRESSIBLE = {
    "qwen2": f"adapters {ADAPTERS_VERSION} has no built-in Qwen2 support (only its plugin interface, which "
             f"load_adapter alone does not set up)",
    "gpt_neox": f"adapters {ADAPTERS_VERSION} has no built-in GPT-NeoX support (parallel attention and MLP)",
}


def _refuse(model_type: str) -> ModelError:
    why = NOT_EXPRESSIBLE.get(model_type) or (
        f"adapters {ADAPTERS_VERSION} has no built-in output adapter for model type {model_type!r} whose "
        f"placement was checked against the unlearning layer's (after the feed-forward module, its output as the "
        f"adapter's input and residual)")
    return ModelError(f"export --format adapters: {why}; supported: {', '.join(PLACEMENTS)} "
                      f"(use --format hf for this model)")


def reduction_factor(hidden: int, rank: int) -> Union[int, float]:
    """A factor for which adapters' ``int(hidden // factor)`` is exactly ``rank``."""
    for factor in (hidden / rank, hidden / (rank + 0.5)):
        if int(hidden // factor) == rank:
            return int(factor) if float(factor).is_integer() else factor
    raise ModelError(f"export --format adapters: no reduction factor gives width {rank} of {hidden}")


def _layer_index(model: nn.Module, placements: Sequence[Placement], path: str) -> tuple[int, str]:
    for placement in placements:
        match = re.fullmatch(placement.pattern, path)
        if match:
            offset = int(getattr(model.config, placement.offset)) if placement.offset else 0
            groups = {k: v or "" for k, v in match.groupdict().items()}
            return offset + int(groups["i"]), placement.module.format(**groups)
    raise ModelError(f"export --format adapters: the unlearning layer at {path} is not where adapters puts its "
                     f"output adapter for {model.config.model_type} (after a block's feed-forward module)")


def adapter_config(model: nn.Module, widths: dict[int, int], activation: str, provenance: dict) -> dict:
    """adapter_config.json: a bottleneck config whose forward is the unlearning layers' (see the module doc)."""
    hidden = int(model.config.hidden_size)
    n_layers = sum(len(blocks) for _, blocks in block_lists(model))
    factors = {str(i): reduction_factor(hidden, r) for i, r in sorted(widths.items())}
    factors["default"] = next(iter(factors.values()))  # never used: every other layer is left out
    config = {
        # where: after the feed-forward sublayer only
        "mh_adapter": False, "output_adapter": True, "cross_adapter": False,
        "leave_out": [i for i in range(n_layers) if i not in widths],
        # what: down [R, d] + bias, activation, up [d, R] + bias, scaled by 1
        "reduction_factor": factors, "non_linearity": NON_LINEARITIES[activation], "scaling": 1.0,
        "phm_layer": False, "use_gating": False, "is_parallel": False, "ln_before": False, "ln_after": False,
        # residual: the adapter reads the FFN output and adds it back; the block's own residual add and
        # LayerNorm follow (seq_bn differs only in original_ln_before=True)
        "original_ln_before": False, "residual_before_ln": True, "adapter_residual_before_ln": False,
        "original_ln_after": True,
        "dropout": 0.0, "stochastic_depth": 0.0, "inv_adapter": None, "inv_adapter_reduction_factor": None,
        "init_weights": "mam_adapter",  # irrelevant once the weights load; zero up-projection like ours
    }
    return {"config": config, "hidden_size": hidden, "model_class": type(model).__name__, "model_name": "",
            "model_type": model.config.model_type, "name": ADAPTER_NAME, "version": f"adapters.{ADAPTERS_VERSION}",
            "unlearn_fast": {"format": ADAPTERS_FORMAT, "package_version": __version__, "provenance": provenance}}


def adapter_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[int, int], str]:
    """The adapter's tensors keyed as adapters names them, each block's width, and the activation.

    Refuses (ModelError, naming what differs) a model whose layers adapters' bottleneck cannot express.
    """
    model_type = getattr(model.config, "model_type", None)
    placements = PLACEMENTS.get(model_type)
    if placements is None:
        raise _refuse(str(model_type))
    hidden = getattr(model.config, "hidden_size", None)
    state, widths, activations = {}, {}, {}
    for site in sites(model):
        if site.dim != hidden:
            raise ModelError(f"export --format adapters: {site.path} has width {site.dim}, but adapters sizes its "
                             f"bottleneck by the model's hidden_size {hidden}")
        index, module = _layer_index(model, placements, site.path)
        for layer in site.layers:
            activations.setdefault(layer.activation, site.path)
        layers = list(site.layers)
        prefix = f"{module}.adapters.{ADAPTER_NAME}"
        with torch.no_grad():
            state[f"{prefix}.adapter_down.0.weight"] = torch.cat([l.down.weight.float() for l in layers], 0)
            state[f"{prefix}.adapter_down.0.bias"] = torch.cat([l.down.bias.float() for l in layers], 0)
            state[f"{prefix}.adapter_up.weight"] = torch.cat([l.up.weight.float() for l in layers], 1)
            state[f"{prefix}.adapter_up.bias"] = torch.stack([l.up.bias.float() for l in layers]).sum(0)
        widths[index] = sum(l.down.out_features for l in layers)
    if len(activations) > 1:
        where = ", ".join(f"{a} (e.g. {p})" for a, p in activations.items())
        raise ModelError(f"export --format adapters: one adapter has one non_linearity, but these layers use {where}")
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return state, widths, next(iter(activations))


def write_adapters(model: nn.Module, out: Union[str, Path], *, provenance: dict, overwrite: bool = False,
                   inputs: Sequence = (), log: Callable = print) -> Path:
    """Write ``model``'s unlearning layers as an ``adapters`` bottleneck adapter directory at ``out``.

    The base weights are not written: ``adapters`` loads the adapter onto the same base model
    (``adapters.init(model); model.load_adapter(DIR); model.set_active_adapters("unlearning")``).
    Refused before anything is written for a family or layers the bottleneck cannot express.
    Atomic, and an existing ``out`` is refused unless ``overwrite``, as :func:`~unlearn_fast.io.export.write_hf`.
    """
    if not sites(model):
        raise ModelError("the model has no unlearning layers attached; attach an artifact's layers first")
    state, widths, activation = adapter_state(model)
    config = adapter_config(model, widths, activation, provenance)
    out = check_writable(out, overwrite, inputs=inputs, log=log)
    with atomic_directory(out, done=DONE_FILES, log=log) as tmp:
        torch.save(state, tmp / ADAPTER_WEIGHTS_FILE)
        save_file(state, str(tmp / ADAPTER_SAFE_WEIGHTS_FILE), metadata={"format": "pt"})
        with open(tmp / ADAPTER_CONFIG_FILE, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        record = {"package": {"name": "unlearn_fast", "version": __version__}, "format": ADAPTERS_FORMAT,
                  "task": detect_task(model), "adapter_name": ADAPTER_NAME, "adapters_version": ADAPTERS_VERSION,
                  "provenance": provenance, "files": files}
        with open(tmp / EXPORT_FILE, "w") as f:  # last: a temporary holding it is finished
            json.dump(record, f, indent=2, sort_keys=True)
    return out
