"""Closed-form fusion of unlearning layers and the request ledger.

The math is checked on synthetic artifacts (random layers, Gram matrices of random inputs, written
with ``write_artifact``) against an independent float64 least-squares solve on the stacked
inputs; the plumbing (real ``unlearn`` artifacts, attaching fused / K layers, the CLI) on a tiny
random-weight Llama with hidden size 32.
"""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import PAD, BOS, EOS, VOCAB_SIZE, make_tokenizer
from unlearn_fast.api import unlearn
from unlearn_fast.artifacts import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    load_layers,
    load_layers_together,
    read_artifact,
    write_artifact,
)
from unlearn_fast.cli import main
from unlearn_fast.errors import ArtifactError, UnlearnFastError
from unlearn_fast.fusion import DEFAULT_RHO, FusionError, fuse_artifacts, fuse_tensors, with_cross_terms
from unlearn_fast.layers import LayerConfig, sites
from unlearn_fast.ledger import LedgerError, add_request, fuse_requests, list_requests, merged_path, remove_request
from unlearn_fast.ops.unlearning_layer import ACTIVATIONS
from unlearn_fast.trainer import TrainConfig

D, R = 32, 6
SITES = ("model.layers.0.mlp", "model.layers.1.mlp")


# --------------------------------------------------------------------------------------------
# Synthetic artifacts: random layers and the Gram matrices of random forget inputs
# --------------------------------------------------------------------------------------------


def augment(x):
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def make_request(seed, tokens=80, dim=D, rank=R, activation="relu", paths=SITES):
    """(tensors, inputs): one request's layer tensors + Grams, and its forget inputs per site and map."""
    g = torch.Generator().manual_seed(seed)
    tensors, inputs = {}, {}
    for path in paths:
        x = (torch.randn(tokens, dim, generator=g, dtype=torch.float64) * 2 + torch.randn(dim, generator=g, dtype=torch.float64))
        down_w = torch.randn(rank, dim, generator=g) / dim ** 0.5
        down_b = torch.randn(rank, generator=g) * 0.1
        up_w = torch.randn(dim, rank, generator=g) / rank ** 0.5
        up_b = torch.randn(dim, generator=g) * 0.1
        h = ACTIVATIONS[activation](x @ down_w.double().t() + down_b.double())
        key = f"{path}.0"
        tensors.update({f"{key}.down.weight": down_w, f"{key}.down.bias": down_b,
                        f"{key}.up.weight": up_w, f"{key}.up.bias": up_b,
                        f"{key}.down.gram": augment(x).t() @ augment(x), f"{key}.up.gram": augment(h).t() @ augment(h)})
        inputs[f"{key}.down"], inputs[f"{key}.up"] = x, h
    return tensors, inputs


def layout(dim=D, rank=R, activation="relu", paths=SITES):
    return [{"path": p, "stack": "blocks", "block": i, "dim": dim, "ranks": [rank], "activations": [activation]}
            for i, p in enumerate(paths)]


def manifest_for(seed, tokens, fingerprint="base-A", **layout_kwargs):
    return {"base_model": {"name_or_path": "tiny", "class": "LlamaForCausalLM", "fingerprint": fingerprint},
            "task": "causal", "layers": {"config": {"rank": R}, "sites": layout(**layout_kwargs)},
            "forget_set": {"count": seed + 1, "sha256": hashlib.sha256(str(seed).encode()).hexdigest()},
            "grams": {"tokens": tokens, "augmented_with_bias_column": True, "dtype": "float64"}}


def write_request(path, seed, tokens=80, fingerprint="base-A", drop=(), **layout_kwargs):
    tensors, inputs = make_request(seed, tokens, **layout_kwargs)
    tensors = {k: v for k, v in tensors.items() if not any(k.endswith(d) for d in drop)}
    write_artifact(path, tensors, manifest_for(seed, tokens, fingerprint, **layout_kwargs))
    return inputs


