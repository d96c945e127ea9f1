"""Unlearning layers and how they attach to a transformers model.

An :class:`UnlearningLayer` is a bottleneck adapter (d → r → d, activation, residual). Its
up-projection starts at zero, so a freshly attached student computes exactly what the teacher
computes. Layers are attached by swapping each block's feed-forward module for an
:class:`UnlearningSite` that wraps it (no model forward code is edited); the site runs the base
module, then every attached layer through :func:`unlearn_fast.ops.unlearning_layer`.

The teacher is the same model with the sites switched off (:func:`layers_disabled`): no second
copy of the weights exists.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import ModelError
from ..ops import unlearning_layer
from ..ops.unlearning_layer import ACTIVATIONS


@dataclass
class LayerConfig:
    """Where unlearning layers go and their shape.

    ``rank`` fixes the bottleneck width; otherwise it is ``hidden_size // reduction_factor``
    (the paper's code used 16). ``blocks`` is ``"all"``, an int k (the top k blocks of each
    stack) or a list of block indices.
    """

    rank: Optional[int] = None
    reduction_factor: int = 16
    activation: str = "relu"
    blocks: Union[str, int, Sequence[int]] = "all"

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ModelError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.rank is not None and self.rank < 1:
            raise ModelError(f"rank must be ≥ 1, got {self.rank}")
        if self.reduction_factor < 1:
            raise ModelError(f"reduction factor must be ≥ 1, got {self.reduction_factor}")
        if isinstance(self.blocks, str) and self.blocks != "all":
            raise ModelError(f"blocks must be 'all', an int or a list of indices, got {self.blocks!r}")

    def rank_for(self, dim: int) -> int:
        return self.rank if self.rank is not None else max(1, dim // self.reduction_factor)

    def to_dict(self) -> dict:
        blocks = self.blocks if isinstance(self.blocks, (str, int)) else list(self.blocks)
        return {"rank": self.rank, "reduction_factor": self.reduction_factor,
                "activation": self.activation, "blocks": blocks}


class UnlearningLayer(nn.Module):
    """One bottleneck adapter: down [r, d] + bias, activation, up [d, r] + bias (zero at init)."""

    def __init__(self, dim: int, rank: int, activation: str = "relu"):
        super().__init__()
        self.activation = activation
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The up-projection's input, act(down(x)) in fp32 (fusion needs its Gram matrix)."""
        return ACTIVATIONS[self.activation](self.down(x.float()))


class UnlearningSite(nn.Module):
    """Wraps a block's feed-forward module and adds its unlearning layers' output to it."""

    def __init__(self, base: nn.Module, dim: int, path: str, stack: str, block: int):
        super().__init__()
        self.base = base
        self.dim = dim
        self.path = path  # module path of the wrapped feed-forward module in the model
        self.stack = stack  # "encoder", "decoder" or "blocks": which token mask applies here
        self.block = block
        self.layers = nn.ModuleList()
        self.enabled = True
        self.observer = None  # set while Gram matrices are collected (see fusion statistics)
        self.recorder = None  # a list while recording_outputs is open: (site, output added) per forward

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        if not (self.enabled and len(self.layers)):
            return out
        if self.observer is not None:
            self.observer(self, out)
        ls = list(self.layers)
        activations = {layer.activation for layer in ls}
        if len(activations) != 1:
            raise ModelError(f"{self.path}: layers with different activations cannot run together")
        result = unlearning_layer(out, [l.down.weight for l in ls], [l.down.bias for l in ls],
                                  [l.up.weight for l in ls], [l.up.bias for l in ls], ls[0].activation)
        if self.recorder is not None:
            self.recorder.append((self, result - out))
        return result


# How to find a block's feed-forward output, per structural pattern. Each entry: a test on the
# block and the attribute path (relative to the block) of the module whose output is the FFN
# output before the residual add.
def _ffn_path(block: nn.Module) -> Optional[str]:
    if hasattr(block, "mlp") and isinstance(block.mlp, nn.Module):
        return "mlp"  # Llama, Qwen2, Mistral, SmolLM, GPT-2, GPT-NeoX, ...
    layer = getattr(block, "layer", None)
    if isinstance(layer, nn.ModuleList) and len(layer) and hasattr(layer[-1], "DenseReluDense"):
        return f"layer.{len(layer) - 1}.DenseReluDense"  # T5 / mT5: FFN inside T5LayerFF
    if hasattr(block, "intermediate") and hasattr(getattr(block, "output", None), "dense"):
        return "output.dense"  # BERT family: FFN output projection, before dropout + LayerNorm
    return None


_SEARCHED = "blocks with `.mlp` (Llama/GPT-2 style), `.layer[-1].DenseReluDense` (T5) or `.intermediate` + `.output.dense` (BERT)"


def block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """ModuleLists whose members all have a recognisable feed-forward sublayer."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(_ffn_path(b) for b in module):
            if not any(name.startswith(prev + ".") for prev, _ in found):
                found.append((name, module))
    return found


def _stack_name(list_path: str, n_lists: int) -> str:
    if n_lists == 1:
        return "blocks"
    return "encoder" if "encoder" in list_path else "decoder"


def _hidden_dim(module: nn.Module) -> int:
    """Width of a feed-forward module's output: its last Linear's out_features."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if isinstance(module, nn.Linear):
        return module.out_features
    if linears:
        return linears[-1].out_features
    convs = [m for m in module.modules() if m.__class__.__name__ == "Conv1D"]  # GPT-2
    if convs:
        return convs[-1].nf
    raise ModelError(f"cannot tell the output width of {module.__class__.__name__}")


