"""Data-parallel and sharded unlearning: 2 CPU processes (gloo, loopback) launched with torchrun.

- 2 processes (data parallel, and FSDP2-sharded base) give the same unlearning-layer weights
  (rel ≤ 1e-5, fp32) and Gram matrices as 1 process on the same global batches;
- a checkpoint written by the 2-process run, resumed in 1 process, reaches the same weights;
- a rank that fails mid-training (raises, or is SIGKILLed) fails the job: non-zero exit, no
  output directory.

The process-free tests check the pieces: the batch split and the global normalisers (the sum of
the ranks' losses and gradients is the one-process loss and gradient).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT, make_model, save_model_dir, tokenizer_for
from unlearn_fast import cli
from unlearn_fast.train.distributed import COUNT_TERMS, owners, split_rows, term_counts
from unlearn_fast.train.encoding import collate, encode
from unlearn_fast.train.data import load_examples
from unlearn_fast.model.layers import LayerConfig, attach, unlearning_parameters
from unlearn_fast.model.family import detect_task
from unlearn_fast.train.objective import EULObjective, ObjectiveConfig

# with generic prompts and a margin of 0 (below), each rank selects the forget tokens before training,
# on the random model roughly half of them: the selection must agree across ranks and with one process
FORGET = [{"prompt": f"The capital of Zorbia{i} is", "response": f" Quell{i}ton",
           "generic_prompts": [f"The capital of Yarbia{i} is", f"The capital of Varbia{i} is"]} for i in range(5)]
RETAIN = [{"prompt": f"Fact {i}: the sky over town {i} is", "response": " blue" * (1 + i % 3)} for i in range(11)]
TIMEOUT = 120

# Launched by torchrun on each rank: optionally makes rank 1 fail at its FAIL_AT-th objective
# call, then runs the CLI once per argument list (a single run joins the process group itself,
# as under `torchrun -m unlearn_fast.cli`).
WORKER = textwrap.dedent('''
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    from unlearn_fast import cli
    if os.environ.get("FAIL_AT"):
        from unlearn_fast.train.objective import EULObjective
        original, calls = EULObjective.__call__, [0]
        def failing(self, batch, rows=None):
            calls[0] += 1
            if int(os.environ["RANK"]) == 1 and calls[0] == int(os.environ["FAIL_AT"]):
                if os.environ.get("FAIL_HOW") == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError("injected failure on rank 1")
            return original(self, batch, rows)
        EULObjective.__call__ = failing
    if os.environ.get("ROUTES_LOG"):  # on rank 0 every completion "holds the answer", on rank 1 none
        from unlearn_fast import api
        from unlearn_fast.train.routes import ForgetRoutes
        holds = os.environ["RANK"] == "0"
        api.answer_found = lambda text, response, answers=None: (bool(text) and holds, bool(text) and holds)
        refresh = ForgetRoutes.refresh
        def logged(self, model):
            new = refresh(self, model)
            routes = sorted(r.input_ids for rows in self.routes.values() for r in rows)
            with open(f"{os.environ['ROUTES_LOG']}.{os.environ['RANK']}", "a") as log:
                log.write(json.dumps(routes) + "\\n")
            return new
        ForgetRoutes.refresh = logged
    runs = json.loads(sys.argv[1])
    if len(runs) > 1:  # one process group for all runs (the CLI joins it; re-joining can hang)
        import torch.distributed as dist
        dist.init_process_group("gloo")
    for argv in runs:
        torch.manual_seed(0)  # the layers' initial weights (rank 0's are broadcast)
        rc = cli.main(argv)
        if rc:
            sys.exit(rc)
''')


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    save_model_dir("llama", root / "model")
    for name, rows in (("forget", FORGET), ("retain", RETAIN)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "worker.py").write_text(WORKER)
    return root


def _args(job, out, *extra):
    return ["unlearn", "--model", str(job / "model"), "--forget", str(job / "forget.jsonl"),
            "--retain", str(job / "retain.jsonl"), "--rank", "4", "--epochs", "2", "--batch-size", "3",
            "--lr", "1e-2", "--no-progress", "--subject-margin", "0", "--out", str(out), *extra]


# batches of 2 rows over 11 retained and 5 forgotten rows: each set's last batch has 1 row, so one
# rank has none (it runs a zero-weight forward), and the 3 Gram batches split 2 / 1 (+1 idle forward)
ODD = ("--schedule", "alternate", "--batch-size", "2")


def _launch(job, runs, **env):
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", **env}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environ.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", str(job / "worker.py"), json.dumps(runs)]
    return subprocess.run(cmd, cwd=job, env=environ, capture_output=True, text=True, timeout=TIMEOUT)


def _run_here(args):
    torch.manual_seed(0)
    assert cli.main(args) == 0


def _tensors(out):
    return load_file(str(out / "unlearning_layers.safetensors"))


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def _assert_same_artifact(reference, other, layer_tol, gram_tol):
    a, b = _tensors(reference), _tensors(other)
    assert a.keys() == b.keys()
    layers = [k for k in a if not k.endswith(".gram")]
    grams = [k for k in a if k.endswith(".gram")]
    assert layers and grams
    assert max(_rel(a[k], b[k]) for k in layers) <= layer_tol
    assert max(_rel(a[k], b[k]) for k in grams) <= gram_tol
    assert any(float(a[k].abs().max()) > 0 for k in layers if ".up." in k)  # it did train
    ma, mb = _manifest(reference), _manifest(other)
    assert ma["grams"]["tokens"] == mb["grams"]["tokens"]
    assert ma["metrics"]["train_tokens"] == mb["metrics"]["train_tokens"]
    assert ma["metrics"]["steps"] == mb["metrics"]["steps"]


@pytest.fixture(scope="module")
def runs(job):
    """One 2-process launch (data parallel with checkpoints, then a sharded base with odd batches)
    and the 1-process references."""
    ddp, sharded = job / "ddp", job / "sharded"
    done = _launch(job, [_args(job, ddp, "--no-eval", "--checkpoint-dir", str(job / "ckpt"), "--checkpoint-every", "2"),
                         _args(job, sharded, "--shard-base", *ODD)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _run_here(_args(job, job / "reference", "--no-eval"))
    _run_here(_args(job, job / "reference-odd", "--no-eval", *ODD))
    return job


def test_two_processes_equal_one_process(runs):
    _assert_same_artifact(runs / "reference", runs / "ddp", layer_tol=1e-5, gram_tol=1e-6)
    m = _manifest(runs / "ddp")
    assert m["distributed"]["world_size"] == 2 and m["distributed"]["backend"] == "gloo"
    assert not m["distributed"]["shard_base"]
    times = m["update_time"]
    assert len(times["per_rank_s"]) == 2 and all(t > 0 for t in times["per_rank_s"])
    assert times["total_s"] == pytest.approx(sum(times["per_rank_s"]))
    # the per-rank teacher cache holds only what each rank saw, and every row was seen
    cached = m["distributed"]["teacher_cache_rows_per_rank"]
    selected = m["subject_selection"]
    assert m["subject_selection"] == _manifest(runs / "reference")["subject_selection"]
    assert 0 < selected["tokens_kept"] < selected["tokens"] and selected["rows"] == len(FORGET)
    trained_rows = selected["rows_kept"] + len(RETAIN)
    assert sum(cached) >= trained_rows and max(cached) < trained_rows
    assert _manifest(runs / "reference")["distributed"]["world_size"] == 1


def test_sharded_base_equals_one_process(runs):
    _assert_same_artifact(runs / "reference-odd", runs / "sharded", layer_tol=1e-5, gram_tol=1e-6)
    m = _manifest(runs / "sharded")
    assert m["distributed"]["shard_base"] and m["distributed"]["sharded_params"] > 0
    assert set(m["metrics"]["before"]) == set(m["metrics"]["after"]) and m["metrics"]["before"]


def test_resume_from_a_two_process_checkpoint_in_one_process(runs):
    ckpt = runs / "ckpt"
    steps = sorted(p.name for p in ckpt.iterdir())
    assert steps == ["step-00000006", "step-00000008"]  # the two newest of 2, 4, 6, 8
    for name in os.listdir(ckpt / steps[-1]):  # as if the job had died after step 6
        os.remove(ckpt / steps[-1] / name)
    os.rmdir(ckpt / steps[-1])
    out = runs / "resumed"
    _run_here(_args(runs, out, "--no-eval", "--checkpoint-dir", str(ckpt), "--resume"))
    _assert_same_artifact(runs / "reference", out, layer_tol=1e-5, gram_tol=1e-6)
    assert _manifest(out)["update_time"]["resumed_from_step"] == 6


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_fails_the_job_and_writes_nothing(job, how):
    out = job / f"failed-{how}"
    done = _launch(job, [_args(job, out, "--no-eval")], FAIL_AT="3", FAIL_HOW=how)
    assert done.returncode != 0
    assert "injected failure" in done.stderr or how == "kill"
    assert not out.exists()
    assert not [p for p in job.iterdir() if p.name.startswith(f".{out.name}")]  # no temporary directory


# -- without processes -----------------------------------------------------------------
def _rows():
    tok = tokenizer_for("llama")
    model = make_model("llama")
    task = detect_task(model)
    forget = encode(load_examples(FORGET, name="f"), tok, task, forget=True, name="f", model_config=model.config)
    retain = encode(load_examples(RETAIN, name="r"), tok, task, forget=False, name="r", model_config=model.config)
    return model, forget, retain


def test_rank_0_finds_the_forget_routes_and_every_rank_trains_them(job):
    log = job / "routes-log"
    done = _launch(job, [_args(job, job / "routes", "--no-eval", "--epochs", "3", "--forget-margin", "1",
                               "--forget-routes", "2")], ROUTES_LOG=str(log))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    seen = [[json.loads(line) for line in (job / f"routes-log.{rank}").read_text().splitlines()] for rank in (0, 1)]
    # epochs 2 and 3; rank 1 would find none itself: it trains rank 0's
    assert len(seen[0]) == 2 and seen[0] == seen[1]
    assert seen[0][-1]
    assert _manifest(job / "routes")["forget_routes_found"] == len(seen[0][-1])


def test_split_is_balanced_deterministic_and_complete():
    _, forget, retain = _rows()
    group = retain[:5] + forget[:3]
    home = owners(retain, forget, 3)
    shares = [split_rows(group, 3, r, home) for r in range(3)]
    assert [len(s) for s in shares] == [3, 3, 2]
    assert sorted(id(r) for s in shares for r in s) == sorted(id(r) for r in group)
    assert shares == [split_rows(group, 3, r, home) for r in range(3)]
    assert split_rows(group[:1], 2, 1, home) == []  # fewer rows than ranks: an empty share
    # rows stay on their home rank when it has room (the per-rank teacher cache keeps hitting)
    assert all(home[id(r)] == 0 for r in split_rows(retain[0:6:3], 2, 0, owners(retain, forget, 2)))


def test_ranks_losses_and_gradients_add_up_to_one_process():
    """With the global batch's counts as normalisers, the shares' losses and gradients sum to the
    one-process loss and gradient."""
    model, forget, retain = _rows()
    torch.manual_seed(0)
    attach(model, LayerConfig(rank=4))
    params = unlearning_parameters(model)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.3)
    objective = EULObjective(model, "causal", ObjectiveConfig())
    group = retain[:5] + forget[:3]

    def loss_and_grads(rows, counts=None):
        batch = collate(rows, 0)
        if counts is not None:
            batch["term_counts"] = counts
        for p in params:
            p.grad = None
        loss, _ = objective(batch, rows)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in params]

    full_loss, full_grads = loss_and_grads(group)
    counts = term_counts(group)
    assert len(counts) == len(COUNT_TERMS) and int(counts.min()) > 0
    parts = [loss_and_grads(split_rows(group, 2, r, owners(retain, forget, 2)), counts) for r in range(2)]
    assert sum(p[0] for p in parts) == pytest.approx(full_loss, rel=1e-5)
    for i, g in enumerate(full_grads):
        assert _rel(g, parts[0][1][i] + parts[1][1][i]) <= 1e-5


def test_multi_gpu_check_script_runs_on_cpu(tmp_path):
    """The multi-GPU check script (benchmarks/multi_gpu_check.py) runs end to end on gloo: its
    equivalence verdict and JSON come from real 1- and 2-process runs."""
    script = str(REPO_ROOT / "benchmarks" / "multi_gpu_check.py")
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, script, "--nproc", "2", "--device", "cpu", "--shape", "tiny",
                           "--steps", "3", "--forget", "16", "--retain", "32", "--modes", "reference,ddp",
                           "--json", str(out)], capture_output=True, text=True, timeout=2 * TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "equivalence (fp32, rel ≤ 1e-4): PASS" in proc.stdout
    result = json.loads(out.read_text())["results"]
    assert result["ddp"]["world"] == 2 and result["ddp"]["layers_rel"] <= 1e-5
    assert result["ddp"]["allreduce_bytes_per_gpu"] > 0