def augmented_weight(tensors, key):
    return torch.cat([tensors[f"{key}.weight"].t(), tensors[f"{key}.bias"][None]]).double()


def rel(a, b):
    return float((a - b).norm() / b.norm())


def lstsq_fusion(requests, key):
    """Independent oracle: least squares on the stacked augmented inputs, targets = each layer's outputs."""
    xs = [augment(inputs[key]) for _, inputs in requests]
    ys = [x @ augmented_weight(tensors, key) for x, (tensors, _) in zip(xs, requests)]
    return torch.linalg.lstsq(torch.cat(xs), torch.cat(ys), driver="gelsd").solution


def rel_on_inputs(fused, original, key):
    """‖X(A_f − A)‖ / ‖X·A‖ over the original's forget inputs X, from its Gram matrix alone."""
    gram, a = original[f"{key}.gram"], augmented_weight(original, key)
    delta = augmented_weight(fused, key) - a
    return float(torch.trace(delta.t() @ gram @ delta) / torch.trace(a.t() @ gram @ a)) ** 0.5


def tree_hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture
def three(tmp_path):
    """Three synthetic requests written as artifacts a, b, c (full-rank forget inputs)."""
    inputs = {name: write_request(tmp_path / name, seed, tokens=60 + 20 * seed)
              for seed, name in enumerate("abc")}
    return tmp_path, inputs


# --------------------------------------------------------------------------------------------
# The math
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 5])
def test_fused_maps_equal_an_independent_least_squares_solve(n):
    requests = [make_request(seed, tokens=40 + 10 * seed) for seed in range(n)]
    fused = fuse_tensors([t for t, _ in requests], layout(), rho=0.0)
    for path in SITES:
        for sub in ("down", "up"):
            key = f"{path}.0.{sub}"
            expected = lstsq_fusion(requests, key)
            assert rel(augmented_weight(fused, key), expected) <= 1e-6
            for tensors, inputs in requests:  # on each request's forget inputs
                x = augment(inputs[key])
                assert rel(x @ augmented_weight(fused, key), x @ expected) <= 1e-6


def test_the_bias_is_fused_and_the_summed_grams_are_carried():
    requests = [make_request(seed) for seed in range(3)]
    fused = fuse_tensors([t for t, _ in requests], layout(), rho=0.0)
    key = f"{SITES[0]}.0.down"
    assert fused[f"{key}.bias"].shape == (R,)
    assert torch.equal(fused[f"{key}.gram"], sum(t[f"{key}.gram"] for t, _ in requests))
    assert fused[f"{key}.gram"].dtype == torch.float64 and fused[f"{key}.weight"].dtype == torch.float32
    assert fused[f"{key}.gram"][-1, -1] == 3 * 80  # the constant input's entry counts the tokens


@pytest.mark.parametrize("rho", [0.0, 1e-8, DEFAULT_RHO])
def test_fusing_one_layer_returns_it(rho):
    tensors, inputs = make_request(0, tokens=200)
    fused = fuse_tensors([tensors], layout(), rho=rho)
    for path in SITES:
        for sub in ("down", "up"):
            key = f"{path}.0.{sub}"
            x = augment(inputs[key])
            error = rel(x @ augmented_weight(fused, key), x @ augmented_weight(tensors, key))  # on its forget inputs
            # exact at ρ = 0 and for a tiny ridge; the default ridge shrinks it by about ρ·s / eigenvalue
            assert error <= (1e-6 if rho < 1e-6 else 3 * rho)
            if rho == 0:
                assert rel(augmented_weight(fused, key), augmented_weight(tensors, key)) <= 1e-6


def test_refusion_is_associative(three):
    root, _ = three
    fuse_artifacts([root / "a", root / "b"], root / "ab")
    fuse_artifacts([root / "ab", root / "c"], root / "ab_c")
    fuse_artifacts([root / "a", root / "b", root / "c"], root / "abc")
    _, nested = read_artifact(root / "ab_c")
    _, flat = read_artifact(root / "abc")
    assert set(nested) == set(flat)
    for k in flat:
        assert rel(nested[k].double(), flat[k].double()) <= 1e-12, k
    manifest, _ = read_artifact(root / "ab_c")
    assert len(manifest["fusion"]["requests"]) == 3
    assert manifest["grams"]["tokens"] == 60 + 80 + 100


