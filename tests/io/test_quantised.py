"""A quantised frozen base (issue 26, items 4 and 8): ``--dtype int8 | nf4`` (alias ``--base-dtype``) loads
the base through transformers' BitsAndBytesConfig with the output head left unquantised; on a machine
without CUDA (or without bitsandbytes) it is refused in one line before any weight is read; the plan
counts the quantised base's bytes. The last tests quantise a tiny model for real where bitsandbytes is
installed (its CPU backend; the CUDA run is benchmarks/gpu_quantised_base.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch
import transformers
from torch import nn

from conftest import (FACTS_FORGET, FACTS_RETAIN, REPO_ROOT, make_config, make_model, save_model_dir,
                      tokenizer_for)
from unlearn_fast import cli
from unlearn_fast.api import unlearn
from unlearn_fast.errors import ArtifactError, ModelError, UnlearnFastError
from unlearn_fast.io import base_model, quantised
from unlearn_fast.io.artifacts import load_layers
from unlearn_fast.io.base_model import load_model
from unlearn_fast.io.quantised import (BASE_QUANTISATIONS, base_quantisation, bnb_config, load_kwargs,
                                       quantised_bytes, quantised_linears, skip_modules)
from unlearn_fast.model.family import output_head
from unlearn_fast.model.layers import LayerConfig
from unlearn_fast.train.plan import PlanSettings, base_bytes, estimate, model_shape
from unlearn_fast.train.trainer import TrainConfig

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None and importlib.util.find_spec("accelerate") is not None


# ---------------------------------------------------------------- the config transformers gets


def test_bnb_config_for_each_value():
    int8 = bnb_config("int8", ["lm_head"])
    assert isinstance(int8, transformers.BitsAndBytesConfig)
    assert int8.load_in_8bit and not int8.load_in_4bit
    assert int8.quantization_method() == "llm_int8"
    assert int8.llm_int8_skip_modules == ["lm_head"]
    nf4 = bnb_config("nf4", ["lm_head"])
    assert nf4.load_in_4bit and not nf4.load_in_8bit
    assert nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_compute_dtype == torch.bfloat16
    assert not nf4.bnb_4bit_use_double_quant  # one fp32 absmax a block, as the plan counts
    assert nf4.llm_int8_skip_modules == ["lm_head"]
    assert nf4.to_dict()["bnb_4bit_quant_type"] == "nf4"
    with pytest.raises(ModelError, match="int4"):
        bnb_config("int4", [])


@pytest.mark.parametrize("arch, tied, head", [("llama", False, "lm_head"), ("llama", True, "lm_head"),
                                              ("gpt2", True, "lm_head"), ("t5", True, "lm_head"),
                                              ("bert", False, "classifier")])
def test_the_head_is_in_the_skip_list(arch, tied, head):
    config = make_config(arch)
    config.tie_word_embeddings = tied
    cls = {"llama": transformers.AutoModelForCausalLM, "gpt2": transformers.AutoModelForCausalLM,
           "t5": transformers.AutoModelForSeq2SeqLM, "bert": transformers.AutoModelForSequenceClassification}[arch]
    for kind in BASE_QUANTISATIONS:
        kwargs = load_kwargs(kind, cls, config, torch.device("cuda", 0))
        assert kwargs["quantization_config"].llm_int8_skip_modules == [head]
        assert kwargs["dtype"] == torch.bfloat16 and kwargs["device_map"] == {"": torch.device("cuda", 0)}
    model = make_model(arch)
    assert skip_modules(model) == [head]
    # every other linear map is quantised, the head is not
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear or type(m).__name__ == "Conv1D"]
    assert head in names
    expected = [n for n in names if n != head and not n.endswith(".wo")]  # T5 keeps its wo in fp32
    assert len(quantised_linears(model)) == len(expected) > 0


def test_output_head_refuses_a_quantised_head():
    model = make_model("llama")

    class Int8Head(nn.Module):  # what a bitsandbytes Linear8bitLt holds: an int8 weight
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(128, 16, dtype=torch.int8), requires_grad=False)

    model.lm_head = Int8Head()
    with pytest.raises(ModelError, match="output head is quantised"):
        output_head(model, "causal")


def test_load_model_hands_transformers_the_quantisation_config(tmp_path, monkeypatch):
    """With CUDA and bitsandbytes present (faked here), load_model loads through BitsAndBytesConfig and
    leaves placement to transformers (no .to(): a bitsandbytes model cannot be moved)."""
    save_model_dir("llama", tmp_path / "m")
    monkeypatch.setattr(quantised, "missing", lambda device=None: [])
    calls = []

    def fake_from_pretrained(path, **kwargs):
        calls.append(kwargs)
        model = make_model("llama")
        model.to = lambda *a, **k: pytest.fail("a quantised model must not be moved with .to()")
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    for kind in BASE_QUANTISATIONS:
        model, _, _ = load_model(str(tmp_path / "m"), dtype=kind, device="cuda:0")
        q = calls[-1]["quantization_config"]
        assert (q.load_in_8bit, q.load_in_4bit) == ((True, False) if kind == "int8" else (False, True))
        assert q.llm_int8_skip_modules == ["lm_head"]
        assert calls[-1]["device_map"] == {"": torch.device("cuda", 0)} and calls[-1]["dtype"] == torch.bfloat16
        assert not model.training


def test_an_already_quantised_checkpoint_is_refused(tmp_path, monkeypatch):
    path = save_model_dir("llama", tmp_path / "m")
    config = transformers.AutoConfig.from_pretrained(path)
    config.quantization_config = {"quant_method": "gptq", "bits": 4}
    config.save_pretrained(path)
    monkeypatch.setattr(quantised, "missing", lambda device=None: [])
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("no weight may be read"))
    with pytest.raises(ModelError, match=r"already quantised \(gptq\)"):
        load_model(str(path), dtype="nf4", device="cuda:0")


def test_base_quantisation_reads_the_config():
    model = make_model("llama")
    assert base_quantisation(model) is None
    model.config.quantization_config = bnb_config("nf4", ["lm_head"])
    assert base_quantisation(model) == "nf4"
    model.config.quantization_config = bnb_config("int8", ["lm_head"]).to_dict()
    assert base_quantisation(model) == "int8"
    model.config.quantization_config = {"quant_method": "gguf"}
    assert base_quantisation(model) is None


# ---------------------------------------------------------------- bad input (item 8)


def fake_machine(monkeypatch, cuda: bool, bnb: bool):
    monkeypatch.setattr(torch.version, "cuda", "12.4" if cuda else None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(quantised, "package_available",
                        lambda name: bnb if name == "bitsandbytes" else importlib.util.find_spec(name) is not None)


@pytest.mark.parametrize("cuda, bnb", [(False, True), (False, False), (True, False)])
def test_the_refusal_names_what_is_missing(monkeypatch, cuda, bnb):
    fake_machine(monkeypatch, cuda, bnb)
    with pytest.raises(ModelError) as err:
        quantised.check_quantised_base("nf4", None)
    text = str(err.value)
    assert "\n" not in text and "needs CUDA and bitsandbytes" in text
    lacking = text.split("missing here:")[1]
    assert ("CUDA" in lacking) == (not cuda)
    assert ("pip install bitsandbytes" in lacking) == (not bnb)


def test_a_cpu_device_is_refused_even_with_cuda_present(monkeypatch):
    fake_machine(monkeypatch, cuda=True, bnb=True)
    with pytest.raises(ModelError, match=r"missing here: CUDA \(the device asked for is cpu\)"):
        quantised.check_quantised_base("int8", "cpu")


@pytest.fixture
def data(tmp_path):
    (tmp_path / "f.csv").write_text("text\nforget me\n")
    (tmp_path / "r.csv").write_text("text\nkeep me\n")
    return tmp_path


@pytest.mark.parametrize("verb", ["unlearn", "eval"])
@pytest.mark.parametrize("bnb", [True, False])
def test_cli_on_a_cpu_says_so_in_one_line_before_loading(verb, bnb, data, monkeypatch, capsys):
    fake_machine(monkeypatch, cuda=False, bnb=bnb)
    monkeypatch.setattr(base_model, "prepare_smollm2", lambda *a, **k: pytest.fail("nothing may be converted"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("no weight may be read"))
    argv = [verb, "--model", "smollm2", "--forget", str(data / "f.csv"), "--retain", str(data / "r.csv"),
            "--base-dtype", "nf4"] + (["--out", str(data / "out")] if verb == "unlearn" else [])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: a 4-bit NF4 base (--dtype nf4) needs CUDA and bitsandbytes; missing here: CUDA")
    assert ("pip install bitsandbytes" in err) == (not bnb)
    assert not (data / "out").exists()


def test_cli_rejects_a_bad_value(data, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["unlearn", "--model", "smollm2", "--forget", str(data / "f.csv"), "--retain", str(data / "r.csv"),
                  "--out", str(data / "out"), "--base-dtype", "int4"])
    assert exit_.value.code == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err


@pytest.mark.parametrize("extra, needle", [(["--shard-base"], "--shard-base cannot shard"),
                                           (["--method", "ga"], "--method ga cannot then train")])
def test_cli_refuses_what_a_quantised_base_cannot_do(extra, needle, data, capsys):
    argv = ["unlearn", "--model", "smollm2", "--forget", str(data / "f.csv"), "--retain", str(data / "r.csv"),
            "--out", str(data / "out"), "--dtype", "int8", *extra]
    assert cli.main(argv) == 2
    assert needle in capsys.readouterr().err


# ---------------------------------------------------------------- the plan


def hand_base_bytes(c: dict, kind: str) -> int:
    """Bytes of a Llama base's weights, counted from its config by hand: each block's seven linear maps
    quantised, the embeddings, norms and (untied) head in bf16."""
    d, ff, hd = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    maps = [(q, d), (kv, d), (kv, d), (d, q), (ff, d), (ff, d), (d, ff)] * c["num_hidden_layers"]
    if kind == "int8":
        quant = sum(rows * cols + 4 * rows for rows, cols in maps)
    else:
        quant = sum(math.ceil(rows * cols / 2) + 4 * math.ceil(rows * cols / 64) for rows, cols in maps)  # 64: a block
    head = 0 if c["tie_word_embeddings"] else c["vocab_size"] * d
    rest = c["vocab_size"] * d + head + (2 * c["num_hidden_layers"] + 1) * d  # embeddings, head, norms
    return quant + 2 * rest


def test_bytes_of_one_quantised_weight():
    assert quantised_bytes(32, 64, "int8") == 32 * 64 + 32 * 4  # a byte a weight, an fp32 scale a row
    assert quantised_bytes(32, 64, "nf4") == 32 * 64 // 2 + 32 * 4  # half a byte a weight, an fp32 absmax / 64
    assert quantised_bytes(3, 3, "nf4") == 5 + 4  # an odd count rounds up; a partial block has its absmax


LLAMA_SMALL = dict(hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=500, max_position_embeddings=256)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kind", BASE_QUANTISATIONS)
def test_plan_counts_the_quantised_base_by_hand(kind, tied):
    c = dict(LLAMA_SMALL, tie_word_embeddings=tied)
    shape = model_shape(transformers.LlamaConfig(**c), LayerConfig(rank=8))
    plan = estimate(shape, PlanSettings(device="cuda", dtype=kind))
    assert plan.parts["frozen base"] == hand_base_bytes(c, kind) == base_bytes(shape, kind)
    bf16 = estimate(shape, PlanSettings(device="cuda", dtype="bfloat16"))
    assert bf16.parts["frozen base"] == shape.params * 2 > plan.parts["frozen base"]
    # everything but the base is a bf16 run's: activations, cache and working memory in bf16
    assert {k: v for k, v in plan.parts.items() if k != "frozen base"} == \
        {k: v for k, v in bf16.parts.items() if k != "frozen base"}


def test_plan_of_an_8b_model_quantised():
    """Llama-3.1-8B's shape: 8.03 G parameters, 16.1 GB in bf16; about 9.1 GB in int8 and 6.0 GB in nf4
    (the embeddings and the untied head, 1.05 G parameters, stay bf16: 2.1 GB of each)."""
    c = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False)
    shape = model_shape(transformers.LlamaConfig(**c), LayerConfig(rank=64, blocks=4))
    sizes = {k: base_bytes(shape, k) for k in ("bfloat16", "int8", "nf4")}
    assert sizes["int8"] == hand_base_bytes(c, "int8") and sizes["nf4"] == hand_base_bytes(c, "nf4")
    assert 16.0e9 < sizes["bfloat16"] < 16.2e9 and 9.0e9 < sizes["int8"] < 9.2e9 and 5.9e9 < sizes["nf4"] < 6.1e9


def test_plan_refuses_a_quantised_base_on_a_cpu_and_the_cli_prints_it(capsys):
    with pytest.raises(UnlearnFastError, match="--device cuda"):
        PlanSettings(device="cpu", dtype="nf4")
    assert cli.main(["plan", "--model", "smollm2", "--device", "cuda", "--base-dtype", "nf4"]) == 0
    out = capsys.readouterr().out
    assert "nf4 on cuda" in out
    line = next(l for l in out.splitlines() if l.strip().startswith("frozen base"))
    assert line.split()[-1] == "MiB" and float(line.split()[-2]) < 120  # 134.5 M parameters, ~256 MiB in bf16


# ---------------------------------------------------------------- a real quantisation (bitsandbytes' CPU backend)


def storage_bytes(model: nn.Module) -> int:
    """What the loaded base's weights take: every parameter's bytes once, plus bitsandbytes' scales
    (int8: SCB, one fp32 a row; 4-bit: the absmax of each block)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for m in model.modules():
        scb = getattr(getattr(m, "weight", None), "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
    return total


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory):
    config = make_config("llama")
    config.tie_word_embeddings = True  # as SmolLM2: the head is the embedding table
    path = tmp_path_factory.mktemp("tied")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer_for("llama").save_pretrained(path)
    return path


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes (and accelerate) not installed: pip install bitsandbytes")
@pytest.mark.parametrize("kind", BASE_QUANTISATIONS)
def test_a_real_quantised_load_keeps_the_head_and_trains(kind, tied_llama_dir, tmp_path):
    config = transformers.AutoConfig.from_pretrained(tied_llama_dir)
    quantised.silence_int8_cast_warning()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tied_llama_dir, config=config, **load_kwargs(kind, transformers.AutoModelForCausalLM, config,
                                                     torch.device("cpu"))).eval()
    expected = {"int8": "Linear8bitLt", "nf4": "Linear4bit"}[kind]
    kinds = {type(m).__name__ for n, m in model.named_modules() if ".layers." in n and n.endswith("_proj")}
    assert kinds == {expected}
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    head = output_head(model, "causal")
    assert head.weight.dtype == torch.bfloat16 and head.weight.shape == (128, 16)
    assert base_quantisation(model) == kind
    # the plan's base bytes are what the loaded weights take
    assert storage_bytes(model) == base_bytes(model_shape(config), kind)

    result = unlearn(model, tokenizer_for("llama"), FACTS_FORGET, FACTS_RETAIN, out=tmp_path / "art",
                     layers=LayerConfig(rank=4), training=TrainConfig(max_steps=3, epochs=10, lr=1e-2, progress=False),
                     evaluate=False, log=lambda *a: None)
    assert result.training.steps == 3 and all(math.isfinite(h["loss"]) for h in result.training.history)
    assert result.manifest["base_model"]["quantization"] == kind
    # the fingerprint is of the quantised base: an unquantised one is refused, saying why
    with pytest.raises(ArtifactError, match=f"trained on a base loaded as --dtype {kind}, this one is unquantised"):
        load_layers(transformers.AutoModelForCausalLM.from_pretrained(tied_llama_dir), tmp_path / "art")


def test_gpu_script_dry_run(tmp_path):
    """benchmarks/gpu_quantised_base.py's code path (a tiny random Llama on the CPU): a GPU lease is too
    short to find a broken script there."""
    out = tmp_path / "q.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_quantised_base.py"), "--dry-run",
                           "--steps", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["base"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"bfloat16", "int8", "nf4"} and "checks: passed" in proc.stdout
    assert rows["bfloat16"]["head_ok"] and rows["bfloat16"]["quantised_linears"] == 0
    if HAS_BNB:
        for kind in BASE_QUANTISATIONS:
            r = rows[kind]
            assert r["head_ok"] and r["linears_ok"] and r["quantised_linears"] == 28, r  # 4 blocks x 7
            assert r["manifest_quantization"] == kind and r["loss_ok"]
    else:
        assert all("bitsandbytes" in rows[k]["error"] for k in BASE_QUANTISATIONS)
