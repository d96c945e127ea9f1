"""Output paths (issue 30): --overwrite replaces only our own artifacts, every output is checked
before the model is loaded, failed writes are one line and leave nothing, a killed run's
temporaries are cleaned up (or restored), and outputs follow the umask.

All through :mod:`unlearn_fast.io.atomic` and :func:`unlearn_fast.io.artifacts.check_writable`."""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FACTS_FORGET, FACTS_RETAIN, REPO_ROOT, save_model_dir, write_jsonl
from unlearn_fast.cli import main
from unlearn_fast.demo import run_demo
from unlearn_fast.errors import OutputError
from unlearn_fast.io.artifacts import MANIFEST_FILE, WEIGHTS_FILE, check_writable, write_artifact
from unlearn_fast.io.atomic import remove_stale
from unlearn_fast.train import checkpoint

FORGET, RETAIN = FACTS_FORGET, FACTS_RETAIN


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code, err, *needles) -> str:
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: "), err
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def tree(path: Path) -> dict:
    """Every file under ``path`` with its bytes (to show nothing was touched)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def temporaries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A saved tiny model, the data (in data/) and two artifacts (in arts/) made by the CLI."""
    root = tmp_path_factory.mktemp("robust")
    save_model_dir("llama", root / "model")
    (root / "data").mkdir()
    write_jsonl(root / "data" / "forget.jsonl", FORGET)
    write_jsonl(root / "data" / "retain.jsonl", RETAIN)
    for name, seed in (("a1", 0), ("a2", 1)):
        assert main([str(a) for a in unlearn_args(root, root / "arts" / name)] + ["--seed", str(seed)]) == 0
    return root


def unlearn_args(root, out, *extra):
    return ["unlearn", "--model", root / "model", "--forget", root / "data" / "forget.jsonl",
            "--retain", root / "data" / "retain.jsonl", "--out", out,
            "--max-steps", "2", "--no-eval", "--no-progress", "--rank", "4", *extra]


@pytest.fixture
def arts(workdir, tmp_path):
    """Fresh copies of the two artifacts, in their own folder P (P/a1, P/a2)."""
    shutil.copytree(workdir / "arts", tmp_path / "P")
    return tmp_path / "P"


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if a verb loads a model: output checks must come first."""
    import unlearn_fast.cli.common as common
    import unlearn_fast.demo as demo

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(common, "load_model", refuse)
    monkeypatch.setattr(demo, "load_model", refuse)


@contextlib.contextmanager
def mounted(path: Path, options: str):
    """A tmpfs at ``path`` (skips the test where mounting is not permitted); unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# --------------------------------------------------------------------------------------------
# 1. --overwrite replaces only an artifact of ours, never an input, never the current directory
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["unlearn", "ga", "fuse", "demo"])
def test_overwrite_refuses_a_folder_that_is_not_an_artifact(verb, workdir, arts, tmp_path, capsys, no_model_load):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    if verb == "demo":
        with pytest.raises(OutputError, match="not an unlearn-fast artifact"):
            run_demo(out=str(notes), overwrite=True, log=lambda *a: None)
    else:
        argv = {"unlearn": unlearn_args(workdir, notes),
                "ga": unlearn_args(workdir, notes, "--method", "ga"),
                "fuse": ["fuse", "--layers", arts / "a1", arts / "a2", "--out", notes]}[verb]
        code, _, err = run(capsys, *argv, "--overwrite")
        one_line_error(code, err, str(notes), "not an unlearn-fast artifact", "--overwrite")
    assert tree(notes) == {"todo.txt": b"mine"}