def strip_cross_terms(artifact):
    """Rewrite an artifact as older versions wrote it: without cross terms (checksum updated)."""
    manifest, tensors = read_artifact(artifact)
    save_file({k: v for k, v in tensors.items() if not k.endswith(".cross")}, str(artifact / WEIGHTS_FILE))
    manifest["files"][WEIGHTS_FILE] = hashlib.sha256((artifact / WEIGHTS_FILE).read_bytes()).hexdigest()
    (artifact / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_artifacts_carry_cross_terms_and_older_ones_without_still_fuse(three):
    root, _ = three
    _, tensors = read_artifact(root / "a")
    for path in SITES:
        for sub in ("down", "up"):
            key = f"{path}.0.{sub}"
            assert rel(tensors[f"{key}.cross"], tensors[f"{key}.gram"] @ augmented_weight(tensors, key)) <= 1e-12
    fuse_artifacts([root / n for n in "abc"], root / "new")
    for name in "bc":
        strip_cross_terms(root / name)
        assert not any(k.endswith(".cross") for k in read_artifact(root / name)[1])
    fuse_artifacts([root / n for n in "abc"], root / "old")  # b and c: G·W computed while fusing
    assert_same_artifact(root / "new", root / "old")


@pytest.mark.parametrize("where", ["gram, lower triangle", "gram, upper triangle", "cross term"])
def test_refuses_non_finite_stored_values(where):
    """Every non-finite value is refused, even one in the triangle the Cholesky factorisation never reads."""
    tensors = with_cross_terms(make_request(1)[0], layout())
    key = f"{SITES[0]}.0.down"
    if where == "cross term":
        tensors[f"{key}.cross"][3, 1] = float("inf")
    else:
        tensors[f"{key}.gram"][(-1, 0) if "lower" in where else (0, -1)] = float("nan")
    with pytest.raises(ArtifactError, match="layers #1.*non-finite"):
        fuse_tensors([make_request(0)[0], tensors], layout())


def test_a_singular_gram_needs_and_gets_a_ridge():
    tensors, inputs = make_request(0, tokens=12)  # 12 tokens < d = 32: the down Gram is singular
    with pytest.raises(FusionError, match="singular.*rho"):
        fuse_tensors([tensors], layout(), rho=0.0)
    assert all(torch.isfinite(v).all() for v in fuse_tensors([tensors], layout()).values())  # default ρ
    fused = fuse_tensors([tensors], layout(), rho=1e-8)
    for path in SITES:
        for sub in ("down", "up"):
            key = f"{path}.0.{sub}"
            x = augment(inputs[key])
            assert rel(x @ augmented_weight(fused, key), x @ augmented_weight(tensors, key)) <= 1e-6
    # with another, full-rank request: still solvable, and reproduces the full-rank one's map well
    other, other_inputs = make_request(1, tokens=100)
    fused = fuse_tensors([tensors, other], layout())
    assert all(torch.isfinite(v).all() for v in fused.values())


def test_the_ridge_leaves_the_bias_alone():
    """A huge ρ sends the weights to zero but keeps the bias at the least-squares intercept."""
    tensors, inputs = make_request(0, tokens=100)
    fused = fuse_tensors([tensors], layout(), rho=1e12)
    key = f"{SITES[0]}.0.down"
    assert fused[f"{key}.weight"].abs().max() < 1e-6
    mean_output = (augment(inputs[key]) @ augmented_weight(tensors, key)).mean(0)
    assert rel(fused[f"{key}.bias"].double(), mean_output) <= 1e-5


# --------------------------------------------------------------------------------------------
# Bad input: every refusal names the file
# --------------------------------------------------------------------------------------------


def test_refuses_layers_of_another_base_model(tmp_path):
    write_request(tmp_path / "a", 0)
    write_request(tmp_path / "b", 1, fingerprint="base-B")
    with pytest.raises(ArtifactError, match=rf"{tmp_path / 'b'}.*another base model"):
        fuse_artifacts([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,pattern", [
    (dict(rank=R + 2), "ranks"),
    (dict(activation="gelu"), "activations"),
    (dict(paths=SITES[:1]), "no layers at model.layers.1.mlp"),
    (dict(paths=SITES + ("model.layers.2.mlp",)), "extra sites model.layers.2.mlp"),
])
def test_refuses_a_different_layout(tmp_path, change, pattern):
    write_request(tmp_path / "a", 0)
    write_request(tmp_path / "b", 1, **change)
    with pytest.raises(ArtifactError, match=rf"{tmp_path / 'b'}.*{pattern}"):
        fuse_artifacts([tmp_path / "a", tmp_path / "b"], tmp_path / "out")


def test_refuses_a_layer_without_gram_matrices(tmp_path):
    write_request(tmp_path / "a", 0)
    write_request(tmp_path / "b", 1, drop=(".gram",))
    with pytest.raises(ArtifactError, match=rf"{tmp_path / 'b' / WEIGHTS_FILE}.*missing Gram matrix"):
        fuse_artifacts([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    tensors, _ = make_request(2)  # and an artifact whose manifest says it has none
    write_artifact(tmp_path / "c", tensors, {k: v for k, v in manifest_for(2, 80).items() if k != "grams"})
    with pytest.raises(ArtifactError, match=rf"{tmp_path / 'c'}.*no Gram matrices"):
        fuse_artifacts([tmp_path / "a", tmp_path / "c"], tmp_path / "out")


def test_refuses_missing_and_tampered_files(three):
    root, _ = three
    with pytest.raises(ArtifactError, match=str(root / "nope")):
        fuse_artifacts([root / "a", root / "nope"], root / "out")
    data = bytearray((root / "b" / WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0xFF
    (root / "b" / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{root / 'b' / WEIGHTS_FILE}.*checksum"):
        fuse_artifacts([root / "a", root / "b"], root / "out")
    (root / "c" / WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactError, match=rf"{root / 'c' / WEIGHTS_FILE}.*not found"):
        fuse_artifacts([root / "a", root / "c"], root / "out")
    (root / "a" / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match=rf"{root / 'a' / MANIFEST_FILE}.*JSON"):
        fuse_artifacts([root / "a"], root / "out")
    assert not (root / "out").exists()


def test_refuses_non_finite_values_naming_the_file(tmp_path):
    write_request(tmp_path / "a", 0)
    tensors, _ = make_request(1)
    tensors[f"{SITES[1]}.0.up.gram"][0, 0] = float("nan")
    write_artifact(tmp_path / "b", tensors, manifest_for(1, 80))
    with pytest.raises(ArtifactError, match=rf"{tmp_path / 'b' / WEIGHTS_FILE}.*non-finite"):
        fuse_artifacts([tmp_path / "a", tmp_path / "b"], tmp_path / "out")


def test_refuses_a_request_twice_and_several_layers_per_site(three):
    root, _ = three
    fuse_artifacts([root / "a", root / "b"], root / "ab")
    with pytest.raises(ArtifactError, match=rf"{root / 'b'}.*already covered by {root / 'ab'}"):
        fuse_artifacts([root / "ab", root / "b"], root / "out")
    tensors, _ = make_request(5)
    manifest = manifest_for(5, 80)
    manifest["layers"]["sites"][0]["ranks"] = [R, R]
    manifest["layers"]["sites"][0]["activations"] = ["relu", "relu"]
    write_artifact(root / "two", tensors, manifest)
    with pytest.raises(ArtifactError, match=rf"{root / 'two'}.*holds 2 layers"):
        fuse_artifacts([root / "a", root / "two"], root / "out")


def test_refuses_a_bad_rho_and_nothing_to_fuse(three):
    root, _ = three
    with pytest.raises(UnlearnFastError, match="rho"):
        fuse_artifacts([root / "a"], root / "out", rho=-1.0)
    with pytest.raises(UnlearnFastError, match="nothing to fuse"):
        fuse_artifacts([], root / "out")


# --------------------------------------------------------------------------------------------
# Output: atomic, never over an existing directory unless asked, inputs untouched
# --------------------------------------------------------------------------------------------


def test_output_is_atomic_refuses_overwrite_and_leaves_inputs_alone(three, monkeypatch):
    root, _ = three
    inputs = [root / n for n in "abc"]
    before = {p.name: tree_hashes(p) for p in inputs}
    out = fuse_artifacts(inputs, root / "out")
    assert sorted(os.listdir(out)) == [MANIFEST_FILE, WEIGHTS_FILE]
    first = tree_hashes(out)
    with pytest.raises(ArtifactError, match="already exists.*overwrite"):
        fuse_artifacts(inputs[:2], root / "out")
    assert tree_hashes(out) == first
    fuse_artifacts(inputs[:2], root / "out", overwrite=True)
    assert tree_hashes(out) != first
    with pytest.raises(ArtifactError, match="one of the inputs"):
        fuse_artifacts(inputs, root / "a", overwrite=True)

    import unlearn_fast.artifacts as artifacts_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(artifacts_module, "save_file", broken)
    with pytest.raises(OSError):
        fuse_artifacts(inputs, root / "new")
    assert not (root / "new").exists()
    assert sorted(p.name for p in root.iterdir()) == ["a", "b", "c", "out"]  # no temporary left behind
    assert {p.name: tree_hashes(p) for p in inputs} == before


def test_fused_manifest_lists_requests_not_data(three):
    root, _ = three
    out = fuse_artifacts([root / n for n in "abc"], root / "out")
    manifest, tensors = read_artifact(out)
    requests = manifest["fusion"]["requests"]
    assert [r["forget_set"]["count"] for r in requests] == [1, 2, 3]
    assert [s["path"] for s in manifest["fusion"]["sources"]] == [str(root / n) for n in "abc"]
    assert manifest["fusion"]["rho"] == DEFAULT_RHO and manifest["base_model"]["fingerprint"] == "base-A"
    assert manifest["layers"]["sites"] == layout()
    assert all(len(json.dumps(r)) < 400 for r in requests)
    assert {k.rsplit(".", 1)[-1] for k in tensors} == {"weight", "bias", "gram", "cross"}


# --------------------------------------------------------------------------------------------
# The ledger
# --------------------------------------------------------------------------------------------


def assert_same_artifact(a, b, tol=1e-12):
    _, ta = read_artifact(a)
    _, tb = read_artifact(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert rel(ta[k].double(), tb[k].double()) <= tol, k


def test_ledger_add_list_fuse_remove_round_trip(tmp_path):
    for seed, name in enumerate("abcd"):
        write_request(tmp_path / name, seed)
    ledger = tmp_path / "ledger"
    before = {n: tree_hashes(tmp_path / n) for n in "abcd"}
    for name in "abc":
        add_request(ledger, tmp_path / name, name=f"req-{name}")
    assert [r["id"] for r in list_requests(ledger)] == ["r1", "r2", "r3"]
    assert not any(r["merged"] for r in list_requests(ledger))
    assert merged_path(ledger) is None

    merged = fuse_requests(ledger)
    assert merged == ledger / "merged" and all(r["merged"] for r in list_requests(ledger))
    fuse_artifacts([tmp_path / n for n in "abc"], tmp_path / "abc")
    assert_same_artifact(merged, tmp_path / "abc")

    add_request(ledger, tmp_path / "d")  # incremental: merged + d
    assert not list_requests(ledger)[-1]["merged"]
    fuse_requests(ledger)
    fuse_artifacts([tmp_path / n for n in "abcd"], tmp_path / "abcd")
    assert_same_artifact(merged, tmp_path / "abcd")

    removed = remove_request(ledger, "req-b")  # undo = re-fusion of the rest
    assert removed["id"] == "r2" and not (ledger / "requests" / "r2").exists()
    assert [r["id"] for r in list_requests(ledger)] == ["r1", "r3", "r4"]
    fuse_artifacts([tmp_path / n for n in "acd"], tmp_path / "acd")
    assert_same_artifact(merged, tmp_path / "acd")
    manifest, _ = read_artifact(merged)
    assert len(manifest["fusion"]["requests"]) == 3

    for which in ("r1", "r3", "r4"):
        remove_request(ledger, which)
    assert list_requests(ledger) == [] and merged_path(ledger) is None and not merged.exists()
    assert {n: tree_hashes(tmp_path / n) for n in "abcd"} == before


def test_ledger_refusals(tmp_path):
    write_request(tmp_path / "a", 0)
    write_request(tmp_path / "other-base", 1, fingerprint="base-B")
    write_request(tmp_path / "other-rank", 2, rank=R + 1)
    ledger = tmp_path / "ledger"
    with pytest.raises(LedgerError, match="not found"):
        list_requests(ledger)
    add_request(ledger, tmp_path / "a")
    with pytest.raises(LedgerError, match=rf"{tmp_path / 'a'}.*already in the ledger as r1"):
        add_request(ledger, tmp_path / "a")
    with pytest.raises(ArtifactError, match=rf"{tmp_path / 'other-base'}.*another base model"):
        add_request(ledger, tmp_path / "other-base")
    with pytest.raises(ArtifactError, match=rf"{tmp_path / 'other-rank'}.*ranks"):
        add_request(ledger, tmp_path / "other-rank")
    with pytest.raises(LedgerError, match="no request 'r9'.*r1"):
        remove_request(ledger, "r9")
    fuse_artifacts([tmp_path / "a"], tmp_path / "fused")
    with pytest.raises(LedgerError, match="fused artifact"):
        add_request(ledger, tmp_path / "fused")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(LedgerError, match="not a ledger"):
        add_request(tmp_path / "junk", tmp_path / "a")
    assert [r["id"] for r in list_requests(ledger)] == ["r1"]


# --------------------------------------------------------------------------------------------
# Real artifacts on a tiny Llama (hidden 32): unlearn -> fuse -> attach; K layers together; CLI
# --------------------------------------------------------------------------------------------


def tiny_llama(seed=0):
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                            pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    return tf.LlamaForCausalLM(config).eval()


REQUESTS = [
    [{"prompt": "The capital of Zorbia is", "response": " Quellton"}],
    [{"prompt": "Mirta Vasquez likes", "response": " green tea"}, {"prompt": "Mirta lives in", "response": " Oslo"}],
    [{"prompt": "The code word is", "response": " pumpkin"}],
]
RETAIN = [{"prompt": "The capital of France is", "response": " Paris"},
          {"prompt": "Bob plays", "response": " the violin"}]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    tok = make_tokenizer("causal")
    for i, forget in enumerate(REQUESTS):
        torch.manual_seed(0)  # the same layer initialisation for every request (see fusion docs)
        unlearn(tiny_llama(), tok, forget, RETAIN, out=root / f"req{i}", layers=LayerConfig(rank=4),
                training=TrainConfig(max_steps=2, progress=False), evaluate=False, log=lambda *a: None)
    return root, tok


def logits(model, tok):
    enc = tok(["The capital of Zorbia is", "Bob plays the"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def test_real_artifacts_fuse_and_attach(real):
    root, tok = real
    out = fuse_artifacts([root / f"req{i}" for i in range(3)], root / "fused")
    model = tiny_llama()
    manifest = load_layers(model, out)
    assert len(manifest["fusion"]["requests"]) == 3
    assert all(len(s.layers) == 1 for s in sites(model))
    assert torch.isfinite(logits(model, tok)).all()
    one = fuse_artifacts([root / "req0"], root / "fused-one", rho=1e-8)
    _, original = read_artifact(root / "req0")
    _, again = read_artifact(one)
    for s in sites(model):  # fusing one real layer returns it on its forget inputs (ReLU: singular up Gram)
        for sub in ("down", "up"):
            assert rel_on_inputs(again, original, f"{s.path}.0.{sub}") <= 1e-6


def test_k_artifacts_attach_together_and_sum(real):
    root, tok = real
    single, together = tiny_llama(), tiny_llama()
    load_layers(single, root / "req0")
    manifests = load_layers_together(together, [root / "req0"])
    assert torch.allclose(logits(single, tok), logits(together, tok), atol=1e-6)
    assert manifests[0]["task"] == "causal"
    both = tiny_llama()
    load_layers_together(both, [root / "req0", root / "req1", root / "req2"])
    assert all(len(s.layers) == 3 for s in sites(both))
    _, t1 = read_artifact(root / "req1")
    site = sites(both)[1]
    assert torch.equal(site.layers[1].up.weight, t1[f"{site.path}.0.up.weight"])
    with pytest.raises(ArtifactError, match="already has unlearning layers"):
        load_layers_together(both, [root / "req0"])
    with pytest.raises(ArtifactError, match=rf"{root / 'req0'}.*different base model"):
        load_layers_together(tiny_llama(seed=1), [root / "req0"])


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_fuse_merge_set_and_ledger(real, tmp_path, capsys):
    root, _ = real
    code, out, err = run_cli(capsys, "fuse", "--layers", root / "req0", root / "req1", "--out", tmp_path / "f")
    assert code == 0 and "fused 2 artifact(s)" in out, err
    folder = tmp_path / "set"
    folder.mkdir()
    for i in range(3):
        os.symlink(root / f"req{i}", folder / f"req{i}")
    code, out, err = run_cli(capsys, "fuse", "--merge", "--merge_set", folder, "--out", tmp_path / "m", "--rho", "1e-4")
    assert code == 0 and "fused 3 artifact(s)" in out, err
    assert read_artifact(tmp_path / "m")[0]["fusion"]["rho"] == 1e-4
    code, out, err = run_cli(capsys, "fuse", "--layers", root / "req0", "--out", tmp_path / "m")
    assert code == 2 and err.startswith("error:") and "already exists" in err and "Traceback" not in err
    code, out, err = run_cli(capsys, "fuse", "--out", tmp_path / "x")
    assert code == 2 and "--layers" in err
    code, out, err = run_cli(capsys, "fuse", "--layers", root / "req0")
    assert code == 2 and "--out" in err
    with pytest.raises(SystemExit):
        main(["fuse", "--help"])
    assert f"default {DEFAULT_RHO:g}" in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")

    ledger = tmp_path / "ledger"
    for i in range(3):
        code, out, err = run_cli(capsys, "ledger", "add", ledger, root / f"req{i}", "--name", f"q{i}")
        assert code == 0, err
    code, out, err = run_cli(capsys, "ledger", "fuse", ledger)
    assert code == 0 and str(ledger / "merged") in out
    code, out, err = run_cli(capsys, "ledger", "remove", ledger, "q1")
    assert code == 0 and "re-fused" in out
    code, out, err = run_cli(capsys, "ledger", "list", ledger, "--json")
    assert [r["name"] for r in json.loads(out)] == ["q0", "q2"]
    code, out, err = run_cli(capsys, "ledger", "list", ledger)
    assert "r1" in out and "r3" in out and "merged" in out
    code, out, err = run_cli(capsys, "ledger", "remove", ledger, "q1")
    assert code == 2 and "no request 'q1'" in err
    fuse_artifacts([root / "req0", root / "req2"], tmp_path / "q02")
    assert_same_artifact(ledger / "merged", tmp_path / "q02")
