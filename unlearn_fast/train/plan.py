"""Memory and compute plan of an unlearning run, from the model's config alone (no weight is loaded).

:func:`model_shape` builds the model on the ``meta`` device (exact parameter counts, no memory) and
attaches the unlearning layers there; :func:`estimate` then gives the peak memory of one training
step, by part, and its FLOPs; :func:`fit` finds settings that fit a memory budget. The parts, at
the step's peak (what is alive at once):

- **frozen base**: every base parameter in the model's dtype (tied embeddings once). A quantised base
  (``--dtype int8`` / ``nf4``, bitsandbytes on CUDA) holds each linear map of the blocks quantised (int8: a
  byte a weight + an fp32 scale a row; nf4: half a byte a weight + an fp32 absmax a block of 64) and the
  rest (embeddings, norms, biases, the output head) in bf16, the dtype of its activations too (see
  :func:`base_bytes`).
- **unlearning layers + AdamW**: fp32 weights, gradients and AdamW's two moments (16 bytes a weight).
- **teacher cache**: the teacher's final hidden states of every training row, and, when the lowest
  unlearning layer is above block 0, the trunk output replayed in later epochs (see
  :mod:`unlearn_fast.train.step_cache`); ``rows × max_length × d`` each, in the model's dtype. Only
  ``--teacher-cache gpu`` (the default) keeps them on the device; ``cpu`` keeps them in CPU memory (on
  a CPU run that is the same memory), ``disk`` in a memory-mapped file (:attr:`Plan.elsewhere` says
  where, and how much); ``off`` keeps nothing between steps: the step's trunk outputs (N·d, shared by
  teacher and student) when the layers start above block 0, and the teacher's forward every step.
- **loss-head chunk**: the fp32 student and teacher logits of one chunk (``2 × 512 × V × 4`` bytes),
  held for the whole run (see :func:`unlearn_fast.ops.loss_head.reused_logit_buffers`).
- **activations for the backward**: what the student's forward keeps for the backward pass, only
  above the lowest unlearning layer (nothing below needs a backward). Per token, a block strictly
  above it keeps both norms' inputs (2·d), the attention's q, k, v and output (4·H·d_head: k and v
  repeated to every head) and the MLP's gate and up products (2·d_ff for a fused SwiGLU, 3·d_ff
  unfused, d_ff for a GELU MLP), plus fp32 norm and softmax statistics; the frozen linear maps keep
  nothing (their weights need no gradient). Each unlearning site keeps its input (d) and fp32
  pre-activation (r); the final norm its input. The 4-D attention mask adds ``rows × T²``. With
  gradient checkpointing each trained block keeps only its input (d), and one block's activations
  come back at a time in the backward pass.
- **working memory**: the rest at the peak: the student's and teacher's final states, their
  selected copies and the hidden-state gradient in the loss head (5·N·d), or, when larger, one
  block's backward (2·d_ff + 2·d per token, plus the recomputed block under checkpointing). The
  teacher's forward (4·d + 3·d_ff + 2·d per token, first epoch) runs before the student's, when no
  activations are kept: it is the peak only when it alone is larger.

N is the tokens of one forward pass: ``batch_size`` rows (times two in the mixed schedule, one
batch of each set) of ``max_length`` tokens. The estimate is an upper bound for rows shorter than
``max_length``. On a GPU, the CUDA context (about 0.5 GiB) is added; the CPU figure is what the
tensors need: the C library's heap can hold more (``MALLOC_MMAP_THRESHOLD_=131072`` returns large
freed blocks at once). tests/train/test_plan.py checks the estimate against a measured CPU peak.

FLOPs per optimiser step: matmuls count 2·m·n·k; frozen blocks backpropagate only to their input
(one forward's matmul FLOPs, twice the attention's); gradient checkpointing adds one forward of
the trained blocks; the loss head makes three [N × V] products (teacher logits, student logits,
the hidden-state gradient). ``step`` is the steady state (teacher cached, trunk replayed; with
``--teacher-cache off`` the teacher's forward every step); ``first_epoch`` adds the teacher's full forward.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from ..errors import UnlearnFastError
from ..io.quantised import BASE_QUANTISATIONS, quantised_bytes, quantised_linears
from ..model.family import detect_task
from ..model.fused_trunk import RMS_NORM_CLASSES, SWIGLU_MLP_CLASSES
from ..model.layers import LayerConfig, attach, block_lists, sites
from ..ops.loss_head import DEFAULT_CHUNK_ROWS
from .step_cache import teacher_cache_mode

GiB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_CONTEXT = GiB // 2
PARTS = ("frozen base", "unlearning layers + AdamW", "teacher cache", "loss-head chunk",
         "activations for the backward", "working memory", "CUDA context")

# SmolLM2-135M-Instruct (the embedded default model), so that `plan --model smollm2` needs no conversion
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)


@dataclass
class ModelShape:
    """What the estimate needs from a model and its unlearning layers (see :func:`model_shape`)."""

    model_type: str
    layers: int  # transformer blocks
    hidden: int  # d
    intermediate: int  # d_ff
    heads: int
    head_dim: int
    vocab: int
    params: int  # base parameters (tied weights once)
    block_params: int  # parameters of one block
    sites: list[tuple[int, int]]  # (block index, rank) of each unlearning layer
    mlp: str  # "swiglu" (fused), "gated" (unfused gated) or "plain" (one activation, e.g. GELU)
    fused_norms: bool
    linears: list[tuple[int, int]] = field(default_factory=list)  # (out, in) of each map a quantised base quantises

    @property
    def lowest(self) -> int:
        return min(block for block, _ in self.sites)

    @property
    def layer_params(self) -> int:
        return sum(2 * self.hidden * r + r + self.hidden for _, r in self.sites)


def model_shape(config, layers: Optional[LayerConfig] = None) -> ModelShape:
    """The shape of the causal LM ``config`` describes with ``layers`` attached, read from the model
    built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError as err:
            raise UnlearnFastError(f"plan covers causal language models; {type(config).__name__}: {err}") from None
    if detect_task(model) != "causal":
        raise UnlearnFastError("plan covers causal language models")
    lists = block_lists(model)
    if len(lists) != 1:
        raise UnlearnFastError(f"{type(model).__name__}: expected one stack of transformer blocks")
    blocks = lists[0][1]
    base_params = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    linears = quantised_linears(model)  # before the unlearning layers (linear maps too) are attached
    attach(model, layers or LayerConfig())
    block = blocks[0]
    mlp = _mlp_kind(block)
    d = int(getattr(config, "hidden_size", None) or config.n_embd)
    heads = int(getattr(config, "num_attention_heads", None) or config.n_head)
    return ModelShape(
        model_type=getattr(config, "model_type", ""), layers=len(blocks), hidden=d,
        intermediate=_intermediate(config, d), heads=heads,
        head_dim=int(getattr(config, "head_dim", None) or d // heads),
        vocab=int(config.vocab_size), params=base_params,
        block_params=sum(p.numel() for p in block.parameters() if not p.requires_grad),  # not the layers
        sites=[(s.block, layer.down.out_features) for s in sites(model) for layer in s.layers],
        mlp=mlp, fused_norms=any(type(m).__name__ in RMS_NORM_CLASSES for m in block.modules()), linears=linears)


def _intermediate(config, d: int) -> int:
    for name in ("intermediate_size", "n_inner", "ffn_dim", "d_ff"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return 4 * d  # GPT-2's default


def _mlp_kind(block: nn.Module) -> str:
    if any(type(m).__name__ in SWIGLU_MLP_CLASSES for m in block.modules()):
        return "swiglu"
    if any(hasattr(m, "gate_proj") for m in block.modules()):
        return "gated"
    return "plain"


@dataclass
class PlanSettings:
    """The training settings the estimate depends on (the ``unlearn`` options of the same names)."""

    batch_size: int = 8  # rows per forward pass, per set in the mixed schedule
    max_length: int = 256
    accumulate: int = 1
    gradient_checkpointing: bool = False
    schedule: str = "mixed"
    device: str = "cpu"
    dtype: Optional[str] = None  # default: float32 on the CPU, bfloat16 on a GPU
    rows: int = 1000  # training rows (forget + retain) the teacher cache holds
    teacher_cache: str = "gpu"  # where it is kept: gpu / cpu / disk / off (True / False: gpu / off)

    def __post_init__(self):
        if self.batch_size < 1 or self.max_length < 1 or self.accumulate < 1 or self.rows < 0:
            raise UnlearnFastError("batch size, max length and accumulate must be ≥ 1, rows ≥ 0")
        if self.dtype is None:
            self.dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        if self.dtype not in DTYPE_BYTES and self.dtype not in BASE_QUANTISATIONS:
            raise UnlearnFastError(f"dtype must be one of {', '.join([*DTYPE_BYTES, *BASE_QUANTISATIONS])}, "
                                   f"got {self.dtype!r}")
        if self.dtype in BASE_QUANTISATIONS and not self.device.startswith("cuda"):
            raise UnlearnFastError(f"--dtype {self.dtype} is a base quantised by bitsandbytes on CUDA: "
                                   "plan it with --device cuda")
        self.teacher_cache = teacher_cache_mode(self.teacher_cache)

    @property
    def cache_place(self) -> str:
        """Where the teacher cache lives: "device", "CPU memory", "disk" or "nowhere" (off)."""
        if self.teacher_cache == "gpu" or (self.teacher_cache == "cpu" and not self.device.startswith("cuda")):
            return "device"
        return {"cpu": "CPU memory", "disk": "disk", "off": "nowhere"}[self.teacher_cache]

    @property
    def compute_dtype(self) -> str:
        """The dtype of the activations and the unquantised weights: bf16 under a quantised base."""
        return "bfloat16" if self.dtype in BASE_QUANTISATIONS else self.dtype

    @property
    def rows_per_forward(self) -> int:
        return self.batch_size * (2 if self.schedule == "mixed" else 1)

    def flags(self) -> str:
        """The ``unlearn`` options these settings correspond to."""
        out = f"--batch-size {self.batch_size}"
        if self.accumulate > 1:
            out += f" --accumulate {self.accumulate}"
        if self.gradient_checkpointing:
            out += " --gradient-checkpointing"
        if self.teacher_cache != "gpu":
            out += f" --teacher-cache {self.teacher_cache}"
        return out


@dataclass
class Plan:
    """Estimated peak memory by part (bytes; :data:`PARTS`) and FLOPs per optimiser step."""

    shape: ModelShape
    settings: PlanSettings
    parts: dict[str, int] = field(default_factory=dict)
    flops: dict[str, float] = field(default_factory=dict)
    elsewhere: dict[str, int] = field(default_factory=dict)  # bytes kept off the device, by place

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def fits(self, memory: int) -> bool:
        return self.total <= memory


def estimate(shape: ModelShape, settings: PlanSettings) -> Plan:
    """Peak memory of one training step, by part, and the FLOPs of one optimiser step."""
    s, b = settings, DTYPE_BYTES[settings.compute_dtype]
    d, ff, V, T = shape.hidden, shape.intermediate, shape.vocab, settings.max_length
    attention = shape.heads * shape.head_dim
    n = s.rows_per_forward * T  # tokens of one forward pass
    mlp = {"swiglu": 2, "gated": 3, "plain": 1}[shape.mlp] * ff
    block = (2 * d + 4 * attention + mlp) * b + (2 + shape.heads) * 4  # per token, a block above the lowest
    site = [d * b + r * 4 for _, r in shape.sites]
    above = shape.layers - 1 - shape.lowest
    trained = shape.layers - shape.lowest
    mask = s.rows_per_forward * T * T * b
    if s.gradient_checkpointing:  # block inputs only; one block's activations during its backward
        saved = n * (trained * d * b + d * b) + mask
        recompute = n * (block + max(site))
    else:
        saved = n * (above * block + sum(site) + d * b) + mask
        recompute = 0
    chunk = min(DEFAULT_CHUNK_ROWS, n)
    head_copy = V * d * 4 if (not s.device.startswith("cuda") and b != 4) else 0  # fp32 head for CPU GEMMs
    loss_head = 5 * n * d * b + head_copy
    backward = n * (2 * ff + 2 * d) * b + recompute
    teacher = n * (4 * d + 3 * ff) * b + 2 * n * d * b  # before the student's forward: no activations yet
    if teacher > saved + max(loss_head, backward):
        saved, working = 0, teacher
    else:
        working = max(loss_head, backward)
    cache = s.rows * T * d * b * (1 + (1 if shape.lowest > 0 else 0))  # the teacher's table + the trunk's
    if s.teacher_cache == "off":  # only the step's trunk outputs, shared by teacher and student
        on_device, elsewhere = (n * d * b if shape.lowest > 0 else 0), {}
    elif s.cache_place == "device":
        on_device, elsewhere = cache, {}
    else:
        on_device, elsewhere = 0, {s.cache_place: cache}
    parts = {
        "frozen base": base_bytes(shape, s.dtype),
        "unlearning layers + AdamW": shape.layer_params * 16,
        "teacher cache": on_device,
        "loss-head chunk": 2 * chunk * V * 4,
        "activations for the backward": saved,
        "working memory": working,
        "CUDA context": CUDA_CONTEXT if s.device.startswith("cuda") else 0,
    }
    return Plan(shape, settings, parts, _flops(shape, settings, n), elsewhere)


def base_bytes(shape: ModelShape, dtype: str) -> int:
    """Bytes of the frozen base's weights in ``dtype``: a float dtype's size for every parameter; for
    a quantised base (int8 / nf4), the quantised linear maps (:func:`unlearn_fast.io.quantised.quantised_bytes`)
    plus every other parameter in bf16."""
    if dtype not in BASE_QUANTISATIONS:
        return shape.params * DTYPE_BYTES[dtype]
    quantised = sum(rows * cols for rows, cols in shape.linears)
    return (sum(quantised_bytes(rows, cols, dtype) for rows, cols in shape.linears)
            + (shape.params - quantised) * DTYPE_BYTES["bfloat16"])


def _flops(shape: ModelShape, s: PlanSettings, n: int) -> dict[str, float]:
    """FLOPs of one optimiser step (``accumulate`` forward/backward passes of ``n`` tokens)."""
    d, T = shape.hidden, s.max_length
    matmul = 2.0 * n * shape.block_params
    attention = 2.0 * n * T * shape.heads * shape.head_dim  # causal: QKᵀ and PV over T/2 keys on average
    layers = sum(2.0 * n * 2 * d * r for _, r in shape.sites)
    trained = shape.layers - shape.lowest
    above = trained - 1
    forward = trained * (matmul + attention) + layers
    backward = above * (matmul + 2 * attention) + 2 * layers
    recompute = trained * (matmul + attention) if s.gradient_checkpointing else 0.0
    head = 3 * 2.0 * n * d * shape.vocab
    step = forward + backward + recompute + head
    teacher = shape.layers * (matmul + attention)
    if s.teacher_cache == "off":  # the teacher runs every step
        return {"step": s.accumulate * (step + teacher), "first_epoch": s.accumulate * (step + teacher)}
    return {"step": s.accumulate * step, "first_epoch": s.accumulate * (step + teacher)}


def candidates(shape: ModelShape, settings: PlanSettings) -> list[Plan]:
    """Settings with the same rows per optimiser step, cheapest first: the whole batch per forward,
    then half of it (twice as many micro-batches), ... down to one row; each without gradient
    checkpointing, then with it; and, where the teacher cache is on the device (``gpu``), each with
    it there, then moved off it (to pinned CPU memory on a GPU, to a memory-mapped file on a CPU: one
    batch's rows copied back per step). The last one is every saving at once."""
    total_rows = settings.batch_size * settings.accumulate
    caches = [settings.teacher_cache]
    if settings.cache_place == "device":
        caches.append("cpu" if settings.device.startswith("cuda") else "disk")
    out, size = [], total_rows
    while True:
        for checkpointing in (False, True):
            for cache in caches:
                out.append(estimate(shape, replace(settings, batch_size=size, accumulate=math.ceil(total_rows / size),
                                                   gradient_checkpointing=checkpointing, teacher_cache=cache)))
        if size == 1:
            return out
        size = math.ceil(size / 2)


def fit(shape: ModelShape, settings: PlanSettings, memory: int) -> Optional[Plan]:
    """The cheapest of :func:`candidates` whose peak fits in ``memory`` bytes; None if none does."""
    return next((p for p in candidates(shape, settings) if p.fits(memory)), None)


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``40GiB``, ``80GB``, ``512MiB`` or ``1e9``."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not m or m.group(2) not in _UNITS:
        raise UnlearnFastError(f"cannot read the size {text!r}; write e.g. 40GiB, 80GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def format_size(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
