"""Beyond one launcher, on loopback (CPU, gloo): multi-node torchrun (c10d rendezvous and the static
--node_rank form), SLURM's direct srun launch and the sbatch script (through stand-ins for srun and
scontrol that run its commands here as 2 "nodes"), elastic restarts after kill -9, SIGTERM / USR1
and requeue, one run per output folder, and --dist_timeout. Every finished run must equal one
torchrun with 2 processes, bit for bit."""

import os
import signal
import socket
import sys
import time

import pytest
import torch
from helpers import (
    ROOT,
    TINY,
    assert_same_state,
    free_port,
    load_last,
    main_jit_here,
    read_until,
    run_script,
    worker_pids,
)

from util import distributed, nodes, runlock
from util.errors import exit_code

STANDINS = os.path.join(ROOT, "tests", "slurm_standins")
SBATCH = os.path.join(ROOT, "scripts", "slurm", "train.sbatch")


def train_args(data48, out) -> list:
    """2 epochs of 6 steps on 2 processes (batch 4 each), a checkpoint every 3 steps."""
    return [*TINY, "--epochs", 2, "--save_every_steps", 3, "--data_path", data48, "--output_dir", out, "--resume", out]


@pytest.fixture(scope="module")
def reference(data48, tmp_path_factory):
    """One torchrun with 2 processes, uninterrupted: the final checkpoint every other launch must equal."""
    out = tmp_path_factory.mktemp("reference")
    run_script("main_jit.py", *train_args(data48, out), nproc=2)
    return load_last(out)


def wait_ok(proc, timeout=300) -> str:
    out = proc.stdout.read()
    assert proc.wait(timeout=timeout) == 0, out
    return out


def test_gpu_index_is_the_local_rank_and_more_processes_than_gpus_is_bad_input(monkeypatch, capsys):
    assert [distributed.gpu_index(r, 8, 8) for r in (0, 3, 7)] == [0, 3, 7]
    srun = [distributed.gpu_index(r, 1, 8) for r in (0, 3, 7)]  # srun --gpus-per-task=1: one visible GPU per task
    assert srun == [0, 0, 0] and distributed.gpu_index(0, 1, 1, shared=True) == 0
    assert distributed.gpu_index(2, 0) == 2
    for local_rank, local_size in ((5, 8), (0, 8), (4, None)):  # every rank of the node knows, where the launcher says
        with pytest.raises(distributed.BadInput, match=r"processes on this node but 4 visible GPU\(s\)"):
            distributed.gpu_index(local_rank, 4, local_size)
    for local_rank in (0, 1):  # torchrun's workers all see the one device
        with pytest.raises(distributed.BadInput, match=r"^2 processes on this node but 1 visible GPU\(s\)"):
            distributed.gpu_index(local_rank, 1, 2, shared=True)
    # through init, as torchrun --nproc_per_node=8 starts it on a node with 4 GPUs: exit 2, one line, before NCCL
    monkeypatch.setattr(distributed.torch.backends.cudnn, "benchmark", False)  # init sets it for CUDA: put back after
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 4)
    for k, v in dict(
        RANK=5, WORLD_SIZE=8, LOCAL_RANK=5, LOCAL_WORLD_SIZE=8, MASTER_ADDR="127.0.0.1", MASTER_PORT=1
    ).items():
        monkeypatch.setenv(k, str(v))
    assert exit_code(distributed.init, "cuda") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 8 processes on this node but 4 visible GPU(s)") and err.count("\n") == 1, err


