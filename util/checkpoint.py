"""Checkpoints: the format (one symmetric pair: TrainState <-> dict), atomic writes, safe loading
(reference files included), finding the newest readable checkpoint, and loading weights and AdamW
state into modules. A run's saves and restores are util/checkpointer.py's `Checkpointer`.

Layout (the reference's keys, plus ours): `model`, `model_ema1`, `model_ema2` (full state dicts of
the denoiser, keys `net.*`), `optimizer`, `epoch` (last finished epoch), `args` (a plain dict; the
reference stored an argparse.Namespace, which loads too), and for exact continuation `resume`
(the start position {'epoch', 'step'} of the next run; `TrainState.start`), `rng` (one entry per
rank), `world_size`; `model_ema3` when a third EMA is kept (--ema_decay3; the reference ignores it);
`model_phema` (a list of state dicts) and `phema_stds` (their σ_rel, ascending) when power-function
EMAs are tracked for post-hoc EMA (--phema_stds, util/phema.py).

Two forms on disk: a single file `checkpoint-NAME.pth` (torch.save of that dict; what the reference
reads), written by rank 0 of an unsharded (DDP or one-process) run, and a folder `checkpoint-NAME.dcp`
written by every rank of a sharded (FSDP) run at once (util/checkpoint_dcp.py). `load_checkpoint`
reads both into the same TrainState; convert_checkpoint.py turns a folder into a file.

Names: `--resume` is the flag (a file or folder to continue from); the position a run continues
from is its `start` (TrainState.start, Start).
"""

import argparse
import dataclasses
import glob
import os
import re
from dataclasses import dataclass, field

import torch

from util import checkpoint_dcp, distributed, files
from util.errors import BadInput

EMA_KEYS = ("model_ema1", "model_ema2", "model_ema3")  # EMA i + 1 (decay --ema_decay{i+1}); the third is optional
# The dtypes weights are stored or summed in, by the names flags take (--phema_dtype, export.py
# --dtype, reconstruct_ema.py --accum each accept some of them).
DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(BadInput):
    """A checkpoint that is missing, unreadable or does not fit the model (bad input: exit 2)."""


@dataclass
class TrainState:
    """What a checkpoint holds. model / emas / optimizer: state dicts (optimizer None: weights only);
    epoch: the last finished epoch of these weights (-1: none); start: {'epoch', 'step'} to continue
    from; rng: every rank's RNG states and world_size: their number (None in reference files);
    phemas / phema_stds: the state dicts of the power EMAs and their σ_rel (empty: none tracked);
    folder: the sharded checkpoint (checkpoint_dcp) it was read from, whose parts (Part, OptimizerPart:
    read-only mappings) read their tensors when used; None: a file or in memory."""

    model: dict
    emas: list
    optimizer: dict | None
    epoch: int
    args: dict
    start: dict
    rng: list | None = None
    world_size: int | None = None
    phemas: list = field(default_factory=list)
    phema_stds: list = field(default_factory=list)
    folder: str | None = None

    @classmethod
    def weights_only(
        cls, state_dict: dict, *, epoch: int = -1, args: dict | None = None, start: dict | None = None
    ) -> "TrainState":
        """One network's weights as a TrainState: the model and EMA 1 are `state_dict` (the other
        EMAs then start from it, see ema_states), no optimizer; `epoch` the last finished epoch of
        the weights (-1: none), continued at the next (`start`, default {epoch + 1, step 0})."""
        return cls(
            model=state_dict,
            emas=[state_dict],
            optimizer=None,
            epoch=epoch,
            args=dict(args or {}),
            start=start or {"epoch": epoch + 1, "step": 0},
        )

    def ema_states(self, n: int) -> list[dict]:
        """The state dicts of n EMAs: an EMA the checkpoint does not hold (a third one added on
        resume) starts from the model's weights."""
        return [self.emas[i] if i < len(self.emas) else self.model for i in range(n)]

    def weights(self, which: str) -> dict:
        """The state dict of 'model' or 'ema{k}' (k = 1, 2, 3); CheckpointError if it has none."""
        if which == "model":
            return self.model
        k = int(which.removeprefix("ema"))
        if not 1 <= k <= len(self.emas):
            raise CheckpointError(
                f"the checkpoint has no {EMA_KEYS[k - 1] if k <= len(EMA_KEYS) else which} "
                f"(it holds EMAs 1..{len(self.emas)}; a third one is kept when training with --ema_decay3)"
            )
        return self.emas[k - 1]


