"""Closed-form fusion on synthetic artifacts, checked against an independent float64 least-squares
solve on the stacked inputs; its refusals; atomic output."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from fusion_helpers import (  # noqa: F401 - fixtures (three) are found by name
    R, SITES, assert_same_artifact, augment, augmented_weight, layout, lstsq_fusion, make_request, manifest_for,
    rel, three, tree_hashes, write_request
)
from safetensors.torch import save_file

from unlearn_fast.errors import ArtifactError, UnlearnFastError
from unlearn_fast.fusion.closed_form import (
    DEFAULT_RHO, FusionError, fuse_artifacts, fuse_tensors, with_cross_terms
)
from unlearn_fast.io.artifacts import MANIFEST_FILE, WEIGHTS_FILE, read_artifact, write_artifact

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

    import unlearn_fast.io.artifacts as artifacts_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(artifacts_module, "save_file", broken)
    with pytest.raises(ArtifactError, match="disk full"):  # one line (OutputError), not a traceback
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
