"""Exports: a base model with its unlearning layers, as a directory that loads without this package.

``hf`` (:func:`write_hf`): a self-contained transformers model directory::

    config.json              the base config, model_type ``unlearned_<base type>``, ``auto_map`` naming
                             the classes below, and ``unlearning_layers``: the sites (module path,
                             width, ranks, activations) and the provenance (base fingerprint, request
                             ids, source artifacts); never data, never Gram matrices
    model.safetensors        the base weights and the layers' weights (fp32), keyed by the wrapped
                             modules (``<ffn path>.base.*``, ``<ffn path>.unlearning_layers.<k>.*``)
    unlearning_layers.py     the modelling code: :mod:`unlearn_fast.io.hf_modelling` (torch and
                             transformers only) plus a config class and a model class subclassing the
                             base architecture's transformers classes
    generation_config.json   (models that generate), tokenizer files
    unlearning_export.json   written last (its presence marks a finished export): package, format,
                             provenance and the sha256 of every other file

``AutoModelForCausalLM`` (``AutoModelForSeq2SeqLM``, ``AutoModelForSequenceClassification``)
``.from_pretrained(DIR, trust_remote_code=True)`` loads it; without ``trust_remote_code`` transformers
refuses (the model type is not one of its own), so the layers cannot be silently dropped.

The weights are saved with the in-memory module names, not through ``save_pretrained``: the custom
class is loaded without transformers' checkpoint key conversions, so the names must be the module
names. Tied weights (e.g. GPT-2's LM head) are stored once, under the name transformers ties from.
"""

from __future__ import annotations

import json
import keyword
from importlib import resources
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import transformers
from safetensors.torch import save_file
from torch import nn

from ..errors import ModelError
from ..model.family import detect_task
from ..model.layers import describe, sites
from ..version import __version__
from .artifacts import DONE_FILES, EXPORT_FILE, check_writable, sha256_file
from .atomic import atomic_directory
from .hf_modelling import LAYERS_ATTRIBUTE

FORMATS = ("hf", "adapters")  # adapters: io.adapters_export
HF_FORMAT = "unlearn_fast.hf/1"
MODELLING_FILE = "unlearning_layers.py"
HF_WEIGHTS_FILE = "model.safetensors"
AUTO_CLASSES = {
    "causal": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "classification": "AutoModelForSequenceClassification",
}


def hf_sites(model: nn.Module) -> list[dict]:
    """The sites as the exported config lists them: path, width, ranks, activations, stack, block."""
    return [{"path": r["path"], "dim": r["dim"], "ranks": list(r["ranks"]), "activations": list(r["activations"]),
             "stack": r["stack"], "block": r["block"]} for r in describe(model)]


def _transformers_class(cls: type, what: str) -> str:
    """``cls``'s name, after checking that ``transformers`` exports it under that name."""
    name = cls.__name__
    if getattr(transformers, name, None) is not cls or not name.isidentifier() or keyword.iskeyword(name):
        raise ModelError(f"export --format hf needs a {what} class of transformers; {cls.__module__}.{name} "
                         f"is not one (a model with its own remote code cannot be re-exported)")
    return name


def class_names(model: nn.Module) -> tuple[str, str, str, str]:
    """(base config class, base model class, exported config class, exported model class)."""
    base_config = _transformers_class(type(model.config), "config")
    base_model = _transformers_class(type(model), "model")
    return base_config, base_model, f"Unlearned{base_config}", f"Unlearned{base_model}"