def to_dict(state: TrainState) -> dict:
    """The file's dict: the reference's keys, plus resume (the start position), rng, world_size and
    the power EMAs (only when tracked)."""
    phema = {"model_phema": state.phemas, "phema_stds": state.phema_stds} if state.phema_stds else {}
    return {
        "model": state.model,
        **dict(zip(EMA_KEYS, state.emas)),
        "optimizer": state.optimizer,
        "epoch": state.epoch,
        "args": state.args,
        "resume": state.start,
        "rng": state.rng,
        "world_size": state.world_size,
        **phema,
    }


def from_dict(ckpt: dict) -> TrainState:
    """Inverse of to_dict; also reads the reference's files (args as a Namespace, no resume point:
    continue at the epoch after `epoch`). A missing EMA 1 or 2 falls back to `model`."""
    args = ckpt.get("args") or {}
    epoch = ckpt.get("epoch", -1)
    emas = [ckpt.get(k, ckpt["model"]) for k in EMA_KEYS[:2]] + ([ckpt[EMA_KEYS[2]]] if EMA_KEYS[2] in ckpt else [])
    return TrainState(
        model=ckpt["model"],
        emas=emas,
        optimizer=ckpt.get("optimizer"),
        epoch=epoch,
        args=vars(args) if isinstance(args, argparse.Namespace) else dict(args),
        start=ckpt.get("resume") or {"epoch": epoch + 1, "step": 0},
        rng=ckpt.get("rng"),
        world_size=ckpt.get("world_size"),
        phemas=ckpt.get("model_phema", []),
        phema_stds=ckpt.get("phema_stds", []),
    )


def summary(args: dict) -> str:
    """The flags that decide a network's shape, as given when the checkpoint was made."""
    return ", ".join(f"--{k} {args[k]}" for k in ("model", "img_size", "class_num") if k in args) or "unknown flags"


def does_not_fit(path: str, args: dict, error: Exception) -> CheckpointError:
    """The error for a checkpoint of another shape, naming the flags it was made with (`args`) and
    the start of load_state_dict's message."""
    first = " ".join(str(error).strip().splitlines()[:2])[:300]
    return CheckpointError(
        f"{path} does not fit this model (check --model, --img_size, --class_num; the checkpoint "
        f"was made with {summary(args)}): {first}"
    )


def load_module(module, state_dict: dict, path: str, args: dict):
    """module.load_state_dict(state_dict); a checkpoint of another shape raises does_not_fit."""
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as e:  # missing / unexpected keys, shape mismatches
        raise does_not_fit(path, args, e) from None
    finally:
        checkpoint_dcp.release_shards(state_dict)  # a sharded checkpoint's part: what it read is not kept


def load_weights(state: TrainState, path: str, denoiser, emas):
    """Load the weights into a denoiser and its EMAs (see load_module and TrainState.ema_states)."""
    load_module(denoiser, state.model, path, state.args)
    for ema, state_dict in zip(emas, state.ema_states(len(emas))):
        load_module(ema, state_dict, path, state.args)


def load_optimizer(optimizer: torch.optim.Optimizer, state_dict):
    """Load AdamW state saved by us or by the reference, for the fused implementation.

    The reference saves fused=None and its `step` counters as CPU tensors; fused AdamW needs each
    `step` as float32 on its parameter's device (CUDA refuses a CPU one), so they are moved there.
    The moments and counters of CPU parameters are copied into the process: loaded as they are, they
    would stay views of the memory-mapped file (load_checkpoint), whose disk space a later save could
    then not free for the rest of the run. A sharded checkpoint's state (checkpoint_dcp) is read here.
    """
    optimizer.load_state_dict(checkpoint_dcp.plain(state_dict))
    for group in optimizer.param_groups:
        group.update(fused=True, foreach=None)
        for p in group["params"]:
            s = optimizer.state.get(p, {})
            for k, v in s.items():
                if k != "step" and isinstance(v, torch.Tensor) and v.device.type == "cpu":
                    s[k] = v.clone()
    place_steps(optimizer)


