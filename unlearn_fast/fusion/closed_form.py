"""Closed-form fusion of the unlearning layers of several deletion requests (EUL, Chen & Yang 2023).

Each request i trained one unlearning layer per site and stored, for each of its two linear maps,
the Gram matrix of that map's augmented inputs over request i's forget data, G_i = Σ [x, 1]ᵀ[x, 1]
(see :mod:`unlearn_fast.fusion.grams`). Fusion finds, per site and per linear map, the one map that best
reproduces every request's map on that request's own inputs:

    W_m = argmin_W  Σ_i ‖X_i W − X_i W_i‖²  +  ρ·s ‖W without its bias row‖²
        = (Σ_i G_i + ρ·s·J)⁻¹  Σ_i G_i W_i

where W_i = [Wᵀ; bᵀ] is the augmented weight (input-major, [in + 1, out]) so the bias is fused with
the weights, and J = diag(1, …, 1, 0). Everything is float64; the system is solved with one
Cholesky factorisation per linear map, reused for all ``out`` right-hand sides.

Choices (documented here because they change results):

- **ρ is relative.** The ridge added is ``rho × s``, s = the mean per-feature spread of the inputs
  (the mean diagonal of the centred summed Gram matrix, Σ_j (G_jj − G_jn²/N) / in; see
  :func:`ridge_scale`), so the same ``rho`` means the same thing at any activation scale, offset
  or token count. Any ρ > 0 makes a singular Gram (a forget set with fewer tokens than d) solvable.
- **Default ρ = 0.03** (:data:`DEFAULT_RHO`), chosen by measurement, not for exactness. Forget sets
  are small (tens of tokens per request against d in the hundreds), so ΣG has many weak directions;
  a tiny ridge fits every request's map exactly with huge weights there, which the retained data
  then hits. Measured (``benchmarks/fusion_quality.py``: SmolLM2-135M, 4 requests × 3 capitals,
  rank-16 layers on 8 blocks) — fused-layer retain accuracy / general-text perplexity, K layers
  active for reference 93 % / 33.4: ρ = 1e-6 → 0 % / 3·10¹⁷ (collapse), 1e-4 → 93 % / 53.6,
  1e-3 → 100 % / 36.7 (one forgotten fact back), 1e-2 → 100 % / 34.7, 3e-2 → 100 % / 33.4 (all
  forget accuracies 0 %), 1e-1 → 100 % / 32.1 (one fact back). The price: fusing one layer returns
  it only approximately (the ridge shrinks it in its weak directions). ``rho=0`` is the exact
  normal-equation solve (fusing one layer returns it to ~1e-15, and the fused maps equal an
  independent least-squares solve); it fails with a clear error on a singular Gram. In directions
  no forget set visited, any ρ > 0 sends the fused weights to zero (minimum-norm least squares).
- **The bias is not penalised.** J leaves the constant input's diagonal at its Gram value, the
  token count N. The system stays positive definite for any ρ > 0 and N > 0:
  vᵀ(G + ρJ)v = ‖Xu + t·1‖² + ρ‖u‖² vanishes only for u = 0, t = 0.
- **Each linear map is regressed on its own stored inputs**, as in the paper: the up-projection on
  the post-activation inputs act(D_i x + b_i) of request i's *own* down-projection, although the
  fused layer feeds it the fused down-projection's activations. Bottleneck unit j of every request
  is treated as the same input feature, which is only meaningful when the layers start from the
  same initialisation (same seed) — the paper's setting.
- **Associativity.** A fused artifact carries the summed Gram matrices and the summed cross terms
  C = Σ_i G_i W_i (keys ``<site>.<k>.down.cross`` / ``.up.cross``, float64, [in + 1, out]). Fusing
  it again uses C rather than G·W_m, so ``fuse(fuse(a, b), c)`` equals ``fuse(a, b, c)`` up to
  rounding for any ρ (not only for ρ = 0), and a request's undo is a re-fusion of the rest.
- **Cost: the products are paid once per request, when its artifact is written.** Per linear map
  fusion sums K Gram matrices and K cross terms, factors the system once (Cholesky, float64) and
  makes two triangular solves. The products G_i·W_i, the largest part of the flops (at d = 2048,
  r = 128: 1.07 GFLOP per request and site, against 2.9 for one factorisation shared by all K), are
  stored in every artifact as its cross term (:func:`unlearn_fast.io.artifacts.write_artifact` adds
  them), so fusing ``unlearn`` artifacts only sums and solves; artifacts written without them
  (older versions) get them computed here. The Gram sums are made in place in one float64 buffer
  per map, the factorisation in place in one reused buffer; inputs read from files are memory-
  mapped and read one map at a time, so memory stays at the output plus one map's inputs. Numbers
  (10 requests, 16 sites, d = 2048, r = 128 on 2 CPU cores: ~1.5–2 s with stored cross terms,
  ~5 s without): ``benchmarks/test_bench_fusion.py``.

Fusion needs one layer per site per input artifact (what ``unlearn`` writes; K layers active on one
model run *summed*, which is a different model from K alternatives and cannot be regressed this
way), the same base model (fingerprint), task, sites, ranks and activations in every input.
"""

