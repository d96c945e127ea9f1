"""Unlearning layers (EUL) on a transformers model: the modelling code of an ``unlearn-fast export --format hf``
directory.

This file is standalone: it imports only torch and transformers, and it is copied as
``unlearning_layers.py`` into every exported directory, followed by the two classes of that model
(a config class and a model class that subclass the base architecture's transformers classes).
``AutoModelFor...from_pretrained(DIR, trust_remote_code=True)`` finds them through the ``auto_map``
of ``config.json``.

The model class builds the base architecture, then wraps each feed-forward module listed in
``config.unlearning_layers["sites"]`` with an :class:`UnlearningSite`: the base module runs, and the
site's K bottleneck layers (one per deletion request, or one fused layer) add their outputs, summed,
in fp32:

    y = f(x) + Σ_k ( U_k · act(D_k · f(x) + b_k) + c_k )

The layers' weights are kept in fp32 whatever dtype the base is loaded in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
LAYERS_ATTRIBUTE = "unlearning_layers"  # the site's ModuleList; also the name kept in fp32 on loading


class UnlearningLayer(nn.Module):
    """One bottleneck: down [r, d] + bias, activation, up [d, r] + bias (zero at init: no effect)."""

    def __init__(self, dim: int, rank: int, activation: str = "relu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
        self.activation = activation
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, flat: torch.Tensor) -> torch.Tensor:
        """The layer's addition for fp32 rows ``flat`` [N, d]."""
        h = ACTIVATIONS[self.activation](F.linear(flat, self.down.weight.float(), self.down.bias.float()))
        return F.linear(h, self.up.weight.float(), self.up.bias.float())


class UnlearningSite(nn.Module):
    """Wraps a feed-forward module (``base``) and adds its unlearning layers' outputs to its output."""

    def __init__(self, base: nn.Module, dim: int, ranks, activations):
        super().__init__()
        self.base = base
        self.unlearning_layers = nn.ModuleList(UnlearningLayer(dim, r, a) for r, a in zip(ranks, activations))

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        x = out.float()
        flat = x.reshape(-1, x.shape[-1])
        y = x
        for layer in self.unlearning_layers:
            y = y + layer(flat).reshape(x.shape)
        return y.to(out.dtype)


def wrap_sites(model: nn.Module, spec: dict) -> None:
    """Wrap every feed-forward module that ``spec["sites"]`` lists (idempotent)."""
    for site in spec["sites"]:
        parent_path, _, name = site["path"].rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        target = getattr(parent, name)
        if isinstance(target, UnlearningSite):
            continue
        setattr(parent, name, UnlearningSite(target, int(site["dim"]), site["ranks"], site["activations"]))


class UnlearningLayersMixin:
    """Put before the base transformers model class: the model gets its unlearning sites right
    before ``post_init`` (so transformers sees the whole module tree), or at the end of ``__init__``."""

    def post_init(self):
        wrap_sites(self, self.config.unlearning_layers)
        super().post_init()

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        wrap_sites(self, config.unlearning_layers)


def keep_in_fp32(base_class) -> list:
    """``_keep_in_fp32_modules_strict`` of a class built on ``base_class``: its own, and the layers."""
    return [*(getattr(base_class, "_keep_in_fp32_modules_strict", None) or []), LAYERS_ATTRIBUTE]


# The classes of this model follow (written by unlearn_fast when it exports a model).
