"""scripts/slurm/train.sbatch's requeue chain through the stand-ins (tests/slurm_standins), with a stand-in
launcher in place of python/torchrun (no torch is started: each "node" runs a shell that waits for a
worker, a python process that USR1 ends), so that the script's own logic is checked in about a second;
test_launch.py runs it with real workers."""

import os
import signal
import stat
import subprocess
import sys

import pytest
from test_launch import SBATCH, sbatch_env

LAUNCHER = f"""#!/bin/bash
{sys.executable} -c "import os, signal, time
signal.signal(signal.SIGUSR1, lambda *_: exit(0))  # as the workers do (USR1 is ignored when they start)
os.write(1, b'stand-in launcher: waiting\\n')  # one write: the two nodes' lines do not interleave
time.sleep(60)" &
wait $!
"""


def launch(tmp_path, start, **extra):
    """The batch script started with the stand-in launcher, once each node's task is waiting; returns
    (the process, the requeue record file)."""
    launcher = tmp_path / "launcher"
    launcher.write_text(LAUNCHER)
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR)
    requeued = tmp_path / "requeued"
    env = sbatch_env(tmp_path / "out", requeued, PYTHON=str(launcher), SIGNAL_LEAD="6", REQUEUE_MARGIN="2", **extra)
    job = start("", env=env, argv=["bash", SBATCH, "--epochs", "1"])
    seen = ""
    while seen.count("stand-in launcher: waiting") < 2:  # both "nodes" (a USR1 before their handler is ignored)
        line = job.stdout.readline()
        assert line, f"the stand-in nodes did not both start:\n{seen}"
        seen += line
    return job, requeued


@pytest.mark.slow
@pytest.mark.parametrize("refused", [False, True])
def test_usr1_requeues_the_job_and_a_refused_requeue_ends_it_as_failed_saying_so(tmp_path, start, refused):
    extra = {"SCONTROL_REFUSE": "Requested operation is presently disabled"} if refused else {}
    job, requeued = launch(tmp_path, start, **extra)
    os.kill(job.pid, signal.SIGUSR1)
    out = job.stdout.read()
    code = job.wait(timeout=30)
    assert "USR1 (the time limit is near)" in out and "requeueing anyway" not in out, out  # the step ended in time
    if refused:  # before: exit 0, the job COMPLETED and never ran again, with no word of it
        assert code == 1 and not requeued.exists(), out
        assert "scontrol: error: Requested operation is presently disabled" in out
        assert "error: scontrol requeue 4242 failed: the job ends here; submit it again" in out
    else:
        assert code == 0 and requeued.read_text().split() == ["4242"], out


def test_outside_a_slurm_job_or_without_scontrol_the_script_stops_with_one_line(tmp_path):
    """Run with bash instead of sbatch (no SLURM_* variables), or scontrol missing: status 2 and one line,
    before anything starts (before: bash's 'unbound variable', or a rendezvous on ':29500')."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    p = subprocess.run(["bash", SBATCH, "--epochs", "1"], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and p.stderr.startswith("error: not a SLURM job (SLURM_JOB_ID, "), p.stderr
    assert p.stderr.count("\n") == 1 and p.stdout == ""
    env.update(SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n[1-2]", SLURM_NNODES="2")  # and no scontrol on PATH
    p = subprocess.run(["bash", SBATCH, "--epochs", "1"], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "error: scontrol show hostnames n[1-2] named no node" in p.stderr, p.stderr
    # a lead the requeue's arithmetic cannot use made the USR1 handler fail at the end: no save, no requeue
    for bad in ({"SIGNAL_LEAD": "300s"}, {"SIGNAL_LEAD": "08"}, {"SIGNAL_LEAD": "20"}, {"REQUEUE_MARGIN": "-1"}):
        p = subprocess.run(["bash", SBATCH], env={**env, **bad}, capture_output=True, text=True, timeout=30)
        assert p.returncode == 2 and p.stderr.startswith("error: SIGNAL_LEAD=") and p.stderr.count("\n") == 1, bad
