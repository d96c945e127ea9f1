"""Data-parallel and sharded unlearning on ``torch.distributed`` (``torchrun`` / ``accelerate launch``).

Data parallel (the default under ``torchrun --nproc_per_node N``)
    Every rank loads the same model and data and builds the same global batches (the batch order
    is a function of the seed). Each rank trains on its share of every global batch
    (:func:`split_rows`), so N processes see exactly the rows one process would see in one
    step. Each EUL term is a mean over its own token positions in the *global* batch: the
    normalisers are counted from the global batch on every rank (:func:`term_counts`, no
    communication), so a rank's loss is its part of the one-process loss and the per-rank
    gradients simply add up.

    Gradients: the unlearning layers' gradients are summed across ranks with one all-reduce of a
    flat fp32 bucket per step (:meth:`DataParallel.reduce`), which also carries the loss and the
    logged term sums. This is DDP's algorithm done explicitly rather than by wrapping the model
    in ``DistributedDataParallel``: the layers run inside the frozen model's forward (their
    sites are swapped into each block), while DDP's reducer must see the forward of the module
    it wraps, and wrapping the whole model would register every frozen base parameter. The
    layers' gradients are small (33.7 MB per step for a 1B-shaped model with r=128 layers on 16
    blocks), so overlapping their all-reduce with the backward pass would gain little. Initial
    layer weights are broadcast from rank 0 (as DDP does), after which every rank applies the
    same update to the same weights, so they stay equal.

Sharded base (``--shard-base``)
    The frozen base's transformer blocks are sharded with FSDP2 (``fully_shard``) over all ranks;
    the model root that the forward enters through is sharded too, with the unlearning layers
    and the output head left out (``ignored_params``): the layers stay replicated and train as
    above, and the fused loss head reads the whole head weight. Every rank must then run the
    same sequence of forwards, so the per-row teacher cache and the shared-trunk replay (which
    skip forwards depending on what a rank has seen) are switched off, a rank without rows in a
    global batch runs a zero-weight forward on a borrowed row, and Gram collection pads the
    ranks to the same number of batches. Causal LMs and classifiers; not encoder-decoders.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import re
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UnlearnFastError
from ..model.family import backbone, output_head
from ..model.layers import block_lists, unlearning_parameters
from ..ops.loss_head import IGNORE_INDEX
from .encoding import Row

# the order of the four normalisers in ``batch["term_counts"]`` (see objective.coefficients)
COUNT_TERMS = ("retain_kl", "forget_kl", "task_loss", "forget_lm_loss")
# figures reported beside the terms that are means over one term's positions too
COUNTED_LIKE = {"forget_kl_coef": "forget_kl", "retain_output": "retain_kl"}


def count_index(name: str) -> Optional[int]:
    """The index in :data:`COUNT_TERMS` of the positions ``name`` is a mean over (None: another figure)."""
    name = COUNTED_LIKE.get(name, name)
    return COUNT_TERMS.index(name) if name in COUNT_TERMS else None

_OWNED = False  # whether this module created the process group (and so destroys it)

# what gloo says when the other end of a connection went away (it names an address, not a rank)
_PEER_GONE = re.compile(r"connection (reset|closed|refused)|closed by peer|broken pipe|read error|write error|"
                        r"timed out|timeout", re.IGNORECASE)


class RankLostError(UnlearnFastError):
    """Another rank stopped (its process died or failed) while this one waited for it in a collective."""


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Run the collective ``what``; when it fails because a peer went away, raise one-line
    :class:`RankLostError` naming the likely dead rank (the other one, in a world of two).

    Without torchrun's agent nobody stops the survivors of a dead rank: each sees only a gloo error
    naming an address. Other errors (a bug, mismatched shapes) pass through unchanged.
    """
    try:
        yield
    except RuntimeError as err:
        if not (is_distributed() and _PEER_GONE.search(str(err))):
            raise
        lost = f"rank {1 - rank()}" if world_size() == 2 else "another rank"
        detail = re.search(r"\]:\d+: ([^.]+)", str(err))  # gloo: "Read error [ADDR]:PORT: Connection reset by peer."
        reason = (detail.group(1) if detail else _PEER_GONE.search(str(err)).group(0)).lower()
        raise RankLostError(f"rank {rank()} of {world_size()}: lost {lost} during {what} ({reason}); its process "
                            f"likely died or failed, see its own output") from None