def test_the_nodes_are_checked_and_described_before_the_first_collective(monkeypatch):
    """util.nodes: what each rank posts, the verdict and the lines rank 0 prints (pure functions)."""
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setattr(nodes, "hostname_address", lambda host: "127.0.0.1")
    here = nodes.local_info(["nccl", "gloo"])
    assert here["gloo"] == [
        "lo",
        "127.0.0.1",
        f"what host name {socket.gethostname()} resolves to; GLOO_SOCKET_IFNAME unset",
    ]
    error, lines = nodes.describe_nodes([here, here])  # two processes on one node: loopback works
    assert error is None and lines[0] == (
        "network: nccl on its own choice (NCCL_SOCKET_IFNAME unset); gloo on lo (127.0.0.1, what host name "
        f"{socket.gethostname()} resolves to; GLOO_SOCKET_IFNAME unset)"
    )
    assert lines[1] == f"processes: {socket.gethostname()}: 2 process(es) on {len(here['cpus'])} CPU(s)"
    other = {**here, "host": "elsewhere"}
    error, lines = nodes.describe_nodes([here, other])  # two nodes: loopback cannot work
    assert lines == [] and error.startswith(f"gloo on node {socket.gethostname()} would use the loopback address")
    assert "set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME)" in error
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "nosuch0")
    error, _ = nodes.describe_nodes([nodes.local_info(["gloo"])])
    assert error == (
        f"GLOO_SOCKET_IFNAME=nosuch0 on node {socket.gethostname()}: no such network interface with an address "
        "(ip -br addr lists them)"
    )
    cluster = [
        {
            "host": f"n{k}",
            "gloo": ["eth0", f"10.0.0.{k}", "GLOO_SOCKET_IFNAME=eth0"],
            "nccl": "ib0",
            "nccl_used": True,
            "cpus": [0] if k == 4 else list(range(64)),
        }
        for k in range(5)
        for _ in range(8)
    ]
    error, lines = nodes.describe_nodes(cluster)
    assert (
        error is None
        and lines[0]
        == "network: nccl on NCCL_SOCKET_IFNAME=ib0; gloo on eth0 (GLOO_SOCKET_IFNAME=eth0) at n0, n1, n2 and 2 more"
    )
    assert lines[1] == "processes: n0, n1, n2 and 1 more: 8 process(es) on 64 CPU(s); n4: 8 process(es) on 1 CPU(s)"
    assert lines[2].startswith("warning: the 8 processes on node n4 share 1 CPU(s)") and "--cpus-per-task" in lines[2]


def test_stale_locks_are_those_of_dead_processes_here_or_of_the_same_job(tmp_path):
    me = runlock.holder_info({"slurm_job": "7", "rdzv_id": "r1"})
    dead = {**me, "pid": 2**22 + 12345, "slurm_job": None, "rdzv_id": None}  # no such pid (above pid_max's default)
    assert runlock.stale_reason(dead, me) == "its process is gone"
    assert (
        runlock.stale_reason({**me, "pid": os.getppid()}, me) == "an earlier attempt of this job (restart or requeue)"
    )
    alive_other_job = {**me, "pid": os.getppid(), "slurm_job": "8", "rdzv_id": "r2"}
    assert runlock.stale_reason(alive_other_job, me) is None
    assert runlock.stale_reason({**dead, "host": "elsewhere"}, me) is None  # another host's pid cannot be checked
    path = runlock.acquire(str(tmp_path), "train", {})
    with pytest.raises(runlock.BadInput, match=r"in use by another train run \(pid \d+ on .*: wait for it to end"):
        runlock.acquire(str(tmp_path), "train", {"slurm_job": "9"})
    assert runlock.acquire(str(tmp_path), "eval", {})  # an evaluation may share the folder
    runlock.release(path)
    assert not os.path.exists(path)


@pytest.mark.slow
def test_two_nodes_by_rendezvous_and_by_node_rank_equal_one_launcher(data48, tmp_path, reference, start):
    for form in ("c10d", "static"):
        out, port = tmp_path / form, free_port()
        nodes = []
        for node in range(2):
            launcher = ["--nnodes", 2, "--nproc_per_node", 1]
            launcher += (
                ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "job42"]
                if form == "c10d"
                else ["--node_rank", node, "--master_addr", "127.0.0.1", "--master_port", port]
            )
            nodes.append(start("main_jit.py", *train_args(data48, out), torchrun=launcher))
        outputs = [wait_ok(p) for p in nodes]
        assert sum("training done" in o for o in outputs) == 1  # printed by rank 0 only
        assert_same_state(load_last(out), reference)


def elastic(max_restarts: int) -> list:
    """torchrun's options for 2 workers here that it restarts up to `max_restarts` times."""
    return [
        "--nproc_per_node",
        2,
        "--max-restarts",
        max_restarts,
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        free_port(),
    ]


