"""Checkpoints: the file format (one symmetric pair: TrainState <-> dict), atomic writes, safe
loading (reference files included), finding the newest readable file, RNG state, and the
`Checkpointer` that saves and restores a run's state.

Layout (the reference's keys, plus ours): `model`, `model_ema1`, `model_ema2` (full state dicts of
the denoiser, keys `net.*`), `optimizer`, `epoch` (last finished epoch), `args` (a plain dict; the
reference stored an argparse.Namespace, which loads too), and for exact continuation `resume`
(the start position {'epoch', 'step'} of the next run; `TrainState.start`), `rng` (one entry per
rank), `world_size`; `model_ema3` when a third EMA is kept (--ema_decay3; the reference ignores it);
`model_phema` (a list of state dicts) and `phema_stds` (their σ_rel, ascending) when power-function
EMAs are tracked for post-hoc EMA (--phema_stds, util/phema.py).

Names: `--resume` is the flag (a file or folder to continue from); the position a run continues
from is its `start` (TrainState.start, Start).
"""

import argparse
import dataclasses
import glob
import os
import random
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from util import distributed, files, sharding
from util.ema import EMA
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
    phemas / phema_stds: the state dicts of the power EMAs and their σ_rel (empty: none tracked)."""

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


def load_weights(state: TrainState, path: str, denoiser, emas):
    """Load the weights into a denoiser and its EMAs (see load_module and TrainState.ema_states)."""
    load_module(denoiser, state.model, path, state.args)
    for ema, state_dict in zip(emas, state.ema_states(len(emas))):
        load_module(ema, state_dict, path, state.args)


def load_optimizer(optimizer: torch.optim.Optimizer, state_dict: dict):
    """Load AdamW state saved by us or by the reference, for the fused implementation.

    The reference saves fused=None and its `step` counters as CPU tensors; fused AdamW needs each
    `step` as float32 on its parameter's device (CUDA refuses a CPU one), so they are moved there.
    The moments of CPU parameters are copied into the process: loaded as they are, they would stay
    views of the memory-mapped file (load_checkpoint), whose disk space a later save could then not
    free for the rest of the run.
    """
    optimizer.load_state_dict(state_dict)
    for group in optimizer.param_groups:
        group.update(fused=True, foreach=None)
        for p in group["params"]:
            s = optimizer.state.get(p, {})
            for k, v in s.items():
                if k != "step" and isinstance(v, torch.Tensor) and v.device.type == "cpu":
                    s[k] = v.clone()
    place_steps(optimizer)


def place_steps(optimizer: torch.optim.Optimizer):
    """Every AdamW `step` counter as float32 on its parameter's device (what fused AdamW needs)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            s = optimizer.state.get(p)
            if s and "step" in s:
                s["step"] = s["step"].to(device=p.device, dtype=torch.float32)


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
    checkpoints, or of other files whose temporaries' names start with `prefix`."""
    for tmp in glob.glob(os.path.join(folder, f"{prefix}*.pth.tmp-*")):
        os.remove(tmp)


