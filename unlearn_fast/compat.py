"""Old module paths, kept importable for one release (0.1.x) with a DeprecationWarning.

Until 0.1.0 the package was one flat folder (``unlearn_fast.layers``, ``unlearn_fast.trainer``, ...).
``import unlearn_fast.layers`` now gives the module at its new place, the same module object, so
monkeypatching and ``isinstance`` keep working. ``unlearn_fast.fusion`` and ``unlearn_fast.cli`` are
packages now and re-export what the old modules offered; they need no entry here.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "unlearn_fast.layers": "unlearn_fast.model.layers",
    "unlearn_fast.models": "unlearn_fast.model.family",
    "unlearn_fast.fused_trunk": "unlearn_fast.model.fused_trunk",
    "unlearn_fast.atomic": "unlearn_fast.io.atomic",
    "unlearn_fast.artifacts": "unlearn_fast.io.artifacts",
    "unlearn_fast.hub": "unlearn_fast.io.base_model",
    "unlearn_fast.data": "unlearn_fast.train.data",
    "unlearn_fast.encoding": "unlearn_fast.train.encoding",
    "unlearn_fast.objective": "unlearn_fast.train.objective",
    "unlearn_fast.selection": "unlearn_fast.train.selection",
    "unlearn_fast.step_cache": "unlearn_fast.train.step_cache",
    "unlearn_fast.trainer": "unlearn_fast.train.trainer",
    "unlearn_fast.checkpoint": "unlearn_fast.train.checkpoint",
    "unlearn_fast.distributed": "unlearn_fast.train.distributed",
    "unlearn_fast.grams": "unlearn_fast.fusion.grams",
    "unlearn_fast.ledger": "unlearn_fast.fusion.ledger",
    "unlearn_fast.metrics": "unlearn_fast.eval.metrics",
    "unlearn_fast.evaluation": "unlearn_fast.eval.evaluation",
    "unlearn_fast.baselines": "unlearn_fast.eval.baselines",
    "unlearn_fast.report": "unlearn_fast.eval.report",
}


class _MovedModuleLoader(importlib.abc.Loader):
    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old path goes away in 0.2", DeprecationWarning,
                      stacklevel=3)
        module = importlib.import_module(new)
        self._spec = module.__spec__  # the import system overwrites __spec__ after this: put it back
        return module

    def exec_module(self, module):  # the module at its new place has run already
        module.__spec__ = self._spec


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _MovedModuleLoader())


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