@pytest.mark.slow
def test_an_elastic_restart_after_kill_9_resumes_exactly(data48, tmp_path, reference, start):
    out = tmp_path / "out"
    proc = start(
        "main_jit.py",
        *train_args(data48, out),
        torchrun=elastic(2),
    )
    read_until(proc, "(resume at epoch 0, step 3)")
    os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
    rest = wait_ok(proc)
    assert "torchelastic restart 1 of at most 2" in rest, rest  # (rank 0 left on the broken group and freed the lock)
    assert f"resumed from {out}/checkpoint-last.pth" in rest
    assert_same_state(load_last(out), reference)
    assert not os.path.exists(runlock.lock_path(str(out), "train"))  # released at the end


@pytest.mark.slow
def test_a_second_run_into_the_same_folder_is_refused_and_a_killed_ones_lock_is_taken_over(data, tmp_path, start):
    out = tmp_path / "out"
    args = [*TINY, "--epochs", 1, "--data_path", data, "--output_dir", out, "--resume", out]
    first = start("tests/launch_worker.py", "slow_steps=10", *args)  # 6 steps of 10 s: killed long before its end
    read_until(first, "training epochs")
    second = run_script("main_jit.py", *args, check=False)
    assert second.returncode == 2 and "is in use by another train run (pid" in second.stdout, second.stdout
    assert second.stdout.strip().splitlines()[-1].endswith(f"if that run is dead, delete {out}/.lock-train")
    first.kill()
    first.wait()
    again = run_script("main_jit.py", *args)
    assert "taking over the train lock" in again.stdout and "its process is gone" in again.stdout, again.stdout


