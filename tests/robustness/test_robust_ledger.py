"""The request ledger under hostile or unlucky conditions (issue 30):

- an entry of ledger.json that points out of the ledger (``../x``, an absolute path, a symbolic
  link) is refused, naming the entry, and nothing outside is read or deleted;
- concurrent writers (2 and 4 processes, a few hundred mixed add / remove) lose nothing and never
  hand out one id twice; 4 concurrent ``ledger add`` on a fresh ledger all land;
- a first add that fails (full disk) leaves no skeleton that later adds refuse, and the skeleton
  older versions left is completed; leftovers of a killed operation are removed, in one line;
- unknown ids and undoing twice give one error line.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import multiprocessing
import os
import random
import sys

import pytest
import torch

from unlearn_fast.cli import main
from unlearn_fast.fusion.ledger import LedgerError, add_request, fuse_requests, list_requests, remove_request
from unlearn_fast.io.artifacts import write_artifact

D, R = 8, 2
SITE = "model.layers.0.mlp"


def write_request(path, seed):
    """A small synthetic ``unlearn`` artifact: one site, random layer and Gram matrices."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(40, D, generator=g, dtype=torch.float64), torch.ones(40, 1, dtype=torch.float64)], 1)
    h = torch.cat([torch.randn(40, R, generator=g, dtype=torch.float64), torch.ones(40, 1, dtype=torch.float64)], 1)
    key = f"{SITE}.0"
    tensors = {f"{key}.down.weight": torch.randn(R, D, generator=g), f"{key}.down.bias": torch.randn(R, generator=g),
               f"{key}.up.weight": torch.randn(D, R, generator=g), f"{key}.up.bias": torch.randn(D, generator=g),
               f"{key}.down.gram": x.t() @ x, f"{key}.up.gram": h.t() @ h}
    manifest = {"base_model": {"name_or_path": "tiny", "class": "LlamaForCausalLM", "fingerprint": "base-A"},
                "task": "causal", "layers": {"config": {"rank": R}, "sites": [
                    {"path": SITE, "stack": "blocks", "block": 0, "dim": D, "ranks": [R], "activations": ["relu"]}]},
                "forget_set": {"count": seed + 1, "sha256": hashlib.sha256(str(seed).encode()).hexdigest()},
                "grams": {"tokens": 40, "augmented_with_bias_column": True, "dtype": "float64"}}
    write_artifact(path, tensors, manifest)


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def tree(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture
def ledger(tmp_path):
    """A ledger holding r1, r2 (fused), and a victim directory beside it."""
    for i in range(3):
        write_request(tmp_path / f"a{i}", i)
    add_request(tmp_path / "L", tmp_path / "a0")
    add_request(tmp_path / "L", tmp_path / "a1")
    fuse_requests(tmp_path / "L")
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "precious.txt").write_text("keep me")
    return tmp_path / "L"


# -- A: entries that point out of the ledger --------------------------------------------------
def edit(ledger, change):
    state = json.loads((ledger / "ledger.json").read_text())
    change(state)
    (ledger / "ledger.json").write_text(json.dumps(state))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "other-request", "symlink", "requests-symlink"])
def test_entry_leaving_the_ledger_is_refused(ledger, capsys, how):
    victim = ledger.parent / "victim"
    if how in ("dotdot", "absolute", "other-request"):
        target = {"dotdot": "../victim", "absolute": str(victim), "other-request": "requests/r1"}[how]
        edit(ledger, lambda s: s["requests"][1].update(artifact=target))
    elif how == "symlink":  # the ledger's own entry, replaced by a link out of it
        os.rename(ledger / "requests" / "r2", ledger.parent / "moved")
        os.symlink(victim, ledger / "requests" / "r2")
    else:
        os.rename(ledger / "requests", ledger.parent / "moved")
        os.symlink(ledger.parent / "moved", ledger / "requests")
    victims = tree(ledger.parent / ("moved" if how == "requests-symlink" else "victim"))
    before = (ledger / "ledger.json").read_text()
    with pytest.raises(LedgerError, match=r"request r2 .*refusing"):
        remove_request(ledger, "r2")
    with pytest.raises(LedgerError, match=r"request r[12] .*refusing"):
        fuse_requests(ledger, rho=0.5)  # a fresh fusion reads every request
    code, out, err = cli(capsys, "ledger", "remove", ledger, "r2")
    assert code == 2 and err.count("\n") == 1 and "r2" in err and "Traceback" not in err
    assert tree(ledger.parent / ("moved" if how == "requests-symlink" else "victim")) == victims
    assert (ledger / "ledger.json").read_text() == before