# -- process group ---------------------------------------------------------------------
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def launched_world_size() -> int:
    """WORLD_SIZE as ``torchrun`` sets it (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init_from_env(device: Optional[str] = None, force: bool = False) -> Optional[str]:
    """Join the process group ``torchrun`` describes in the environment; return this rank's device.

    Does nothing (returns ``device``) unless WORLD_SIZE > 1 (or ``force`` and WORLD_SIZE is set,
    e.g. FSDP on one GPU). The backend is NCCL when the rank runs on CUDA, else gloo; a CUDA rank
    uses ``cuda:LOCAL_RANK``.
    """
    global _OWNED
    if is_distributed():
        return device
    if launched_world_size() <= 1 and not (force and "WORLD_SIZE" in os.environ):
        return device
    if not dist.is_available():
        raise UnlearnFastError("this torch build has no torch.distributed")
    wants_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    if wants_cuda:
        if not torch.cuda.is_available():
            raise UnlearnFastError("--device cuda was asked for but CUDA is not available")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
        dist.init_process_group("nccl", device_id=torch.device(device),
                                timeout=datetime.timedelta(minutes=30))
    else:
        device = "cpu"
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    _OWNED = True
    return device


def shutdown() -> None:
    """Leave the process group if :func:`init_from_env` created it."""
    global _OWNED
    if _OWNED and is_distributed():
        dist.destroy_process_group()
    _OWNED = False


def backend_name() -> Optional[str]:
    return dist.get_backend() if is_distributed() else None


def comm_device() -> torch.device:
    """Where collective buffers live: the current CUDA device under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        with collective("a barrier"):
            dist.barrier()


def all_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks of a few numbers (float64)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=comm_device())
    if is_distributed():
        with collective("a sum over ranks"):
            dist.all_reduce(t)
    return t.cpu().tolist()


def all_gather_floats(value: float) -> list[float]:
    """Every rank's ``value``, in rank order."""
    if not is_distributed():
        return [float(value)]
    t = torch.tensor([float(value)], dtype=torch.float64, device=comm_device())
    out = [torch.zeros_like(t) for _ in range(world_size())]
    with collective("a gather over ranks"):
        dist.all_gather(out, t)
    return [float(x.item()) for x in out]


def broadcast_object(value, what: str = "a broadcast from rank 0"):
    """Rank 0's ``value`` (any picklable object) on every rank; ``value`` itself in one process."""
    if not is_distributed():
        return value
    holder = [value]
    with collective(what):
        dist.broadcast_object_list(holder, src=0, device=comm_device())
    return holder[0]


def check_same(text: str, what: str) -> None:
    """Refuse to go on unless every rank holds the same ``text`` (e.g. the base fingerprint)."""
    if not is_distributed():
        return
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")
    t = torch.tensor([h, -h], dtype=torch.int64, device=comm_device())
    with collective(f"the check of the {what}"):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != h or int(-t[1]) != h:
        raise UnlearnFastError(f"the ranks do not hold the same {what}; every rank must load the same "
                               f"model and data")


# -- batches ---------------------------------------------------------------------------
def owners(retain: Sequence[Row], forget: Sequence[Row], world: int) -> dict[int, int]:
    """A home rank per row (its index in retain + forget, modulo the world size).

    :func:`split_rows` prefers sending a row to its home rank, so the per-rank teacher cache
    mostly holds 1/N of the rows and keeps hitting in later epochs.
    """
    return {id(r): i % world for i, r in enumerate(list(retain) + list(forget))}


