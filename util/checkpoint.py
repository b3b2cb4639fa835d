"""Checkpoint files: atomic writes, safe loading (reference files included), resume lookup, RNG state.

Layout (the reference's keys, plus ours): `model`, `model_ema1`, `model_ema2` (full state dicts of
the denoiser, keys `net.*`), `optimizer`, `epoch` (last finished epoch), `args` (a plain dict; the
reference stored an argparse.Namespace, which loads too), and for exact resume `resume`
({'epoch', 'step'} to continue from), `rng` (one entry per rank), `world_size`.
"""
import argparse
import glob
import os
import random
import re

import numpy as np
import torch

LAST = "checkpoint-last.pth"


class CheckpointError(RuntimeError):
    pass


def save_atomic(obj, path: str):
    """torch.save to `path` so that a crash at any moment leaves the old file intact.

    Writes a temporary file in the same folder, flushes and fsyncs it, renames it over `path`,
    then fsyncs the folder. On failure the temporary file is removed and the error re-raised.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(folder: str):
    """Delete temporary files left by a save that was killed (they are never read)."""
    for tmp in glob.glob(os.path.join(folder, ".checkpoint-*.pth.tmp-*")):
        os.remove(tmp)


def load(path: str) -> dict:
    """Load a checkpoint with weights_only=True; `args` comes back as a dict. Raises
    CheckpointError naming the file if it is missing, truncated or not a checkpoint."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, unpickling refused
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a JiT checkpoint (no 'model' entry)")
    if isinstance(ckpt.get("args"), argparse.Namespace):
        ckpt["args"] = vars(ckpt["args"])
    return ckpt


def candidates(folder: str) -> list[str]:
    """Checkpoints in `folder`, newest first (by modification time, then epoch number)."""
    paths = [p for p in glob.glob(os.path.join(folder, "checkpoint-*.pth")) if re.search(r"checkpoint-(last|\d+)\.pth$", p)]

    def key(p):
        m = re.search(r"checkpoint-(\d+)\.pth$", p)
        return os.path.getmtime(p), int(m.group(1)) if m else float("inf")

    return sorted(paths, key=key, reverse=True)


def load_for_resume(resume: str, log=print):
    """Resolve `--resume` and load it. Returns (checkpoint dict, path) or (None, None).

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
            ckpt = load(path)
        except CheckpointError as e:
            log(f"warning: {e}; trying an older checkpoint")
            continue
        if i > 0:
            log(f"warning: resuming from the older checkpoint {path}")
        return ckpt, path
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
