"""Fused ops behind public functions: each file holds ``<op>_reference`` (plain PyTorch, fp32
accumulation: the test oracle and fallback), its autograd Function, and the public function that
picks a backend once (see :mod:`unlearn_fast.ops.backend`)."""

from .loss_head import LossHeadOutput, eul_loss_head, eul_loss_head_reference, loss_rows_reference
from .trunk import rms_norm, rms_norm_reference, swiglu, swiglu_reference
from .unlearning_layer import unlearning_layer, unlearning_layer_reference

__all__ = [
    "LossHeadOutput",
    "eul_loss_head",
    "eul_loss_head_reference",
    "loss_rows_reference",
    "rms_norm",
    "rms_norm_reference",
    "swiglu",
    "swiglu_reference",
    "unlearning_layer",
    "unlearning_layer_reference",
]