def place_steps(optimizer: torch.optim.Optimizer):
    """Every AdamW `step` counter as float32 on its parameter's device (what fused AdamW needs), a
    copy of its own (not a view of a loaded file)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            s = optimizer.state.get(p)
            if s and "step" in s:
                s["step"] = s["step"].to(device=p.device, dtype=torch.float32, copy=True)


def tensor_bytes(obj) -> int:
    """Bytes of all tensors in a nest of dicts, lists and tuples (about a checkpoint's file size)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def estimated_size(denoiser, copies: int = 3) -> int:
    """Bytes of a checkpoint of `denoiser`: its state `copies` times (weights, two EMAs, ...) and
    two AdamW moments per trainable parameter."""
    trainable = sum(p.numel() * p.element_size() for p in denoiser.parameters() if p.requires_grad)
    return copies * tensor_bytes(denoiser.state_dict()) + 2 * trainable


def save_atomic(obj, path: str):
    """torch.save to `path` so that a crash at any moment leaves the old file intact (see
    util.files.atomic_write). A failed write (a full disk, ...) raises util.files.WriteError, whose
    one-line message names the file, the bytes needed and the bytes free; no temporary file is left."""
    files.atomic_write(path, lambda f: torch.save(obj, f), needed=tensor_bytes(obj))


def save(state: TrainState, path: str):
    save_atomic(to_dict(state), path)


def remove_stale_temporaries(folder: str, prefix: str = ".checkpoint-"):
    """Delete temporary files left by a save that was killed (they are never read): those of
    checkpoints, or of other files whose temporaries' names start with `prefix`; for checkpoints also
    the temporary folders of sharded saves (checkpoint_dcp.recover, which puts back a folder set aside
    by a save killed between its two renames)."""
    for tmp in glob.glob(os.path.join(folder, f"{prefix}*.pth.tmp-*")):
        os.remove(tmp)
    if prefix == ".checkpoint-":
        checkpoint_dcp.recover(folder, prefix)


def one_line(error: Exception) -> str:
    """An exception's message on one line (some of torch's span several), at most 300 characters."""
    return " ".join(str(error).split())[:300]


def _read(path: str) -> TrainState:
    """One checkpoint, a file (its tensors memory-mapped, see load_checkpoint) or a sharded folder (its
    parts read when used). CheckpointError naming it if it is missing, truncated or not a checkpoint."""
    if checkpoint_dcp.is_dcp(path):
        try:
            return dataclasses.replace(from_dict(checkpoint_dcp.read(path)), folder=path)
        except checkpoint_dcp.UnreadableFolder as e:
            raise CheckpointError(str(e)) from None
        except Exception as e:  # a damaged train_state.pth or .metadata
            raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {one_line(e)}") from e
    if os.path.isdir(path):
        raise CheckpointError(
            f"{path} is not a complete sharded checkpoint (it lacks {checkpoint_dcp.METADATA} or "
            f"{checkpoint_dcp.STATE_FILE}: a save that did not finish, or a copy cut short)"
        )
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # a file of torch < 1.6 (no zip archive), a file system without mmap: read it whole
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, unpickling refused
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {one_line(e)}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a JiT checkpoint (no 'model' entry)")
    return from_dict(ckpt)


NAME = re.compile(r"checkpoint-(last|\d+)\.(pth|dcp)$")


def candidates(folder: str) -> list[str]:
    """Checkpoints in `folder`, files and sharded folders alike, newest first (by the modification time
    of the file or of the folder's metadata, written last; then epoch number). A sharded folder counts
    once complete (checkpoint_dcp.is_dcp)."""
    paths = [
        p
        for p in glob.glob(os.path.join(folder, "checkpoint-*"))
        if NAME.search(p) and (checkpoint_dcp.is_dcp(p) if p.endswith(checkpoint_dcp.SUFFIX) else os.path.isfile(p))
    ]

    def key(p):
        m = re.search(r"checkpoint-(\d+)\.", p)
        stamp = os.path.join(p, checkpoint_dcp.METADATA) if p.endswith(checkpoint_dcp.SUFFIX) else p
        return os.path.getmtime(stamp), int(m.group(1)) if m else float("inf")

    return sorted(paths, key=key, reverse=True)


def load_checkpoint(source: str, log=print, *, required: bool = True, main_only: bool = False, collective=False):
    """The one reader of checkpoints (--resume, --init_from, --evaluate_gen, export.py, sample.py).
    Returns (TrainState, path of the file or sharded folder read).

    `source` is a checkpoint (a file or a sharded folder, read as is: a bad one is an error) or a run
    folder, searched newest first (an unreadable checkpoint is reported through `log` and the next
    older one tried). A folder without checkpoints gives (None, None), or a CheckpointError when
    `required`; an empty `source` (no --resume) gives (None, None); a path that does not exist is an
    error. (The messages name the file or folder as --resume, the flag most callers pass it with.)

    Host memory: the tensors of a file are memory-mapped, not read into the process. Loading them into
    modules copies from the page cache, which the ranks of a node share (one copy per node, and
    reclaimable: it is not the processes' own memory), so a rank holds nothing of the file but what it
    keeps (the AdamW moments of a CPU run, see load_optimizer). Files that cannot be mapped (written by
    torch < 1.6, or on a file system without mmap) are read whole. A sharded folder's parts are read
    into the process when used, one at a time where the caller releases them (checkpoint_dcp.release_shards).

    collective (every rank calls it): rank 0 chooses the checkpoint and the other ranks read the same
    one, or with main_only get the state without a file's tensors (for a sharded model, which rank 0
    loads by broadcasting each tensor: sharding.load_full_state; a sharded folder's state is passed
    whole, its parts unread). An error is raised on every rank.
    """
    if (collective or main_only) and distributed.get_world_size() > 1:
        return _load_on_every_rank(source, log, required, main_only)
    if not source:
        return None, None
    if not os.path.exists(source):
        raise CheckpointError(f"--resume {source}: no such file or folder")
    if os.path.isfile(source) or os.path.normpath(source).endswith(checkpoint_dcp.SUFFIX):
        return _read(source), source  # a checkpoint named: read as it is, never searched as a run folder
    found = candidates(source)
    _report_unfinished(source, found, log)
    for i, path in enumerate(found):
        try:
            state = _read(path)
        except CheckpointError as e:
            log(f"warning: {e}; trying an older checkpoint")
            continue
        if i > 0:
            log(f"warning: resuming from the older checkpoint {path}")
        return state, path
    if found:
        raise CheckpointError(f"--resume {source}: none of its {len(found)} checkpoints can be read")
    if required:
        raise CheckpointError(f"{source} has no checkpoint-*.pth or checkpoint-*.dcp")
    return None, None


def _report_unfinished(folder: str, found: list[str], log):
    """Sharded folders in `folder` named as checkpoints but lacking their metadata (our saves never leave
    one: a copy not finished, or damage): a warning each; CheckpointError when there is nothing else to
    resume from, rather than a fresh start that would overwrite it."""
    for path in sorted(glob.glob(os.path.join(folder, "checkpoint-*" + checkpoint_dcp.SUFFIX))):
        if not (NAME.search(path) and os.path.isdir(path)) or checkpoint_dcp.is_dcp(path):
            continue
        what = (
            f"{path} is not a complete sharded checkpoint (no {checkpoint_dcp.METADATA} or {checkpoint_dcp.STATE_FILE})"
        )
        if not found:
            raise CheckpointError(f"--resume {folder}: {what}: finish copying it, or remove it to start afresh")
        log(f"warning: {what}: skipped")


def _load_on_every_rank(source: str, log, required: bool, main_only: bool):
    """load_checkpoint's collective form: rank 0 chooses and reads, the others follow (see there)."""
    state, path, error = None, None, None
    if distributed.is_main_process():
        try:
            state, path = load_checkpoint(source, log, required=required)
        except CheckpointError as e:  # every rank raises it: none is left waiting in a collective
            error = e
    header = state
    if state is not None and state.folder is None:
        header = dataclasses.replace(
            state, model=None, emas=[None] * len(state.emas), optimizer=None, phemas=[None] * len(state.phemas)
        )
    header, path, error = distributed.broadcast_object((header, path, error))
    if error is not None:
        raise error
    if distributed.is_main_process() or path is None or main_only:
        return (state if distributed.is_main_process() else header), path
    return _read(path), path
