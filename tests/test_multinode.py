"""Runs spread over nodes: the launcher's environment (torchrun, a Slurm step), the collective
timeout, 2 "nodes" through torchrun's c10d rendezvous == 1 process, and a rank that dies or hangs:
the survivor fails within a bounded time with a one-line error and the run resumes exactly.

Multi-process tests run real ``speedrun train`` processes on localhost with gloo.
"""
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist
from test_train import micro_config, train_losses, write_synthetic_shards

from speedrun import distributed
from speedrun.config import Config, ConfigError
from speedrun.distributed import LaunchEnv, LaunchEnvError, PeerLostError, first_host, launch_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12


def _slurm(rank, ntasks=2, **extra) -> dict:
    env = {"SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(ntasks),
           "SLURM_LOCALID": str(rank), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[007-008,020]"}
    return {**env, **extra}


# ---- the launcher's environment (no processes) ----------------------------------------------------

def test_slurm_step_maps_to_rank_world_and_rendezvous():
    got = launch_env(_slurm(1, ntasks=16, SLURM_LOCALID="1", SLURM_STEP_NODELIST="gpu[008,020]"))
    # the step's first node hosts task 0; the port is derived from the job id (20000 + 4242)
    assert got == LaunchEnv("slurm", rank=1, world_size=16, local_rank=1, master_addr="gpu008",
                            master_port=24242)
    got = launch_env(_slurm(0, SLURM_STEP_NUM_TASKS="4", MASTER_ADDR="10.1.2.3", MASTER_PORT="29500"))
    assert (got.world_size, got.master_addr, got.master_port) == (4, "10.1.2.3", 29500)
    assert launch_env(_slurm(0)).master_addr == "gpu007"   # no step node list: the job's


def test_torchrun_variables_win_and_a_batch_script_is_one_process():
    env = {**_slurm(3, ntasks=4), "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    assert launch_env(env) == LaunchEnv("torchrun", 5, 8, 1)   # srun starting torchrun per node
    # sbatch's script itself sees SLURM_PROCID=0 and the allocation's SLURM_NTASKS, but no step:
    # nobody starts the other tasks there, so it must not wait for them
    batch = {k: v for k, v in _slurm(0, ntasks=4).items() if k != "SLURM_STEP_ID"}
    assert launch_env(batch) == LaunchEnv("none")
    assert launch_env({}) == LaunchEnv("none")
    assert launch_env(_slurm(0, ntasks=1)) == LaunchEnv("slurm", 0, 1, 0)   # srun -n 1: no rendezvous


@pytest.mark.parametrize("env, message", [
    ({**_slurm(0), "SLURM_LOCALID": None}, "Slurm step without SLURM_LOCALID"),
    ({**_slurm(2)}, "rank 2, world size 2"),
    ({**_slurm(0), "SLURM_NTASKS": "two"}, "SLURM_NTASKS='two'"),
    ({**_slurm(0), "MASTER_PORT": "70000"}, "MASTER_PORT='70000'"),
    ({**_slurm(0), "SLURM_JOB_ID": None}, "set MASTER_PORT"),
    ({**_slurm(0), "SLURM_JOB_NODELIST": None}, "set MASTER_ADDR"),
    ({**_slurm(0), "SLURM_JOB_NODELIST": "gpu[1-2"}, "node list 'gpu[1-2'"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "LOCAL_RANK missing"),
])
def test_bad_launcher_environment_is_a_one_line_error(env, message):
    env = {k: v for k, v in env.items() if v is not None}
    with pytest.raises(LaunchEnvError, match=message.replace("[", r"\[")) as info:
        launch_env(env)
    assert "\n" not in str(info.value) and info.value.user_error


@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"), ("node1,node2", "node1"), ("gpu[007-012,020],cpu1", "gpu007"),
    ("gpu[3,5-6]", "gpu3"), ("rack[1-2]-n[03-04],x", "rack1-n03"), ("a-b.c.example", "a-b.c.example"),
])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert first_host(nodelist) == first


def test_init_world_joins_with_the_configured_timeout(monkeypatch):
    """A Slurm step of 2: init_process_group gets the rendezvous address, this task's rank and the
    collective timeout; a rendezvous that fails is a PeerLostError naming the address."""
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    for k, v in _slurm(1).items():
        monkeypatch.setenv(k, v)
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: calls.append((a, kw)))
    world = distributed.init_world("cpu", timeout_s=42)
    assert calls == [(("gloo",), {"init_method": "tcp://gpu007:24242", "rank": 1, "world_size": 2,
                                  "timeout": datetime.timedelta(seconds=42)})]
    assert (world.rank, world.world_size, world.backend, world.timeout_s) == (1, 2, "gloo", 42)

    def unreachable(*a, **kw):
        raise dist.DistNetworkError("The client socket has timed out after 42000ms while trying to "
                                    "connect to (gpu007, 24242).")
    monkeypatch.setattr(dist, "init_process_group", unreachable)
    with pytest.raises(PeerLostError, match=r"rank 1 of 2: could not join the other ranks at "
                                            r"gpu007:24242 within 42 s \(The client socket"):
        distributed.init_world("cpu", timeout_s=42)