@pytest.mark.parametrize("target", ["model", "data", "checkpoints"])
def test_overwrite_refuses_the_model_the_data_and_the_checkpoints(target, workdir, tmp_path, capsys, no_model_load):
    root = tmp_path / "copy"
    shutil.copytree(workdir / "model", root / "model")
    shutil.copytree(workdir / "data", root / "data")
    out = {"model": root / "model", "data": root / "data", "checkpoints": root / "run"}[target]
    extra = ["--checkpoint-dir", root / "run" / "ckpt"] if target == "checkpoints" else []
    if target == "checkpoints":  # an artifact whose folder also holds the run's checkpoints
        write_artifact(out, {"a": torch.zeros(1)}, {})
        (out / "ckpt" / "step-00000001").mkdir(parents=True)
    before = tree(out)
    code, _, err = run(capsys, *unlearn_args(root, out, *extra), "--overwrite")
    one_line_error(code, err, str(out), "one of the inputs")
    assert tree(out) == before


def test_fuse_refuses_to_overwrite_the_folder_of_its_inputs(arts, capsys):
    (arts / MANIFEST_FILE).write_text(json.dumps({"format_version": 1}))  # even if it looks like an artifact
    before = tree(arts)
    code, _, err = run(capsys, "fuse", "--layers", arts / "a1", arts / "a2", "--out", arts, "--overwrite")
    one_line_error(code, err, "one of the inputs")
    code, _, err = run(capsys, "fuse", "--merge_set", arts, "--out", arts, "--overwrite")
    one_line_error(code, err, "one of the inputs")
    assert tree(arts) == before


def test_overwrite_refuses_an_artifact_holding_other_files_and_the_current_directory(
        workdir, arts, capsys, monkeypatch, no_model_load):
    (arts / "a1" / "notes.md").write_text("mine")
    code, _, err = run(capsys, *unlearn_args(workdir, arts / "a1"), "--overwrite")
    one_line_error(code, err, "notes.md")
    assert (arts / "a1" / "notes.md").read_text() == "mine"

    monkeypatch.chdir(arts / "a2")
    before = tree(arts / "a2")
    code, _, err = run(capsys, *unlearn_args(workdir, "."), "--overwrite")
    one_line_error(code, err, "current directory")
    assert tree(arts / "a2") == before and temporaries(arts) == [] and temporaries(arts / "a2") == []


def test_overwrite_still_replaces_artifacts(workdir, arts, capsys):
    code, out, err = run(capsys, "fuse", "--layers", arts / "a1", arts / "a2", "--out", arts / "a1", "--overwrite")
    one_line_error(code, err, "one of the inputs")
    code, out, err = run(capsys, "fuse", "--layers", arts / "a1", "--out", arts / "a2", "--overwrite")
    assert code == 0, err
    assert json.loads((arts / "a2" / MANIFEST_FILE).read_text())["fusion"]["sources"][0]["path"] == str(arts / "a1")
    full = arts / "ga-full"
    for _ in range(2):  # a baseline's whole-model directory (baseline.json) is ours too
        code, out, err = run(capsys, *unlearn_args(workdir, full, "--method", "ga", "--max-steps", "1"), "--overwrite")
        assert code == 0, err
    assert (full / "baseline.json").is_file() and temporaries(arts) == []


# --------------------------------------------------------------------------------------------
# 5. unwritable outputs fail before the model is loaded, in one line
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--out", "--checkpoint-dir", "fuse", "eval --report"])
def test_an_output_below_a_regular_file_fails_before_any_work(option, workdir, arts, tmp_path, capsys, no_model_load):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    bad = blocker / "sub" / "out"
    if option == "--out":
        argv = unlearn_args(workdir, bad)
    elif option == "--checkpoint-dir":
        argv = unlearn_args(workdir, tmp_path / "out", "--checkpoint-dir", bad)
    elif option == "fuse":
        argv = ["fuse", "--layers", arts / "a1", "--out", bad]
    else:
        argv = ["eval", "--model", workdir / "model", "--forget", workdir / "data" / "forget.jsonl", "--report", bad]
    code, _, err = run(capsys, *argv)
    one_line_error(code, err, str(blocker), "is a file")
    assert blocker.read_text() == "x" and not (tmp_path / "out").exists()


def test_an_output_on_a_read_only_file_system_fails_before_any_work(workdir, tmp_path, capsys, no_model_load):
    with mounted(tmp_path / "ro", "ro,size=1m") as ro:
        for argv in (unlearn_args(workdir, ro / "out"), unlearn_args(workdir, tmp_path / "out", "--checkpoint-dir", ro)):
            code, _, err = run(capsys, *argv)
            one_line_error(code, err, str(ro), "Read-only file system")


