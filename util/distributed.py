"""The one owner of device, precision and distributed state.

Every helper works without torch.distributed: get_rank() is 0, barrier() is a no-op and the
reductions return their input. Launchers: torchrun (RANK / WORLD_SIZE / LOCAL_RANK; single- or
multi-node, static or with a c10d rendezvous, elastic restarts), SLURM's srun with one task per
GPU (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, as the reference reads them) and OpenMPI
(--dist_on_itp).
"""

import builtins
import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from util import nodes
from util.errors import BadInput

_control_group = None  # a gloo group for small host-side collectives (no GPU synchronisation)
_console_copy = None  # a file that this process's console lines are also appended to (output_dir/log.txt)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def copy_console_to(path: str | None):
    """Also append what print0 / print_all print in this process to `path` (None: stop)."""
    global _console_copy
    _console_copy = path


def _print(*args, **kwargs):
    global _console_copy
    kwargs.setdefault("flush", True)
    builtins.print(*args, **kwargs)
    if _console_copy is not None:
        try:
            with open(_console_copy, "a") as f:
                builtins.print(*args, **{**kwargs, "file": f})
        except OSError as e:  # a full disk: the console goes on alone
            path, _console_copy = _console_copy, None
            builtins.print(
                f"error: could not append to {path} ({e}); the console is not copied there from now on", flush=True
            )


def print0(*args, **kwargs):
    """print on rank 0 only (flushed, so logs interleave correctly under torchrun)."""
    if is_main_process():
        _print(*args, **kwargs)


def print_all(*args, **kwargs):
    """print on every rank, prefixed with the rank when distributed."""
    prefix = (f"[rank {get_rank()}]",) if is_dist() else ()
    _print(*prefix, *args, **kwargs)


def control_group():
    """The process group of the small host-side collectives (gloo; the default group in a CPU run);
    None before `init` or without a process group."""
    return _control_group


def barrier():
    if is_dist():
        dist.barrier(group=_control_group)


def _launcher_env(dist_on_itp: bool):
    """(rank, world_size, local_rank) from the launcher's environment, or None for one process."""
    env = os.environ
    if dist_on_itp:
        rank, world, local = (
            int(env[k]) for k in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")
        )
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        return rank, world, local
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank = int(env["SLURM_PROCID"])
        return rank, int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return None


def local_world_size() -> int | None:
    """The number of processes on this node, where the launcher says it (torchrun, OpenMPI, srun with
    --ntasks-per-node); None otherwise."""
    for key in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return None


def gpu_index(local_rank: int, visible: int, local_size: int | None = None, shared: bool = False) -> int:
    """The CUDA device of the process with this node-local rank when `visible` devices are visible
    and `local_size` processes run on the node (None: unknown): its local rank. One task per GPU
    under `srun --gpus-per-task=1` (or with CUDA_VISIBLE_DEVICES naming one device) sees a single
    GPU, device 0, whatever its local rank. Two processes on one GPU, which NCCL refuses later with a
    less clear error, are BadInput (exit 2): more processes than the several GPUs visible, or one GPU
    visible to the several processes of one launcher on the node (`shared`: torchrun, whose workers
    all see the devices its environment names)."""
    if visible == 1 and not (shared and (local_size or 1) > 1):
        return 0
    if visible >= 1 and max(local_rank + 1, local_size or 0) > visible:
        raise BadInput(
            f"{max(local_rank + 1, local_size or 0)} processes on this node but {visible} visible GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most one process "
            "per GPU (--nproc_per_node, --ntasks-per-node), or make one GPU visible to each (srun --gpus-per-task=1)"
        )
    return local_rank


def elastic_attempt() -> tuple[int, int] | None:
    """(restart count, max restarts) of a torchrun (torchelastic) launch; None under other launchers."""
    env = os.environ
    if "TORCHELASTIC_RESTART_COUNT" not in env:
        return None
    return int(env["TORCHELASTIC_RESTART_COUNT"]), int(env.get("TORCHELASTIC_MAX_RESTARTS", 0))


def run_ids() -> dict:
    """What identifies this job across restarts and requeues: the SLURM job id and the torchrun
    rendezvous id (absent keys: not launched that way; torchrun's static launch has the id 'none')."""
    env = os.environ
    ids = {"slurm_job": env.get("SLURM_JOB_ID"), "rdzv_id": env.get("TORCHELASTIC_RUN_ID")}
    return {k: v for k, v in ids.items() if v and v != "none"}


# What a collective that timed out or lost its peer raises (gloo: RuntimeError; NCCL's watchdog).
_COLLECTIVE_FAILURE_MARKERS = (
    "Timed out",
    "timed out",
    "Connection closed by peer",
    "Connection reset by peer",
    "Watchdog caught collective operation timeout",
)


def is_collective_failure(e: BaseException) -> bool:
    """Whether `e` is a collective that timed out (--dist_timeout) or whose peer died: a failed run,
    not a bug."""
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _COLLECTIVE_FAILURE_MARKERS)


