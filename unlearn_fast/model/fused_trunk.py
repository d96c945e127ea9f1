"""Run the frozen trunk's RMSNorms and SwiGLU products through the fused trunk ops while training.

The student's forward and backward pass through every block above the lowest unlearning layer,
and in eager transformers code a Llama-family block spends a good share of its non-matmul time
in RMSNorm (about eight elementwise passes each way) and in silu(gate)·up. :func:`fused_trunk`
routes those modules through :func:`unlearn_fast.ops.rms_norm` and :func:`unlearn_fast.ops.swiglu`
for as long as the context is open. The math is unchanged (the ops' references are the
transformers formulas), so the teacher cache, fusion statistics and artifacts are unaffected.

Only module classes whose forward is known to be exactly that formula are touched (Llama,
Mistral, Qwen2, Qwen3 RMSNorms and SiLU-gated MLPs); every other module keeps its own forward.
The modules are not replaced: each keeps its parameters, hooks and state-dict keys (FSDP2 swaps
parameters on the modules it shards, so a replacement holding references would read stale ones);
only its ``forward`` is overridden on the instance and restored on exit, as
:func:`unlearn_fast.train.trainer.compiled_blocks` does for blocks.
"""

from __future__ import annotations

import contextlib
import types
from typing import Callable, Iterator, Optional

from torch import nn

from ..ops.trunk import rms_norm, swiglu

# transformers classes whose forward is LlamaRMSNorm's / LlamaMLP's (tests/test_fused_trunk.py
# compares their source with Llama's, so a change in transformers shows up as a failing test)
RMS_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
SWIGLU_MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
_SILU_CLASSES = ("SiLU", "SiLUActivation")


def _rms_norm_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_mlp_forward(self, x):
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _fused_forward(module: nn.Module) -> Optional[Callable]:
    name = type(module).__name__
    if name in RMS_NORM_CLASSES:
        return _rms_norm_forward
    if name in SWIGLU_MLP_CLASSES and type(getattr(module, "act_fn", None)).__name__ in _SILU_CLASSES:
        return _swiglu_mlp_forward
    return None


@contextlib.contextmanager
def fused_trunk(model: nn.Module, enabled: bool = True) -> Iterator[list[nn.Module]]:
    """Within the context, the model's RMSNorm and SwiGLU-MLP modules run the fused trunk ops
    (the backend is chosen per call, like every op's). Yields the modules it switched."""
    switched = []
    if enabled:
        for module in model.modules():
            forward = _fused_forward(module)
            if forward is not None and "forward" not in vars(module):  # not already overridden
                module.forward = types.MethodType(forward, module)
                switched.append(module)
    try:
        yield switched
    finally:
        for module in switched:
            del module.forward  # the instance attribute; the class's forward is back