from __future__ import annotations

import datetime
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import ArtifactError, UnlearnFastError
from ..io.artifacts import (
    MANIFEST_FILE, WEIGHTS_FILE, check_writable, cross_term, read_artifact, write_artifact
)
from ..version import __version__

DEFAULT_RHO = 0.03  # relative; see the module docstring for the measurement behind it
SUBLAYERS = ("down", "up")
PathLike = Union[str, Path]


class FusionError(UnlearnFastError):
    """The fusion problem itself cannot be solved as asked (e.g. a singular Gram with ρ = 0)."""


# --------------------------------------------------------------------------------------------
# The math: tensors in, tensors out
# --------------------------------------------------------------------------------------------


def _shapes(rec: dict, sub: str) -> tuple[int, int]:
    """(inputs, outputs) of a site's linear sub-layer."""
    dim, rank = rec["dim"], rec["ranks"][0]
    return (dim, rank) if sub == "down" else (rank, dim)


def _tensor(tensors: Mapping[str, torch.Tensor], key: str, shape: tuple, name: str, what: str) -> torch.Tensor:
    t = tensors.get(key)
    if t is None:
        raise ArtifactError(f"{name}: missing {what} {key}")
    if tuple(t.shape) != shape:
        raise ArtifactError(f"{name}: {key} has shape {tuple(t.shape)}, expected {shape}")
    return t


def gram_and_cross(tensors: Mapping[str, torch.Tensor], key: str, n_in: int, n_out: int,
                   name: str = "layers") -> tuple[torch.Tensor, torch.Tensor]:
    """(G, C = G · [Wᵀ; bᵀ]) of the linear map ``key`` (``<site>.<k>.<sub>``), C float64 [n_in + 1, n_out].

    A stored ``<key>.cross`` (what ``unlearn`` and ``fuse`` write) wins over recomputing it from the
    weights (older artifacts). Stored tensors are returned as stored, not copied.
    """
    gram = _tensor(tensors, f"{key}.gram", (n_in + 1, n_in + 1), name,
                   "Gram matrix (only artifacts written by `unlearn` or `fuse` store them)")
    if f"{key}.cross" in tensors:
        return gram, _tensor(tensors, f"{key}.cross", (n_in + 1, n_out), name, "cross term").double()
    weight = _tensor(tensors, f"{key}.weight", (n_out, n_in), name, "weight")
    bias = _tensor(tensors, f"{key}.bias", (n_out,), name, "bias")
    return gram, cross_term(gram, weight, bias)


def ridge_scale(gram: torch.Tensor) -> float:
    """s: the mean per-feature spread of the inputs, Σ_j (G_jj − G_jn²/N) / n — the mean diagonal of
    the *centred* Gram matrix (the unpenalised bias absorbs the inputs' mean). Falls back to the
    plain mean diagonal, then 1, for degenerate inputs."""
    n = gram.shape[0] - 1
    diag, tokens = gram.diagonal()[:n].double(), float(gram[n, n])
    centred = float((diag - gram[:n, n].double() ** 2 / tokens).mean())
    plain = float(diag.mean())
    return centred if centred > 1e-12 * plain else (plain if plain > 0 else 1.0)


