"""Gram matrices of each unlearning layer's linear inputs over a data set (what fusion needs).

For a layer y = x + U·act(D·x + b) + c, fusion regresses each linear map on its own inputs:
the down-projection on x, the up-projection on h = act(D·x + b). Inputs are augmented with a
constant 1 so the bias is part of the regression, and accumulated in float64 over real (not
padding) tokens: G = Σ [x, 1]ᵀ[x, 1]. Only these matrices are stored, never the data.

Next to each Gram matrix an artifact stores the map's cross term C = G·[Wᵀ; bᵀ] (float64,
[in + 1, out]): the product fusion needs from every request, the larger part of its cost, paid
here once per request — :func:`unlearn_fast.artifacts.write_artifact` adds what is missing with
:func:`cross_terms`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from .encoding import Row, collate
from .layers import sites
from .models import output_states


def _augmented_gram(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
    return x.t() @ x


def cross_term(gram: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """C = G · [Wᵀ; bᵀ] in float64, [in + 1, out], of a linear map with weight [out, in] and bias [out]."""
    augmented = torch.cat([weight.detach().t(), bias.detach()[None]], dim=0).to(gram.device, torch.float64)
    return gram.double() @ augmented


def cross_terms(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The missing cross terms ``<map>.cross`` of every linear map in ``tensors`` (artifact keys) that
    has a Gram matrix ``<map>.gram``, a ``<map>.weight`` and a ``<map>.bias`` but no ``<map>.cross``."""
    out = {}
    for name, gram in tensors.items():
        key = name[:-len(".gram")]
        if not name.endswith(".gram") or f"{key}.cross" in tensors:
            continue
        weight, bias = tensors.get(f"{key}.weight"), tensors.get(f"{key}.bias")
        if weight is not None and bias is not None:
            out[f"{key}.cross"] = cross_term(gram, weight, bias)
    return out


@torch.no_grad()
def collect_grams(model: nn.Module, task: str, rows: Sequence[Row], pad_id: int,
                  batch_size: int = 8) -> tuple[dict[str, torch.Tensor], int]:
    """Forward ``rows`` through the student and return ({name: Gram}, token count).

    Names: ``<site path>.<k>.down.gram`` ([d+1, d+1]) and ``<site path>.<k>.up.gram``
    ([r+1, r+1]) for layer k of each site.
    """
    grams: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    tokens = 0

    def observe(site, out):
        mask = masks[site.stack].to(out.device)
        x = out[mask]
        down = _augmented_gram(x).cpu()
        for k, layer in enumerate(site.layers):
            for name, g in ((f"{site.path}.{k}.down.gram", down),
                            (f"{site.path}.{k}.up.gram", _augmented_gram(layer.bottleneck(x)).cpu())):
                grams[name] = grams[name] + g if name in grams else g

    all_sites = sites(model)
    device = next(model.parameters()).device
    for s in all_sites:
        s.observer = observe
    try:
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_size], pad_id).items()}
            masks["blocks"] = masks["encoder"] = batch["attention_mask"].bool()
            if "decoder_attention_mask" in batch:
                masks["decoder"] = batch["decoder_attention_mask"].bool()
            tokens += int(batch["attention_mask"].sum())
            output_states(model, task, batch)
    finally:
        for s in all_sites:
            s.observer = None
    return grams, tokens