def _select(n_blocks: int, blocks) -> list[int]:
    if blocks == "all":
        return list(range(n_blocks))
    if isinstance(blocks, int):
        if not 1 <= blocks <= n_blocks:
            raise ModelError(f"top-k blocks: k must be in 1..{n_blocks}, got {blocks}")
        return list(range(n_blocks - blocks, n_blocks))
    chosen = sorted(set(int(b) for b in blocks))
    bad = [b for b in chosen if not 0 <= b < n_blocks]
    if bad or not chosen:
        raise ModelError(f"block indices must be in 0..{n_blocks - 1}, got {list(blocks)}")
    return chosen


def sites(model: nn.Module) -> list[UnlearningSite]:
    """The model's unlearning sites, in module order."""
    return [m for m in model.modules() if isinstance(m, UnlearningSite)]


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(root, parent), name, module)


def freeze(model: nn.Module) -> None:
    """Make every base parameter frozen (unlearning-layer parameters are added afterwards)."""
    for p in model.parameters():
        p.requires_grad_(False)


def attach(model: nn.Module, config: LayerConfig) -> list[UnlearningSite]:
    """Attach one new unlearning layer to each selected block's feed-forward sublayer.

    The base is frozen; new layers are fp32 master weights on the model's device. A block that
    already has a site gets another layer in it (several requests' layers run summed).
    """
    lists = block_lists(model)
    if not lists:
        raise ModelError(f"{model.__class__.__name__}: found no transformer blocks; looked for {_SEARCHED}")
    freeze(model)
    device = next(model.parameters()).device
    added = []
    for list_path, blocks in lists:
        stack = _stack_name(list_path, len(lists))
        for index in _select(len(blocks), config.blocks):
            block = blocks[index]
            rel = _ffn_path(block)
            target = block.get_submodule(rel)
            path = f"{list_path}.{index}.{rel}"
            if isinstance(target, UnlearningSite):
                site = target
            else:
                site = UnlearningSite(target, _hidden_dim(target), path, stack, index)
                _set(model, path, site)
            layer = UnlearningLayer(site.dim, config.rank_for(site.dim), config.activation).to(device)
            site.layers.append(layer)
            added.append(site)
    return added


def detach(model: nn.Module) -> None:
    """Remove every unlearning site, putting the original feed-forward modules back."""
    for name, module in list(model.named_modules()):
        if isinstance(module, UnlearningSite):
            _set(model, name, module.base)


def set_enabled(model: nn.Module, enabled: bool) -> None:
    for site in sites(model):
        site.enabled = enabled


@contextlib.contextmanager
def layers_disabled(model: nn.Module) -> Iterator[None]:
    """Run the teacher: the same model with every unlearning layer switched off."""
    states = [(s, s.enabled) for s in sites(model)]
    try:
        for s, _ in states:
            s.enabled = False
        yield
    finally:
        for s, was in states:
            s.enabled = was


@contextlib.contextmanager
def recording_outputs(model: nn.Module) -> Iterator[list[tuple[UnlearningSite, torch.Tensor]]]:
    """While open, every enabled site's forward appends ``(site, what its layers added)`` to the
    yielded list (differentiable w.r.t. the layers; the objective's retained-output penalty)."""
    found = sites(model)
    outputs: list = []
    for site in found:
        site.recorder = outputs
    try:
        yield outputs
    finally:
        for site in found:
            site.recorder = None


def unlearning_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for s in sites(model) for p in s.layers.parameters()]


def layer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every unlearning layer's tensors, keyed ``<site path>.<k>.<down|up>.<weight|bias>``."""
    state = {}
    for s in sites(model):
        for k, layer in enumerate(s.layers):
            for name, t in layer.state_dict().items():
                state[f"{s.path}.{k}.{name}"] = t.detach().contiguous()
    return state


def describe(model: nn.Module) -> list[dict]:
    """One record per site: where it is and its layers' ranks (for the manifest)."""
    return [{"path": s.path, "stack": s.stack, "block": s.block, "dim": s.dim,
             "ranks": [l.down.out_features for l in s.layers],
             "activations": [l.activation for l in s.layers]} for s in sites(model)]


def attach_from_description(model: nn.Module, records: list[dict]) -> None:
    """Recreate saved sites and (zero-up) layers exactly where the manifest says they were."""
    freeze(model)
    device = next(model.parameters()).device
    for rec in records:
        try:
            target = model.get_submodule(rec["path"])
        except AttributeError:
            raise ModelError(f"the saved layers expect a module at {rec['path']}, which this model lacks") from None
        if not isinstance(target, UnlearningSite):
            dim = _hidden_dim(target)
            if dim != rec["dim"]:
                raise ModelError(f"{rec['path']}: saved layers have width {rec['dim']}, the model {dim}")
            target = UnlearningSite(target, dim, rec["path"], rec["stack"], rec["block"])
            _set(model, rec["path"], target)
        for rank, act in zip(rec["ranks"], rec["activations"]):
            target.layers.append(UnlearningLayer(target.dim, rank, act).to(device))