def test_gpu_of_each_rank(monkeypatch):
    """A rank takes GPU LOCAL_RANK of those it sees; a Slurm task bound to one GPU takes that one;
    NCCL gets the device and a short debug-dump wait before its watchdog ends a timed-out rank."""
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.delenv("TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC", raising=False)
    for k, v in _slurm(1, SLURM_LOCALID="3").items():
        monkeypatch.setenv(k, v)
    calls, devices = [], []
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: calls.append(kw))
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    world = distributed.init_world("cuda")
    assert devices == [0] and world.device == torch.device("cuda", 0) and world.local_rank == 3
    assert calls[0]["device_id"] == torch.device("cuda", 0) and world.backend == "nccl"
    assert os.environ["TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC"] == "5000"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert distributed.init_world("cuda").device == torch.device("cuda", 3)
    for k in _slurm(0):   # torchrun never binds GPUs: local rank 3 of 1 visible GPU is a mistake
        monkeypatch.delenv(k)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(LaunchEnvError, match="local rank 3 \\(torchrun\\) but only 1 CUDA device"):
        distributed.init_world("cuda")


def test_local_launcher_inside_a_multi_task_srun_step_is_refused(monkeypatch, capsys):
    """srun already made each task a rank: --distributed would start more workers per task."""
    from speedrun.cli import main
    for k, v in _slurm(0).items():
        monkeypatch.setenv(k, v)
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(v, raising=False)
    assert main(["train", "--cpu", "--distributed", "--num-gpus", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "srun already started 2 tasks" in err[0], err


def test_collective_timeout_is_validated():
    cfg = Config()
    cfg.train.collective_timeout_s = 0
    with pytest.raises(ConfigError, match="train.collective_timeout_s"):
        cfg.validate()


def test_gloo_and_nccl_failures_are_recognised_and_shortened():
    gloo = RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                        "[127.0.0.1]:45212: Connection reset by peer. This is typically caused by a remote "
                        "worker hanging.\nmore")
    assert distributed.is_peer_failure(gloo)
    assert distributed.short_reason(gloo).startswith("Read error [127.0.0.1]:45212: Connection reset")
    # what a rank's other pending operations see once one of its waits timed out
    assert distributed.is_peer_failure(RuntimeError("Application timeout caused pair closure"))
    assert distributed.is_peer_failure(dist.DistBackendError("NCCL communicator was aborted"))
    assert not distributed.is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not distributed.is_peer_failure(ValueError("gloo/ in a value error is not a transport error"))


# ---- real processes -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(str(tmp_path_factory.mktemp("shards")))


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """The run in one process (no launcher): the trajectory every multi-process run must follow."""
    from speedrun.distributed import World
    from speedrun.train.trainer import Trainer
    run_dir = tmp_path_factory.mktemp("reference")
    Trainer(micro_config(*shards, run_dir, steps=STEPS), World(), str(run_dir)).run()
    return train_losses(run_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    # no launcher variables of the test runner's own environment may leak into the workers
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))
            and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**base, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _config_file(shards, run_dir, steps=STEPS, **train) -> str:
    cfg = micro_config(*shards, run_dir, steps=steps)
    for k, v in train.items():
        setattr(cfg.train, k, v)
    path = f"{run_dir}-config.json"
    cfg.save(path)
    return path


def _start_slurm_step(config, port, extra=()) -> list[subprocess.Popen]:
    """2 tasks of a fake srun step on 'localhost' (MASTER_ADDR comes from the node list)."""
    procs = []
    for rank in range(2):
        env = _env(**_slurm(rank, SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(port)))
        procs.append(subprocess.Popen([sys.executable, "-m", "speedrun", "train", "--config", config,
                                       "--cpu", *extra], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs, timeout=120) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"process {p.args} still running after {timeout} s")
        out.append((p.returncode, stdout, stderr))
    return out


def _latest(run_dir) -> str | None:
    try:
        with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def _assert_follows(losses, reference, steps):
    train, _ = losses
    ref_train, _ = reference
    assert sorted(train) == list(steps)
    for step in steps:
        assert train[step] == pytest.approx(ref_train[step], rel=2e-4, abs=2e-4), step


@pytest.mark.slow
def test_two_nodes_through_torchrun_c10d_follow_one_process(shards, reference, tmp_path):
    """2 torchrun agents ("nodes", 1 process each) meet through the c10d rendezvous on localhost:
    global batch from the recipe, accumulation derived, the same losses as 1 process."""
    run_dir = tmp_path / "run"
    config = _config_file(shards, run_dir)
    endpoint = f"127.0.0.1:{_free_port()}"
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "test-two-nodes",
         "--max-restarts", "0", "-m", "speedrun", "train", "--config", config, "--cpu"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = _finish(agents, timeout=240)
    for rc, stdout, stderr in results:
        assert rc == 0, stderr[-3000:]
    log = "".join(stdout for _, stdout, _ in results)
    assert "device cpu x2" in log and "grad_accum 1" in log   # 2 micro-batches per step over 2 ranks
    _assert_follows(train_losses(run_dir), reference, range(1, STEPS + 1))


