"""Two gloo ranks on the CPU started by hand, without torchrun's agent (which would stop the
survivors itself): when one rank dies, the other says in one line which rank it lost, and exits
non-zero (issue 30 D)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO_ROOT, save_model_dir
from unlearn_fast.train import distributed
from unlearn_fast.train.distributed import RankLostError, collective

TIMEOUT = 180

# `unlearn-fast unlearn` on each rank; rank DIE is SIGKILLed at its third objective call
CLI_WORKER = textwrap.dedent('''
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    from unlearn_fast import cli
    from unlearn_fast.train.objective import EULObjective
    original, calls = EULObjective.__call__, [0]
    def dying(self, batch, rows=None):
        calls[0] += 1
        if int(os.environ["RANK"]) == int(os.environ["DIE"]) and calls[0] == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, batch, rows)
    EULObjective.__call__ = dying
    torch.manual_seed(0)
    sys.exit(cli.main(json.loads(sys.argv[1])))
''')

# the module's collectives in a loop, errors handled as cli.main handles them
LOOP_WORKER = textwrap.dedent('''
    import os, signal, sys
    from unlearn_fast.errors import UnlearnFastError
    from unlearn_fast.train import distributed
    distributed.init_from_env("cpu")
    try:
        for i in range(100):
            if distributed.rank() == int(os.environ["DIE"]) and i == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            distributed.all_sum([1.0])
            distributed.barrier()
    except UnlearnFastError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        distributed.shutdown()
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_by_hand(script, argv, die, cwd):
    """Two ranks as plain processes (the environment torchrun would set, no agent); their
    (returncode, stderr) in rank order."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "GROUP_", "ROLE_"))}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), DIE=str(die), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
                   PYTHONPATH=str(REPO_ROOT))
        procs.append(subprocess.Popen([sys.executable, str(script), *argv], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return [(p.returncode, err) for p, (_, err) in ((p, p.communicate(timeout=TIMEOUT)) for p in procs)]


def error_lines(stderr):
    """stderr without progress bars and the model loader's chatter."""
    return [line for line in stderr.splitlines() if line.strip() and "it/s]" not in line and "%|" not in line]


def test_cli_survivor_names_the_dead_rank_in_one_line(tmp_path):
    save_model_dir("llama", tmp_path / "model")
    rows = {"forget": [{"prompt": f"The capital of Zorbia{i} is", "response": f" Quell{i}ton"} for i in range(4)],
            "retain": [{"prompt": f"Fact {i}: the sky is", "response": " blue"} for i in range(8)]}
    for name, data in rows.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    (tmp_path / "worker.py").write_text(CLI_WORKER)
    out = tmp_path / "out"
    argv = ["unlearn", "--model", str(tmp_path / "model"), "--forget", str(tmp_path / "forget.jsonl"),
            "--retain", str(tmp_path / "retain.jsonl"), "--rank", "4", "--epochs", "2", "--batch-size", "4",
            "--no-progress", "--no-eval", "--out", str(out)]
    (rc0, err0), (rc1, _) = launch_by_hand(tmp_path / "worker.py", [json.dumps(argv)], die=1, cwd=tmp_path)
    assert rc1 == -9
    lines = error_lines(err0)
    assert rc0 == 2 and len(lines) == 1, err0
    assert lines[0].startswith("error: rank 0 of 2: lost rank 1 during the gradient all-reduce"), lines
    assert "Traceback" not in err0 and "127.0.0.1" not in err0
    assert not out.exists()


def test_survivor_rank_1_names_rank_0(tmp_path):
    (tmp_path / "loop.py").write_text(LOOP_WORKER)
    (rc0, _), (rc1, err1) = launch_by_hand(tmp_path / "loop.py", [], die=0, cwd=tmp_path)
    assert rc0 == -9
    lines = [line for line in err1.splitlines() if line.strip()]
    assert rc1 == 2 and len(lines) == 1 and lines[0].startswith("error: rank 1 of 2: lost rank 0 during a "), err1


@pytest.mark.parametrize("world,expected", [(2, "lost rank 0 during x"), (4, "lost another rank during x")])
def test_collective_names_the_rank_only_for_a_lost_peer(monkeypatch, world, expected):
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    gloo = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:36753: "
            "Connection reset by peer. This is typically caused by a remote worker hanging")
    with pytest.raises(RankLostError, match=rf"rank 1 of {world}: {expected} \(connection reset by peer\)"):
        with collective("x"):
            raise RuntimeError(gloo)
    with pytest.raises(RuntimeError, match="size mismatch"):  # not a lost peer: unchanged
        with collective("x"):
            raise RuntimeError("gloo: size mismatch")
