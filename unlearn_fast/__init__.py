"""unlearn_fast: remove chosen data from trained language models with EUL unlearning layers.

Public API: :func:`load_model`, :func:`unlearn`, :func:`load_layers`, :func:`evaluate_sets`,
:func:`fuse_artifacts`, :func:`export`, the configs (:class:`LayerConfig`, :class:`ObjectiveConfig`,
:class:`TrainConfig`) and the layer switches (:func:`set_enabled`, :func:`layers_disabled`,
:func:`detach`). The package's layers, lowest first, are described in docs/architecture.md.
"""

from . import compat  # old flat module paths (unlearn_fast.layers, ...) keep importing, with a warning
from .api import UnlearnResult, export, unlearn
from .errors import UnlearnFastError
from .eval.evaluation import evaluate_sets
from .fusion.closed_form import fuse_artifacts
from .io.artifacts import load_layers, load_layers_together, read_manifest
from .io.base_model import load_model
from .model.layers import LayerConfig, attach, detach, layers_disabled, set_enabled
from .train.data import Columns, Example, load_examples
from .train.objective import ObjectiveConfig
from .train.trainer import TrainConfig
from .version import __version__

__all__ = [
    "Columns", "Example", "LayerConfig", "ObjectiveConfig", "TrainConfig", "UnlearnFastError",
    "UnlearnResult", "__version__", "attach", "detach", "evaluate_sets", "export", "fuse_artifacts", "layers_disabled",
    "load_examples", "load_layers", "load_layers_together", "load_model", "read_manifest", "set_enabled",
    "unlearn",
]