@pytest.mark.slow
def test_slurm_srun_one_task_per_gpu_equals_torchrun(data48, tmp_path, reference, start):
    out, port = tmp_path / "out", free_port()
    tasks = [
        start(
            "main_jit.py",
            *train_args(data48, out),
            env={
                "SLURM_PROCID": str(r),
                "SLURM_NTASKS": "2",
                "SLURM_LOCALID": str(r),
                "SLURM_JOB_ID": "777",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
        )
        for r in range(2)
    ]
    for t in tasks:
        wait_ok(t)
    assert_same_state(load_last(out), reference)


@pytest.mark.slow
def test_the_sbatch_script_runs_two_nodes_and_a_slow_save_on_usr1_is_written_before_the_requeue(
    data48, tmp_path, reference, start
):
    """The sbatch script itself, its srun and scontrol replaced by stand-ins that run here: USR1 (the
    time limit's warning) reaches the workers (through srun and each node's task, not through
    torchrun), which save, the job is requeued, and the requeued job continues to the uninterrupted
    result. The save takes 5 s (tests/launch_worker.py slow_save) and torchrun's shutdown timeout is
    2 s: a SIGTERM through torchrun (or srun, which makes it a SIGKILL) would lose it."""
    out, requeued = tmp_path / "out", tmp_path / "requeued"
    env = {
        "PATH": f"{STANDINS}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_JOB_NAME": "jit",
        "GPUS_PER_NODE": "1",
        "MAX_RESTARTS": "0",
        "OUTPUT_DIR": str(out),
        "RDZV_PORT": str(free_port()),
        "PYTHON": sys.executable,
        "SCONTROL_REQUEUED": str(requeued),
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "2",
        "IFNAME": "lo",
        "TRAIN_SCRIPT": "tests/launch_worker.py slow_save=5",
        "SLURM_CPUS_PER_TASK": "2",
    }
    args = [str(a) for a in train_args(data48, out)[:-4]]  # the script sets --output_dir and --resume
    job = start("", env=env, argv=["bash", SBATCH, *args])
    first = "".join(read_until(job, "Epoch [0] [2/6]"))
    assert "network: gloo on lo (127.0.0.1, GLOO_SOCKET_IFNAME=lo)" in first, first
    # srun got --cpus-per-task (the stand-in, as srun since Slurm 22.05, would give each task 1 CPU)
    assert f"processes: {socket.gethostname()}: 2 process(es) on 2 CPU(s)" in first and "warning" not in first, first
    os.kill(job.pid, signal.SIGUSR1)
    rest = wait_ok(job)
    assert "USR1 (the time limit is near)" in rest and "stop requested" in rest and "checkpoint saved" in rest, rest
    assert requeued.read_text().split() == ["4242"]
    stopped = load_last(out)["resume"]
    assert stopped != {"epoch": 2, "step": 0}
    again = start(
        "", env={**env, "RDZV_PORT": str(free_port()), "TRAIN_SCRIPT": "main_jit.py"}, argv=["bash", SBATCH, *args]
    )
    rest = wait_ok(again)
    assert f"epoch {stopped['epoch']}, step {stopped['step']}" in rest and "taking over the train lock" not in rest, (
        rest
    )
    assert_same_state(load_last(out), reference)


@pytest.mark.slow
def test_dist_timeout_waits_for_a_slow_save_and_ends_a_stuck_run(data48, tmp_path, reference):
    """--dist_timeout 0.1 (6 s): rank 0's checkpoint writes taking 2 s more each keep the other rank
    waiting (in a collective with the same timeout) without failing, and the run equals the
    reference; a rank stuck for 12 s ends the run with a one-line error, exit 1, instead of a hang."""
    p = run_script(
        "tests/launch_worker.py",
        "slow_save=2",
        *train_args(data48, tmp_path / "slow"),
        "--save_every_steps",
        0,
        "--dist_timeout",
        0.1,
        nproc=2,
    )
    assert p.stdout.count("saved ") == 2
    assert_same_state(load_last(tmp_path / "slow"), reference)
    t0 = time.time()
    p = run_script(
        "tests/launch_worker.py",
        "stuck=12",
        *train_args(data48, tmp_path / "stuck"),
        "--dist_timeout",
        0.1,
        nproc=2,
        check=False,
    )
    assert p.returncode != 0 and time.time() - t0 < 60, p.stdout
    assert "--dist_timeout is 0.1 min); rerun the same command" in p.stdout and 'main_jit.py", line' not in p.stdout, (
        p.stdout
    )


@pytest.mark.parametrize("rank", [0, 1])
def test_post_hoc_samplers_wait_for_rank_0s_reconstruction_at_one_barrier_per_new_sigma(monkeypatch, rank):
    """Rank 0 reconstructs while the others wait at a control-group barrier (bounded by --dist_timeout,
    unlike a wait in an NCCL broadcast): every rank passes the same barriers, also when asked again."""
    import engine_eval

    calls, barriers = [], []
    monkeypatch.setattr(engine_eval.distributed, "is_main_process", lambda: rank == 0)
    monkeypatch.setattr(engine_eval.distributed, "barrier", lambda: barriers.append(len(calls)))
    samplers = engine_eval.PostHocWeights(
        torch.nn.Module(),
        lambda stds: calls.append(stds) or {s: {} for s in stds},
        torch.device("cpu"),
        compile_net=False,
    )
    for stds in ([0.05, 0.1], [0.1], [0.1, 0.2]):
        samplers.refresh(stds)
    assert barriers == ([1, 2] if rank == 0 else [0, 0])  # after each reconstruction; none when nothing is new
    assert calls == ([[0.05, 0.1], [0.2]] if rank == 0 else [])


def sbatch_env(out, requeued, **extra) -> dict:
    """The environment of scripts/slurm/train.sbatch run through the stand-ins: 2 "nodes" of 1 GPU."""
    return {
        "PATH": f"{STANDINS}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_JOB_NAME": "jit",
        "SLURM_CPUS_PER_TASK": "2",
        "GPUS_PER_NODE": "1",
        "MAX_RESTARTS": "0",
        "OUTPUT_DIR": str(out),
        "RDZV_PORT": str(free_port()),
        "PYTHON": sys.executable,
        "SCONTROL_REQUEUED": str(requeued),
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "2",
        "IFNAME": "lo",
        **extra,
    }


@pytest.mark.slow
def test_usr1_during_the_set_up_stops_the_workers_and_the_requeue_waits_a_bounded_time(data48, tmp_path, start):
    """The workers start with USR1 ignored (the node task's trap) and are still setting up (6 s more,
    tests/launch_worker.py slow_setup) when USR1 comes: they record it all the same (the handler is
    installed first) and stop before training. The batch script waits for them at most SIGNAL_LEAD -
    REQUEUE_MARGIN = 3 s, then requeues the job regardless."""
    out, requeued = tmp_path / "out", tmp_path / "requeued"
    env = sbatch_env(
        out, requeued, TRAIN_SCRIPT="tests/launch_worker.py slow_setup=6", SIGNAL_LEAD="5", REQUEUE_MARGIN="2"
    )
    args = [str(a) for a in train_args(data48, out)[:-4]]
    job = start("", env=env, argv=["bash", SBATCH, *args])
    read_until(job, "launch_worker: setting up")
    t0 = time.time()
    os.kill(job.pid, signal.SIGUSR1)
    lines = read_until(job, "requeueing anyway")
    waited = time.time() - t0
    rest = wait_ok(job)  # the script exits 0 once requeued; the output ends when the workers are gone
    assert 2.5 < waited < 7 and "is requeued (after at most 3 s)" in "".join(lines), (waited, lines)
    assert requeued.read_text().split() == ["4242"]
    assert "during the set-up: nothing was trained and no checkpoint exists yet (a rerun starts afresh)" in rest, rest
    assert "Epoch [" not in rest and not [p for p in os.listdir(out) if p.startswith("checkpoint-")]


@pytest.mark.slow
def test_a_resume_frees_its_checkpoint_file_and_a_stop_whose_save_fails_is_final(data48, tmp_path, start):
    """A CPU resume keeps nothing of the checkpoint file mapped (AdamW's step counters were views of
    it), so the save that replaces it frees its disk space; a stop (SIGTERM) whose save fails (a full
    disk, tests/launch_worker.py fail_saves_after) ends with status 0 under torchrun with restarts
    left, and torchrun does not start the workers again."""
    out = tmp_path / "out"
    assert main_jit_here(*TINY, "--epochs", 1, "--data_path", data48, "--output_dir", out) == 0
    proc = start(
        "tests/launch_worker.py",
        "check_maps=1,fail_saves_after=1,slow_steps=0.5",
        *train_args(data48, out),
        torchrun=elastic(1),
    )
    first = "".join(read_until(proc, "(resume at epoch 1, step 3)"))
    os.kill(worker_pids(proc.pid)[1], signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, first + rest
    output = first + rest
    for rank in (0, 1):
        assert output.count(f"rank {rank} maps 0 deleted checkpoint file(s)") == 2, output  # after both saves
    assert "deleted checkpoint file(s)" not in output.replace("maps 0 deleted", "")
    assert "No space left on device" in rest and "stop requested" in rest, rest
    assert f"the newest readable checkpoint is {out}/checkpoint-last.pth (resume at epoch 1, step 3)" in rest
    assert "exit status 0 after the stop" in rest and "torchelastic restart" not in rest, rest


@pytest.mark.slow
def test_launches_that_cannot_work_stop_at_once_with_one_line(data48, tmp_path):
    """Two "nodes" (fake host names) whose gloo would bind to loopback: every rank exits 2 before the
    first collective, not after --dist_timeout; one visible GPU for 2 workers of one torchrun: exit 2."""
    t0 = time.time()
    p = run_script(
        "tests/launch_worker.py",
        "fake_hosts=1",
        *train_args(data48, tmp_path / "a"),
        nproc=2,
        check=False,
        env={"GLOO_SOCKET_IFNAME": ""},
    )
    errors = [line for line in p.stdout.splitlines() if line.startswith("error: ")]
    assert p.returncode != 0 and time.time() - t0 < 60 and "Timeout" not in p.stdout, p.stdout
    assert 1 <= len(errors) <= 2 and all(
        e.startswith("error: gloo on node node0 would use the loopback address 127.0.1.1") and "spans 2 nodes" in e
        for e in errors
    ), p.stdout
    p = run_script(
        "tests/launch_worker.py",
        "one_gpu=1",
        *train_args(data48, tmp_path / "b"),
        "--device",
        "cuda",
        nproc=2,
        check=False,
    )
    errors = [line for line in p.stdout.splitlines() if line.startswith("error: ")]
    assert p.returncode != 0 and 1 <= len(errors) <= 2, p.stdout
    assert all(e.startswith("error: 2 processes on this node but 1 visible GPU(s)") for e in errors), p.stdout
