"""Artifacts: save -> load round trip, base-model and integrity checks, atomic (over)writes, the
Gram matrices fusion needs, and what the manifest may (not) hold."""

import json
from pathlib import Path

import pytest
import torch
from conftest import ALL_ARCHS, FACTS_FORGET, FACTS_RETAIN, TASK_OF, logits_of, make_config, make_model, sample_batch, tokenizer_for

from unlearn_fast.api import unlearn
from unlearn_fast.errors import ArtifactError
from unlearn_fast.io.artifacts import (
    MANIFEST_FILE, WEIGHTS_FILE, load_layers, model_fingerprint, read_artifact, read_manifest, write_artifact
)
from unlearn_fast.model.layers import LayerConfig, layers_disabled, sites
from unlearn_fast.train.data import load_examples
from unlearn_fast.train.encoding import encode
from unlearn_fast.train.set_checks import fingerprint
from unlearn_fast.train.trainer import TrainConfig

FORGET, RETAIN = FACTS_FORGET, FACTS_RETAIN

FORGET_TEXT = [{"text": "Zorbia exports purple marbles.", "label": 1},
               {"text": "Quellton has seven bridges.", "label": 0}]
RETAIN_TEXT = [{"text": "France exports cheese and wine.", "label": 0},
               {"text": "Paris has many museums.", "label": 1},
               {"text": "The sky is blue today.", "label": 1}]
SECRETS = ["Zorbia", "Quellton", "Mirta Vasquez", "green tea", "purple marbles", "seven bridges"]
RANK = 4


def data_for(arch):
    return (FORGET_TEXT, RETAIN_TEXT) if arch == "bert" else (FORGET, RETAIN)


def run_unlearn(arch, out, seed=0, **kwargs):
    model = make_model(arch, seed)
    forget, retain = data_for(arch)
    kwargs.setdefault("training", TrainConfig(max_steps=3, lr=1e-2, progress=False))
    kwargs.setdefault("evaluate", False)
    result = unlearn(model, tokenizer_for(arch), forget, retain, out=out, layers=LayerConfig(rank=RANK),
                     log=lambda *a: None, **kwargs)
    return result


@pytest.fixture(scope="module")
def llama_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "llama"
    result = run_unlearn("llama", out)
    return result, out


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_round_trip_is_bit_exact(arch, tmp_path):
    out = tmp_path / "layers"
    result = run_unlearn(arch, out)
    assert result.out == out and (out / WEIGHTS_FILE).is_file() and (out / MANIFEST_FILE).is_file()
    trained = result.model
    batch = sample_batch(arch)
    student = logits_of(trained, batch)
    with layers_disabled(trained):
        teacher = logits_of(trained, batch)
    assert not torch.equal(student, teacher)  # the layers learned something: not a vacuous check

    fresh = make_model(arch)
    assert torch.equal(logits_of(fresh, batch), teacher)
    manifest = load_layers(fresh, out)
    assert manifest["task"] == TASK_OF[arch]
    assert [s.path for s in sites(fresh)] == [s.path for s in sites(trained)]
    assert torch.equal(logits_of(fresh, batch), student)
    for a, b in zip(sites(fresh), sites(trained)):
        assert a.stack == b.stack and a.block == b.block
        for la, lb in zip(a.layers, b.layers):
            for (na, ta), (nb, tb) in zip(la.state_dict().items(), lb.state_dict().items()):
                assert na == nb and torch.equal(ta, tb)
    with layers_disabled(fresh):
        assert torch.equal(logits_of(fresh, batch), teacher)


def test_fingerprint_ignores_attached_layers():
    model = make_model("llama")
    before = model_fingerprint(model)
    from unlearn_fast.model.layers import attach
    attach(model, LayerConfig(rank=RANK))
    assert model_fingerprint(model) == before
    assert model_fingerprint(make_model("llama", seed=1)) != before


