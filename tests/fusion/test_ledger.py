"""The request ledger (add, list, fuse, remove) and the plumbing on real artifacts: unlearn -> fuse ->
attach, K layers together, the fuse / ledger CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from fusion_helpers import (  # noqa: F401 - fixtures (real) are found by name
    R, assert_same_artifact, logits, real, rel_on_inputs, run_cli, tiny_llama, tree_hashes, write_request
)

from unlearn_fast.cli import main
from unlearn_fast.errors import ArtifactError
from unlearn_fast.fusion.closed_form import DEFAULT_RHO, fuse_artifacts
from unlearn_fast.fusion.ledger import (
    LedgerError, add_request, fuse_requests, list_requests, merged_path, remove_request
)
from unlearn_fast.io.artifacts import load_layers, load_layers_together, read_artifact
from unlearn_fast.model.layers import sites

# --------------------------------------------------------------------------------------------
# The ledger
# --------------------------------------------------------------------------------------------


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
