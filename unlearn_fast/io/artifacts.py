"""Unlearning artifacts: a directory with ``unlearning_layers.safetensors`` and ``manifest.json``.

The safetensors file holds every unlearning layer's weights and what fusion needs: per linear map
the Gram matrix of its inputs and the cross term G·W (added when an artifact is written, see
:mod:`unlearn_fast.fusion.grams`); the manifest says which base model they belong to (a fingerprint of its weights), how they
were made, what they achieved, and the sha256 of the tensor file. Nothing is ever unpickled.

Writes are atomic: files go to a temporary sibling directory that is renamed into place, and an
existing directory is replaced only when asked (``overwrite=True``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ArtifactError
from ..model.layers import UnlearningSite, attach_from_description, sites
from .atomic import atomic_directory

FORMAT_VERSION = 1
WEIGHTS_FILE = "unlearning_layers.safetensors"
MANIFEST_FILE = "manifest.json"
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


def check_writable(out: Union[str, Path], overwrite: bool) -> Path:
    """Refuse an existing output (unless ``overwrite``) before any work is spent on it."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a directory")
    return out


def write_artifact(out: Union[str, Path], tensors: dict[str, torch.Tensor], manifest: dict,
                   overwrite: bool = False) -> Path:
    """Write tensors + manifest to ``out`` atomically; return the directory.

    Every linear map with a Gram matrix, weight and bias but no cross term gets its cross term
    G·[Wᵀ; bᵀ] written too (:func:`cross_terms`): fusion then only sums and solves.
    """
    out = check_writable(out, overwrite)
    tensors = {**tensors, **cross_terms(tensors)}
    with atomic_directory(out) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE))
        manifest = {**manifest, "format_version": FORMAT_VERSION,
                    "files": {WEIGHTS_FILE: sha256_file(tmp / WEIGHTS_FILE)}}
        with open(tmp / MANIFEST_FILE, "w") as f:
            json.dump(_strict_json(manifest), f, indent=2, sort_keys=True, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
    return out


def read_manifest(artifact: Union[str, Path]) -> dict:
    path = Path(artifact) / MANIFEST_FILE
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
    path = Path(artifact) / WEIGHTS_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: tensor file not found")
    expected = manifest.get("files", {}).get(WEIGHTS_FILE)
    if expected != sha256_file(path):
        raise ArtifactError(f"{path}: checksum does not match the manifest (file changed or corrupt)")
    return manifest, (LazyTensors(path) if lazy else load_file(str(path)))


def load_layers(model: nn.Module, artifact: Union[str, Path], check_base: bool = True) -> dict:
    """Attach an artifact's unlearning layers to a freshly loaded base model; return the manifest.

    Refuses (ArtifactError) a model whose fingerprint differs from the one the layers were
    trained on, and a model that already carries unlearning layers.
    """
    manifest, tensors = read_artifact(artifact)
    if sites(model):
        raise ArtifactError("the model already has unlearning layers attached; load a fresh base model")
    if check_base:
        expected = manifest["base_model"]["fingerprint"]
        if model_fingerprint(model) != expected:
            raise ArtifactError(f"{artifact}: these layers were trained on a different base model "
                                f"({manifest['base_model'].get('name_or_path')}); refusing to attach them")
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
        if check_base and manifest["base_model"]["fingerprint"] != fingerprint:
            raise ArtifactError(f"{artifact}: these layers were trained on a different base model "
                                f"({manifest['base_model'].get('name_or_path')}); refusing to attach them")
        for rec in manifest["layers"]["sites"]:
            for k, act in enumerate(rec["activations"]):
                seen = activation.setdefault(rec["path"], (act, artifact))
                if seen[0] != act:
                    raise ArtifactError(f"{artifact}: {rec['path']} uses {act} but {seen[1]} uses {seen[0]}; "
                                        f"layers in one block must share their activation")
                for name in ("down.weight", "down.bias", "up.weight", "up.bias"):
                    if f"{rec['path']}.{k}.{name}" not in tensors:
                        raise ArtifactError(f"{Path(artifact) / WEIGHTS_FILE}: missing tensor {rec['path']}.{k}.{name}")
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
