"""The unlearning-layer op: K bottleneck adapters applied to one activation in one call.

    y = x + Σ_k ( U_k · act(D_k · x + b_k) + c_k )

The K layers of a block (one per deletion request until they are fused) read the same input and
add their outputs to the residual: summed, not chained. Summing keeps every request's layer
independent of the others' order, lets the K down-projections run as one [d, Σr] product, and is
what closed-form fusion assumes (each layer's inputs are the block's activations, not another
adapter's output).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import pick_backend

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
}


def unlearning_layer_reference(
    x: Tensor,
    down_weights: Sequence[Tensor],
    down_biases: Sequence[Tensor],
    up_weights: Sequence[Tensor],
    up_biases: Sequence[Tensor],
    activation: str = "relu",
) -> Tensor:
    """Pure-PyTorch K-layer forward in fp32 or wider (autograd gives the backward); result in x's dtype."""
    act = ACTIVATIONS[activation]
    wide = torch.promote_types(x.dtype, torch.float32)
    xw = x.to(wide)
    flat = xw.reshape(-1, xw.shape[-1])
    y = xw
    for d_w, d_b, u_w, u_b in zip(down_weights, down_biases, up_weights, up_biases, strict=True):
        bottleneck = act(torch.addmm(d_b.to(wide), flat, d_w.to(wide).t()))
        y = y + torch.addmm(u_b.to(wide), bottleneck, u_w.to(wide).t()).reshape(xw.shape)
    return y.to(x.dtype)


def unlearning_layer(
    x: Tensor,
    down_weights: Sequence[Tensor],
    down_biases: Sequence[Tensor],
    up_weights: Sequence[Tensor],
    up_biases: Sequence[Tensor],
    activation: str = "relu",
) -> Tensor:
    """Apply K unlearning layers to ``x`` [..., d]: D_k [r_k, d], b_k [r_k], U_k [d, r_k], c_k [d].

    The fused Triton / C++ kernels plug in here; until then every device runs the reference.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    pick_backend(x.device, available=())
    return unlearning_layer_reference(x, down_weights, down_biases, up_weights, up_biases, activation)