def test_merged_entry_leaving_the_ledger_is_refused(ledger, capsys):
    edit(ledger, lambda s: s["merged"].update(artifact="../victim"))
    with pytest.raises(LedgerError, match=r"merged layer .*'\.\./victim'"):
        remove_request(ledger, "r1")
    code, out, err = cli(capsys, "ledger", "list", ledger)  # listing reads ledger.json only
    assert code == 0 and "r1" in out
    assert (ledger.parent / "victim" / "precious.txt").read_text() == "keep me"


# -- B: concurrent writers --------------------------------------------------------------------
# The writers are forked from this process (torch is imported already: no per-process start-up),
# released together, and write what they did to a JSON file.
FORK = multiprocessing.get_context("fork")


def writer(ledger, root, k, ops, go):
    """A seeded sequence of adds (of this writer's artifacts not in the ledger) and removes (of its
    requests in it)."""
    pool = sorted(p.name for p in root.glob(f"w{k}-*"))
    rng, present, added = random.Random(k), {}, []
    go.wait()
    for _ in range(ops):
        absent = [n for n in pool if n not in present]
        if absent and (not present or rng.random() < 0.6):
            name = rng.choice(absent)
            present[name] = add_request(ledger, root / name, name=name, log=lambda m: None)["id"]
            added.append(present[name])
        else:
            remove_request(ledger, present.pop(rng.choice(sorted(present))), log=lambda m: None)
    (root / f"done{k}.json").write_text(json.dumps({"present": present, "added": added}))


def cli_writer(ledger, artifact, out, go):
    """``unlearn-fast ledger add LEDGER ARTIFACT``, its output to ``out``."""
    go.wait()
    with open(out, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        sys.exit(main(["ledger", "add", str(ledger), str(artifact)]))


def run_together(target, argss, timeout=60):
    go = FORK.Event()
    procs = [FORK.Process(target=target, args=(*args, go)) for args in argss]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(timeout)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


@pytest.mark.parametrize("writers,ops", [(2, 100), (4, 60)])
def test_concurrent_writers_lose_nothing(tmp_path, writers, ops):
    for k in range(writers):
        for j in range(4):
            write_request(tmp_path / f"w{k}-{j}", 100 * k + j)
    ledger = tmp_path / "L"
    if writers == 4:
        write_request(tmp_path / "first", 999)
        add_request(ledger, tmp_path / "first", name="first")  # the other variant: an existing ledger
    run_together(writer, [(ledger, tmp_path, k, ops) for k in range(writers)])
    done = [json.loads((tmp_path / f"done{k}.json").read_text()) for k in range(writers)]
    added = [i for d in done for i in d["added"]]
    assert len(added) == len(set(added)), "an id was handed out twice"
    expected = {i: n for d in done for n, i in d["present"].items()}
    if writers == 4:
        expected["r1"] = "first"
    state = json.loads((ledger / "ledger.json").read_text())
    assert {r["id"]: r["name"] for r in state["requests"]} == expected
    assert state["next"] == len(added) + 1 + (writers == 4)
    assert sorted(p.name for p in (ledger / "requests").iterdir()) == sorted(expected)


def test_concurrent_cli_adds_get_distinct_ids(tmp_path):
    for k in range(4):
        write_request(tmp_path / f"a{k}", k)
    run_together(cli_writer, [(tmp_path / "L", tmp_path / f"a{k}", tmp_path / f"out{k}") for k in range(4)])
    printed = sorted((tmp_path / f"out{k}").read_text().split()[1] for k in range(4))
    assert printed == ["r1", "r2", "r3", "r4"]
    assert sorted(r["id"] for r in list_requests(tmp_path / "L")) == printed


# -- C: an interrupted first add, leftovers of a killed operation -------------------------------
def test_full_disk_on_first_add_leaves_no_skeleton(tmp_path, capsys, monkeypatch):
    write_request(tmp_path / "a", 0)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("unlearn_fast.io.artifacts.save_file", full)
    code, out, err = cli(capsys, "ledger", "add", tmp_path / "L", tmp_path / "a")
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err, err
    monkeypatch.undo()
    code, out, err = cli(capsys, "ledger", "add", tmp_path / "L", tmp_path / "a")
    assert code == 0 and "added r1" in out, err
    assert [r["id"] for r in list_requests(tmp_path / "L")] == ["r1"]


@pytest.mark.parametrize("skeleton", [["requests/"], ["requests/", "requests/.r1.k2j3x9/x"], [".ledger.json.q1w2"]])
def test_skeleton_of_an_interrupted_first_add_is_completed(tmp_path, capsys, skeleton):
    write_request(tmp_path / "a", 0)
    for entry in skeleton:
        path = tmp_path / "L" / entry
        if entry.endswith("/"):
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("partial")
    code, out, err = cli(capsys, "ledger", "add", tmp_path / "L", tmp_path / "a")
    assert code == 0 and "added r1" in out, err
    assert sorted(p.name for p in (tmp_path / "L").iterdir()) == [".lock", "ledger.json", "requests"]
    assert [p.name for p in (tmp_path / "L" / "requests").iterdir()] == ["r1"]


@pytest.mark.parametrize("junk", ["notes.txt", "requests/r1/x", "requests/notes.txt", "merged/x"])
def test_a_directory_that_is_not_a_ledger_is_still_refused(tmp_path, junk):
    write_request(tmp_path / "a", 0)
    (tmp_path / "L" / junk).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "L" / junk).write_text("mine")
    before = tree(tmp_path / "L")
    with pytest.raises(LedgerError, match="exists and is not a ledger"):
        add_request(tmp_path / "L", tmp_path / "a")
    assert tree(tmp_path / "L") == before  # not even a lock file


