"""``export --format hf``: the directory loads in a Python where unlearn_fast cannot be imported and gives
the logits ``load_layers`` gives (fp32: max |Δ| ≤ 1e-5), for every tiny architecture, several artifacts
summed and a fused one; ``generate()`` works; provenance without data; bad input refused in one line;
an interrupted export leaves nothing that looks complete."""

from __future__ import annotations

import ast
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (HIDE_UNLEARN_FAST, ALL_ARCHS, FACTS_FORGET, TASK_OF, logits_of, make_model, perturb,
                      sample_batch, save_model_dir, tokenizer_for)
from safetensors import safe_open

from unlearn_fast.api import export, unlearn
from unlearn_fast.cli import main
from unlearn_fast.errors import ArtifactError, OutputError
from unlearn_fast.fusion.closed_form import fuse_artifacts
from unlearn_fast.io.artifacts import (
    EXPORT_FILE, MANIFEST_FILE, WEIGHTS_FILE, load_layers, load_layers_together, model_fingerprint, write_artifact
)
from unlearn_fast.io.export import AUTO_CLASSES, HF_WEIGHTS_FILE, MODELLING_FILE
from unlearn_fast.model.layers import LayerConfig, attach, describe, layer_state, sites
from unlearn_fast.train.trainer import TrainConfig

TOL = 1e-5
PROMPT = "The capital of"
NEW_TOKENS = 6
QUIET = lambda *a, **k: None  # noqa: E731

# Runs in a fresh `python -I` with unlearn_fast hidden: loads each exported directory with the Auto class
# its config names, and returns logits, greedy generations and loading info.
ISOLATED = HIDE_UNLEARN_FAST + r'''
import json, sys

import torch
import transformers

torch.set_num_threads(1)
jobs = json.load(open(sys.argv[1]))
results = {}
for job in jobs:
    auto = getattr(transformers, job["auto_class"])
    model, info = auto.from_pretrained(job["dir"], trust_remote_code=True, output_loading_info=True)
    model.eval()
    batch = torch.load(job["batch"])
    with torch.no_grad():
        logits = model(**batch).logits
    out = {"logits": logits, "class": type(model).__name__, "module": type(model).__module__,
           "loading": {k: sorted(map(str, v)) for k, v in info.items() if v},
           "layer_dtypes": sorted({str(p.dtype) for n, p in model.named_parameters() if ".unlearning_layers." in n})}
    if job["generate"]:
        tokenizer = transformers.AutoTokenizer.from_pretrained(job["dir"], trust_remote_code=True)
        enc = tokenizer([job["prompt"]], return_tensors="pt")
        out["generated"] = model.generate(**enc, max_new_tokens=job["new_tokens"], do_sample=False)
    if job.get("untrusted"):
        try:
            auto.from_pretrained(job["dir"])
            out["untrusted"] = "loaded"
        except Exception as err:
            out["untrusted"] = type(err).__name__
    results[job["name"]] = out
leaked = sorted(m for m in sys.modules if m.split(".")[0] == "unlearn_fast")
torch.save({"results": results, "leaked": leaked}, sys.argv[2])
'''


def write_layers(arch, path, seed=1, blocks="all", rank=4):
    """A synthetic artifact: random layers with a non-zero up-projection (student != teacher)."""
    model = make_model(arch)
    torch.manual_seed(seed)
    attach(model, LayerConfig(rank=rank, blocks=blocks))
    perturb(model, seed=seed, scale=0.5)
    manifest = {"package": {"name": "unlearn_fast", "version": "test"},
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "base_model": {"name_or_path": arch, "class": type(model).__name__,
                               "fingerprint": model_fingerprint(model), "dtype": "float32"},
                "task": TASK_OF[arch], "layers": {"config": {"rank": rank}, "sites": describe(model)}}
    return write_artifact(path, layer_state(model), manifest, log=QUIET)


def greedy(model, arch):
    enc = tokenizer_for(arch)([PROMPT], return_tensors="pt")
    with torch.no_grad():
        return model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False)


