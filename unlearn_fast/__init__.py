"""unlearn_fast: remove chosen data from trained language models with EUL unlearning layers.

Public API: :func:`load_model`, :func:`unlearn`, :func:`load_layers`, :func:`evaluate_sets`, the
configs (:class:`LayerConfig`, :class:`ObjectiveConfig`, :class:`TrainConfig`) and the layer
switches in :mod:`unlearn_fast.layers`.
"""

__version__ = "0.1.0"

from .api import UnlearnResult, unlearn  # noqa: E402
from .artifacts import load_layers, load_layers_together, read_manifest  # noqa: E402
from .fusion import fuse_artifacts  # noqa: E402
from .data import Columns, Example, load_examples  # noqa: E402
from .errors import UnlearnFastError  # noqa: E402
from .evaluation import evaluate_sets  # noqa: E402
from .hub import load_model  # noqa: E402
from .layers import LayerConfig, attach, detach, layers_disabled, set_enabled  # noqa: E402
from .objective import ObjectiveConfig  # noqa: E402
from .trainer import TrainConfig  # noqa: E402

__all__ = [
    "Columns", "Example", "LayerConfig", "ObjectiveConfig", "TrainConfig", "UnlearnFastError",
    "UnlearnResult", "attach", "detach", "evaluate_sets", "fuse_artifacts", "layers_disabled", "load_examples",
    "load_layers", "load_layers_together", "load_model", "read_manifest", "set_enabled", "unlearn",
]