def modelling_source(model: nn.Module, model_type: str) -> str:
    """The text of ``unlearning_layers.py`` for ``model``: the template and this model's two classes."""
    base_config, base_model, config_cls, model_cls = class_names(model)
    template = resources.files(__package__).joinpath("hf_modelling.py").read_text(encoding="utf-8")
    return (f"{template}\n"
            f"from transformers import {base_config}, {base_model}  # noqa: E402\n\n\n"
            f"class {config_cls}({base_config}):\n"
            f"    model_type = {model_type!r}\n\n\n"
            f"class {model_cls}(UnlearningLayersMixin, {base_model}):\n"
            f"    config_class = {config_cls}\n"
            f"    _keep_in_fp32_modules_strict = keep_in_fp32({base_model})\n")


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors keyed as the exported class names them; each tied weight once.

    A site's layers move from ``<path>.layers.<k>`` to ``<path>.unlearning_layers.<k>``. A tensor
    that shares its memory with an earlier one is dropped when transformers ties it on loading
    (its name is a key of the model's tied-weights map), and copied otherwise.
    """
    renames = {f"{s.path}.layers.": f"{s.path}.{LAYERS_ATTRIBUTE}." for s in sites(model)}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    state, seen = {}, {}
    for name, tensor in model.state_dict().items():
        for old, new in renames.items():
            if name.startswith(old):
                name = new + name[len(old):]
                break
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key in seen and tensor.numel():
            if name in tied:
                continue
            tensor = tensor.clone()
        seen.setdefault(key, name)
        state[name] = tensor.detach().to("cpu").contiguous()
    return state


def hf_config(model: nn.Module, provenance: dict) -> dict:
    """config.json of the export: the base config with the exported classes and the layers' sites."""
    base_config, base_model, config_cls, model_cls = class_names(model)
    base_type = model.config.model_type
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    config.update({
        "model_type": f"unlearned_{base_type}",
        "architectures": [model_cls],
        "auto_map": {"AutoConfig": f"{Path(MODELLING_FILE).stem}.{config_cls}",
                     AUTO_CLASSES[detect_task(model)]: f"{Path(MODELLING_FILE).stem}.{model_cls}"},
        "dtype": _dtype_name(model),
        "unlearning_layers": {"format": HF_FORMAT, "base_model_type": base_type,
                              "base_architecture": base_model, "base_config_class": base_config,
                              "sites": hf_sites(model), "provenance": provenance},
    })
    return config


def _dtype_name(model: nn.Module) -> str:
    """The dtype of the base weights (the unlearning layers are fp32 whatever it is)."""
    layer_params = {id(p) for s in sites(model) for p in s.layers.parameters()}
    for p in model.parameters():
        if id(p) not in layer_params and p.is_floating_point():
            return str(p.dtype).replace("torch.", "")
    return "float32"


def write_hf(model: nn.Module, tokenizer, out: Union[str, Path], *, provenance: dict, overwrite: bool = False,
             inputs: Sequence = (), log: Callable = print) -> Path:
    """Write ``model`` (a transformers model with its unlearning layers attached) as an ``hf`` export.

    ``provenance`` goes into config.json and the export record (base fingerprint, request ids: no
    data). The directory is written atomically (:func:`~unlearn_fast.io.atomic.atomic_directory`):
    an interrupted export leaves no directory at ``out``. An existing ``out`` is refused unless
    ``overwrite``, and then unless it is an output of this package that holds none of ``inputs``.
    """
    if not sites(model):
        raise ModelError("the model has no unlearning layers attached; attach an artifact's layers first")
    if tokenizer is None:
        raise ModelError("export --format hf writes the tokenizer too: pass the base model's tokenizer")
    task = detect_task(model)
    if task not in AUTO_CLASSES:
        raise ModelError(f"export --format hf supports {', '.join(AUTO_CLASSES)} models, not {task}")
    config = hf_config(model, provenance)
    source = modelling_source(model, config["model_type"])
    state = hf_state_dict(model)
    out = check_writable(out, overwrite, inputs=inputs, log=log)
    with atomic_directory(out, done=DONE_FILES, log=log) as tmp:
        save_file(state, str(tmp / HF_WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / MODELLING_FILE).write_text(source, encoding="utf-8")
        with open(tmp / "config.json", "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        generation = getattr(model, "generation_config", None)
        if generation is not None and model.can_generate():
            try:
                generation.save_pretrained(tmp)
            except ValueError as err:  # transformers refuses to save an inconsistent generation config
                log(f"generation_config.json not written ({str(err).splitlines()[0]}); transformers "
                    f"derives one from config.json")
        tokenizer.save_pretrained(tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        record = {"package": {"name": "unlearn_fast", "version": __version__}, "format": HF_FORMAT,
                  "task": task, "auto_class": AUTO_CLASSES[task], "provenance": provenance, "files": files}
        with open(tmp / EXPORT_FILE, "w") as f:  # last: a temporary holding it is finished
            json.dump(record, f, indent=2, sort_keys=True)
    return out


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ModelError(f"unknown export format {fmt!r}; supported: {', '.join(FORMATS)}")
    return fmt


def provenance_record(manifests: Sequence[dict], sources: Sequence[Union[str, Path]],
                      requests: Optional[Sequence[dict]] = None) -> dict:
    """What an export says about where its layers came from: base model, task, request ids and the
    source artifacts (directory name, checksums, fusion ρ); never training data, Gram matrices, set
    hashes (a short set's hash would confirm a guess of it) or local paths."""
    first = manifests[0]
    base = first.get("base_model") or {}
    return {
        "base_model": {k: base.get(k) for k in ("name_or_path", "class", "fingerprint", "dtype")},
        "task": first.get("task"),
        "combined": "summed" if len(manifests) > 1 else "single",
        "requests": [{"id": r.get("id"), "created": r.get("created")} for r in (requests or [])],
        "sources": [{"name": Path(src).name, "created": m.get("created"),
                     "files": dict(m.get("files") or {}),
                     "package_version": (m.get("package") or {}).get("version"),
                     "fused": "fusion" in m,
                     "rho": (m.get("fusion") or {}).get("rho")} for m, src in zip(manifests, sources)],
    }
