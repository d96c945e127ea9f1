"""Gram matrices of each unlearning layer's linear inputs over a data set (what fusion needs).

For a layer y = x + U·act(D·x + b) + c, fusion regresses each linear map on its own inputs:
the down-projection on x, the up-projection on h = act(D·x + b). Inputs are augmented with a
constant 1 so the bias is part of the regression, and accumulated in float64 over real (not
padding) tokens: G = Σ [x, 1]ᵀ[x, 1]. Only these matrices are stored, never the data.

Next to each Gram matrix an artifact stores the map's cross term C = G·[Wᵀ; bᵀ] (float64,
[in + 1, out]): the product fusion needs from every request, the larger part of its cost, paid
here once per request — :func:`unlearn_fast.io.artifacts.write_artifact` adds what is missing with
:func:`unlearn_fast.io.artifacts.cross_terms`.

:func:`collect_grams` runs over every rank when ``torch.distributed`` is initialised (the batches
are dealt round-robin and the matrices summed), so one call serves one process and torchrun alike.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..model.family import output_states
from ..model.layers import sites
from ..train.distributed import all_sum, comm_device, rank, world_size
from ..train.encoding import Row, collate


def _augmented_gram(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
    return x.t() @ x


@torch.no_grad()
def local_grams(model: nn.Module, task: str, rows: Sequence[Row], pad_id: int,
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


def collect_grams(model: nn.Module, task: str, rows: Sequence[Row], pad_id: int, batch_size: int = 8,
                  lockstep: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    """:func:`local_grams` over all ranks: the batches one process would
    run are dealt round-robin to the ranks, and the (float64) Gram matrices and token counts
    summed. With ``lockstep`` (a sharded base), ranks with fewer batches run extra forwards
    that record nothing, so that every rank runs the same number of forwards."""
    if world_size() <= 1:
        return local_grams(model, task, rows, pad_id, batch_size)
    world, me = world_size(), rank()
    chunks = [list(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    mine = [r for chunk in chunks[me::world] for r in chunk]
    grams, tokens = local_grams(model, task, mine, pad_id, batch_size) if mine else ({}, 0)
    if lockstep:
        device = next(model.parameters()).device
        for _ in range(math.ceil(len(chunks) / world) - len(chunks[me::world])):
            batch = {k: v.to(device) for k, v in collate(chunks[0], pad_id).items()}
            with torch.no_grad():
                output_states(model, task, batch)
    dev = comm_device()
    out = {}
    for site in sites(model):
        for k, layer in enumerate(site.layers):
            for name, n in ((f"{site.path}.{k}.down.gram", site.dim + 1),
                            (f"{site.path}.{k}.up.gram", layer.down.out_features + 1)):
                g = grams.get(name)
                g = torch.zeros(n, n, dtype=torch.float64) if g is None else g
                buf = g.to(dev)
                dist.all_reduce(buf)
                out[name] = buf.cpu()
    total = int(all_sum([tokens])[0])
    return out, total
