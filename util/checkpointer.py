"""A run's checkpoints (`Checkpointer`: load and restore at the start, save during the run), where it
starts (`Start`), what its saves came to (`SaveLog`), every rank's RNG states, and the policies when
a checkpoint and the run disagree (`check_objective`, `match_emas`). The forms on disk and the reader
are util/checkpoint.py (a single file) and util/checkpoint_dcp.py (a sharded folder)."""

import os
import random
from dataclasses import dataclass, replace

import numpy as np
import torch

from util import checkpoint_dcp, distributed, files, sharding
from util.checkpoint import (
    EMA_KEYS,
    CheckpointError,
    TrainState,
    does_not_fit,
    estimated_size,
    load_checkpoint,
    load_module,
    load_optimizer,
    load_weights,
    place_steps,
    save,
    tensor_bytes,
)
from util.ema import EMA


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


def describe_start(path: str, start: dict) -> str:
    return f"{path} (resume at epoch {start['epoch']}, step {start['step']})"


@dataclass
class Start:
    """Where a run starts. epoch, step: the position to continue from; weights_epoch: the last
    finished epoch of the loaded weights (-1: none); path: the checkpoint (None: none)."""

    epoch: int
    step: int = 0
    weights_epoch: int = -1
    path: str | None = None


@dataclass
class SaveLog:
    """What the checkpoint writes of a run came to. newest: the newest readable checkpoint and what
    it holds; at: its start position ({'epoch', 'step'}; None: none); last_ok: whether the latest
    checkpoint-last write succeeded; failed: writes that did not."""

    newest: str | None = None
    at: dict | None = None
    last_ok: bool = True
    failed: int = 0

    def note(self, name: str, written: str | None, start: dict) -> bool:
        """Record the outcome of writing checkpoint-{name} to continue at `start` (`written`: its
        description, None if it failed); returns whether it was written."""
        self.failed += written is None
        if name == "last":
            self.last_ok = written is not None
        if written:
            self.newest, self.at = written, start
        return written is not None


def next_start(epoch: int, next_step: int, steps_per_epoch: int) -> tuple[int, dict]:
    """(the last finished epoch of the weights, the start position) of a save during `epoch` before
    step `next_step` (0-based; steps_per_epoch: the epoch is done)."""
    if next_step >= steps_per_epoch:
        return epoch, {"epoch": epoch + 1, "step": 0}
    return epoch - 1, {"epoch": epoch, "step": next_step}