def test_out_a_dangling_symlink_fails_before_any_work(workdir, tmp_path, capsys, no_model_load):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    code, _, err = run(capsys, *unlearn_args(workdir, link))
    one_line_error(code, err, str(link), "symbolic link")


# --------------------------------------------------------------------------------------------
# 6. a full disk, damaged artifacts and checkpoints: one line, nothing left behind
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["artifact", "checkpoint", "fused"])
def test_a_full_disk_is_one_line_and_leaves_no_temporary(what, workdir, arts, tmp_path, capsys):
    with mounted(tmp_path / "small", "size=64k") as disk:
        (disk / "filler").write_bytes(b"\0" * 56 * 1024)  # a few pages left: enough for the probe only
        if what == "artifact":
            argv = unlearn_args(workdir, disk / "out")
        elif what == "checkpoint":
            argv = unlearn_args(workdir, tmp_path / "out", "--checkpoint-dir", disk / "ckpt")
        else:
            argv = ["fuse", "--layers", arts / "a1", arts / "a2", "--out", disk / "out"]
        code, _, err = run(capsys, *argv)
        one_line_error(code, err, str(disk), "No space left on device")
        leftovers = sorted(p.name for p in disk.rglob("*") if p.name != "filler" and p.name != "ckpt")
        assert leftovers == [], leftovers
    assert not (tmp_path / "out").exists()


def damaged(arts: Path, how: str) -> Path:
    art = arts / "a1"
    manifest = json.loads((art / MANIFEST_FILE).read_text())
    if how == "no base_model":
        del manifest["base_model"]
    elif how == "base_model a string":
        manifest["base_model"] = "llama"
    elif how == "wrong rank":
        for rec in manifest["layers"]["sites"]:
            rec["ranks"] = [3 for _ in rec["ranks"]]
    else:  # a corrupt header, its checksum updated in the manifest
        data = bytearray((art / WEIGHTS_FILE).read_bytes())
        data[8:16] = b"{corrupt"
        (art / WEIGHTS_FILE).write_bytes(bytes(data))
        manifest["files"][WEIGHTS_FILE] = hashlib.sha256(bytes(data)).hexdigest()
    (art / MANIFEST_FILE).write_text(json.dumps(manifest))
    return art


@pytest.mark.parametrize("how", ["no base_model", "base_model a string", "wrong rank", "corrupt header"])
def test_a_damaged_artifact_is_one_line_naming_the_file(how, workdir, arts, capsys):
    art = damaged(arts, how)
    code, _, err = run(capsys, "eval", "--model", workdir / "model", "--forget", workdir / "data" / "forget.jsonl",
                       "--layers", art)
    one_line_error(code, err, str(art))
    if how == "corrupt header":
        code, _, err = run(capsys, "fuse", "--layers", art, arts / "a2", "--out", arts / "fused")
        one_line_error(code, err, str(art / WEIGHTS_FILE))