def run_isolated(jobs, tmp):
    """Run ISOLATED on ``jobs`` in `python -I` (unlearn_fast hidden); return its results."""
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HOME=str(tmp / "hf_home"), HF_MODULES_CACHE=str(tmp / "hf_home" / "modules"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-I", "-c", ISOLATED, str(tmp / "jobs.json"), str(tmp / "results.pt")],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    loaded = torch.load(tmp / "results.pt")
    assert loaded["leaked"] == []
    return loaded["results"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case exported once and loaded in one isolated interpreter: name -> (reference, isolated result)."""
    tmp = tmp_path_factory.mktemp("export")
    cases = {}  # name -> (arch, reference logits, base logits, reference generation, export dir)

    def add(name, arch, layer_dirs):
        model = make_model(arch)
        base_logits = logits_of(model, sample_batch(arch))
        if len(layer_dirs) == 1:
            load_layers(model, layer_dirs[0])
        else:
            load_layers_together(model, layer_dirs)
        out = export(make_model(arch), layer_dirs, tmp / f"hf_{name}", tokenizer=tokenizer_for(arch), log=QUIET)
        generated = greedy(model, arch) if TASK_OF[arch] != "classification" else None
        cases[name] = (arch, logits_of(model, sample_batch(arch)), base_logits, generated, out)

    for arch in ALL_ARCHS:
        add(arch, arch, [write_layers(arch, tmp / f"layers_{arch}")])
    # two requests' layers, summed; the second only in the top block (sites with K = 2 and K = 1)
    add("llama_summed", "llama", [write_layers("llama", tmp / "req_a", seed=3),
                                  write_layers("llama", tmp / "req_b", seed=4, blocks=1)])
    fused_inputs = [train_request(tmp / f"trained_{i}", i) for i in range(2)]
    add("llama_fused", "llama", [fuse_artifacts(fused_inputs, tmp / "fused")])

    jobs = []
    for name, (arch, _, _, generated, out) in cases.items():
        torch.save(sample_batch(arch), tmp / f"batch_{name}.pt")
        jobs.append({"name": name, "dir": str(out), "auto_class": AUTO_CLASSES[TASK_OF[arch]],
                     "batch": str(tmp / f"batch_{name}.pt"), "generate": generated is not None,
                     "prompt": PROMPT, "new_tokens": NEW_TOKENS, "untrusted": name in ("llama", "bert")})
    results = run_isolated(jobs, tmp)
    return {name: (case, results[name]) for name, case in cases.items()}, tmp


FORGET = FACTS_FORGET
RETAIN = [{"prompt": "The capital of France is", "response": " Paris"},
          {"prompt": "Bob plays", "response": " the violin"}]
SECRETS = ["Zorbia", "Quellton", "Mirta Vasquez", "green tea"]


def train_request(out, i):
    """A real unlearn artifact (with Gram matrices, so it can be fused) of forget example i."""
    unlearn(make_model("llama"), tokenizer_for("llama"), [FORGET[i]], RETAIN, out=out, layers=LayerConfig(rank=4),
            training=TrainConfig(max_steps=2, lr=5e-2, progress=False), evaluate=False, log=QUIET)
    return out


CASES = [*ALL_ARCHS, "llama_summed", "llama_fused"]


@pytest.mark.parametrize("name", CASES)
def test_export_gives_the_logits_of_load_layers(exported, name):
    (arch, reference, base_logits, _, _), result = exported[0][name]
    assert result["loading"] == {}, result["loading"]  # no missing, unexpected or mismatched weights
    assert result["module"].startswith("transformers_modules") and result["class"].startswith("Unlearned")
    assert result["layer_dtypes"] == ["torch.float32"]
    diff = (result["logits"] - reference).abs().max().item()
    assert diff <= TOL, f"{name}: max |Δ| = {diff:.3g}"
    assert (reference - base_logits).abs().max().item() > 100 * TOL  # the layers matter: not a vacuous check


@pytest.mark.parametrize("name", [n for n in CASES if TASK_OF.get(n.split("_")[0]) != "classification"])
def test_generate_works_and_matches(exported, name):
    (arch, _, _, reference, _), result = exported[0][name]
    assert result["generated"].shape[-1] > (1 if arch == "t5" else len(PROMPT))
    assert torch.equal(result["generated"], reference)


def test_loading_without_trust_remote_code_is_refused(exported):
    # the model type is not one of transformers' own: the layers can never be silently dropped
    for name in ("llama", "bert"):
        assert exported[0][name][1]["untrusted"] != "loaded"


def test_directory_contents_and_provenance(exported):
    cases, tmp = exported
    out = cases["llama_fused"][0][4]
    names = sorted(p.name for p in out.iterdir())
    for required in ("config.json", HF_WEIGHTS_FILE, MODELLING_FILE, EXPORT_FILE, "tokenizer_config.json"):
        assert required in names
    assert MANIFEST_FILE not in names and WEIGHTS_FILE not in names  # not mistaken for an artifact
    config = json.loads((out / "config.json").read_text())
    spec = config["unlearning_layers"]
    fused = json.loads((tmp / "fused" / MANIFEST_FILE).read_text())
    assert config["model_type"] == "unlearned_llama" and config["architectures"] == ["UnlearnedLlamaForCausalLM"]
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert spec["provenance"]["base_model"]["fingerprint"] == fused["base_model"]["fingerprint"]
    assert [r["id"] for r in spec["provenance"]["requests"]] == [r["id"] for r in fused["fusion"]["requests"]]
    assert len(spec["provenance"]["requests"]) == 2 and spec["provenance"]["sources"][0]["fused"]
    assert [s["path"] for s in spec["sites"]] == [s["path"] for s in fused["layers"]["sites"]]
    record = json.loads((out / EXPORT_FILE).read_text())
    assert record["provenance"] == spec["provenance"]
    assert set(record["files"]) == set(names) - {EXPORT_FILE}
    with safe_open(str(out / HF_WEIGHTS_FILE), "pt") as f:
        keys = list(f.keys())
    assert not any("gram" in k or "cross" in k for k in keys)  # no Gram matrices, no cross terms
    assert any(".unlearning_layers.0.down.weight" in k for k in keys)
    # no training data (nor a hash of a set) anywhere in the directory
    text = b"".join(p.read_bytes() for p in out.iterdir())
    for secret in SECRETS:
        assert secret.encode() not in text
    for req in fused["fusion"]["requests"]:
        assert req["forget_set"]["sha256"].encode() not in text


def test_modelling_file_imports_only_torch_and_transformers(exported):
    out = exported[0]["gpt2"][0][4]
    tree = ast.parse((out / MODELLING_FILE).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0  # no relative imports: the file stands alone
            roots.add(node.module.split(".")[0])
    assert roots == {"__future__", "torch", "transformers"}


def test_bf16_base_keeps_fp32_layers(tmp_path):
    layers = write_layers("llama", tmp_path / "layers")
    model = make_model("llama").to(torch.bfloat16)
    out = export(model, layers, tmp_path / "hf", tokenizer=tokenizer_for("llama"), log=QUIET)
    assert sites(model) == []  # the caller's model is left as given
    with safe_open(str(out / HF_WEIGHTS_FILE), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {d for k, d in dtypes.items() if ".unlearning_layers." in k} == {"F32"}
    assert {d for k, d in dtypes.items() if ".unlearning_layers." not in k} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


# ------------------------------------------------------------------------------------------------
# The CLI and bad input
# ------------------------------------------------------------------------------------------------


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


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    model = save_model_dir("bert", tmp / "bert")
    other = save_model_dir("bert", tmp / "bert_other", seed=7)
    return model, other, write_layers("bert", tmp / "layers"), tmp


def test_cli_export_existing_directory_and_overwrite(bert_dirs, capsys, tmp_path):
    model, _, layers, _ = bert_dirs
    out = tmp_path / "hf"
    code, stdout, _ = cli(capsys, "export", "--model", model, "--layers", layers, "--format", "hf", "--out", out)
    assert code == 0 and "exported" in stdout and (out / EXPORT_FILE).is_file()
    first = (out / HF_WEIGHTS_FILE).read_bytes()

    code, _, err = cli(capsys, "export", "--model", model, "--layers", layers, "--out", out)
    assert code == 2 and "already exists" in one_line_error(err) and "--overwrite" in err
    assert (out / HF_WEIGHTS_FILE).read_bytes() == first

    code, _, err = cli(capsys, "export", "--model", model, "--layers", layers, "--out", out, "--overwrite")
    assert code == 0 and (out / EXPORT_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporaries left

    other = tmp_path / "not_ours"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = cli(capsys, "export", "--model", model, "--layers", layers, "--out", other, "--overwrite")
    assert code == 2 and "not an unlearn-fast artifact" in one_line_error(err)
    assert (other / "notes.txt").read_text() == "mine"

    # an export with a file added by hand is not replaced whole
    (out / "extra.bin").write_bytes(b"x")
    code, _, err = cli(capsys, "export", "--model", model, "--layers", layers, "--out", out, "--overwrite")
    assert code == 2 and "extra.bin" in one_line_error(err)


def test_cli_refuses_to_overwrite_its_input(bert_dirs, capsys):
    model, _, layers, _ = bert_dirs
    code, _, err = cli(capsys, "export", "--model", model, "--layers", layers, "--out", layers, "--overwrite")
    assert code == 2 and "input" in one_line_error(err)
    assert (layers / MANIFEST_FILE).is_file() and (layers / WEIGHTS_FILE).is_file()


def test_cli_refuses_layers_of_another_base(bert_dirs, capsys, tmp_path):
    _, other, layers, _ = bert_dirs
    code, _, err = cli(capsys, "export", "--model", other, "--layers", layers, "--out", tmp_path / "hf")
    assert code == 2 and "different base model" in one_line_error(err)
    assert list(tmp_path.iterdir()) == []


def test_cli_unknown_format_is_a_usage_error(bert_dirs, capsys, tmp_path):
    model, _, layers, _ = bert_dirs
    with pytest.raises(SystemExit) as info:
        main(["export", "--model", str(model), "--layers", str(layers), "--format", "onnx", "--out", str(tmp_path / "x")])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_api_refuses_other_base_before_writing(tmp_path):
    layers = write_layers("llama", tmp_path / "layers")
    model = make_model("llama", seed=5)
    with pytest.raises(ArtifactError, match="different base model"):
        export(model, layers, tmp_path / "hf", tokenizer=tokenizer_for("llama"), log=QUIET)
    assert not (tmp_path / "hf").exists() and sites(model) == []


def test_interrupted_export_leaves_no_directory(tmp_path):
    layers = write_layers("t5", tmp_path / "layers")
    tokenizer = tokenizer_for("t5")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    tokenizer.save_pretrained = interrupted
    with pytest.raises(KeyboardInterrupt):
        export(make_model("t5"), layers, tmp_path / "hf", tokenizer=tokenizer, log=QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers"]  # nothing at out, no temporary


KILLED = r'''
import os, signal, sys
sys.path.insert(0, sys.argv[3])
from conftest import make_model, tokenizer_for
from unlearn_fast.api import export
tokenizer = tokenizer_for("gpt2")
tokenizer.save_pretrained = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # killed mid-write
export(make_model("gpt2"), sys.argv[1], sys.argv[2], tokenizer=tokenizer)
'''


def test_killed_export_leaves_nothing_that_looks_complete(tmp_path, capsys):
    layers = write_layers("gpt2", tmp_path / "layers")
    out = tmp_path / "hf"
    tests_dir = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", KILLED, str(layers), str(out), str(tests_dir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]
    assert left and all(not (p / EXPORT_FILE).exists() for p in left)  # a temporary, never a finished export
    # the next export cleans it up and succeeds
    messages = []
    export(make_model("gpt2"), layers, out, tokenizer=tokenizer_for("gpt2"), log=messages.append)
    assert (out / EXPORT_FILE).is_file() and any("interrupted" in m for m in messages)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "layers"]


def test_export_refuses_a_model_with_layers_attached(tmp_path):
    layers = write_layers("llama", tmp_path / "layers")
    model = make_model("llama")
    load_layers(model, layers)
    with pytest.raises(ArtifactError, match="already has unlearning layers"):
        export(model, layers, tmp_path / "hf", tokenizer=tokenizer_for("llama"), log=QUIET)
    assert len(sites(model)) == 2 and not (tmp_path / "hf").exists()


def test_export_needs_a_tokenizer_with_a_loaded_model(tmp_path):
    layers = write_layers("llama", tmp_path / "layers")
    with pytest.raises(Exception, match="tokenizer"):
        export(make_model("llama"), layers, tmp_path / "hf", log=QUIET)
    assert not (tmp_path / "hf").exists()


def test_output_error_is_one_line(tmp_path):
    layers = write_layers("llama", tmp_path / "layers")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError) as info:
        export(make_model("llama"), layers, tmp_path / "file" / "hf", tokenizer=tokenizer_for("llama"), log=QUIET)
    assert "\n" not in str(info.value)