@pytest.mark.slow
def test_killed_rank_fails_the_survivor_and_the_run_resumes(shards, reference, tmp_path):
    """A Slurm step of 2 tasks checkpointing every 2 steps; rank 0 (the rendezvous host and the
    checkpoint publisher) is killed mid-run. Rank 1 exits at once with one line naming the last
    complete checkpoint; ``--resume`` in a new step of 2 tasks finishes on the 1-process trajectory."""
    run_dir = tmp_path / "run"
    config = _config_file(shards, run_dir, save_every=2)
    procs = _start_slurm_step(config, _free_port())
    deadline = time.time() + 120
    while _latest(run_dir) is None:
        assert all(p.poll() is None for p in procs), _finish(procs)
        assert time.time() < deadline, "no checkpoint after 120 s"
        time.sleep(0.02)
    procs[0].send_signal(signal.SIGKILL)
    killed_at = time.time()
    (rc0, _, _), (rc1, _, err1) = _finish(procs, timeout=60)
    assert rc0 == -signal.SIGKILL
    assert rc1 == 1 and time.time() - killed_at < 30, err1[-2000:]
    last = err1.strip().splitlines()[-1]
    latest = _latest(run_dir)
    assert latest is not None and latest != f"step_{STEPS:06d}", "the run ended before the kill"
    assert last.startswith("speedrun train: error: rank 1 of 2: lost the other ranks"), err1[-2000:]
    assert f"resume from {run_dir}/checkpoints/{latest} with --resume {run_dir}" in last, last
    assert "Traceback" not in err1, err1[-2000:]

    resumed = _finish(_start_slurm_step(config, _free_port(), ["--resume", str(run_dir)]))
    for rc, _, stderr in resumed:
        assert rc == 0, stderr[-3000:]
    assert f"steps {int(latest[5:])}->{STEPS}" in resumed[0][1]
    # steps before the kill come from the first run, the rest from the resumed one: all on track
    _assert_follows(train_losses(run_dir), reference, range(1, STEPS + 1))
    assert json.load(open(run_dir / "summary.json"))["steps"] == STEPS


@pytest.mark.slow
def test_hung_rank_fails_the_survivor_after_the_collective_timeout(shards, tmp_path):
    """A rank that stops answering (SIGSTOP: a hung node, not a dead one; nothing closes its
    sockets) holds the other in a collective until train.collective_timeout_s, then that one exits
    with a one-line error instead of waiting for the default 30 minutes."""
    run_dir = tmp_path / "run"
    # long enough that rank 1 is stopped mid-run however slowly this test reads rank 0's output
    config = _config_file(shards, run_dir, steps=400, collective_timeout_s=4.0)
    procs = _start_slurm_step(config, _free_port())
    # reading rank 0's output blocks: a timer ends both processes should nothing come in 120 s
    guard = threading.Timer(120, lambda: [p.kill() for p in procs])
    guard.start()
    try:
        for line in procs[0].stdout:   # rank 0 logs; stop rank 1 once training is under way
            if line.startswith("step") and "loss" in line and "val" not in line:
                break
        procs[1].send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        _, err0 = procs[0].communicate(timeout=60)
        waited = time.time() - stopped_at
    finally:
        guard.cancel()
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == 1, err0[-2000:]
    assert 3.0 < waited < 30, waited
    last = err0.strip().splitlines()[-1]
    assert last.startswith("speedrun train: error: rank 0 of 2: lost the other ranks"), err0[-2000:]
    assert "train.collective_timeout_s = 4 s" in last and "Traceback" not in err0, err0[-2000:]


@pytest.mark.slow
def test_run_directory_not_shared_by_the_ranks_is_refused(shards, tmp_path):
    """Each rank resolves a relative --save-path in its own working directory (as two nodes without
    shared storage would): both refuse to start, naming the rank that cannot see rank 0's files."""
    config = _config_file(shards, tmp_path / "unused")
    port = _free_port()
    procs = []
    for rank in range(2):
        cwd = tmp_path / f"node{rank}"
        cwd.mkdir()
        env = _env(**_slurm(rank, SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(port)))
        procs.append(subprocess.Popen([sys.executable, "-m", "speedrun", "train", "--config", config,
                                       "--cpu", "--save-path", "runs/shared"], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for rc, _, stderr in _finish(procs):
        assert rc == 1, stderr[-2000:]
        line = stderr.strip().splitlines()[-1]
        assert "run directory runs/shared: rank 1 on" in line and "cannot see files" in line, line
    # refused before anything was written: no run directory, and rank 0's marker file is gone
    assert os.listdir(tmp_path / "node0") == [] and os.listdir(tmp_path / "node1") == []