def _read(path: str) -> TrainState:
    """One checkpoint file, its tensors memory-mapped (see load_checkpoint). CheckpointError naming the
    file if it is missing, truncated or not a checkpoint."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # a file of torch < 1.6 (no zip archive), a file system without mmap: read it whole
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, unpickling refused
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a JiT checkpoint (no 'model' entry)")
    return from_dict(ckpt)


def candidates(folder: str) -> list[str]:
    """Checkpoints in `folder`, newest first (by modification time, then epoch number)."""
    paths = [
        p for p in glob.glob(os.path.join(folder, "checkpoint-*.pth")) if re.search(r"checkpoint-(last|\d+)\.pth$", p)
    ]

    def key(p):
        m = re.search(r"checkpoint-(\d+)\.pth$", p)
        return os.path.getmtime(p), int(m.group(1)) if m else float("inf")

    return sorted(paths, key=key, reverse=True)


def load_checkpoint(source: str, log=print, *, required: bool = True, main_only: bool = False):
    """The one reader of checkpoints (--resume, --init_from, --evaluate_gen, export.py, sample.py).
        Returns (TrainState, path of the file read).

        `source` is a file (read as is: a bad file is an error) or a run folder, searched newest first
        (an unreadable checkpoint is reported through `log` and the next older one tried). A folder
        without checkpoints gives (None, None), or a CheckpointError when `required`; an empty `source`
        (no --resume) gives (None, None); a path that does not exist is an error. (The messages name the
        file or folder as --resume, the flag most callers pass it with.)

        Host memory: the tensors are memory-mapped from the file, not read into the process. Loading them
        into modules copies from the page cache, which the ranks of a node share (one copy per node, and
        reclaimable: it is not the processes' own memory), so a rank holds nothing of the file but what it
        keeps (the AdamW moments of a CPU run, see load_optimizer). Files that cannot be mapped (written
    by torch < 1.6, or on a file system without mmap) are read whole.

        main_only: collective; rank 0 alone reads, the other ranks get the state without its tensors
        (for a sharded model, which rank 0 loads by broadcasting each tensor: sharding.load_full_state).
    """
    if main_only and distributed.get_world_size() > 1:
        state, path, error = None, None, None
        if distributed.is_main_process():
            try:
                state, path = load_checkpoint(source, log, required=required)
            except CheckpointError as e:  # every rank raises it: none is left waiting in the broadcast
                error = e
        header = (
            None
            if state is None
            else dataclasses.replace(
                state, model=None, emas=[None] * len(state.emas), optimizer=None, phemas=[None] * len(state.phemas)
            )
        )
        header, path, error = distributed.broadcast_object((header, path, error))
        if error is not None:
            raise error
        return (state if distributed.is_main_process() else header), path
    if not source:
        return None, None
    if not os.path.exists(source):
        raise CheckpointError(f"--resume {source}: no such file or folder")
    if os.path.isfile(source):
        return _read(source), source
    found = candidates(source)
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
        raise CheckpointError(f"{source} has no checkpoint-*.pth")
    return None, None


def capture_rng(device: torch.device) -> dict:
    """This process's RNG states: torch CPU (and the current CUDA device), numpy, python; and its
    intra-op thread count, which CPU results depend on (see thread_note)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),  # loadable with weights_only
        "python": random.getstate(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device):
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def thread_note(state: dict, device: torch.device, path: str) -> str | None:
    """A note when a CPU run continues the RNG `state` of a process with another intra-op thread count:
    CPU kernels split their sums between threads, so the results differ in the last bits (None: same
    count, not the CPU, or a file without the count)."""
    saved, now = state.get("threads"), torch.get_num_threads()
    if device.type != "cpu" or saved is None or saved == now:
        return None
    return (
        f"note: {path} was written by processes of {saved} CPU threads, this run has {now} "
        "(torch.get_num_threads(), from OMP_NUM_THREADS): training continues, but not bit-exactly as the original "
        "run would"
    )


def describe(path: str, start: dict) -> str:
    return f"{path} (resume at epoch {start['epoch']}, step {start['step']})"


@dataclass
class Start:
    """Where a run starts. epoch, step: the position to continue from; weights_epoch: the last
    finished epoch of the loaded weights (-1: none); path: the checkpoint file (None: none)."""

    epoch: int
    step: int = 0
    weights_epoch: int = -1
    path: str | None = None


@dataclass
class SaveLog:
    """What the checkpoint writes of a run came to. newest: the newest readable checkpoint and what
    it holds; last_ok: whether the latest checkpoint-last.pth write succeeded; failed: writes that did not."""

    newest: str | None = None
    last_ok: bool = True
    failed: int = 0

    def note(self, name: str, written: str | None) -> bool:
        """Record the outcome of writing checkpoint-{name}.pth (`written`: its description, None if it
        failed); returns whether it was written."""
        self.failed += written is None
        if name == "last":
            self.last_ok = written is not None
        self.newest = written or self.newest
        return written is not None