def split_rows(group: Sequence[Row], world: int, rank_: int, home: Optional[dict[int, int]] = None) -> list[Row]:
    """This rank's share of a global batch: sizes differ by at most one (the first ranks get the
    extra rows); rows go to their home rank while it has room, the rest fill the other ranks in
    order. Deterministic: every rank computes every share identically."""
    n = len(group)
    sizes = [n // world + (1 if r < n % world else 0) for r in range(world)]
    shares: list[list[Row]] = [[] for _ in range(world)]
    overflow = []
    for row in group:
        r = home.get(id(row)) if home else None
        if r is not None and len(shares[r]) < sizes[r]:
            shares[r].append(row)
        else:
            overflow.append(row)
    overflow.reverse()
    for r in range(world):
        while len(shares[r]) < sizes[r]:
            shares[r].append(overflow.pop())
    return shares[rank_]


def term_counts(rows: Sequence[Row]) -> torch.Tensor:
    """Token positions of each EUL term in ``rows`` (order: :data:`COUNT_TERMS`): the KL terms
    count KL-mask positions, the task / LM terms positions with a target; retained vs forgotten."""
    counts = [0, 0, 0, 0]
    for r in rows:
        kl = sum(1 for m in r.kl_mask if m)
        ce = sum(1 for t in r.targets if t != IGNORE_INDEX)
        if r.forget:
            counts[1] += kl
            counts[3] += ce
        else:
            counts[0] += kl
            counts[2] += ce
    return torch.tensor(counts, dtype=torch.int64)


def row_tokens(rows: Sequence[Row]) -> int:
    """Real tokens of ``rows`` (what :func:`unlearn_fast.train.encoding.token_count` counts on their batch)."""
    return sum(len(r.input_ids) + len(r.decoder_input_ids or ()) for r in rows)


class DataParallel:
    """What the trainer does differently with N > 1 ranks (see the module docstring)."""

    def __init__(self, params: Sequence[nn.Parameter], retain: Sequence[Row], forget: Sequence[Row],
                 global_normalisers: bool):
        self.params = list(params)
        self.world, self.rank = world_size(), rank()
        self.home = owners(retain, forget, self.world)
        # an objective whose terms are normalised by global counts gives per-rank parts of one
        # loss: sum them; any other objective gives per-rank means: average them
        self.sum = global_normalisers

    @staticmethod
    def current(params, retain, forget, objective) -> Optional["DataParallel"]:
        if world_size() <= 1:
            return None
        return DataParallel(params, retain, forget, bool(getattr(objective, "global_normalisers", False)))

    def broadcast_parameters(self) -> None:
        """Start every rank from rank 0's weights (as DDP does when it wraps a model)."""
        with torch.no_grad():
            for p in self.params:
                buf = p.detach().to(comm_device())
                with collective("the broadcast of the initial weights"):
                    dist.broadcast(buf, src=0)
                if buf.data_ptr() != p.data_ptr():
                    p.copy_(buf.to(p.device))

    def share(self, group: Sequence[Row]) -> tuple[list[Row], bool]:
        """(rows this rank runs, whether they count). A rank with no rows in the global batch
        runs the first row with zero weight, so that every rank calls the same collectives."""
        rows = split_rows(group, self.world, self.rank, self.home)
        return (rows, True) if rows else ([group[0]], False)

    def reduce(self, loss: torch.Tensor, terms: dict, rows: Sequence[Row], group: Sequence[Row],
               counts: bool, global_counts: torch.Tensor) -> tuple[float, dict, int]:
        """All-reduce gradients, loss, term sums and tokens in one flat fp32 bucket.

        Returns the global loss, the global per-term means and the global token count.
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        local = term_counts(rows).double() if counts else torch.zeros(4, dtype=torch.float64)
        names = list(terms)
        stats = [loss.detach().float().item() if counts else 0.0]
        for k in names:
            if count_index(k) is not None:  # a mean over the term's own positions: add value × count
                c = float(local[count_index(k)])
                stats.append(terms[k] * c if c else 0.0)
            else:  # another objective's figure: average over the ranks that ran rows
                stats.append(terms[k] if counts else 0.0)
        stats.append(1.0 if counts else 0.0)
        stats.append(float(row_tokens(rows)) if counts else 0.0)
        device = comm_device()
        flat = torch.cat([g.detach().reshape(-1).to(device, torch.float32) for g in grads]
                         + [torch.tensor(stats, dtype=torch.float32, device=device)])
        with collective("the gradient all-reduce"):
            dist.all_reduce(flat)
        if not self.sum:
            flat[: flat.numel() - len(stats)] /= self.world
        offset = 0
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                n = g.numel()
                piece = flat[offset: offset + n].view_as(g).to(g.device, g.dtype)
                if p.grad is None:
                    p.grad = piece
                else:
                    p.grad.copy_(piece)
                offset += n
        tail = flat[offset:].double().cpu().tolist()
        ran, tokens = tail[-2], int(round(tail[-1]))
        loss_value = tail[0] if self.sum else tail[0] / max(ran, 1.0)
        reduced = {}
        for i, k in enumerate(names):
            v = tail[1 + i]
            if count_index(k) is not None:
                n = int(global_counts[count_index(k)])
                reduced[k] = v / n if n else float("nan")
            else:
                reduced[k] = v / ran if ran else float("nan")
        return loss_value, reduced, tokens


# -- FSDP2 -----------------------------------------------------------------------------
def shard_base(model: nn.Module, task: str, device: Optional[str] = None) -> None:
    """Shard the frozen base with FSDP2 over all ranks; unlearning layers and the head stay whole.

    Call after :func:`unlearn_fast.model.layers.attach`. Every block of the model's block list becomes
    one FSDP unit; the module the forward enters through (the backbone of a causal LM, the
    whole model of a classifier) becomes the root unit, holding what is left (embeddings, final
    norm). Parameters FSDP does not manage (the layers, the head) are moved to ``device``.
    """
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as err:  # pragma: no cover - old torch
        raise UnlearnFastError(f"--shard-base needs FSDP2 (torch.distributed.fsdp.fully_shard): {err}") from None
    if not is_distributed():
        raise UnlearnFastError("--shard-base needs torch.distributed: launch with torchrun "
                               "(torchrun --nproc_per_node N -m unlearn_fast.cli unlearn ... --shard-base)")
    if task == "seq2seq":
        raise UnlearnFastError("--shard-base supports causal LMs and classifiers; an encoder-decoder's "
                               "encoder and decoder share their embeddings across two forward entries")
    backend = dist.get_backend()
    mesh_device = "cuda" if backend == "nccl" else "cpu"
    if device is None:
        device = str(comm_device())
    mesh = init_device_mesh(mesh_device, (world_size(),))
    head = output_head(model, task)
    ignored = set(unlearning_parameters(model))
    ignored |= {t for t in (head.weight, head.bias) if isinstance(t, nn.Parameter)}
    for _, blocks in block_lists(model):
        for block in blocks:
            fully_shard(block, mesh=mesh, ignored_params=ignored, reshard_after_forward=True)
    root = backbone(model) if task == "causal" else model
    fully_shard(root, mesh=mesh, ignored_params=ignored)
    _move_unmanaged(model, torch.device(device))


def _move_unmanaged(model: nn.Module, device: torch.device) -> None:
    """Move the parameters and buffers FSDP does not hold (plain tensors) to ``device``."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and not isinstance(p, DTensor) and p.device != device:
                    p.data = p.data.to(device)
            for name, b in list(module._buffers.items()):
                if b is not None and not isinstance(b, DTensor) and b.device != device:
                    module._buffers[name] = b.to(device)


def sharded_params(model: nn.Module) -> int:
    """Elements of the parameters FSDP shards (0 for a model that is not sharded)."""
    if not is_distributed():
        return 0
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return 0
    return sum(p.numel() for p in model.parameters() if isinstance(p, DTensor))