@pytest.mark.parametrize("operation", ["add", "fuse", "remove"])
def test_leftovers_of_a_killed_operation_are_removed(ledger, operation):
    leftovers = ["requests/.r3.k2j3x9/manifest.json", "requests/.r2.old.ab12cd/r2/manifest.json",
                 ".ledger.json.q1w2e3", ".merged.zx81ab/manifest.json", "requests/r7/manifest.json"]
    for entry in leftovers:
        (ledger / entry).parent.mkdir(parents=True, exist_ok=True)
        (ledger / entry).write_text("partial")
    os.symlink(ledger.parent / "victim", ledger / "requests" / ".r4.link00")  # unlinked, not followed
    lines = []
    if operation == "add":
        add_request(ledger, ledger.parent / "a2", log=lines.append)
    elif operation == "fuse":
        fuse_requests(ledger, rho=0.5, log=lines.append)
    else:
        remove_request(ledger, "r1", log=lines.append)
    assert len(lines) == 1 and "6 entries left by an interrupted operation" in lines[0], lines
    assert "requests/.r3.k2j3x9" in lines[0] and "requests/r7" in lines[0]
    kept = {"add": ["r1", "r2", "r3"], "fuse": ["r1", "r2"], "remove": ["r2"]}[operation]
    assert sorted(p.name for p in (ledger / "requests").iterdir()) == kept
    assert sorted(p.name for p in ledger.iterdir()) == [".lock", "ledger.json", "merged", "requests"]
    assert (ledger.parent / "victim" / "precious.txt").read_text() == "keep me"


# -- unknown ids, undo twice: one line -----------------------------------------------------------
def test_unknown_ids_and_undo_twice_give_one_line(ledger, capsys):
    code, out, err = cli(capsys, "ledger", "remove", ledger, "r2")
    assert code == 0 and "removed r2" in out
    for argv, expected in [(("remove", "r2"), "request r2 was removed already; it holds r1"),
                           (("remove", "r9"), "no request 'r9'; it holds r1"),
                           (("remove", "nobody"), "no request 'nobody'"),
                           (("list", "r2"), "request r2 was removed already"),
                           (("list", "r9"), "no request 'r9'")]:
        code, out, err = cli(capsys, "ledger", argv[0], ledger, *argv[1:])
        assert code == 2 and err.count("\n") == 1 and expected in err and not out, (argv, err)
    code, out, err = cli(capsys, "ledger", "list", ledger, "r1")
    assert code == 0 and out.startswith("r1 ") and out.count("\n") == 1
    code, out, err = cli(capsys, "ledger", "remove", ledger.parent / "nowhere", "r1")
    assert code == 2 and err.count("\n") == 1 and "not found" in err
    assert not (ledger.parent / "nowhere").exists()