class Checkpointer:
    """A run's checkpoints in `output_dir`: `load` + `restore` at the start, `save` during the run.

    Holds the live denoiser, its EMAs (the list itself: an EMA added to it is saved too), the
    optimizer (None: weights only), the run's settings `args` (a plain dict, stored in every file),
    the device (for RNG states) and the power EMAs `phemas` (util.ema.PowerEMA, ascending σ_rel).
    Sharded (FSDP) objects are gathered to and loaded from the unsharded format, rank 0 alone
    reading and writing the file. `log` notes every write.
    """

    def __init__(self, output_dir: str, device: torch.device, denoiser, emas: list, optimizer, args: dict, phemas=()):
        self.output_dir, self.device = output_dir, device
        self.denoiser, self.emas, self.optimizer, self.args = denoiser, emas, optimizer, args
        self.phemas = list(phemas)
        self.log = SaveLog()

    def load(self, source: str):
        """(TrainState, path) of --resume `source`, or (None, None) when it names nothing to resume
        (load_checkpoint). Sharded: rank 0 alone reads the file; the other ranks get the state
        without its tensors (rank 0 broadcasts them in `restore`)."""
        state, path = load_checkpoint(
            source, log=distributed.print0, required=False, main_only=sharding.is_sharded(self.denoiser)
        )
        if source and state is None:
            distributed.print0(f"no checkpoint in {source}: training from scratch")
        return state, path

    def restore(self, state: TrainState, path: str) -> Start:
        """Load `state` (from `load`) into the live objects, the optimizer's only if there is one, and
        this rank's RNG states when the process count is the same. Returns the run's Start."""
        self._load_weights(state, path)
        if state.rng is not None and state.world_size == distributed.get_world_size():
            restore_rng(state.rng[distributed.get_rank()], self.device)
            if note := thread_note(state.rng[distributed.get_rank()], self.device, path):
                distributed.print0(note)
        elif state.rng is not None:
            distributed.print0(
                f"note: {path} was written by {state.world_size} processes, this run has "
                f"{distributed.get_world_size()}: training continues, but not bit-exactly as the original run would"
            )
        distributed.print0(f"resumed from {path}: epoch {state.start['epoch']}, step {state.start['step']}")
        self.log.newest = describe(path, state.start)
        return Start(state.start["epoch"], state.start["step"], state.epoch, os.path.abspath(path))

    def initialise(self, state: TrainState, source: str):
        """Load the weights of `state` (--init_from: weights only) into the model and every EMA (power
        EMAs too); the optimizer stays fresh and nothing of `source`'s run (epoch, RNG states)
        carries over."""
        self._load_weights(dataclasses.replace(state, optimizer=None), source)

    def _load_weights(self, state: TrainState, path: str):
        phema_sds = state.phemas or [state.model] * len(self.phemas)  # none in the state (--init_from): the model's
        if not sharding.is_sharded(self.denoiser):
            load_weights(state, path, self.denoiser, self.emas)
            for ema, state_dict in zip(self.phemas, phema_sds):
                load_module(ema, state_dict, path, state.args)
            if self.optimizer is not None and state.optimizer is not None:
                load_optimizer(self.optimizer, state.optimizer)
            return
        ema_sds = None if state.model is None else state.ema_states(len(self.emas)) + phema_sds  # None: not rank 0
        try:
            sharding.load_full_state(
                self.denoiser, self.emas + self.phemas, self.optimizer, state.model, ema_sds, state.optimizer
            )
        except RuntimeError as e:
            raise does_not_fit(path, state.args, e) from None
        if self.optimizer is not None:
            place_steps(self.optimizer)

    def save(self, epoch: int, next_step: int, steps_per_epoch: int, name: str = "last") -> bool:
        """Collective: every rank contributes its RNG state; rank 0 writes checkpoint-{name}.pth
        atomically, to continue at (epoch, next_step). A failed write is reported on one line and the
        previous checkpoint kept. Returns, on every rank, whether the file was written."""
        rngs = distributed.all_gather_object(capture_rng(self.device))
        n = len(self.emas)
        if sharding.is_sharded(self.denoiser):  # collective: gathered to full state dicts on rank 0
            model, averages, optimizer = sharding.full_state(self.denoiser, self.emas + self.phemas, self.optimizer)
        elif distributed.is_main_process():
            model, optimizer = self.denoiser.state_dict(), self.optimizer.state_dict()
            averages = [e.state_dict() for e in self.emas + self.phemas]
        written = None
        if distributed.is_main_process():
            done = next_step >= steps_per_epoch
            state = TrainState(
                model=model,
                emas=averages[:n],
                optimizer=optimizer,
                epoch=epoch if done else epoch - 1,
                args=self.args,
                start={"epoch": epoch + 1, "step": 0} if done else {"epoch": epoch, "step": next_step},
                rng=rngs,
                world_size=distributed.get_world_size(),
                phemas=averages[n:],
                phema_stds=[e.sigma_rel for e in self.phemas],
            )
            path = os.path.join(self.output_dir, f"checkpoint-{name}.pth")
            try:
                save(state, path)
            except files.WriteError as e:
                distributed.print0(f"error: {e}; the previous checkpoint is kept, training goes on")
            else:
                written = describe(path, state.start)
                distributed.print0(f"saved {written}")
        return self.log.note(name, distributed.broadcast_object(written))

    def unsaved_exit(self) -> int:
        """The end of a run whose final checkpoint could not be written: say what is on disk; status 1."""
        distributed.print0(
            "error: the final checkpoint of this run could not be written; "
            + (
                f"the newest readable checkpoint is {self.log.newest}"
                if self.log.newest
                else "no checkpoint of this run was written"
            )
        )
        return 1

    def check_free_space(self):
        """Say so before training when output_dir cannot hold a checkpoint and its temporary file."""
        need = 2 * estimated_size(self.denoiser, 1 + len(self.emas) + len(self.phemas))
        free = files.free_bytes(self.output_dir)
        if free < need:
            distributed.print0(
                f"warning: {self.output_dir} has {files.human_bytes(free)} free, but saving a checkpoint "
                f"({files.human_bytes(need // 2)}) next to the previous one needs {files.human_bytes(need)}: "
                "checkpoints may fail to be written"
            )


