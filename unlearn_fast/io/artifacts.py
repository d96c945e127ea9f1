"""Unlearning artifacts: a directory with ``unlearning_layers.safetensors`` and ``manifest.json``.

The safetensors file holds every unlearning layer's weights and what fusion needs: per linear map
the Gram matrix of its inputs and the cross term G·W (added when an artifact is written, see
:mod:`unlearn_fast.fusion.grams`); the manifest says which base model they belong to (a fingerprint of its weights), how they
were made, what they achieved, and the sha256 of the tensor file. Nothing is ever unpickled.

Writes are atomic: files go to a temporary sibling directory that is renamed into place (see
:mod:`unlearn_fast.io.atomic`), and an existing directory is replaced only when asked
(``overwrite=True``) and only if it is an artifact of this package (:func:`check_writable`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ArtifactError, OutputError
from ..model.layers import UnlearningSite, attach_from_description, sites
from .atomic import atomic_directory, ensure_directory, remove_stale
from .quantised import base_quantisation

FORMAT_VERSION = 1
WEIGHTS_FILE = "unlearning_layers.safetensors"
MANIFEST_FILE = "manifest.json"
BASELINE_FILE = "baseline.json"  # what a baseline's whole-model directory carries instead
EXPORT_FILE = "unlearning_export.json"  # what an exported model directory carries (io.export)
DONE_FILES = (MANIFEST_FILE, BASELINE_FILE, EXPORT_FILE)  # written last: their presence marks a finished output
_SAMPLE = 4096  # values hashed per parameter tensor


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the base model's parameter names, shapes and a strided sample of values.

    Values are rounded to bf16 first, so the same weights loaded in fp32, bf16 or fp16 (from a
    bf16 original) keep their fingerprint; unlearning sites are looked through.
    """
    site_paths = [s.path for s in sites(model)]
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if any(name.startswith(f"{path}.layers.") for path in site_paths):
            continue
        for path in site_paths:
            name = name.replace(f"{path}.base.", f"{path}.")
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLE)
        sample = flat[::step][:_SAMPLE].to("cpu", torch.bfloat16).view(torch.int16)
        digest.update(f"{name}:{tuple(p.shape)};".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def quantisation_hint(manifest: dict, model: nn.Module) -> str:
    """What to add to a fingerprint refusal when the base was loaded quantised in one run and not the
    other (the fingerprint is of the weights as loaded: an int8 / nf4 base has its own)."""
    trained, here = manifest.get("base_model", {}).get("quantization"), base_quantisation(model)
    if trained == here:
        return ""
    return (f" (they were trained on a base loaded {f'as --dtype {trained}' if trained else 'unquantised'}, this "
            f"one is {f'--dtype {here}' if here else 'unquantised'}: load the base as they were trained)")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _strict_json(value):
    """``value`` with NaN / infinite floats as null: the manifest must be valid JSON for any reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


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


def check_writable(out: Union[str, Path], overwrite: bool, inputs: Sequence = (), log: Callable = print) -> Path:
    """Check, before any work is spent, that the output directory ``out`` can be written; return it.

    First cleans what a killed earlier write of ``out`` left (:func:`~unlearn_fast.io.atomic.remove_stale`,
    reported through ``log``). Then refuses (OutputError, one line) an existing ``out`` unless
    ``overwrite``, and even then unless it is an artifact of this package and neither is nor
    holds the current directory or one of ``inputs`` (model, data, layers: paths, None skipped).
    Finally the parent directory is created and a probe file written in it, so an unwritable
    place fails now rather than after training.
    """
    out = Path(out)
    remove_stale(out, DONE_FILES, log)
    if out.is_symlink() and not out.exists():
        raise OutputError(f"{out} is a symbolic link to a missing {os.readlink(out)}; remove the link or "
                          f"choose another output directory")
    if out.exists():
        _check_holds_no_input(out, inputs)
        if not overwrite:
            raise OutputError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
        _check_replaceable(out)
    ensure_directory(out.parent)
    return out


def _check_holds_no_input(out: Path, inputs: Sequence) -> None:
    real = out.resolve()
    for given in inputs:
        if given is not None and Path(given).exists():
            path = Path(given).resolve()
            if path == real or real in path.parents:
                raise OutputError(f"{out} is one of the inputs or holds one ({given}); "
                                  f"choose another output directory")


def _check_replaceable(out: Path) -> None:
    """Refuse to replace ``out`` unless it is an artifact of ours and not where we run."""
    if not out.is_dir():
        raise OutputError(f"{out} exists and is not a directory; choose another output directory")
    real, cwd = out.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents:  # it cannot be renamed away (EBUSY) and we stand in it
        raise OutputError(f"{out} is or holds the current directory; run from elsewhere or "
                          f"choose another output directory")
    problem = _not_ours(out)
    if problem:
        raise OutputError(f"{out} {problem}; --overwrite replaces only an unlearn-fast artifact: "
                          f"move it away or choose another output directory")


def _not_ours(directory: Path) -> Optional[str]:
    """Why ``directory`` is not an output of this package that may be replaced whole (None if it is,
    or if it is empty: replacing it loses nothing)."""
    if not any(directory.iterdir()):
        return None
    manifest = _json_or_none(directory / MANIFEST_FILE)
    if isinstance(manifest, dict) and "format_version" in manifest:
        files = manifest.get("files")
        ours = {MANIFEST_FILE, *(files if isinstance(files, dict) else ())}
        extra = sorted(p.name for p in directory.iterdir() if p.name not in ours)
        return f"holds {extra[0]}, which is not part of the artifact" if extra else None
    baseline = _json_or_none(directory / BASELINE_FILE)
    if isinstance(baseline, dict) and (baseline.get("package") or {}).get("name") == "unlearn_fast":
        # a saved model's file names vary, but save_pretrained writes no folders
        folders = sorted(p.name for p in directory.iterdir() if p.is_dir())
        return f"holds the folder {folders[0]}, which is not part of the saved model" if folders else None
    export = _json_or_none(directory / EXPORT_FILE)
    if isinstance(export, dict) and (export.get("package") or {}).get("name") == "unlearn_fast":
        files = export.get("files")
        ours = {EXPORT_FILE, *(files if isinstance(files, dict) else ())}
        extra = sorted(p.name for p in directory.iterdir() if p.name not in ours)
        return f"holds {extra[0]}, which is not part of the export" if extra else None
    return "is not an unlearn-fast artifact (no manifest.json saying so)"


def _json_or_none(path: Path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_artifact(out: Union[str, Path], tensors: dict[str, torch.Tensor], manifest: dict,
                   overwrite: bool = False, log: Callable = print) -> Path:
    """Write tensors + manifest to ``out`` atomically; return the directory.

    Every linear map with a Gram matrix, weight and bias but no cross term gets its cross term
    G·[Wᵀ; bᵀ] written too (:func:`cross_terms`): fusion then only sums and solves. An existing
    ``out`` is refused as :func:`check_writable` says; a failed write (a full disk) raises
    OutputError and leaves nothing behind.
    """
    out = check_writable(out, overwrite, log=log)
    tensors = {**tensors, **cross_terms(tensors)}
    with atomic_directory(out, done=DONE_FILES, log=log) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE))
        manifest = {**manifest, "format_version": FORMAT_VERSION,
                    "files": {WEIGHTS_FILE: sha256_file(tmp / WEIGHTS_FILE)}}
        with open(tmp / MANIFEST_FILE, "w") as f:  # last: a temporary with a manifest is finished
            json.dump(_strict_json(manifest), f, indent=2, sort_keys=True, allow_nan=False)
    return out


def inside(artifact: Union[str, Path], name: str) -> Path:
    """``artifact/name``, refused (ArtifactError) when it is a symbolic link or resolves outside the
    artifact directory: an artifact is read from its own files only, never from wherever a link
    planted in it points."""
    path = Path(artifact) / name
    if path.is_symlink() or not path.resolve().is_relative_to(Path(artifact).resolve()):
        raise ArtifactError(f"{path} is a symbolic link (to {os.path.realpath(path)}); an artifact's files must "
                            f"be plain files inside it: copy the real file there or write the artifact again")
    return path


def read_manifest(artifact: Union[str, Path]) -> dict:
    """The artifact's manifest (ArtifactError when it is missing, a link, not JSON or of another format)."""
    path = inside(artifact, MANIFEST_FILE)
    if not path.is_file():
        raise ArtifactError(f"{path}: manifest not found (is {artifact} an unlearning artifact?)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: not valid JSON ({err})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: unsupported artifact format {manifest.get('format_version')!r}")
    return manifest


class LazyTensors(Mapping):
    """A safetensors file's tensors, each memory-mapped from the file when asked for.

    The file is opened per tensor, so a tensor's mapping (and its resident pages) goes away with
    the tensor rather than staying for as long as the mapping object lives.
    """

    def __init__(self, path: Path):
        self._path = str(path)
        with safe_open(self._path, framework="pt") as f:
            self._keys = frozenset(f.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        with safe_open(self._path, framework="pt") as f:
            return f.get_tensor(key)

    def __contains__(self, key) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)


def read_artifact(artifact: Union[str, Path], lazy: bool = False) -> tuple[dict, Mapping[str, torch.Tensor]]:
    """(manifest, tensors) after checking the tensor file against the manifest's checksum.

    ``lazy``: the tensors as a :class:`LazyTensors` mapping that reads each from the file when
    asked (fusion reads one site at a time, so its memory stays at one site's tensors).
    """
    manifest = read_manifest(artifact)
    path = inside(artifact, WEIGHTS_FILE)
    if not path.is_file():
        raise ArtifactError(f"{path}: tensor file not found")
    files = manifest.get("files")
    if not isinstance(files, dict) or files.get(WEIGHTS_FILE) != sha256_file(path):
        raise ArtifactError(f"{path}: checksum does not match the manifest (file changed or corrupt)")
    try:
        return manifest, (LazyTensors(path) if lazy else load_file(str(path)))
    except SafetensorError as err:  # a checksum updated after the file was damaged
        raise ArtifactError(f"{path}: not a readable safetensors file ({err}); write the artifact again") from None


def load_layers(model: nn.Module, artifact: Union[str, Path], check_base: bool = True) -> dict:
    """Attach an artifact's unlearning layers to a freshly loaded base model; return the manifest.

    Refuses (ArtifactError) a model whose fingerprint differs from the one the layers were
    trained on, and a model that already carries unlearning layers.
    """
    manifest, tensors = read_artifact(artifact)
    if sites(model):
        raise ArtifactError("the model already has unlearning layers attached; load a fresh base model")
    check_layers(artifact, manifest, tensors)
    if check_base:
        expected = manifest["base_model"]["fingerprint"]
        if model_fingerprint(model) != expected:
            raise ArtifactError(f"{artifact}: these layers were trained on a different base model "
                                f"({manifest['base_model'].get('name_or_path')}); refusing to attach them"
                                f"{quantisation_hint(manifest, model)}")
    attach_from_description(model, manifest["layers"]["sites"])
    for s in sites(model):
        for k, layer in enumerate(s.layers):
            state = {}
            for name in layer.state_dict():
                key = f"{s.path}.{k}.{name}"
                if key not in tensors:
                    raise ArtifactError(f"{Path(artifact) / WEIGHTS_FILE}: missing tensor {key}")
                state[name] = tensors[key]
            layer.load_state_dict(state)
    return manifest


def check_layers(artifact: Union[str, Path], manifest: dict, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse (ArtifactError naming the file) a manifest that does not say which base model and
    which layers it holds, or tensors whose shapes differ from what it says (e.g. another rank)."""
    path = Path(artifact) / MANIFEST_FILE
    base = manifest.get("base_model")
    if not isinstance(base, dict) or not isinstance(base.get("fingerprint"), str):
        raise ArtifactError(f"{path}: base_model.fingerprint is missing or not a string; write the artifact again")
    layers = manifest.get("layers")
    records = layers.get("sites") if isinstance(layers, dict) else None
    if not isinstance(records, list):
        raise ArtifactError(f"{path}: layers.sites is missing or not a list; write the artifact again")
    for rec in records:
        try:
            dim, ranks = int(rec["dim"]), [int(r) for r in rec["ranks"]]
            complete = {"path", "stack", "block"} <= rec.keys() and len(ranks) == len(rec["activations"])
        except (KeyError, TypeError, ValueError, AttributeError):
            complete = False
        if not complete:
            raise ArtifactError(f"{path}: a layers.sites record is incomplete ({str(rec)[:80]}); "
                                f"write the artifact again")
        for k, rank in enumerate(ranks):
            shapes = {"down.weight": (rank, dim), "down.bias": (rank,), "up.weight": (dim, rank), "up.bias": (dim,)}
            for name, shape in shapes.items():
                key = f"{rec['path']}.{k}.{name}"
                if key not in tensors:
                    raise ArtifactError(f"{Path(artifact) / WEIGHTS_FILE}: missing tensor {key}")
                if tuple(tensors[key].shape) != shape:
                    raise ArtifactError(f"{Path(artifact) / WEIGHTS_FILE}: {key} has shape "
                                        f"{tuple(tensors[key].shape)}, the manifest says {shape}")



def load_layers_together(model: nn.Module, artifacts, check_base: bool = True) -> list[dict]:
    """Attach the layers of several artifacts at once (e.g. K requests' layers before fusing them).

    In a block that several artifacts cover, their layers run side by side and their outputs are
    summed on the residual (see :mod:`unlearn_fast.ops.unlearning_layer`). All artifacts are read
    and checked (checksum, base model, tensors present, one activation per block) before the
    model is touched. Returns the manifests, in order.
    """
    artifacts = list(artifacts)
    if not artifacts:
        raise ArtifactError("no artifacts given to attach")
    if sites(model):
        raise ArtifactError("the model already has unlearning layers attached; load a fresh base model")
    loaded = [read_artifact(a) for a in artifacts]
    fingerprint = model_fingerprint(model) if check_base else None
    activation: dict[str, tuple[str, object]] = {}
    for artifact, (manifest, tensors) in zip(artifacts, loaded):
        check_layers(artifact, manifest, tensors)
        if check_base and manifest["base_model"]["fingerprint"] != fingerprint:
            raise ArtifactError(f"{artifact}: these layers were trained on a different base model "
                                f"({manifest['base_model'].get('name_or_path')}); refusing to attach them"
                                f"{quantisation_hint(manifest, model)}")
        for rec in manifest["layers"]["sites"]:
            for k, act in enumerate(rec["activations"]):
                seen = activation.setdefault(rec["path"], (act, artifact))
                if seen[0] != act:
                    raise ArtifactError(f"{artifact}: {rec['path']} uses {act} but {seen[1]} uses {seen[0]}; "
                                        f"layers in one block must share their activation")
    for manifest, tensors in loaded:
        records = manifest["layers"]["sites"]
        offsets = {}
        for rec in records:
            try:
                target = model.get_submodule(rec["path"])
            except AttributeError:
                target = None  # attach_from_description names the missing module
            offsets[rec["path"]] = len(target.layers) if isinstance(target, UnlearningSite) else 0
        attach_from_description(model, records)
        for rec in records:
            site = model.get_submodule(rec["path"])
            for k in range(len(rec["ranks"])):
                layer = site.layers[offsets[rec["path"]] + k]
                layer.load_state_dict({name: tensors[f"{rec['path']}.{k}.{name}"] for name in layer.state_dict()})
    return [manifest for manifest, _ in loaded]