def solve_ridge(gram: torch.Tensor, cross: torch.Tensor, rho: float = DEFAULT_RHO,
                what: str = "layer", work: torch.Tensor | None = None) -> torch.Tensor:
    """(G + ρ·s·J)⁻¹ C in float64 by Cholesky, s = :func:`ridge_scale` (G).

    ``gram`` [n + 1, n + 1] (last row/column: the constant input), ``cross`` [n + 1, out].
    Returns the augmented weight [n + 1, out] (last row: the bias). ``work``: an optional
    contiguous float64 buffer of ``gram``'s shape to factor in (saves allocating one per call).
    """
    n = gram.shape[0] - 1
    tokens = float(gram[n, n])
    if not tokens > 0:
        raise FusionError(f"{what}: the Gram matrices cover no tokens; nothing to regress on")
    work = _empty(gram.shape) if work is None else work
    work.copy_(gram)
    # G is symmetric: the row-major copy, read column-major, is the same matrix, in the layout
    # LAPACK factors in place (no further copy). Upper (G = UᵀU): ~10 % faster than lower with MKL here.
    factor = work.mT
    factor.diagonal()[:n] += rho * ridge_scale(gram)
    _, info = torch.linalg.cholesky_ex(factor, upper=True, out=(factor, torch.empty((), dtype=torch.int32)))
    if int(info) != 0:
        raise FusionError(f"{what}: the summed Gram matrix is singular ({tokens:.0f} tokens for {n} inputs; too "
                          f"few tokens, or an input that never varies, such as a ReLU unit that never fires); "
                          f"use a ridge rho > 0 (default {DEFAULT_RHO:g})")
    half = torch.linalg.solve_triangular(factor.mT, cross.double(), upper=False)  # U⁻ᵀ C, then U⁻¹ of that
    return torch.linalg.solve_triangular(factor, half, upper=True)


