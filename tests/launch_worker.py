"""main_jit.py with faults put in, for test_launch.py and test_fsdp.py (under torchrun or srun):

    launch_worker.py MODE=VALUE[,MODE=VALUE...] MAIN_ARGS...

slow_save=S        rank 0's checkpoint writes (or every rank's, sharded) each take S seconds more
stuck=S            rank 1 stops for S seconds before its first step
slow_steps=S       every step takes S seconds more (a run that lasts)
slow_eval=S        every generation batch of an evaluation takes S seconds more
slow_setup=S       the set-up takes S seconds more (after rank 0 prints "launch_worker: setting up")
fail_saves_after=N the checkpoint writes after the first N fail as on a full disk
check_maps=1       after each checkpoint write, every rank prints how many deleted checkpoint files it
                   still maps ("rank R maps N deleted checkpoint file(s)")
fake_hosts=1       rank R runs on host "nodeR", whose name resolves to loopback (127.0.1.1)
one_gpu=1          CUDA looks available with one device
"""

import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import engine_jit  # noqa: E402
import main_jit  # noqa: E402
from util import checkpointer, evaluation, files, nodes  # noqa: E402

modes = dict(item.split("=") for item in sys.argv[1].split(","))
argv = sys.argv[2:]
rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def wrap(owner, name, before=None, after=None):
    """owner.name(...) with before() called first and after(result) after."""
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if before:
            before()
        result = real(*args, **kwargs)
        if after:
            after(result)
        return result

    setattr(owner, name, wrapped)


if "slow_save" in modes:
    wrap(checkpointer, "_reported", before=lambda: time.sleep(float(modes["slow_save"])))
if "slow_steps" in modes:
    wrap(engine_jit, "train_step", before=lambda: time.sleep(float(modes["slow_steps"])))
if "stuck" in modes and rank == 1:
    real_step = engine_jit.train_step

    def stuck_once(*args, **kwargs):
        engine_jit.train_step = real_step
        time.sleep(float(modes["stuck"]))
        return real_step(*args, **kwargs)

    engine_jit.train_step = stuck_once
if "slow_eval" in modes:
    real_batches = evaluation.generate_batches

    def slow_batches(*args, **kwargs):
        for item in real_batches(*args, **kwargs):
            yield item
            time.sleep(float(modes["slow_eval"]))

    evaluation.generate_batches = slow_batches
if "slow_setup" in modes:

    def slow():
        if rank == 0:
            print("launch_worker: setting up", flush=True)
        time.sleep(float(modes["slow_setup"]))

    wrap(main_jit, "setup", before=slow)
if "fail_saves_after" in modes:
    written, real_reported = [], checkpointer._reported

    def full(path):
        raise files.WriteError(f"could not write {path}: No space left on device (launch_worker)")

    def maybe_full(path, start, write):
        written.append(path)
        return real_reported(path, start, write if len(written) <= int(modes["fail_saves_after"]) else full)

    checkpointer._reported = maybe_full
if "check_maps" in modes:

    def count_maps(result):
        with open("/proc/self/maps") as f:
            deleted = {line.split()[-2] for line in f if "checkpoint-" in line and line.rstrip().endswith("(deleted)")}
        print(f"rank {rank} maps {len(deleted)} deleted checkpoint file(s)", flush=True)

    wrap(checkpointer.Checkpointer, "save", after=count_maps)
if "fake_hosts" in modes:
    socket.gethostname = lambda: f"node{rank}"
    nodes.hostname_address = lambda host: "127.0.1.1"
if "one_gpu" in modes:
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
sys.exit(main_jit.cli(argv))
