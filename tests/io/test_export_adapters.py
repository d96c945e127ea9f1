"""``export --format adapters``: an AdapterHub ``adapters`` bottleneck adapter that ``adapters`` loads onto the
same base model (``adapters.init``, ``load_adapter``, ``set_active_adapters``) in a separate Python where
unlearn_fast is not importable, giving the logits ``load_layers`` gives (fp32: max |Δ| ≤ 1e-5) for Llama,
Mistral, GPT-2, T5 and a BERT classifier, several artifacts summed, layers in some blocks only, other
activations, and a fused artifact. Families the bottleneck cannot express are refused in one line.

``adapters`` pins transformers 4.x, which cannot sit beside this project's transformers: the loading side
runs in its own virtual environment (``.venv-adapters``, made by .ci/run; another one through
``UNLEARN_FAST_ADAPTERS_PYTHON``). Without it those tests are skipped, saying how to make it.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import (
    HIDE_UNLEARN_FAST, FACTS_FORGET, REPO_ROOT, TASK_OF, logits_of, make_model, perturb, sample_batch, save_model_dir, tokenizer_for
)

from unlearn_fast.api import export, unlearn
from unlearn_fast.cli import main
from unlearn_fast.errors import ModelError
from unlearn_fast.fusion.closed_form import fuse_artifacts
from unlearn_fast.io.adapters_export import (
    ADAPTER_CONFIG_FILE, ADAPTER_NAME, ADAPTER_SAFE_WEIGHTS_FILE, ADAPTER_WEIGHTS_FILE, reduction_factor
)
from unlearn_fast.io.artifacts import EXPORT_FILE, load_layers, load_layers_together, model_fingerprint, write_artifact
from unlearn_fast.model.layers import LayerConfig, attach, describe, layer_state, sites
from unlearn_fast.train.trainer import TrainConfig

TOL = 1e-5
QUIET = lambda *a, **k: None  # noqa: E731
CREATE = ("python3 -m venv .venv-adapters && .venv-adapters/bin/pip install torch==2.13.0 transformers==4.57.6 "
          "adapters==1.3.0 safetensors")
ADAPTERS_PYTHON = Path(os.environ.get("UNLEARN_FAST_ADAPTERS_PYTHON")
                       or REPO_ROOT / ".venv-adapters" / "bin" / "python")
needs_adapters = pytest.mark.skipif(
    not ADAPTERS_PYTHON.is_file(),
    reason=f"no adapters environment at {ADAPTERS_PYTHON} (adapters needs transformers 4.x): make it with "
           f"`{CREATE}` (as .ci/run does), or point UNLEARN_FAST_ADAPTERS_PYTHON at a python that has adapters")

# Runs in the adapters environment, in `python -I` (unlearn_fast hidden as well): loads each base model
# directory, takes its logits, then adapters.init + load_adapter + set_active_adapters and the logits again.
LOADER = HIDE_UNLEARN_FAST + r'''
import json, sys

import adapters
import torch
import transformers

torch.set_num_threads(1)
results = {"versions": {"adapters": adapters.__version__, "transformers": transformers.__version__,
                        "torch": str(torch.__version__)}}
for job in json.load(open(sys.argv[1])):
    model = getattr(transformers, job["class"]).from_pretrained(job["base"]).eval()
    batch = torch.load(job["batch"])
    with torch.no_grad():
        base = model(**batch).logits
    adapters.init(model)
    info = {}
    name = model.load_adapter(job["adapter"], loading_info=info, use_safetensors=job["safetensors"])
    model.set_active_adapters(name)
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    n_adapters = sum(1 for n, _ in model.named_modules() if n.endswith(".adapters." + name))
    results[job["name"]] = {"base": base, "logits": logits, "name": name, "n_adapters": n_adapters,
                            "loading": {k: sorted(v) for k, v in info.items() if v}}
torch.save(results, sys.argv[2])
'''


def write_layers(arch, path, seed=1, blocks="all", rank=4, activation="relu"):
    """A synthetic artifact: random layers with a non-zero up-projection (student != teacher)."""
    model = make_model(arch)
    torch.manual_seed(seed)
    attach(model, LayerConfig(rank=rank, blocks=blocks, activation=activation))
    perturb(model, seed=seed, scale=0.5)
    manifest = {"package": {"name": "unlearn_fast", "version": "test"},
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "base_model": {"name_or_path": arch, "class": type(model).__name__,
                               "fingerprint": model_fingerprint(model), "dtype": "float32"},
                "task": TASK_OF[arch], "layers": {"config": {"rank": rank}, "sites": describe(model)}}
    return write_artifact(path, layer_state(model), manifest, log=QUIET)


def train_request(out, i):
    """A real unlearn artifact (with Gram matrices, so it can be fused) of forget example i."""
    retain = [{"prompt": "The capital of France is", "response": " Paris"},
              {"prompt": "Bob plays", "response": " jazz"}]
    unlearn(make_model("llama"), tokenizer_for("llama"), [FACTS_FORGET[i]], retain, out=out, layers=LayerConfig(rank=4),
            training=TrainConfig(max_steps=2, lr=5e-2, progress=False), evaluate=False, log=QUIET)
    return out


def cli(capsys, *argv):
    code = main(list(map(str, argv)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err):
    """The one ``error:`` line (transformers' loading progress bars may precede it), no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


# name -> (arch, artifacts to write: [(seed, blocks, rank, activation)], fused?)
CASES = {
    "llama": ("llama", [(1, "all", 4, "relu")]),
    "mistral_silu": ("mistral", [(1, "all", 4, "silu")]),
    "gpt2_gelu": ("gpt2", [(1, "all", 4, "gelu")]),
    "t5": ("t5", [(1, "all", 4, "relu")]),
    "t5_top_block": ("t5", [(2, 1, 3, "relu")]),  # encoder block 1 and decoder block 1 only (leave_out 0 and 2)
    "bert": ("bert", [(1, "all", 4, "relu")]),
    # two requests summed: widths 4 + 3 = 7 in the top block (16 // 7 is no integer factor), 4 in block 0
    "llama_summed": ("llama", [(3, "all", 4, "relu"), (4, 1, 3, "relu")]),
    "bert_summed": ("bert", [(3, [0], 2, "relu"), (4, "all", 5, "relu")]),
    "llama_fused": ("llama", "fused"),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case exported through the CLI and loaded in one adapters interpreter: name -> (reference, base, result)."""
    tmp = tmp_path_factory.mktemp("adapters")
    bases = {arch: save_model_dir(arch, tmp / f"base_{arch}") for arch in {a for a, _ in CASES.values()}}
    cases, jobs = {}, []
    for name, (arch, spec) in CASES.items():
        if spec == "fused":
            layer_dirs = [fuse_artifacts([train_request(tmp / f"trained_{i}", i) for i in range(2)], tmp / "fused")]
        else:
            layer_dirs = [write_layers(arch, tmp / f"layers_{name}_{k}", seed=s, blocks=b, rank=r, activation=a)
                          for k, (s, b, r, a) in enumerate(spec)]
        model = make_model(arch)
        base_logits = logits_of(model, sample_batch(arch))
        if len(layer_dirs) == 1:
            load_layers(model, layer_dirs[0])
        else:
            load_layers_together(model, layer_dirs)
        out = tmp / f"adapter_{name}"
        code = main(["export", "--model", str(bases[arch]), "--layers", *map(str, layer_dirs), "--format", "adapters",
                     "--out", str(out)])
        assert code == 0
        cases[name] = (arch, logits_of(model, sample_batch(arch)), base_logits, out)
        torch.save(sample_batch(arch), tmp / f"batch_{name}.pt")
        jobs.append({"name": name, "class": type(model).__name__, "base": str(bases[arch]), "adapter": str(out),
                     "batch": str(tmp / f"batch_{name}.pt"), "safetensors": name == "llama_summed"})
    results = {}
    if ADAPTERS_PYTHON.is_file():
        (tmp / "jobs.json").write_text(json.dumps(jobs))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env.update(HF_HOME=str(tmp / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
                   TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run([str(ADAPTERS_PYTHON), "-I", "-c", LOADER, str(tmp / "jobs.json"), str(tmp / "out.pt")],
                              cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        results = torch.load(tmp / "out.pt")
    return cases, results


@needs_adapters
@pytest.mark.parametrize("name", list(CASES))
def test_adapters_gives_the_logits_of_load_layers(exported, name):
    cases, results = exported
    arch, reference, base_logits, _ = cases[name]
    result = results[name]
    assert result["name"] == ADAPTER_NAME
    assert result["loading"] == {}, result["loading"]  # no missing or unexpected adapter weights
    # the same base model on both sides (another transformers version): a difference here is not ours
    assert (result["base"] - base_logits).abs().max().item() <= TOL
    diff = (result["logits"] - reference).abs().max().item()
    print(f"{name}: max |Δ| = {diff:.3g} (adapters {results['versions']['adapters']}, "
          f"transformers {results['versions']['transformers']})")
    assert diff <= TOL, f"{name}: max |Δ| = {diff:.3g}"
    assert (reference - base_logits).abs().max().item() > 100 * TOL  # the layers matter: not a vacuous check


@needs_adapters
def test_adapters_built_one_bottleneck_per_block_with_layers(exported):
    results = exported[1]
    assert results["versions"]["adapters"] == "1.3.0"
    assert results["llama"]["n_adapters"] == 2 and results["t5"]["n_adapters"] == 4
    assert results["t5_top_block"]["n_adapters"] == 2  # the other blocks are left out, not zero adapters


def test_directory_and_config(exported):
    cases = exported[0]
    out = cases["t5_top_block"][3]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, ADAPTER_SAFE_WEIGHTS_FILE, EXPORT_FILE])
    config = json.loads((out / ADAPTER_CONFIG_FILE).read_text())
    bn = config["config"]
    assert config["name"] == ADAPTER_NAME and config["model_type"] == "t5" and config["version"].startswith("adapters.")
    assert bn["output_adapter"] and not bn["mh_adapter"] and not bn["cross_adapter"]
    assert not bn["original_ln_before"] and bn["original_ln_after"] and bn["residual_before_ln"] is True
    assert bn["leave_out"] == [0, 2]  # encoder block 0, decoder block 0 (numbered after the encoder's)
    assert sorted(bn["reduction_factor"]) == ["1", "3", "default"]
    assert {int(16 // f) for f in bn["reduction_factor"].values()} == {3}  # adapters' width: int(hidden // factor)
    weights = torch.load(out / ADAPTER_WEIGHTS_FILE, weights_only=True)
    assert sorted(weights) == sorted(f"{m}.adapters.{ADAPTER_NAME}.{t}" for m in
                                     ("encoder.block.1.layer.1", "decoder.block.1.layer.2")
                                     for t in ("adapter_down.0.weight", "adapter_down.0.bias",
                                               "adapter_up.weight", "adapter_up.bias"))
    record = json.loads((out / EXPORT_FILE).read_text())
    assert record["format"].startswith("unlearn_fast.adapters") and set(record["files"]) == {
        ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, ADAPTER_SAFE_WEIGHTS_FILE}
    summed = json.loads((cases["llama_summed"][3] / ADAPTER_CONFIG_FILE).read_text())
    assert summed["config"]["leave_out"] == [] and summed["unlearn_fast"]["provenance"]["combined"] == "summed"
    assert int(16 // summed["config"]["reduction_factor"]["1"]) == 7  # 4 + 3 concatenated
    fused = json.loads((cases["llama_fused"][3] / ADAPTER_CONFIG_FILE).read_text())
    assert len(fused["unlearn_fast"]["provenance"]["requests"]) == 2
    text = b"".join(p.read_bytes() for p in cases["llama_fused"][3].iterdir())
    for row in FACTS_FORGET:  # no training data
        assert row["prompt"].encode() not in text and row["response"].encode() not in text


def test_reduction_factor_gives_every_width():
    for hidden in (1, 7, 16, 768, 896, 2048, 4096, 5120):
        for rank in {*range(1, 70), hidden // 3, hidden, 2 * hidden, 4097}:
            if rank >= 1:
                assert int(hidden // reduction_factor(hidden, rank)) == rank, (hidden, rank)
    assert reduction_factor(768, 48) == 16 and isinstance(reduction_factor(768, 48), int)


# ------------------------------------------------------------------------------------------------
# Bad input: refusals in one line, nothing written
# ------------------------------------------------------------------------------------------------


def test_unsupported_family_is_refused_in_one_line(capsys, tmp_path):
    base = save_model_dir("qwen2", tmp_path / "qwen2")
    layers = write_layers("qwen2", tmp_path / "layers")
    code, _, err = cli(capsys, "export", "--model", base, "--layers", layers, "--format", "adapters",
                       "--out", tmp_path / "out")
    line = one_line_error(err)
    assert code == 2 and "qwen2" in line.lower() and "supported: llama" in line and "--format hf" in line
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers", "qwen2"]  # no temporary either


def test_different_activations_are_refused(tmp_path):
    a = write_layers("llama", tmp_path / "a", blocks=[0], activation="relu")
    b = write_layers("llama", tmp_path / "b", seed=2, blocks=[1], activation="gelu")
    with pytest.raises(ModelError, match="one non_linearity"):
        export(make_model("llama"), [a, b], tmp_path / "out", format="adapters", log=QUIET)
    assert not (tmp_path / "out").exists()


def test_existing_directory_refused_unless_overwrite(capsys, tmp_path):
    base = save_model_dir("gpt2", tmp_path / "gpt2")
    layers = write_layers("gpt2", tmp_path / "layers")
    out = tmp_path / "adapter"
    args = ["export", "--model", base, "--layers", layers, "--format", "adapters", "--out", out]
    code, stdout, _ = cli(capsys, *args)
    assert code == 0 and "format adapters" in stdout and (out / EXPORT_FILE).is_file()
    first = (out / ADAPTER_WEIGHTS_FILE).read_bytes()
    code, _, err = cli(capsys, *args)
    assert code == 2 and "already exists" in one_line_error(err) and "--overwrite" in err
    assert (out / ADAPTER_WEIGHTS_FILE).read_bytes() == first
    code, _, _ = cli(capsys, *args, "--overwrite")
    assert code == 0 and (out / EXPORT_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "gpt2", "layers"]  # no temporaries left
    # an hf export may replace an adapters export of this package and back (both are ours)
    code, _, _ = cli(capsys, "export", "--model", base, "--layers", layers, "--format", "hf", "--out", out,
                     "--overwrite")
    assert code == 0 and (out / "config.json").is_file() and not (out / ADAPTER_WEIGHTS_FILE).exists()
    other = tmp_path / "not_ours"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = cli(capsys, "export", "--model", base, "--layers", layers, "--format", "adapters",
                       "--out", other, "--overwrite")
    assert code == 2 and "not an unlearn-fast artifact" in one_line_error(err)
    assert (other / "notes.txt").read_text() == "mine"


def test_api_with_a_loaded_model_needs_no_tokenizer(tmp_path):
    layers = write_layers("bert", tmp_path / "layers")
    model = make_model("bert")
    out = export(model, layers, tmp_path / "adapter", format="adapters", log=QUIET)
    assert (out / ADAPTER_CONFIG_FILE).is_file() and sites(model) == []  # the caller's model is left as given