def fuse_tensors(requests: Sequence[Mapping[str, torch.Tensor]], sites: Sequence[dict],
                 rho: float = DEFAULT_RHO, names: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
    """Fuse the layers of several requests (tensor dicts as stored in artifacts) into one.

    ``sites`` is the common site layout (the manifest's ``layers.sites``, one layer per site).
    Returns the fused artifact's tensors: per site ``<path>.0.<down|up>.<weight|bias>`` (in the
    inputs' weight dtype) and the summed ``.gram`` and ``.cross`` (float64). ``names`` label the
    inputs in error messages. The inputs are read one linear map at a time (``requests`` may be
    :class:`~unlearn_fast.io.artifacts.LazyTensors`), summed in place into one buffer each, and
    factored in one reused buffer per shape.
    """
    if not requests:
        raise UnlearnFastError("nothing to fuse: no layers given")
    _check_rho(rho)
    names = list(names) if names is not None else [f"layers #{i}" for i in range(len(requests))]
    out: dict[str, torch.Tensor] = {}
    work: dict[int, torch.Tensor] = {}  # factorisation buffers by size
    for rec in sites:
        if len(rec["ranks"]) != 1:
            raise ArtifactError(f"{rec['path']}: fusion needs one layer per site, the layout has {len(rec['ranks'])}")
        for sub in SUBLAYERS:
            n_in, n_out = _shapes(rec, sub)
            key = f"{rec['path']}.0.{sub}"
            terms = [gram_and_cross(tensors, key, n_in, n_out, name) for tensors, name in zip(requests, names)]
            gram, cross = _sum([g for g, _ in terms]), _sum([c for _, c in terms])
            if not (torch.isfinite(gram.sum()) and torch.isfinite(cross.sum())):  # NaN/inf anywhere shows
                _name_non_finite(requests, names, key, n_in, n_out)
            if n_in + 1 not in work:
                work[n_in + 1] = _empty((n_in + 1, n_in + 1))
            fused = solve_ridge(gram, cross, rho, what=key, work=work[n_in + 1])
            dtype = requests[0][f"{key}.weight"].dtype if f"{key}.weight" in requests[0] else torch.float32
            out[f"{key}.weight"] = fused[:n_in].t().contiguous().to(dtype)
            out[f"{key}.bias"] = fused[n_in].contiguous().to(dtype)
            out[f"{key}.gram"] = gram
            out[f"{key}.cross"] = cross
    return out


def _sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ tensors in float64, in one new buffer: the first addition writes it, the others add in place."""
    total = _empty(tensors[0].shape)
    if len(tensors) == 1:
        return total.copy_(tensors[0])
    torch.add(tensors[0], tensors[1], out=total)
    for t in tensors[2:]:
        total.add_(t)
    return total


def _empty(shape: Sequence[int]) -> torch.Tensor:
    """A new, uninitialised float64 CPU tensor in memory allocated by numpy, which (unlike torch's
    allocator, unless THP_MEM_ALLOC_ENABLE=1) asks Linux for transparent huge pages for large
    buffers: writing a new [2049, 2049] Gram sum then takes a few page faults instead of ~8000
    (measured on the 2-core VM: ~5 ms instead of ~30 ms per sum)."""
    return torch.from_numpy(np.empty(tuple(shape)))


def with_cross_terms(tensors: Mapping[str, torch.Tensor], sites: Sequence[dict],
                     name: str = "layers") -> dict[str, torch.Tensor]:
    """``tensors`` plus each linear map's cross term ``<site>.0.<sub>.cross`` (precomputed so that
    later fusions skip the G·W products, the larger part of their cost)."""
    out = dict(tensors)
    for rec in sites:
        for sub in SUBLAYERS:
            key = f"{rec['path']}.0.{sub}"
            out[f"{key}.cross"] = gram_and_cross(tensors, key, *_shapes(rec, sub), name)[1]
    return out


def _check_rho(rho: float) -> None:
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0):
        raise UnlearnFastError(f"rho must be a finite number ≥ 0, got {rho!r}")


def _name_non_finite(requests, names, key, n_in, n_out):
    for tensors, name in zip(requests, names):
        g, c = gram_and_cross(tensors, key, n_in, n_out, name)
        if not (torch.isfinite(g).all() and torch.isfinite(c).all()):
            raise ArtifactError(f"{name}: {key} has a non-finite (NaN or infinite) Gram matrix or weight")
    raise FusionError(f"{key}: the summed Gram matrices overflow")


# --------------------------------------------------------------------------------------------
# Artifacts: checks, request records, the fused artifact's manifest
# --------------------------------------------------------------------------------------------


def request_records(manifest: dict) -> list[dict]:
    """The deletion requests an artifact covers: fingerprints and counts, never data.

    A fused artifact lists its requests; a stored ledger entry carries its own record; a plain
    ``unlearn`` artifact is one request identified by the checksum of its tensor file.
    """
    if "fusion" in manifest:
        return list(manifest["fusion"]["requests"])
    if "request" in manifest:
        return [manifest["request"]]
    return [{"id": manifest.get("files", {}).get(WEIGHTS_FILE, "")[:16],
             "forget_set": manifest.get("forget_set"), "retain_set": manifest.get("retain_set"),
             "tokens": manifest.get("grams", {}).get("tokens"), "created": manifest.get("created")}]


def _require(manifest: dict, name: str, *keys: str):
    value = manifest
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            raise ArtifactError(f"{name}: the manifest has no {'.'.join(keys)}")
        value = value[key]
    return value


def _layout_key(rec: dict) -> tuple:
    return (rec["path"], rec["dim"], tuple(rec["ranks"]), tuple(rec["activations"]))


def check_compatible(manifests: Sequence[dict], names: Sequence[str]) -> list[dict]:
    """Refuse (ArtifactError naming the file) inputs that cannot be fused; return the common layout.

    Same base fingerprint, task, sites, ranks and activations; one layer per site; Gram matrices
    present (per the manifest); no request covered twice.
    """
    for manifest, name in zip(manifests, names):
        _require(manifest, name, "base_model", "fingerprint")
        for rec in _require(manifest, name, "layers", "sites"):
            if not (isinstance(rec, dict) and {"path", "dim", "ranks", "activations"} <= set(rec)):
                raise ArtifactError(f"{name}: the manifest's layers.sites records are incomplete")
    first, first_name = manifests[0], names[0]
    layout = first["layers"]["sites"]
    seen: dict[str, str] = {}
    for manifest, name in zip(manifests, names):
        base = manifest["base_model"]
        if base["fingerprint"] != first["base_model"]["fingerprint"]:
            raise ArtifactError(
                f"{name}: trained on another base model ({base.get('name_or_path') or '?'}, fingerprint "
                f"{base['fingerprint'][:12]}) than {first_name} ({first['base_model']['fingerprint'][:12]}); "
                f"only layers of the same base model can be fused")
        if manifest.get("task") != first.get("task"):
            raise ArtifactError(f"{name}: task {manifest.get('task')!r} differs from {first_name} ({first.get('task')!r})")
        if "grams" not in manifest:
            raise ArtifactError(f"{name}: the artifact has no Gram matrices, so it cannot be fused")
        ours = manifest["layers"]["sites"]
        for rec in ours:
            if len(rec["ranks"]) != 1:
                raise ArtifactError(f"{name}: {rec['path']} holds {len(rec['ranks'])} layers; fusion takes "
                                    f"artifacts with one layer per site (one per request)")
        if [_layout_key(r) for r in ours] != [_layout_key(r) for r in layout]:
            raise ArtifactError(f"{name}: its unlearning layers differ from {first_name}'s "
                                f"({_layout_difference(ours, layout)}); only layers of the same shape can be fused")
        for req in request_records(manifest):
            if req["id"] in seen:
                raise ArtifactError(f"{name}: request {req['id']} is already covered by {seen[req['id']]}; "
                                    f"fusing it twice would count it twice")
            seen[req["id"]] = name
    return layout


def _layout_difference(ours: list[dict], theirs: list[dict]) -> str:
    a, b = {r["path"]: r for r in ours}, {r["path"]: r for r in theirs}
    if set(a) != set(b):
        extra, missing = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        parts = ([f"extra sites {', '.join(extra[:3])}"] if extra else []) + \
                ([f"no layers at {', '.join(missing[:3])}"] if missing else [])
        return "; ".join(parts)
    for path in b:
        for field in ("dim", "ranks", "activations"):
            if a[path][field] != b[path][field]:
                return f"{path}: {field} {a[path][field]} vs {b[path][field]}"
    return "site order"


def fused_manifest(manifests: Sequence[dict], sources: Sequence[str], layout: list[dict], rho: float) -> dict:
    """The manifest of a fused artifact: base model and layout of the inputs, every covered request."""

    first = manifests[0]
    requests = [r for m in manifests for r in request_records(m)]
    return {
        "package": {"name": "unlearn_fast", "version": __version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base_model": first["base_model"],
        "task": first.get("task"),
        # how the requests' prompt/response rows were encoded (train.encoding.chat_template_record), where
        # they agree; "mixed" where not (eval --layers then warns)
        "chat_template": (first.get("chat_template")
                          if all(m.get("chat_template") == first.get("chat_template") for m in manifests) else "mixed"),
        "layers": {"config": first["layers"].get("config"), "sites": layout},
        "grams": {"tokens": sum(int(m["grams"].get("tokens") or 0) for m in manifests),
                  "augmented_with_bias_column": True, "dtype": "float64", "cross_terms": True},
        "fusion": {
            "method": "closed-form ridge regression per linear map: W = (ΣG + ρ·s·J)⁻¹ Σ G·W_i",
            "rho": rho,
            "rho_is_relative_to": "mean diagonal s of the summed Gram matrix, bias entry excluded",
            "bias_penalised": False,
            "requests": requests,
            "sources": [{"path": src, "files": m.get("files", {})} for src, m in zip(sources, manifests)],
        },
    }


def fuse_artifacts(paths: Sequence[PathLike], out: PathLike, rho: float = DEFAULT_RHO,
                   overwrite: bool = False) -> Path:
    """Fuse the unlearning layers of the artifacts at ``paths`` into one artifact at ``out``.

    Checks every input (checksum, base model, layout, Gram matrices) before any work, writes
    atomically, refuses an existing ``out`` unless ``overwrite`` (and always refuses to overwrite
    one of its inputs). The inputs are only read. Returns ``out``.
    """
    paths = [Path(p) for p in paths]
    _check_rho(rho)
    if not paths:
        raise UnlearnFastError("nothing to fuse: give at least one artifact directory")
    out = check_writable(out, overwrite, inputs=paths)  # also: never over (or around) an input
    tensors, manifest = fuse_paths(paths, rho)
    return write_artifact(out, tensors, manifest, overwrite)


def fuse_paths(paths: Sequence[PathLike], rho: float = DEFAULT_RHO) -> tuple[dict[str, torch.Tensor], dict]:
    """Read, check and fuse the artifacts at ``paths``; return the fused (tensors, manifest) unwritten."""
    paths = [Path(p) for p in paths]
    _check_rho(rho)
    if not paths:
        raise UnlearnFastError("nothing to fuse: give at least one artifact directory")
    with ThreadPoolExecutor() as pool:  # the checksums (sha256, ~1.4 GB/s per core) on all cores
        manifests, tensors = zip(*pool.map(lambda p: read_artifact(p, lazy=True), paths))
    layout = check_compatible(manifests, [str(p) for p in paths])
    fused = fuse_tensors(tensors, layout, rho, [str(p / WEIGHTS_FILE) for p in paths])
    return fused, fused_manifest(manifests, [str(p) for p in paths], layout, rho)


def artifacts_in(folder: PathLike) -> list[Path]:
    """Every artifact directory directly inside ``folder`` (the original ``--merge_set``), by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: not a directory")
    found = sorted(p for p in folder.iterdir() if p.is_dir() and (p / MANIFEST_FILE).is_file())
    if not found:
        raise ArtifactError(f"{folder}: holds no unlearning artifacts (directories with a manifest.json)")
    return found