def test_other_base_model_is_refused(llama_artifact):
    _, out = llama_artifact
    other = make_model("llama", seed=1)
    with pytest.raises(ArtifactError) as info:
        load_layers(other, out)
    assert "different base model" in str(info.value)
    assert sites(other) == []  # nothing was attached


def test_model_with_layers_is_refused(llama_artifact):
    result, out = llama_artifact
    with pytest.raises(ArtifactError):
        load_layers(result.model, out)
    fresh = make_model("llama")
    load_layers(fresh, out)
    with pytest.raises(ArtifactError):
        load_layers(fresh, out)


def copy_artifact(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in (WEIGHTS_FILE, MANIFEST_FILE):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_tampered_tensor_file_is_refused(llama_artifact, tmp_path):
    _, out = llama_artifact
    art = copy_artifact(out, tmp_path / "copy")
    data = bytearray((art / WEIGHTS_FILE).read_bytes())
    data[-3] ^= 0x01  # one bit of one tensor value
    (art / WEIGHTS_FILE).write_bytes(bytes(data))
    fresh = make_model("llama")
    with pytest.raises(ArtifactError) as info:
        load_layers(fresh, art)
    assert "checksum" in str(info.value)
    assert sites(fresh) == []


def test_missing_manifest_is_refused(llama_artifact, tmp_path):
    _, out = llama_artifact
    art = copy_artifact(out, tmp_path / "copy")
    (art / MANIFEST_FILE).unlink()
    with pytest.raises(ArtifactError) as info:
        load_layers(make_model("llama"), art)
    assert "manifest" in str(info.value)
    with pytest.raises(ArtifactError):
        load_layers(make_model("llama"), tmp_path / "does-not-exist")


def test_missing_tensor_file_and_bad_manifest_are_refused(llama_artifact, tmp_path):
    _, out = llama_artifact
    art = copy_artifact(out, tmp_path / "copy")
    (art / WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactError):
        load_layers(make_model("llama"), art)
    art = copy_artifact(out, tmp_path / "copy2")
    (art / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ArtifactError):
        load_layers(make_model("llama"), art)


def leftovers(parent: Path, name: str) -> list:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_existing_output_refused_without_overwrite_and_replaced_with_it(tmp_path):
    out = tmp_path / "layers"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    model = make_model("llama")
    with pytest.raises(ArtifactError) as info:
        unlearn(model, tokenizer_for("llama"), FORGET, RETAIN, out=out, layers=LayerConfig(rank=RANK),
                training=TrainConfig(max_steps=1, progress=False), evaluate=False)
    assert "already exists" in str(info.value) and "overwrite" in str(info.value)
    assert sites(model) == []  # refused before any work
    assert (out / "stale.txt").read_text() == "old"
    with pytest.raises(ArtifactError, match="not an unlearn-fast artifact"):  # only artifacts are replaced
        run_unlearn("llama", out, overwrite=True)
    assert (out / "stale.txt").read_text() == "old"

    (out / "stale.txt").unlink()
    write_artifact(out, {"a": torch.zeros(1)}, {}, overwrite=True)  # an empty directory holds nothing to lose
    result = run_unlearn("llama", out, overwrite=True)
    assert result.out == out
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS_FILE, MANIFEST_FILE])
    assert leftovers(tmp_path, "layers") == []
    load_layers(make_model("llama"), out)


def test_write_artifact_is_atomic_and_refuses_existing(tmp_path):
    out = tmp_path / "art"
    tensors = {"a": torch.arange(4.0)}
    write_artifact(out, tensors, {"base_model": {"fingerprint": "x"}})
    with pytest.raises(ArtifactError):
        write_artifact(out, {"a": torch.zeros(2)}, {})
    manifest, loaded = read_artifact(out)
    assert torch.equal(loaded["a"], tensors["a"])
    write_artifact(out, {"b": torch.ones(3)}, {"n": 1}, overwrite=True)
    manifest, loaded = read_artifact(out)
    assert list(loaded) == ["b"] and manifest["n"] == 1
    assert leftovers(tmp_path, "art") == []
    file = tmp_path / "plain-file"
    file.write_text("x")
    with pytest.raises(ArtifactError):
        write_artifact(file, tensors, {}, overwrite=True)