def test_resume_without_the_checkpoint_tensors_is_one_line(workdir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    argv = unlearn_args(workdir, tmp_path / "out", "--checkpoint-dir", ckpt, "--checkpoint-every", "1")
    assert run(capsys, *argv)[0] == 0
    newest = checkpoint.latest(ckpt)
    (newest / checkpoint.TENSORS_FILE).unlink()
    shutil.rmtree(tmp_path / "out")
    code, _, err = run(capsys, *argv, "--resume")
    one_line_error(code, err, str(newest / checkpoint.TENSORS_FILE), "missing")


# --------------------------------------------------------------------------------------------
# 7. what a killed run left: cleaned up by the next run on the same output, or restored
# --------------------------------------------------------------------------------------------

KILLED_WRITE = """
import os, shutil, signal, sys
from unlearn_fast.io import atomic
out, when = sys.argv[1], sys.argv[2]
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
renames = []
real_rename = os.rename
def rename(a, b):
    renames.append(a)
    if when == f"rename{len(renames)}":
        die()
    real_rename(a, b)
os.rename = rename
if when == "rmtree":
    shutil.rmtree = die
with atomic.atomic_directory(out) as tmp:
    (tmp / "unlearning_layers.safetensors").write_text("new")
    if when == "writing":
        die()
    (tmp / "manifest.json").write_text('{"format_version": 1, "files": {"unlearning_layers.safetensors": "x"}}')
"""


def killed_write(out: Path, when: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(out), when], env=env)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("when,expect,finished_left", [
    ("writing", "removed", False),  # .out.X half written: removed
    ("rename1", "left", True),      # .out.X finished, never renamed: left (it holds a manifest); empty .out.old.X removed
    ("rename2", "restored", True),  # out moved to .out.old.X/out, not replaced yet: put back
    ("rmtree", "removed", False),   # out replaced, the old copy in .out.old.X/out not deleted yet: removed
])
def test_a_killed_write_is_cleaned_up_by_the_next_run(when, expect, finished_left, tmp_path, capsys):
    out = tmp_path / "out"
    write_artifact(out, {"a": torch.zeros(1)}, {"old": True})
    old = tree(out)
    killed_write(out, when)
    assert temporaries(tmp_path)  # something was left behind
    capsys.readouterr()
    check_writable(out, overwrite=True)  # what the next run does first; it says what it did (print)
    said = capsys.readouterr().out.splitlines()
    assert said and all(str(out) in line and "\n" not in line for line in said)
    assert any(line.startswith(expect) for line in said), said
    if when == "rmtree":  # the new one
        assert json.loads((out / MANIFEST_FILE).read_text())["files"][WEIGHTS_FILE] == "x"
    else:
        assert tree(out) == old
    left = temporaries(tmp_path)
    if finished_left:
        assert len(left) == 1 and (tmp_path / left[0] / MANIFEST_FILE).is_file(), left
    else:
        assert left == []


def test_a_live_write_is_not_taken_for_a_stale_one(tmp_path):
    import fcntl

    live = tmp_path / ".out.abcd1234"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what atomic_directory holds while it writes
    try:
        remove_stale(tmp_path / "out", log=lambda m: None)
        assert live.is_dir()
    finally:
        os.close(fd)
    remove_stale(tmp_path / "out", log=lambda m: None)
    assert not live.exists()


def test_resume_removes_stale_checkpoint_temporaries(workdir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    stale = ckpt / ".step-00000001.abcd_123"
    stale.mkdir(parents=True)
    (stale / checkpoint.TENSORS_FILE).write_bytes(b"half")
    (ckpt / "notes.txt").write_text("mine")  # anything else stays
    code, out, err = run(capsys, *unlearn_args(workdir, tmp_path / "out", "--checkpoint-dir", ckpt), "--resume")
    assert code == 0, err
    assert f"removed {stale}" in out
    assert sorted(p.name for p in ckpt.iterdir()) == ["notes.txt", "step-00000002"]


# --------------------------------------------------------------------------------------------
# 9. outputs follow the umask
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_follow_the_umask(mask, workdir, tmp_path, capsys):
    previous = os.umask(mask)
    try:
        out, ckpt = tmp_path / "out", tmp_path / "ckpt"
        code, _, err = run(capsys, *unlearn_args(workdir, out, "--checkpoint-dir", ckpt))
        assert code == 0, err
    finally:
        os.umask(previous)
    for directory in (out, checkpoint.latest(ckpt)):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o777 & ~mask
        for f in directory.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


def test_a_killed_process_probe_file_is_removed_by_the_next_check(tmp_path):
    from unlearn_fast.io.atomic import ensure_directory

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead = tmp_path / f".probe.{int(finished.stdout)}.abcd1234"  # what a kill between write and unlink leaves
    live = tmp_path / f".probe.{os.getpid()}.efgh5678"           # a probe being written right now
    other = tmp_path / ".probe.notapid1"                          # not ours to judge
    for p in (dead, live, other):
        p.write_bytes(b"probe")
    ensure_directory(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])
