"""Post-hoc EMA snapshot files (EDM2's reconstruct_phema.py side; the math is util/phema.py).

Snapshot files (`phema-{step}-{sigma_rel}.pth` in one folder) are torch.save'd plain dicts; see
write_snapshot. A training run (main_jit.py --phema_stds) writes them with SnapshotWriter;
reconstruct_ema.py and main_jit.py --evaluate_gen --phema read the snapshots of one run back
(usable_snapshots: a folder holding several runs' snapshots names them and asks which) and sum them
with the reconstruction weights (reconstruct, combine).
"""

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from util import checkpoint, distributed, files
from util.errors import BadValue, MissingFile
from util.phema import Fit, fit_target, gamma_from_sigma_rel, stds_text
from util.sharding import full_state_dict

SNAPSHOT_DTYPES = ("float32", "float16")  # names in util.checkpoint.DTYPES


SNAPSHOT_NAME = re.compile(r"phema-(\d+)-[^/]*\.pth$")


@dataclass(frozen=True)
class Snapshot:
    """What a snapshot file says about itself: the global optimiser step and images seen at which it
    was taken, the profile (σ_rel, γ), the stored dtype, and the run's last finished epoch."""

    path: str
    step: int
    images_seen: int
    sigma_rel: float
    gamma: float
    dtype: str
    epoch: int
    run: str | None = None  # the identity of the run that wrote it (run_identity; None: written before runs had one)


class SnapshotError(BadValue):
    """A snapshot file that cannot be read (bad input: exit status 2)."""


def snapshot_due(step: int, *, every: int, start: int, total: int) -> bool:
    """Whether the global optimiser step `step` (1-based: steps done) writes snapshots: every `every`
    steps from step `start` on, and always the run's last step `total`. A function of the step only,
    so a resumed run continues the series (a replayed step rewrites the same file)."""
    return step >= start and (step % every == 0 or step == total)


