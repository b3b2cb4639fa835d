"""Checkpoint files: the format (one symmetric pair: TrainState <-> dict), atomic writes, safe
loading (reference files included), resume lookup, RNG state.

Layout (the reference's keys, plus ours): `model`, `model_ema1`, `model_ema2` (full state dicts of
the denoiser, keys `net.*`), `optimizer`, `epoch` (last finished epoch), `args` (a plain dict; the
reference stored an argparse.Namespace, which loads too), and for exact resume `resume`
({'epoch', 'step'} to continue from), `rng` (one entry per rank), `world_size`; `model_ema3` when
a third EMA is kept (--ema_decay3; the reference ignores the key).
"""
import argparse
import glob
import os
import random
import re
from dataclasses import dataclass

import numpy as np
import torch

from util import files

LAST = "checkpoint-last.pth"
EMA_KEYS = ("model_ema1", "model_ema2", "model_ema3")  # EMA i + 1 (decay --ema_decay{i+1}); the third is optional


class CheckpointError(RuntimeError):
    pass


@dataclass
class TrainState:
    """What a checkpoint holds. model / emas / optimizer: state dicts (optimizer None: weights only);
    epoch: the last finished epoch of these weights (-1: none); resume: {'epoch', 'step'} to continue
    from; rng: every rank's RNG states and world_size: their number (None in reference files)."""

    model: dict
    emas: list
    optimizer: dict | None
    epoch: int
    args: dict
    resume: dict
    rng: list | None = None
    world_size: int | None = None

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
            raise CheckpointError(f"the checkpoint has no {EMA_KEYS[k - 1] if k <= len(EMA_KEYS) else which} "
                                  f"(it holds EMAs 1..{len(self.emas)}; a third one is kept when training with --ema_decay3)")
        return self.emas[k - 1]


def to_dict(state: TrainState) -> dict:
    """The file's dict: the reference's keys, plus resume, rng and world_size."""
    return {"model": state.model, **dict(zip(EMA_KEYS, state.emas)), "optimizer": state.optimizer,
            "epoch": state.epoch, "args": state.args, "resume": state.resume, "rng": state.rng,
            "world_size": state.world_size}


def from_dict(ckpt: dict) -> TrainState:
    """Inverse of to_dict; also reads the reference's files (args as a Namespace, no resume point:
    continue at the epoch after `epoch`). A missing EMA 1 or 2 falls back to `model`."""
    args = ckpt.get("args") or {}
    epoch = ckpt.get("epoch", -1)
    emas = [ckpt.get(k, ckpt["model"]) for k in EMA_KEYS[:2]] + ([ckpt[EMA_KEYS[2]]] if EMA_KEYS[2] in ckpt else [])
    return TrainState(
        model=ckpt["model"], emas=emas, optimizer=ckpt.get("optimizer"),
        epoch=epoch, args=vars(args) if isinstance(args, argparse.Namespace) else dict(args),
        resume=ckpt.get("resume") or {"epoch": epoch + 1, "step": 0}, rng=ckpt.get("rng"),
        world_size=ckpt.get("world_size"),
    )


def summary(args: dict) -> str:
    """The flags that decide a network's shape, as given when the checkpoint was made."""
    return ", ".join(f"--{k} {args[k]}" for k in ("model", "img_size", "class_num") if k in args) or "unknown flags"


def does_not_fit(path: str, args: dict, error: Exception) -> CheckpointError:
    """The error for a checkpoint of another shape, naming the flags it was made with (`args`) and
    the start of load_state_dict's message."""
    first = " ".join(str(error).strip().splitlines()[:2])[:300]
    return CheckpointError(f"{path} does not fit this model (check --model, --img_size, --class_num; the checkpoint "
                           f"was made with {summary(args)}): {first}")


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
    """
    optimizer.load_state_dict(state_dict)
    for group in optimizer.param_groups:
        group.update(fused=True, foreach=None)
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


def estimated_size(denoiser) -> int:
    """Bytes of a checkpoint of `denoiser`: its state three times (weights, two EMAs) and two AdamW
    moments per trainable parameter."""
    trainable = sum(p.numel() * p.element_size() for p in denoiser.parameters() if p.requires_grad)
    return 3 * tensor_bytes(denoiser.state_dict()) + 2 * trainable


def save_atomic(obj, path: str):
    """torch.save to `path` so that a crash at any moment leaves the old file intact (see
    util.files.atomic_write). A failed write (a full disk, ...) raises util.files.WriteError, whose
    one-line message names the file, the bytes needed and the bytes free; no temporary file is left."""
    files.atomic_write(path, lambda f: torch.save(obj, f), needed=tensor_bytes(obj))


def save(state: TrainState, path: str):
    save_atomic(to_dict(state), path)


def remove_stale_temporaries(folder: str):
    """Delete temporary files left by a save that was killed (they are never read)."""
    for tmp in glob.glob(os.path.join(folder, ".checkpoint-*.pth.tmp-*")):
        os.remove(tmp)


def load(path: str) -> TrainState:
    """Load a checkpoint with weights_only=True. Raises CheckpointError naming the file if it is
    missing, truncated or not a checkpoint."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, unpickling refused
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a JiT checkpoint (no 'model' entry)")
    return from_dict(ckpt)


def candidates(folder: str) -> list[str]:
    """Checkpoints in `folder`, newest first (by modification time, then epoch number)."""
    paths = [p for p in glob.glob(os.path.join(folder, "checkpoint-*.pth")) if re.search(r"checkpoint-(last|\d+)\.pth$", p)]

    def key(p):
        m = re.search(r"checkpoint-(\d+)\.pth$", p)
        return os.path.getmtime(p), int(m.group(1)) if m else float("inf")

    return sorted(paths, key=key, reverse=True)


def load_for_resume(resume: str, log=print):
    """Resolve `--resume` and load it. Returns (TrainState, path) or (None, None).

    A file is loaded as is (a bad file is an error). A folder is searched for checkpoints, newest
    first; an unreadable one is reported and the next one tried; none at all means training from
    scratch. A path that does not exist is an error.
    """
    if not resume:
        return None, None
    if not os.path.exists(resume):
        raise CheckpointError(f"--resume {resume}: no such file or folder")
    if os.path.isfile(resume):
        return load(resume), resume
    found = candidates(resume)
    for i, path in enumerate(found):
        try:
            state = load(path)
        except CheckpointError as e:
            log(f"warning: {e}; trying an older checkpoint")
            continue
        if i > 0:
            log(f"warning: resuming from the older checkpoint {path}")
        return state, path
    if found:
        raise CheckpointError(f"--resume {resume}: none of its {len(found)} checkpoints can be read")
    log(f"no checkpoint in {resume}: training from scratch")
    return None, None


def capture_rng(device: torch.device) -> dict:
    """This process's RNG states: torch CPU (and the current CUDA device), numpy, python."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),  # loadable with weights_only
        "python": random.getstate(),
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
