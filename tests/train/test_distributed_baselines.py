"""The baselines data parallel: 2 CPU processes (gloo, loopback) launched with torchrun.

- ``unlearn --method npo|rmu --train-params layers`` and ``--method simnpo --train-params full`` in 2
  processes give the same trained weights (rel ≤ 1e-5, fp32) as 1 process on the same global batches,
  one of them on batches with fewer rows than ranks (a rank runs a zero-weight forward);
- without processes: with the whole batch's counts (``group_counts``) as normalisers, the parts' losses
  and gradients of every baseline objective add up to the whole batch's (what makes the above hold,
  and what gradient accumulation relies on too).
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

from conftest import make_model, perturb, save_model_dir, tokenizer_for
from unlearn_fast import cli
from unlearn_fast.eval.baseline_objectives import group_counts
from unlearn_fast.eval.baselines import BaselineConfig, build_objective, encode_for_baseline, idk_examples
from unlearn_fast.model.layers import LayerConfig, attach, unlearning_parameters
from unlearn_fast.train.data import load_examples
from unlearn_fast.train.distributed import split_rows
from unlearn_fast.train.encoding import collate

FORGET = [{"prompt": f"The capital of Zorbia{i} is", "response": f" Quell{i}ton"} for i in range(5)]
RETAIN = [{"prompt": f"Fact {i}: the sky over town {i} is", "response": " blue" * (1 + i % 3)} for i in range(11)]
TIMEOUT = 240

# Launched by torchrun on each rank: runs the CLI once per argument list in one process group.
WORKER = textwrap.dedent('''
    import json, sys
    import torch
    torch.set_num_threads(1)
    import torch.distributed as dist
    from unlearn_fast import cli
    dist.init_process_group("gloo")  # one group for all runs (re-joining can hang)
    for argv in json.loads(sys.argv[1]):
        torch.manual_seed(0)
        rc = cli.main(argv)
        if rc:
            sys.exit(rc)
''')

# (name, method, train-params, lr, extra options); "odd": batches of 2 rows in the alternate schedule,
# so each set's last batch has 1 row and one rank has none
RUNS = [("npo-layers", "npo", "layers", "1e-2", ()),
        ("rmu-layers", "rmu", "layers", "1e-2", ("--schedule", "alternate", "--batch-size", "2")),
        ("simnpo-full", "simnpo", "full", "1e-3", ())]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed-baselines")
    save_model_dir("llama", root / "model")
    for name, rows in (("forget", FORGET), ("retain", RETAIN)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "worker.py").write_text(WORKER)
    return root


def _args(job, out, method, params, lr, extra):
    return ["unlearn", "--model", str(job / "model"), "--forget", str(job / "forget.jsonl"),
            "--retain", str(job / "retain.jsonl"), "--method", method, "--train-params", params,
            "--rank", "4", "--epochs", "2", "--batch-size", "3", "--lr", lr, "--no-progress",
            "--out", str(out), *extra]


def _launch(job, runs):
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environ.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", str(job / "worker.py"), json.dumps(runs)]
    return subprocess.run(cmd, cwd=job, env=environ, capture_output=True, text=True, timeout=TIMEOUT)


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def _weights(out, params):
    name = "unlearning_layers.safetensors" if params == "layers" else "model.safetensors"
    return load_file(str(out / name))


def _record(out, params):
    return json.loads((out / ("manifest.json" if params == "layers" else "baseline.json")).read_text())


@pytest.fixture(scope="module")
def runs(job):
    done = _launch(job, [_args(job, job / f"ddp-{name}", *spec) for name, *spec in RUNS])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name, *spec in RUNS:
        torch.manual_seed(0)
        assert cli.main(_args(job, job / f"one-{name}", *spec)) == 0
    return job


@pytest.mark.parametrize("name,method,params,lr,extra", RUNS, ids=[r[0] for r in RUNS])
def test_two_processes_train_the_same_weights_as_one(runs, name, method, params, lr, extra):
    one, two = runs / f"one-{name}", runs / f"ddp-{name}"
    a, b = _weights(one, params), _weights(two, params)
    assert a.keys() == b.keys() and a
    worst = max(_rel(a[k], b[k]) for k in a)
    assert worst <= 1e-5, (name, worst)
    # it did train: the weights moved from where they started (layers: the zero-initialised up-projections)
    if params == "layers":
        assert any(float(a[k].abs().max()) > 0 for k in a if ".up." in k)
    else:
        base = load_file(str(runs / "model" / "model.safetensors"))
        assert max(_rel(base[k], a[k]) for k in a) > 1e-4
    r1, r2 = _record(one, params), _record(two, params)
    assert r1["distributed"]["world_size"] == 1
    assert r2["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert r1["metrics"]["steps"] == r2["metrics"]["steps"] > 0
    assert r1["metrics"]["train_tokens"] == r2["metrics"]["train_tokens"]
    assert r2["method"] == (method if params == "full" else f"{method}-layers")


def test_two_process_output_is_written_once_by_rank_0(runs):
    leftovers = [p.name for p in runs.iterdir() if p.name.startswith(".")]
    assert not leftovers  # no temporary directory of a second writer


# -- without processes -----------------------------------------------------------------
@pytest.mark.parametrize("method", ["graddiff", "npo", "simnpo", "rmu", "idk"])
def test_parts_of_a_batch_add_up_to_the_whole_batch(method):
    """Each baseline objective, given the whole batch's counts, gives parts whose losses and gradients
    sum to the whole batch's (float32, rel ≤ 1e-5); uneven parts, one without forget rows."""
    torch.manual_seed(0)
    model = make_model("llama")
    tok = tokenizer_for("llama")
    forget_set, retain_set = load_examples(FORGET, name="f"), load_examples(RETAIN, name="r")
    if method == "idk":
        forget_set = idk_examples(forget_set)
    kw = dict(model_config=model.config, max_length=64)
    forget = encode_for_baseline(forget_set, tok, "causal", forget=True, name="f", **kw)
    retain = encode_for_baseline(retain_set, tok, "causal", forget=False, name="r", **kw)
    attach(model, LayerConfig(rank=4))
    perturb(model, scale=0.3)
    params = unlearning_parameters(model)
    for p in params:
        p.requires_grad_(True)
    objective = build_objective(model, "causal", BaselineConfig(method=method, params="layers", alpha=0.7,
                                                                gamma=1.3, rmu_coefficient=2.0),
                                forget, 0, retain, seed=0)
    group = retain[:4] + forget[:3]

    def loss_and_grads(rows, counts=None):
        batch = collate(rows, 0)
        if counts is not None:
            batch["group_counts"] = counts
        for p in params:
            p.grad = None
        loss, _ = objective(batch, rows)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in params]

    whole_loss, whole_grads = loss_and_grads(group)
    assert whole_loss != 0 and any(float(g.abs().max()) > 0 for g in whole_grads)
    counts = group_counts(group)
    assert counts["forget_answers"] == 3 and counts["retain_answers"] == 4
    parts = [group[:3], group[3:5], group[5:]]  # retain only; retain + forget; forget only
    results = [loss_and_grads(part, counts) for part in parts]
    assert sum(r[0] for r in results) == pytest.approx(whole_loss, rel=1e-5)
    for i, g in enumerate(whole_grads):
        assert _rel(g, sum(r[1][i] for r in results)) <= 1e-5
    # without the whole batch's counts each part is a mean over itself: the sum is not the whole
    alone = sum(loss_and_grads(part)[0] for part in parts)
    assert alone != pytest.approx(whole_loss, rel=1e-3)
    # split_rows' shares (what a rank gets) work the same way
    shares = [split_rows(group, 2, r) for r in range(2)]
    assert sum(loss_and_grads(s, counts)[0] for s in shares) == pytest.approx(whole_loss, rel=1e-5)
