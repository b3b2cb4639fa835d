"""One run per output folder: a lock file that rank 0 takes before anything is written there.

A training run holds `output_dir/.lock-train`, an evaluation-only run (--evaluate_gen) its own
`output_dir/.lock-eval`: one training and one evaluation may share a folder (an evaluation writes only
eval records, `sweep*.csv/png` and image folders, never checkpoints), two of a kind may not. The
file says who holds it: host, pid, start time and the job's ids (SLURM job, torchrun rendezvous).
Taken over, and said so, when its holder is gone: a dead process on this host, or an earlier attempt
of the same job (the same SLURM job id after a requeue, the same rendezvous id after an elastic
restart). A lock of a live process, or of another host's job, is refused with what to do.
"""

import json
import os
import socket
import time

from util import distributed
from util.errors import BadInput

KINDS = ("train", "eval")


def lock_path(output_dir: str, kind: str) -> str:
    return os.path.join(output_dir, f".lock-{kind}")


def holder_info(ids: dict) -> dict:
    """What this process writes into its lock: host, pid, start time and the job's ids."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), **ids}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def describe_holder(holder: dict) -> str:
    ids = ", ".join(f"{k} {holder[k]}" for k in ("slurm_job", "rdzv_id") if holder.get(k))
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}" + (
        f", {ids}" if ids else ""
    )


def stale_reason(holder: dict, me: dict) -> str | None:
    """Why the lock of `holder` may be taken over by `me` (None: it may not)."""
    if any(holder.get(k) and holder.get(k) == me.get(k) for k in ("slurm_job", "rdzv_id")):
        return "an earlier attempt of this job (restart or requeue)"
    if holder.get("host") == me["host"] and not pid_alive(int(holder.get("pid", -1))):
        return "its process is gone"
    return None


def read_holder(path: str) -> dict:
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):  # empty or cut short: written by a process killed while taking it
        return {}


def acquire(output_dir: str, kind: str, ids: dict, log=print) -> str:
    """Take the `kind` lock of output_dir for this process (its folder must exist). Returns the lock
    file's path. BadInput (one line: who holds it and how to proceed) when a live run holds it."""
    path, me = lock_path(output_dir, kind), holder_info(ids)
    for _ in range(2):  # a second try after removing a stale lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_holder(path)
            reason = stale_reason(holder, me) if holder else "it is empty (its writer was killed)"
            if reason is None:
                raise BadInput(
                    f"--output_dir {output_dir} is in use by another {kind} run ({describe_holder(holder)}): wait for "
                    f"it to end or use another --output_dir; if that run is dead, delete {path}"
                ) from None
            log(
                f"note: taking over the {kind} lock of {output_dir} from "
                f"{describe_holder(holder) if holder else 'nobody'}: {reason}"
            )
            os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise BadInput(f"--output_dir {output_dir}: another run took the {kind} lock at the same moment")


def take(output_dir: str, kind: str) -> str | None:
    """Collective: rank 0 creates output_dir and takes its `kind` lock (with the job's ids,
    util.distributed.run_ids); every rank raises the same BadInput when another run holds it.
    Returns the lock file's path on rank 0 (None elsewhere)."""
    path, error = None, None
    if distributed.is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        try:
            path = acquire(output_dir, kind, distributed.run_ids(), log=distributed.print0)
        except BadInput as e:
            error = str(e)
    error = distributed.broadcast_object(error)
    if error:
        raise BadInput(error)
    return path


def release(path: str | None):
    """Remove a lock this process holds (its pid is in the file); anything else is left alone."""
    if path and read_holder(path).get("pid") == os.getpid():
        os.remove(path)