def elastic_store(rank: int, world_size: int, timeout: datetime.timedelta, attempt: int):
    """The store a torchrun worker joins the process group through: torchrun's at MASTER_ADDR:
    MASTER_PORT (served by its agent, or else by rank 0), under a prefix of its own per restart
    attempt. torchrun keeps one store across restarts, and without the prefix the workers of a
    restart read the dead workers' addresses from it and hang while connecting."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=not agent and rank == 0,
        timeout=timeout,
        multi_tenant=not agent,
    )
    return dist.PrefixStore(f"jit/attempt_{attempt}", store)


def launch_store(rank: int, world_size: int, timeout: datetime.timedelta, dist_url: str):
    """The store the processes meet through with --dist_url env://: torchrun's (elastic_store), or a
    TCPStore at MASTER_ADDR:MASTER_PORT served by rank 0 (srun, OpenMPI, a hand-set environment, as
    env:// makes it). None for another --dist_url (init_process_group makes its own)."""
    if dist_url != "env://":
        return None
    attempt = elastic_attempt()
    if attempt:
        return elastic_store(rank, world_size, timeout, attempt[0])
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    return dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout, multi_tenant=True)


def init(
    device: str | None = None, dist_on_itp: bool = False, dist_url: str = "env://", timeout_min: float = 30.0
) -> torch.device:
    """Pick the device once (and its backend settings) and join the process group if a launcher
    started us.

    device: 'cuda', 'cpu', 'cuda:N' or None (CUDA when available); a device with an index becomes
    this process's current CUDA device. Under a launcher each process takes the GPU of its local
    rank (gpu_index); the backend is NCCL on CUDA and gloo on CPU. timeout_min: how long any
    collective (a barrier included: the ranks waiting while rank 0 writes a checkpoint) may wait
    for the others before the run fails. Before the first collective the ranks tell each other their
    nodes through the launcher's store (util.nodes): a network that cannot work (gloo on loopback
    across nodes) is BadInput on every rank. Returns the device.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda was asked for, but no CUDA device is available (use --device cpu)")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # TF32 stays at PyTorch's defaults, as in the reference
    launch = _launcher_env(dist_on_itp)
    if launch is None:
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # else threads (the loader's pinning) would use GPU 0
        return device
    rank, world_size, local_rank = launch
    if dist_url == "env://":
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise BadInput(
                f"distributed launch needs {' and '.join(missing)} in the environment (or --dist_url tcp://host:port)"
            )
    if device.type == "cuda":
        shared = "LOCAL_WORLD_SIZE" in os.environ  # torchrun: its workers see the same devices
        device = torch.device("cuda", gpu_index(local_rank, torch.cuda.device_count(), local_world_size(), shared))
        torch.cuda.set_device(device)
    _join(rank, world_size, device, dist_url, datetime.timedelta(minutes=timeout_min))
    return device


def _join(rank: int, world_size: int, device: torch.device, dist_url: str, timeout: datetime.timedelta):
    """Check the nodes (util.nodes, through the launcher's store), then join the process group and make
    the control group; rank 0 prints what the nodes use."""
    global _control_group
    # torch._dynamo, imported after a process group exists (by torch.compile, torchvision or
    # torch-fidelity), keeps a reference to it that destroy_process_group cannot drop, and the group's
    # gloo threads then abort the process at exit (see shutdown). Imported before, it holds none.
    from torch import _dynamo  # noqa: F401

    backends = ["nccl", "gloo"] if device.type == "cuda" else ["gloo"]
    store = launch_store(rank, world_size, timeout, dist_url)
    lines = None
    if store is not None:
        error, lines = nodes.exchange(store, rank, world_size, nodes.local_info(backends))
        if error:
            raise BadInput(error)
    dist.init_process_group(
        backend=backends[0],
        world_size=world_size,
        rank=rank,
        timeout=timeout,
        **({"store": store} if store is not None else {"init_method": dist_url}),
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    _control_group = dist.new_group(backend="gloo", timeout=timeout) if device.type == "cuda" else dist.group.WORLD
    if lines is None:  # another --dist_url: told after the fact
        lines = nodes.describe_nodes(all_gather_object(nodes.local_info(backends)))[1]
    barrier()
    for line in lines:
        print0(line)


def shutdown():
    """Leave the process group: every rank waits for the others first, so none tears down its
    connections while a peer still uses them; then all groups are destroyed and the last reference
    to them dropped, which joins their C++ threads (gloo's workers and event loop) here, while
    Python is fully alive. Left running into interpreter shutdown, a gloo worker that releases its
    last tensors there aborts the process ("terminate called without an active exception").
    Objects that hold a group (a DDP-wrapped model) must be released before."""
    global _control_group
    if is_dist():
        barrier()
        dist.destroy_process_group()
    _control_group = None


def autocast(device: torch.device):
    """The training/sampling precision context: bf16 autocast on CUDA, plain float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def host_all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few host numbers over all ranks through the gloo control group (no GPU sync)."""
    if not is_dist():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=_control_group)
    return t.tolist()


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (through the control group)."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj, group=_control_group)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s obj on every rank (through the control group)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_control_group)
    return box[0]


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of a device tensor over ranks (a new tensor)."""
    if not is_dist():
        return t.clone()
    t = t.clone()
    dist.all_reduce(t)
    return t / get_world_size()