def test_written_artifacts_carry_cross_terms_and_read_lazily(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64) + 3
    xa = torch.cat([x, torch.ones(50, 1, dtype=torch.float64)], 1)
    w, b = torch.randn(3, 8, generator=g), torch.randn(3, generator=g)
    given = torch.randn(9, 3, generator=g, dtype=torch.float64)
    tensors = {f"s.{i}.down.{name}": t.clone() for i in range(3) for name, t in (("weight", w), ("bias", b))}
    tensors.update({"s.0.down.gram": xa.t() @ xa, "s.1.down.gram": xa.t() @ xa, "s.1.down.cross": given})
    # s.2 has no Gram matrix: no cross term
    write_artifact(tmp_path / "a", tensors, {"task": "causal"})
    _, stored = read_artifact(tmp_path / "a")  # the checksum covers what was added
    assert set(stored) == set(tensors) | {"s.0.down.cross"}
    expected = xa.t() @ (xa @ torch.cat([w.t(), b[None]]).double())  # Xᵀ(X·[Wᵀ; bᵀ]), not G·[Wᵀ; bᵀ]
    assert stored["s.0.down.cross"].dtype == torch.float64
    assert float((stored["s.0.down.cross"] - expected).norm() / expected.norm()) <= 1e-12
    assert torch.equal(stored["s.1.down.cross"], given)  # a stored cross term (a fused one) is kept as given

    manifest, lazy = read_artifact(tmp_path / "a", lazy=True)
    assert manifest["task"] == "causal" and len(lazy) == len(stored) and set(lazy) == set(stored)
    assert all(torch.equal(lazy[k], v) for k, v in stored.items())
    assert "nope" not in lazy and lazy.get("nope") is None
    data = bytearray((tmp_path / "a" / WEIGHTS_FILE).read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / "a" / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        read_artifact(tmp_path / "a", lazy=True)


def _input_grams(model, task, rows, pad_id):
    """Independent Gram matrices: hook each site's wrapped module and accumulate [x, 1]ᵀ[x, 1]."""
    from unlearn_fast.model.family import output_states
    from unlearn_fast.train.encoding import collate

    grams, handles = {}, []
    current = {}

    def hook(site):
        def fn(module, args, out):
            mask = current["decoder"] if site.stack == "decoder" else current["input"]
            x = out[mask].double()
            layer = site.layers[0]
            h = torch.relu(x @ layer.down.weight.double().t() + layer.down.bias.double())
            for key, v in ((f"{site.path}.0.down.gram", x), (f"{site.path}.0.up.gram", h)):
                v = torch.cat([v, torch.ones(v.shape[0], 1, dtype=v.dtype)], 1)
                grams[key] = grams.get(key, 0) + v.t() @ v
        return fn

    for s in sites(model):
        handles.append(s.base.register_forward_hook(hook(s)))
    try:
        with torch.no_grad():
            for row in rows:  # one row at a time: no padding at all
                batch = collate([row], pad_id)
                current["input"] = batch["attention_mask"].bool()
                if "decoder_attention_mask" in batch:
                    current["decoder"] = batch["decoder_attention_mask"].bool()
                output_states(model, task, batch)
    finally:
        for h in handles:
            h.remove()
    return grams


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "bert"])
def test_gram_matrices(arch, tmp_path):
    out = tmp_path / "layers"
    result = run_unlearn(arch, out)
    manifest, tensors = read_artifact(out)
    tok = tokenizer_for(arch)
    forget, _ = data_for(arch)
    task = TASK_OF[arch]
    examples = load_examples(forget, name="forget")
    labels = [e.label for e in examples] if task == "classification" else None
    rows = encode(examples, tok, task, forget=True, name="forget", model_config=make_config(arch), labels=labels)
    tokens = {"input": sum(len(r.input_ids) for r in rows),
              "decoder": sum(len(r.decoder_input_ids or []) for r in rows)}
    if task == "causal":
        expected = sum(len(tok(e["prompt"])["input_ids"]) + len(e["response"]) for e in forget)
        assert tokens["input"] == expected  # one token per character, plus <s>
    expected_grams = _input_grams(result.model, task, rows, tok.pad_token_id)
    names = [k for k in tensors if k.endswith(".gram")]
    assert len(names) == 2 * len(sites(result.model))
    for s in sites(result.model):
        down, up = tensors[f"{s.path}.0.down.gram"], tensors[f"{s.path}.0.up.gram"]
        assert down.dtype == torch.float64 and up.dtype == torch.float64
        assert tuple(down.shape) == (s.dim + 1, s.dim + 1)
        assert tuple(up.shape) == (RANK + 1, RANK + 1)
        n = tokens["decoder"] if s.stack == "decoder" else tokens["input"]
        assert n > 0
        for g in (down, up):
            torch.testing.assert_close(g, g.t(), rtol=1e-12, atol=1e-12)
            assert float(g[-1, -1]) == n
            assert torch.linalg.eigvalsh(g).min() > -1e-8 * float(g.abs().max())  # a Gram matrix is PSD
        # the same statistics up to fp32 noise (padded vs unpadded forward, fp32 vs fp64 bottleneck)
        for g, key in ((down, "down"), (up, "up")):
            want = expected_grams[f"{s.path}.0.{key}.gram"]
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
            # and the cross term fusion needs, G·[Wᵀ; bᵀ] of the stored layer, in float64
            weight, bias = (tensors[f"{s.path}.0.{key}.{p}"].double() for p in ("weight", "bias"))
            cross, expected = tensors[f"{s.path}.0.{key}.cross"], g @ torch.cat([weight.t(), bias[None]])
            assert cross.dtype == torch.float64
            assert float((cross - expected).norm() / expected.norm()) <= 1e-12
    assert manifest["grams"]["tokens"] == tokens["input"]


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_manifest_has_set_fingerprints_but_no_text(arch, tmp_path):
    out = tmp_path / "layers"
    run_unlearn(arch, out, evaluate=True)
    forget, retain = data_for(arch)
    text = (out / MANIFEST_FILE).read_text()
    manifest = json.loads(text, parse_constant=lambda c: pytest.fail(f"manifest is not strict JSON: {c}"))
    assert manifest == read_manifest(out)
    assert manifest["forget_set"] == fingerprint(load_examples(forget, name="forget"))
    assert manifest["retain_set"] == fingerprint(load_examples(retain, name="retain"))
    assert manifest["forget_set"]["count"] == len(forget)
    assert len(manifest["forget_set"]["sha256"]) == 64
    blob = (out / WEIGHTS_FILE).read_bytes()
    for example in forget + retain:
        for value in example.values():
            if isinstance(value, str):
                assert value.strip() not in text
                assert value.strip().encode() not in blob
    for secret in SECRETS:
        assert secret not in text
    assert manifest["base_model"]["fingerprint"] == model_fingerprint(make_model(arch))
    assert manifest["base_model"]["class"] == make_model(arch).__class__.__name__
    assert manifest["layers"]["config"]["rank"] == RANK


def test_write_json_replaces_whole_or_not_at_all(tmp_path):
    from unlearn_fast.io.atomic import write_json

    path = tmp_path / "report.json"
    write_json(path, {"rows": [1, 2]}, indent=2)
    assert json.loads(path.read_text()) == {"rows": [1, 2]}
    with pytest.raises(TypeError):  # not serialisable: fails mid-write
        write_json(path, {"rows": [1, object()]})
    assert json.loads(path.read_text()) == {"rows": [1, 2]}  # the old file, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary left behind