def default_schedule(total: int) -> tuple[int, int]:
    """(every, start) in optimiser steps when --phema_every / --phema_from are not given: every 1/300
    of the run over its last tenth (for 600 ImageNet epochs of 1251 steps: every 2 epochs from epoch
    540). σ_rel and the spacing are both fractions of the run, so the accuracy measured by
    bench/phema_accuracy.py holds at any run length `total` (steps)."""
    return max(1, total // 300), total - total // 10


def snapshot_count(*, every: int, start: int, total: int, after: int = 0) -> int:
    """How many steps in after + 1..total are snapshot_due (after: steps done already)."""
    first = max(start, after + 1, 1)
    if first > total:
        return 0
    return total // every - (first - 1) // every + (total % every != 0)


def cast_state(state_dict: dict, dtype: str, keep=()) -> dict:
    """The state dict with floating tensors cast to `dtype` ('float32' or 'float16'), except the
    entries named in `keep` (e.g. frozen parameters such as pos_embed, kept exact). ValueError if a
    value does not fit in float16."""
    target = checkpoint.DTYPES[dtype]
    out = {}
    for name, value in state_dict.items():
        if name in keep or not value.is_floating_point():
            out[name] = value
            continue
        if target == torch.float16 and value.numel() and value.abs().max() > torch.finfo(torch.float16).max:
            raise ValueError(f"{name} holds values beyond the float16 range: write snapshots in float32")
        out[name] = value.to(target)
    return out


def snapshot_file_bytes(state_dict: dict, dtype: str, keep=()) -> int:
    """Bytes of the tensors of one snapshot of `state_dict` (which may live on the meta device)."""
    size = checkpoint.DTYPES[dtype].itemsize
    return sum(
        v.numel() * (size if v.is_floating_point() and n not in keep else v.element_size())
        for n, v in state_dict.items()
    )


def snapshot_cost(
    file_bytes: int, profiles: int, *, every: int, start: int, total: int, after: int = 0
) -> tuple[int, int]:
    """(files, bytes) that a run writes after step `after`: `profiles` files of `file_bytes` at each
    snapshot step."""
    count = profiles * snapshot_count(every=every, start=start, total=total, after=after)
    return count, count * file_bytes


def frozen_names(module: nn.Module) -> set[str]:
    """Names of the parameters that do not train (kept exact in snapshots)."""
    return {n for n, p in module.named_parameters() if not p.requires_grad}


def snapshot_path(folder: str, step: int, sigma_rel: float) -> str:
    return os.path.join(folder, f"phema-{step:010d}-{sigma_rel:.6g}.pth")


def write_snapshot(
    folder: str,
    state_dict: dict,
    *,
    sigma_rel: float,
    step: int,
    images_seen: int,
    epoch: int,
    args: dict,
    dtype: str = "float32",
    keep=(),
) -> str:
    """Write one snapshot of a power EMA's full (unsharded) state dict to `folder` atomically; return
    its path. The file is a plain dict: `state_dict` (floating tensors in `dtype`, except `keep`),
    `sigma_rel`, `gamma`, `step` (global optimiser steps done), `images_seen`, `epoch` (last finished
    epoch), `dtype`, `args` (the run's flags, so that the model can be rebuilt from it alone), `run`
    (args["run_id"], the run's identity: a reconstruction uses the snapshots of one run).
    util.files.WriteError on a failed write (a full disk), as checkpoints."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:  # a file in its place, no permission: one line, as a failed write
        raise files.write_error(folder, e) from e
    payload = {
        "state_dict": cast_state(state_dict, dtype, keep),
        "sigma_rel": float(sigma_rel),
        "gamma": gamma_from_sigma_rel(sigma_rel),
        "step": int(step),
        "images_seen": int(images_seen),
        "epoch": int(epoch),
        "dtype": dtype,
        "args": dict(args),
        "run": args.get("run_id"),
    }
    path = snapshot_path(folder, step, sigma_rel)
    checkpoint.save_atomic(payload, path)
    return path


def _load(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, garbage bytes
        raise SnapshotError(f"cannot read snapshot {path}: {type(e).__name__}: {e}") from e


def read_snapshot(path: str) -> tuple[Snapshot, dict]:
    """(Snapshot, the whole file dict). Tensors are memory-mapped, so reading only the header is cheap."""
    data = _load(path)
    try:
        info = Snapshot(
            path=path,
            step=data["step"],
            images_seen=data["images_seen"],
            sigma_rel=data["sigma_rel"],
            gamma=data["gamma"],
            dtype=data["dtype"],
            epoch=data["epoch"],
            run=data.get("run"),
        )
    except (KeyError, TypeError) as e:
        raise SnapshotError(f"{path} is not a post-hoc EMA snapshot (no {e})") from None
    return info, data


def list_snapshots(folder: str) -> list[Snapshot]:
    """The snapshots in `folder`, sorted by step, then σ_rel. SnapshotError for an unreadable one."""
    paths = [p for p in glob.glob(os.path.join(folder, "phema-*.pth")) if SNAPSHOT_NAME.search(p)]
    return sorted((read_snapshot(p)[0] for p in paths), key=lambda s: (s.step, s.sigma_rel))


def run_identity(args: dict) -> str:
    """A run's identity, made when it starts (a resumed run keeps its checkpoint's): a digest of its
    settings, so that the same command in the same folder is the same run (its snapshots byte for
    byte), while a run of other settings left in the folder is another."""
    text = json.dumps({k: v for k, v in args.items() if k != "run_id"}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_name(run: str | None) -> str:
    """How a run is named in messages and picked by --phema_run / --run: its identity, or "unnamed"
    for snapshots written before runs had one."""
    return run or "unnamed"


def describe_runs(groups: dict) -> str:
    """'run 0123abcd (12 snapshots, steps 100-1200), run ffee0011 (1 snapshot, step 1300)', by first step."""
    parts = []
    for run, snaps in sorted(groups.items(), key=lambda kv: kv[1][0].step):
        steps = sorted({s.step for s in snaps})
        span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
        parts.append(f"run {run_name(run)} ({len(snaps)} snapshot{'s' if len(snaps) > 1 else ''}, {span})")
    return ", ".join(parts)


def one_run(found: list[Snapshot], folder: str, run: str | None = None, flag: str = "--phema_run") -> list[Snapshot]:
    """The snapshots of one run (they record the run that wrote them, run_identity). With `run` (a
    run's name or a unique prefix of it), that run's; without, the folder must hold one run only: a
    folder with several (a stray file of another run copied in, an earlier run in the same output
    folder) is a BadValue listing each run (snapshot count, step range) and how to pick one with
    `flag`. Taking the newest file's run would let one foreign file replace a whole run."""
    groups = {}
    for s in found:
        groups.setdefault(s.run, []).append(s)
    if run is not None:
        matches = [r for r in groups if run and run_name(r).startswith(run)]  # "": no run (each would match)
        if len(matches) != 1:
            which = "no run" if not matches else f"{len(matches)} runs"
            raise BadValue(f"{flag} {run}: {which} of {folder} match; it holds {describe_runs(groups)}")
        return groups[matches[0]]
    if len(groups) > 1:
        raise BadValue(
            f"{folder} holds the snapshots of {len(groups)} runs: {describe_runs(groups)}; pick one with {flag} RUN, "
            "or move the other run's files out of the folder"
        )
    return found


def usable_snapshots(
    folder: str, at: int | None = None, run: str | None = None, flag: str = "--phema_run"
) -> list[Snapshot]:
    """The snapshots of one run in `folder` (one_run: `run`, or the folder's only run) at or before
    global step `at` (default: all), sorted as list_snapshots; MissingFile or BadValue (one line)
    when there are none or the folder holds several runs and none is picked (`flag` names the option)."""
    if not os.path.isdir(folder):
        raise MissingFile(f"{folder}: no such folder of snapshots")
    try:
        found = list_snapshots(folder)
    except SnapshotError as e:
        raise BadValue(str(e)) from None
    if not found:
        raise BadValue(f"{folder}: no phema-*.pth snapshots (train with --phema_stds)")
    found = one_run(found, folder, run, flag)
    used = [s for s in found if at is None or s.step <= at]
    if not used:
        raise BadValue(f"{folder}: no snapshot at or before step {at} (the first is at step {found[0].step})")
    return used


@dataclass
class SnapshotWriter:
    """A training run's snapshots: at each global optimiser step that snapshot_due says (every
    `every` steps from `start` on, and the run's last step `total`), one file per tracked profile in
    `folder` (write_snapshot), from the full weights: gathered to rank 0 under FSDP, rank 0 writes,
    every rank waits. A file that cannot be written (a full disk) is reported on one line and
    counted in `failed`; training goes on, the series then has a gap."""

    folder: str
    emas: list  # PowerEMA (its module sharded under FSDP)
    every: int
    start: int
    total: int
    steps_per_epoch: int
    dtype: str  # of the stored weights, one of SNAPSHOT_DTYPES
    args: dict  # the run's flags, stored in every file
    keep: frozenset = frozenset()  # names of the frozen parameters, stored exactly
    failed: int = 0

    def __call__(self, step: int, images_seen: int):
        """Collective. Write the snapshots due at global step `step` (1-based: steps done), taken
        after its optimiser step, `images_seen` images into the run."""
        if not snapshot_due(step, every=self.every, start=self.start, total=self.total):
            return
        for ema in self.emas:
            state = full_state_dict(ema.module)  # None on ranks > 0
            if state is None:
                continue
            try:
                write_snapshot(
                    self.folder,
                    state,
                    sigma_rel=ema.sigma_rel,
                    step=step,
                    images_seen=images_seen,
                    epoch=step // self.steps_per_epoch - 1,
                    args=self.args,
                    dtype=self.dtype,
                    keep=self.keep,
                )
            except (files.WriteError, ValueError) as e:  # a full disk; weights beyond the float16 range
                self.failed += 1
                distributed.print0(
                    f"error: post-hoc EMA snapshot σ_rel {ema.sigma_rel:g} at step {step} not written: {e}; "
                    "training goes on"
                )
        distributed.print0(f"post-hoc EMA snapshots at step {step} ({images_seen} images) -> {self.folder}")
        distributed.barrier()

    def plan(self, done: int) -> list[str]:
        """Lines for the log before training, `done` global steps into the run: the files and bytes
        the whole run writes, and a warning when the disk has less free than those still to write."""
        one = snapshot_file_bytes(
            self.emas[0].module.state_dict(), self.dtype, self.keep
        )  # full shapes, also of DTensors
        schedule = dict(every=self.every, start=self.start, total=self.total)
        count, size = snapshot_cost(one, len(self.emas), **schedule)
        left, need = snapshot_cost(one, len(self.emas), **schedule, after=done)
        lines = [
            f"post-hoc EMA: σ_rel {stds_text(e.sigma_rel for e in self.emas)}; snapshots every {self.every} steps "
            f"from step {self.start} and at the last ({self.total}): {count} files of {files.human_bytes(one)} "
            f"({self.dtype}), {files.human_bytes(size)} in {self.folder}" + (f", {left} still to write" if done else "")
        ]
        free = files.free_bytes(self.folder)
        if free < need:
            lines.append(
                f"warning: {self.folder} has {files.human_bytes(free)} free, but the snapshots still to write need "
                f"{files.human_bytes(need)}: some will fail to be written (--phema_every, --phema_dtype float16)"
            )
        return lines


@torch.no_grad()
def combine(snapshots: list[Snapshot], weights: np.ndarray, accum: torch.dtype = torch.float64) -> list[dict]:
    """For each column k of weights (S, K): Σ_i weights[i, k] · snapshot i's state dict, accumulated in
    `accum` and returned in float32. Snapshots are read one at a time (memory-mapped), each once;
    those whose weights are all 0 are not read. Non-floating entries come from the last one read."""
    weights = np.asarray(weights, dtype=np.float64).reshape(len(snapshots), -1)
    sums = [{} for _ in range(weights.shape[1])]
    for snap, row in zip(snapshots, weights):
        if not row.any():
            continue
        state = read_snapshot(snap.path)[1]["state_dict"]
        for out, w in zip(sums, row):
            for name, value in state.items():
                if not value.is_floating_point():
                    out[name] = value.clone()
                elif name in out:
                    out[name].add_(value.to(accum), alpha=float(w))
                else:  # a new tensor: .to() returns the snapshot's own when the dtype already matches
                    out[name] = torch.mul(value.to(accum), float(w))
    return [{n: v.to(torch.float32) if v.is_floating_point() else v for n, v in out.items()} for out in sums]


def images_per_step(snapshots: list[Snapshot]) -> int:
    """The global batch, the same for every snapshot (images_seen = step · batch), or BadValue."""
    batches = {s.images_seen // s.step for s in snapshots if s.images_seen % s.step == 0}
    if len(batches) != 1 or any(s.images_seen % s.step for s in snapshots):
        raise BadValue(
            "the snapshots do not share one global batch (images seen / step): "
            "a decay target and a step between snapshots need a constant batch"
        )
    return batches.pop()


def reconstruction_point(
    snapshots: list[Snapshot], at: int | None = None, need_batch: bool = False
) -> tuple[int, int, int | None]:
    """(global step, images seen, global batch or None) to reconstruct at from `snapshots` (at or
    before it): step `at`, default the newest snapshot's. Between snapshots the images seen are
    at · batch, which needs one constant batch (images_per_step, also found when `need_batch`)."""
    newest = snapshots[-1]
    at = newest.step if at is None else at
    batch = images_per_step(snapshots) if need_batch or at != newest.step else None
    return at, newest.images_seen if at == newest.step else at * batch, batch


def reconstruct(
    snapshots: list[Snapshot],
    targets: list[tuple[str, float]],
    end_images: int,
    batch: int | None,
    accum: torch.dtype = torch.float64,
) -> tuple[list[Fit], list[dict]]:
    """(fits, float32 state dicts) of the targets (see fit_target), in one pass over the snapshots."""
    fits = [fit_target(t, snapshots, end_images, batch) for t in targets]
    return fits, combine(snapshots, np.stack([f.weights for f in fits], axis=1), accum)