def check_objective(state: TrainState, path: str, pred: str, loss: str):
    """Training continues the objective the checkpoint was trained with: another --pred or --loss
    keeps every shape but changes what the weights mean (CheckpointError: exit 2). A reference
    checkpoint without them was trained with x-prediction and the v-loss."""
    for flag, ours, default in (("pred", pred, "x"), ("loss", loss, "v")):
        theirs = state.args.get(flag) or default
        if theirs != ours:
            raise CheckpointError(
                f"{path} was trained with --{flag} {theirs}, this run --{flag} {ours}: "
                f"resume with --{flag} {theirs} (or start a new run from its weights with --init_from)"
            )


def match_emas(
    state: TrainState, path: str, denoiser, emas: list, *, evaluate: bool, decay3: float | None, sampled: list[int]
):
    """The third EMA's policy when checkpoint `state` (read from `path`) and the run disagree:
    evaluation (`evaluate`) samples the checkpoint's EMA 3 (appended to `emas`, never updated);
    training starts a new EMA 3 from the loaded weights, or drops the checkpoint's (no `decay3`).
    CheckpointError for an EMA of `sampled` (1-based) the checkpoint does not hold."""
    if evaluate and len(state.emas) > len(emas):
        emas.append(EMA(denoiser, decay=decay3 or 0.0))
    elif not evaluate and len(state.emas) != len(emas):
        distributed.print0(
            f"note: {path} holds {len(state.emas)} EMAs, this run keeps {len(emas)}: "
            + (
                "EMA 3 starts from the loaded weights"
                if len(emas) > len(state.emas)
                else "its EMA 3 is dropped (pass --ema_decay3 to keep it)"
            )
        )
    if max(sampled) > len(emas):
        raise CheckpointError(
            f"--ema {max(sampled)}: {path} has no {EMA_KEYS[len(emas)]} "
            "(a third EMA is kept when training with --ema_decay3)"
        )