class Checkpointer:
    """A run's checkpoints in `output_dir`: `load` + `restore` at the start, `save` during the run.

    Holds the live denoiser, its EMAs (the list itself: an EMA added to it is saved too), the
    optimizer (None: weights only), the run's settings `args` (a plain dict, stored in every
    checkpoint), the device (for RNG states) and the power EMAs `phemas` (util.ema.PowerEMA, ascending
    σ_rel). An unsharded run's rank 0 writes checkpoint-NAME.pth; a sharded (FSDP) run writes
    checkpoint-NAME.dcp, every rank its own shards (util.checkpoint_dcp). Both forms restore into
    either kind of run, a sharded folder at any world size. `log` notes every write.
    """

    def __init__(self, output_dir: str, device: torch.device, denoiser, emas: list, optimizer, args: dict, phemas=()):
        self.output_dir, self.device = output_dir, device
        self.denoiser, self.emas, self.optimizer, self.args = denoiser, emas, optimizer, args
        self.phemas = list(phemas)
        self.log = SaveLog()

    @property
    def sharded(self) -> bool:
        return sharding.is_sharded(self.denoiser)

    def load(self, source: str):
        """Collective. (TrainState, path) of --resume `source`, or (None, None) when it names nothing
        to resume (load_checkpoint): rank 0 chooses, every rank resumes from the same checkpoint.
        Sharded from a file: rank 0 alone reads it, the other ranks get the state without its tensors
        (rank 0 broadcasts them in `restore`)."""
        state, path = load_checkpoint(
            source, log=distributed.print0, required=False, main_only=self.sharded, collective=True
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
        self.log.newest, self.log.at = describe_start(path, state.start), dict(state.start)
        return Start(state.start["epoch"], state.start["step"], state.epoch, os.path.abspath(path))

    def initialise(self, state: TrainState, source: str):
        """Load the weights of `state` (--init_from: weights only) into the model and every EMA (power
        EMAs too); the optimizer stays fresh and nothing of `source`'s run (epoch, RNG states)
        carries over."""
        self._load_weights(replace(state, optimizer=None), source)

    def _load_weights(self, state: TrainState, path: str):
        phema_sds = state.phemas or [state.model] * len(self.phemas)  # none in the state (--init_from): the model's
        if not self.sharded:
            load_weights(state, path, self.denoiser, self.emas)
            for ema, state_dict in zip(self.phemas, phema_sds):
                load_module(ema, state_dict, path, state.args)
            if self.optimizer is not None and state.optimizer is not None:
                load_optimizer(self.optimizer, state.optimizer)
                checkpoint_dcp.release_shards(state.optimizer)
            return
        averages = self.emas + self.phemas
        try:
            if state.folder is not None:  # every rank reads its own shards
                sds = state.ema_states(len(self.emas)) + phema_sds
                sources = [(self.denoiser, state.model.part)] + [(a.module, sd.part) for a, sd in zip(averages, sds)]
                has_optim = self.optimizer is not None and state.optimizer is not None
                steps = (state.optimizer.groups, state.optimizer.steps) if has_optim else None
                sharding.load_sharded(state.folder, self.denoiser, sources, self.optimizer, steps)
            else:  # rank 0 broadcasts each tensor
                ema_sds = None if state.model is None else state.ema_states(len(self.emas)) + phema_sds
                sharding.load_full_state(self.denoiser, averages, self.optimizer, state.model, ema_sds, state.optimizer)
        except RuntimeError as e:
            if distributed.is_collective_failure(e):  # a peer gone: a failed run (main_jit.cli), not bad input
                raise
            raise does_not_fit(path, state.args, e) from None
        except OSError as e:  # a sharded folder some rank cannot read
            raise CheckpointError(str(e)) from None
        if self.optimizer is not None:
            place_steps(self.optimizer)

    def save(self, epoch: int, next_step: int, steps_per_epoch: int, name: str = "last") -> bool:
        """Collective: every rank contributes its RNG state; checkpoint-{name} is written atomically
        (rank 0 a file, or every rank its shards of a folder), to continue at (epoch, next_step). A
        failed write is reported on one line and the previous checkpoint kept. Returns, on every rank,
        whether it was written."""
        weights_epoch, start = next_start(epoch, next_step, steps_per_epoch)
        meta = dict(
            epoch=weights_epoch,
            args=self.args,
            resume=start,
            rng=distributed.all_gather_object(capture_rng(self.device)),
            world_size=distributed.get_world_size(),
            phema_stds=[e.sigma_rel for e in self.phemas],
        )
        write = self._save_sharded if self.sharded else self._save_file
        written = write(os.path.join(self.output_dir, f"checkpoint-{name}"), meta)
        return self.log.note(name, distributed.broadcast_object(written), start)

    def _save_file(self, stem: str, meta: dict) -> str | None:
        """Rank 0 writes stem.pth (the reference's form); returns its description (None: failed, or not rank 0)."""
        n = len(self.emas)
        if not distributed.is_main_process():
            return None
        averages = [e.state_dict() for e in self.emas + self.phemas]
        state = TrainState(
            model=self.denoiser.state_dict(),
            emas=averages[:n],
            optimizer=self.optimizer.state_dict(),
            epoch=meta["epoch"],
            args=meta["args"],
            start=meta["resume"],
            rng=meta["rng"],
            world_size=meta["world_size"],
            phemas=averages[n:],
            phema_stds=meta["phema_stds"],
        )
        return _reported(stem + ".pth", meta["resume"], lambda path: save(state, path))

    def _save_sharded(self, stem: str, meta: dict) -> str | None:
        """Every rank writes its shards of stem.dcp (checkpoint_dcp.write_folder); returns its description
        (None: failed)."""
        parts = {("model",): self.denoiser, **{(EMA_KEYS[i],): e.module for i, e in enumerate(self.emas)}}
        parts.update({("model_phema", str(j)): p.module for j, p in enumerate(self.phemas)})
        tensors, groups, steps = sharding.sharded_state(self.denoiser, parts, self.optimizer)
        names = [p[0] for p in parts if len(p) == 1] + (["model_phema"] if self.phemas else [])
        rest = dict(meta, param_groups=groups, steps=steps, parts=names, order=list(tensors["model"]))
        needed = tensor_bytes(tensors)  # DTensors count their full size
        return _reported(
            stem + checkpoint_dcp.SUFFIX,
            meta["resume"],
            lambda path: checkpoint_dcp.write_folder(path, tensors, rest, needed=needed),
        )

    def is_saved(self, epoch: int, next_step: int, steps_per_epoch: int) -> bool:
        """Whether the newest checkpoint (written by this run or resumed from) continues at (epoch, next_step)."""
        return self.log.at == next_start(epoch, next_step, steps_per_epoch)[1]

    def unsaved_exit(self, stopped: bool = False) -> int:
        """The end of a run whose final checkpoint could not be written: say what is on disk. Status 1;
        after a stop by signal (`stopped`) under torchrun with restarts left, 0: a stop is final, and
        any other status would make torchrun start the workers again in a job that is ending."""
        distributed.print0(
            "error: the final checkpoint of this run could not be written; "
            + (
                f"the newest readable checkpoint is {self.log.newest}"
                if self.log.newest
                else "no checkpoint of this run was written"
            )
        )
        attempt = distributed.elastic_attempt()
        if stopped and attempt is not None and attempt[0] < attempt[1]:
            distributed.print0("exit status 0 after the stop (a signal), so that torchrun does not restart the run")
            return 0
        return 1

    def check_free_space(self):
        """Say so before training when output_dir cannot hold a checkpoint and its temporary copy."""
        need = 2 * estimated_size(self.denoiser, 1 + len(self.emas) + len(self.phemas))
        free = files.free_bytes(self.output_dir)
        if free < need:
            distributed.print0(
                f"warning: {self.output_dir} has {files.human_bytes(free)} free, but saving a checkpoint "
                f"({files.human_bytes(need // 2)}) next to the previous one needs {files.human_bytes(need)}: "
                "checkpoints may fail to be written"
            )


def _reported(path: str, start: dict, write) -> str | None:
    """write(path); prints 'saved ...' or the one-line error (the previous checkpoint is kept).
    Returns the checkpoint's description, None if the write failed."""
    try:
        write(path)
    except files.WriteError as e:
        distributed.print0(f"error: {e}; the previous checkpoint is kept, training goes on")
        return None
    written = describe_start(path, start)
    distributed.print0(f"saved {written}")
    return written


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
