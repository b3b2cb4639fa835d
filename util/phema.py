"""Post-hoc EMA (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models",
CVPR 2024, §3 and App. C.2): track power-function EMAs during training, write snapshots of them, and
after training reconstruct the EMA of another length as a linear combination of the snapshots.

Time is counted in images seen, t. The weights after the optimiser step that brings t from t' to t
stand for the interval (t', t], so the training trajectory θ(τ) is piecewise constant. A snapshot
taken at t_i of a power-function EMA with exponent γ averages it with the profile

    p_i(τ) = (γ + 1) / t_i · (τ / t_i)^γ   for 0 < τ ≤ t_i, 0 after                   (EDM2 eq. 121)

and the per-step update of PowerEMA realises that average exactly, for any sequence of batch sizes.
An EMA of another length (another power profile, or a classic per-step decay) is reconstructed by
the weights x that make Σ x_i p_i closest to its profile in L2 over τ (a least-squares problem whose
Gram matrix has a closed form), normalised to sum to 1.

Snapshot files (`phema-{step}-{sigma_rel}.pth` in one folder) are torch.save'd plain dicts; see
write_snapshot. A training run (main_jit.py --phema_stds) writes them with SnapshotWriter;
reconstruct_ema.py and main_jit.py --evaluate_gen --phema read them back (usable_snapshots, reconstruct).
"""
import copy
import glob
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from util import checkpoint, files, sharding
from util import distributed
from util.errors import BadValue, MissingFile
from util.sharding import full_state_dict, local_tensors

SIGMA_REL_MAX = 1 / math.sqrt(12)  # γ = 0, the plain average over the whole run
SNAPSHOT_DTYPES = ("float32", "float16")  # names in util.checkpoint.DTYPES
SNAPSHOT_NAME = re.compile(r"phema-(\d+)-[^/]*\.pth$")
POOR_FIT = 0.01  # profile-space fit error above which the snapshots do not cover a target well


# Profiles: exponent, relative standard deviation, per-step weight.

def sigma_rel_from_gamma(gamma: float) -> float:
    """Relative standard deviation of the power profile with exponent γ (its standard deviation over
    its end time): σ_rel = sqrt((γ + 1) / ((γ + 2)² (γ + 3))) (EDM2 eq. 123)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent γ > 0 of the power profile of relative standard deviation σ_rel: the largest real
    root of γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) = 0 (EDM2 eq. 126, Alg. 2), polished by Newton steps.
    ValueError unless 0 < σ_rel < 1/√12 ≈ 0.2887."""
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}) (a power profile with exponent > 0), got {sigma_rel}")
    s = sigma_rel ** -2
    coefficients = (1.0, 7.0, 16.0 - s, 12.0 - s)
    gamma = max(r.real for r in np.roots(coefficients) if abs(r.imag) <= 1e-6 * abs(r))
    for _ in range(3):
        value = ((gamma + 7.0) * gamma + 16.0 - s) * gamma + 12.0 - s
        slope = (3.0 * gamma + 14.0) * gamma + 16.0 - s
        gamma -= value / slope
    return float(gamma)


def power_ema_weight(images_seen: int, batch: int, gamma: float) -> float:
    """The lerp weight of the new weights, 1 − β with β = (1 − Δ/t)^(γ + 1) (EDM2 eq. 127), where t is
    the images seen including this step's batch of Δ images (0 < Δ ≤ t). It is 1 on the first step."""
    if not 0 < batch <= images_seen:
        raise ValueError(f"need 0 < batch <= images_seen, got batch {batch}, images_seen {images_seen}")
    if batch == images_seen:
        return 1.0
    return -math.expm1((gamma + 1) * math.log1p(-batch / images_seen))


# Tracking during training.

@torch.no_grad()
def lerp_together_(targets: list[list[torch.Tensor]], source: list[torch.Tensor], weights: list[float]):
    """targets[e][j] ← lerp(targets[e][j], source[j], weights[e]) for every EMA e and tensor j, in one
    fused `_foreach_lerp_` (one weight per tensor; weights computed on the host, no device sync). A
    classic EMA joins with the weight 1 − decay."""
    flat = [t for ts in targets for t in ts]
    per_tensor = [float(w) for ts, w in zip(targets, weights) for _ in ts]
    torch._foreach_lerp_(flat, list(source) * len(targets), per_tensor)


class PowerEMA:
    """Power-function EMA of all parameters of a module, with relative standard deviation `sigma_rel`.

    The interface of denoiser.EMA and util.sharding.ShardedEMA (`module`, a frozen copy that
    samples directly; `tensors`, `weight`, `state_dict`, `load_state_dict`), but `update` and
    `weight` take the images seen. sharded: build it from the unsharded model before that is
    sharded; the copy shards itself at once with the live model's plan (util.sharding.shard), as
    ShardedEMA does, so that building P power EMAs never holds more than one extra full copy;
    update() then lerps this rank's local shards only.
    """

    def __init__(self, model: nn.Module, sigma_rel: float, *, sharded: bool = False, mixed_precision: bool = False):
        self.sigma_rel = float(sigma_rel)
        self.gamma = gamma_from_sigma_rel(self.sigma_rel)
        if sharded and sharding.is_sharded(model):
            raise ValueError("a sharded PowerEMA copies the unsharded model: build it before sharding the model")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        if sharded:
            sharding.shard(self.module, mixed_precision=mixed_precision)

    def weight(self, images_seen: int, batch: int) -> float:
        """The lerp weight of the step that ends at `images_seen` with a global batch of `batch`."""
        return power_ema_weight(images_seen, batch, self.gamma)

    def tensors(self) -> list[torch.Tensor]:
        """The tensors update() writes: this rank's (shard of each) parameter."""
        return local_tensors(self.module.parameters())

    @torch.no_grad()
    def update(self, model: nn.Module, images_seen: int, batch: int):
        """One step towards `model`'s parameters, after the optimiser step that brought the images seen
        to `images_seen` with a global batch of `batch` images."""
        lerp_together_([self.tensors()], local_tensors(model.parameters()), [self.weight(images_seen, batch)])

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state_dict):
        self.module.load_state_dict(state_dict)


# Snapshot files.

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
    return sum(v.numel() * (size if v.is_floating_point() and n not in keep else v.element_size())
               for n, v in state_dict.items())


def snapshot_cost(file_bytes: int, profiles: int, *, every: int, start: int, total: int, after: int = 0) -> tuple[int, int]:
    """(files, bytes) that a run writes after step `after`: `profiles` files of `file_bytes` at each
    snapshot step."""
    count = profiles * snapshot_count(every=every, start=start, total=total, after=after)
    return count, count * file_bytes


def frozen_names(module: nn.Module) -> set[str]:
    """Names of the parameters that do not train (kept exact in snapshots)."""
    return {n for n, p in module.named_parameters() if not p.requires_grad}


def snapshot_path(folder: str, step: int, sigma_rel: float) -> str:
    return os.path.join(folder, f"phema-{step:010d}-{sigma_rel:.6g}.pth")


def write_snapshot(folder: str, state_dict: dict, *, sigma_rel: float, step: int, images_seen: int, epoch: int,
                   args: dict, dtype: str = "float32", keep=()) -> str:
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
    payload = {"state_dict": cast_state(state_dict, dtype, keep), "sigma_rel": float(sigma_rel),
               "gamma": gamma_from_sigma_rel(sigma_rel), "step": int(step), "images_seen": int(images_seen),
               "epoch": int(epoch), "dtype": dtype, "args": dict(args), "run": args.get("run_id")}
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
        info = Snapshot(path=path, step=data["step"], images_seen=data["images_seen"], sigma_rel=data["sigma_rel"],
                        gamma=data["gamma"], dtype=data["dtype"], epoch=data["epoch"], run=data.get("run"))
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


def one_run(found: list[Snapshot], folder: str, log=print) -> list[Snapshot]:
    """The snapshots of the run that wrote the newest file of `found` (by modification time, then
    step); those of other runs (an earlier or abandoned run in the same folder) are left out and
    named through `log`."""
    newest = max(found, key=lambda s: (os.path.getmtime(s.path), s.step))
    kept = [s for s in found if s.run == newest.run]
    skipped = [s for s in found if s.run != newest.run]
    if skipped:
        names = ", ".join(os.path.basename(s.path) for s in skipped[:4]) + (f" and {len(skipped) - 4} more" if len(skipped) > 4 else "")
        log(f"note: {folder}: {len(skipped)} snapshot(s) of another run skipped ({names}); "
            f"using the {len(kept)} of run {newest.run or '(unnamed)'}, which wrote the newest")
    return kept


def usable_snapshots(folder: str, at: int | None = None, log=print) -> list[Snapshot]:
    """The snapshots of one run in `folder` (one_run) at or before global step `at` (default: all),
    sorted as list_snapshots; MissingFile or BadValue (one line) when there are none."""
    if not os.path.isdir(folder):
        raise MissingFile(f"{folder}: no such folder of snapshots")
    try:
        found = list_snapshots(folder)
    except SnapshotError as e:
        raise BadValue(str(e)) from None
    if not found:
        raise BadValue(f"{folder}: no phema-*.pth snapshots (train with --phema_stds)")
    found = one_run(found, folder, log)
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
                write_snapshot(self.folder, state, sigma_rel=ema.sigma_rel, step=step, images_seen=images_seen,
                               epoch=step // self.steps_per_epoch - 1, args=self.args, dtype=self.dtype, keep=self.keep)
            except (files.WriteError, ValueError) as e:  # a full disk; weights beyond the float16 range
                self.failed += 1
                distributed.print0(f"error: post-hoc EMA snapshot σ_rel {ema.sigma_rel:g} at step {step} not written: {e}; "
                         "training goes on")
        distributed.print0(f"post-hoc EMA snapshots at step {step} ({images_seen} images) -> {self.folder}")
        distributed.barrier()

    def plan(self, done: int) -> list[str]:
        """Lines for the log before training, `done` global steps into the run: the files and bytes
        the whole run writes, and a warning when the disk has less free than those still to write."""
        one = snapshot_file_bytes(self.emas[0].module.state_dict(), self.dtype, self.keep)  # full shapes, also of DTensors
        schedule = dict(every=self.every, start=self.start, total=self.total)
        count, size = snapshot_cost(one, len(self.emas), **schedule)
        left, need = snapshot_cost(one, len(self.emas), **schedule, after=done)
        lines = [f"post-hoc EMA: σ_rel {stds_text(e.sigma_rel for e in self.emas)}; snapshots every {self.every} steps "
                 f"from step {self.start} and at the last ({self.total}): {count} files of {files.human_bytes(one)} "
                 f"({self.dtype}), {files.human_bytes(size)} in {self.folder}" + (f", {left} still to write" if done else "")]
        free = files.free_bytes(self.folder)
        if free < need:
            lines.append(f"warning: {self.folder} has {files.human_bytes(free)} free, but the snapshots still to write need "
                         f"{files.human_bytes(need)}: some will fail to be written (--phema_every, --phema_dtype float16)")
        return lines


# Inner products of profiles (L2 over τ, in units of 1/images).

def power_inner(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """⟨p_a, p_b⟩ = ∫ p_a(τ) p_b(τ) dτ of power profiles ending at t_a and t_b (EDM2 eq. 151):
    (γ_a + 1)(γ_b + 1) / ((γ_a + γ_b + 1) T) · (t / T)^γ_T with T = max(t_a, t_b), t = min(t_a, t_b)
    and γ_T the exponent of the profile that ends at T. Arguments broadcast (numpy, float64)."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    hi, lo = np.maximum(t_a, t_b), np.minimum(t_a, t_b)
    gamma_hi = np.where(t_a >= t_b, gamma_a, gamma_b)
    return (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * hi) * (lo / hi) ** gamma_hi


def ema_step_weights(decay: float, steps: int) -> np.ndarray:
    """(steps,) float64: the weight of the weights after step k = 1..steps in a classic EMA
    (p ← d·p + (1 − d)·θ, started from the initial weights) after `steps` steps: (1 − d)·d^(steps − k).
    The initial weights' share d^steps, in no snapshot, is given to step 1, so the weights sum to 1."""
    w = (1 - decay) * decay ** np.arange(steps - 1, -1, -1, dtype=np.float64)
    w[0] += decay ** steps
    return w


def step_masses(end_step: int, gamma: float, first: int = 1) -> np.ndarray:
    """(end_step − first + 1,) float64: the mass of the power profile ending at step `end_step` on
    each step k = first..end_step, ∫ over ((k − 1)Δ, kΔ] of p = (k/m)^(γ+1) − ((k − 1)/m)^(γ+1),
    m = end_step: the weight of step k's weights in the tracked power EMA (constant batch Δ)."""
    k = np.arange(first - 1, end_step + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        c = np.exp((gamma + 1) * (np.log(k) - math.log(end_step)))  # (k/m)^(γ+1); 0 at k = 0
    return np.diff(c)


def ema_power_inner(decay: float, steps: int, batch: int, end_steps, gammas, cutoff: float = 1e-20) -> np.ndarray:
    """⟨q, p_i⟩ for the piecewise-constant profile q of a classic EMA of per-step decay d after
    `steps` steps of `batch` images (q = w_k / Δ on step k's interval, w = ema_step_weights) and power
    profiles ending at steps end_steps[i] with exponents gammas[i]: Σ_k w_k / Δ · mass_i(k), summed
    exactly on the step grid; steps whose w_k is below `cutoff`·max(w) are left out."""
    w = ema_step_weights(decay, steps)
    first = int(np.argmax(w >= cutoff * w.max())) + 1
    out = []
    for m, gamma in zip(end_steps, gammas):
        m = int(m)
        if m < first:
            out.append(0.0)
            continue
        masses = step_masses(m, gamma, first)  # steps first..m
        out.append(float(np.dot(w[first - 1:min(m, steps)], masses[:min(m, steps) - first + 1])) / batch)
    return np.array(out)


def ema_self_inner(decay: float, steps: int, batch: int) -> float:
    """⟨q, q⟩ = Σ_k w_k² / Δ of a classic EMA's profile (see ema_power_inner)."""
    return float(np.sum(ema_step_weights(decay, steps) ** 2)) / batch


# Reconstruction.

@dataclass(frozen=True)
class Fit:
    """Reconstruction weights for one target profile q from snapshot profiles p_i. weights: (S,),
    summing to 1. cond: 2-norm condition number of the Gram matrix ⟨p_i, p_j⟩. gain: Σ|x_i| (1 for
    a convex combination; how much rounding in the snapshots can grow). fit_error: the relative
    residual in profile space ‖Σ x_i p_i − q‖ / ‖q‖ with these (normalised) weights; values below
    about 1e-7 are at the float64 floor of its computation."""

    weights: np.ndarray
    cond: float
    gain: float
    fit_error: float


def solve_weights(gram: np.ndarray, cross: np.ndarray, target_sq: float) -> Fit:
    """Least squares in profile space (EDM2 App. C.2, Alg. 3): x minimising ‖Σ x_i p_i − q‖² solves
    gram·x = cross with gram_ij = ⟨p_i, p_j⟩, cross_i = ⟨p_i, q⟩ (float64, SVD-based lstsq, so that
    a nearly singular gram still gives the minimum-norm solution); then x / Σx. target_sq: ⟨q, q⟩."""
    x = np.linalg.lstsq(gram, cross, rcond=None)[0]
    x = x / x.sum()
    residual_sq = x @ gram @ x - 2 * x @ cross + target_sq
    return Fit(weights=x, cond=float(np.linalg.cond(gram)), gain=float(np.abs(x).sum()),
               fit_error=math.sqrt(max(residual_sq, 0.0) / target_sq))


def gram_matrix(images, gammas) -> np.ndarray:
    """(S, S) ⟨p_i, p_j⟩ of power profiles ending at images[i] with exponents gammas[i]."""
    t, g = np.asarray(images, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    return power_inner(t[:, None], g[:, None], t[None, :], g[None, :])


def fit_power(images, gammas, end_images: int, sigma_rel: float) -> Fit:
    """Weights that reconstruct, at images seen `end_images`, the power EMA of relative std σ_rel
    from snapshot profiles ending at images[i] with exponents gammas[i]."""
    gamma = gamma_from_sigma_rel(sigma_rel)
    cross = power_inner(images, gammas, end_images, gamma)
    return solve_weights(gram_matrix(images, gammas), cross, float(power_inner(end_images, gamma, end_images, gamma)))


def fit_decay(images, gammas, end_images: int, decay: float, batch: int) -> Fit:
    """Weights that reconstruct, at images seen `end_images`, the classic EMA of per-step `decay`
    (constant global batch of `batch` images, so step k ends at k·batch) from snapshot profiles."""
    if not 0 < decay < 1:
        raise ValueError(f"an EMA decay must be in (0, 1), got {decay}")
    steps, end_steps = end_images // batch, np.asarray(images) // batch
    cross = ema_power_inner(decay, steps, batch, end_steps, gammas)
    return solve_weights(gram_matrix(images, gammas), cross, ema_self_inner(decay, steps, batch))


def sigma_rel_of_decay(decay: float, steps: int) -> float:
    """The relative standard deviation of a classic EMA's step profile after `steps` steps: the
    profile's standard deviation in steps over `steps` (about √d / ((1 − d)·steps) for long runs)."""
    w = ema_step_weights(decay, steps)
    k = np.arange(1, steps + 1, dtype=np.float64) - 0.5  # each step's interval midpoint
    mean = np.dot(w, k)
    var = np.dot(w, (k - mean) ** 2) + 1 / 12  # + the spread within a step
    return math.sqrt(var) / steps


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
        raise BadValue("the snapshots do not share one global batch (images seen / step): "
                       "a decay target and a step between snapshots need a constant batch")
    return batches.pop()


def reconstruction_point(snapshots: list[Snapshot], at: int | None = None, need_batch: bool = False) -> tuple[int, int, int | None]:
    """(global step, images seen, global batch or None) to reconstruct at from `snapshots` (at or
    before it): step `at`, default the newest snapshot's. Between snapshots the images seen are
    at · batch, which needs one constant batch (images_per_step, also found when `need_batch`)."""
    newest = snapshots[-1]
    at = newest.step if at is None else at
    batch = images_per_step(snapshots) if need_batch or at != newest.step else None
    return at, newest.images_seen if at == newest.step else at * batch, batch


def fit_target(target: tuple[str, float], snapshots: list[Snapshot], end_images: int, batch: int | None) -> Fit:
    """The reconstruction weights of a target ('std', σ_rel) or ('decay', d) at `end_images` images
    (a decay needs the constant global `batch`)."""
    images = np.array([s.images_seen for s in snapshots], dtype=np.float64)
    gammas = np.array([s.gamma for s in snapshots])
    kind, value = target
    if kind == "std":
        return fit_power(images, gammas, end_images, value)
    return fit_decay(images, gammas, end_images, value, batch)


def reconstruct(snapshots: list[Snapshot], targets: list[tuple[str, float]], end_images: int, batch: int | None,
                accum: torch.dtype = torch.float64) -> tuple[list[Fit], list[dict]]:
    """(fits, float32 state dicts) of the targets (see fit_target), in one pass over the snapshots."""
    fits = [fit_target(t, snapshots, end_images, batch) for t in targets]
    return fits, combine(snapshots, np.stack([f.weights for f in fits], axis=1), accum)


def stds_text(stds) -> str:
    """σ_rel values for messages: '0.05 0.1', or 'none'."""
    return " ".join(f"{s:g}" for s in stds) or "none"


def describe_target(target: tuple[str, float]) -> str:
    kind, value = target
    return f"σ_rel {value:g}" if kind == "std" else f"decay {value:g}"


def fit_report(target: tuple[str, float], fit: Fit) -> list[str]:
    """How well the snapshots cover a target: one line, and a warning line when the fit is poor."""
    name = describe_target(target)
    lines = [f"{name}: condition {fit.cond:.1e}, Σ|w| {fit.gain:.2f}, fit error {fit.fit_error:.1e} (relative, in profile space)"]
    if fit.fit_error > POOR_FIT:
        lines.append(f"warning: {name} is poorly covered by these snapshots (fit error above {POOR_FIT}): "
                     "track a σ_rel nearer to it, or snapshot more often")
    return lines


def check_resume_stds(state: checkpoint.TrainState, path: str, stds: list):
    """Training continues the power EMAs `state` holds, and only those: a power EMA's profile starts
    at step 0, so one cannot join a run midway, and one left out would end its snapshot series
    unnoticed. Other `stds` (--phema_stds, sorted) are a checkpoint.CheckpointError (exit 2)."""
    theirs = sorted(state.phema_stds)
    if theirs == stds:
        return
    fix = f"resume with --phema_stds {stds_text(theirs)}" if theirs else "power EMAs start with a run, resume without --phema_stds"
    raise checkpoint.CheckpointError(f"{path} tracks post-hoc EMAs of σ_rel {stds_text(theirs)}, this run --phema_stds {stds_text(stds)}: {fix}")


def snapshot_state(folder: str, at: int | None, log=print) -> tuple[checkpoint.TrainState, int]:
    """(the newest snapshot at or before step `at` of `folder` as a weights-only TrainState, the step
    the EMAs are reconstructed at: `at`, default that snapshot's). Its run's args and tensors say
    what network to build (--evaluate_gen --phema); the weights sampled are reconstruct_at's."""
    snapshots = usable_snapshots(folder, at, log)
    step = reconstruction_point(snapshots, at)[0]
    newest, data = read_snapshot(snapshots[-1].path)
    state = checkpoint.TrainState.weights_only(data["state_dict"], epoch=newest.epoch, args=data["args"])
    return state, step


def reconstruct_at(folder: str, at: int, stds: list, log=print) -> dict:
    """{σ_rel: state dict} of the power EMAs `stds` at step `at`, from the snapshots of `folder` at or
    before it (reconstruct: float64 sums, one pass for all); the fits are reported through `log`."""
    snapshots = usable_snapshots(folder, at, log=lambda note: None)  # named once, by snapshot_state
    at, end_images, batch = reconstruction_point(snapshots, at)
    log(f"post-hoc EMA: reconstructing σ_rel {stds_text(stds)} at step {at} ({end_images} images) "
        f"from {len(snapshots)} snapshots in {folder}")
    targets = [("std", s) for s in stds]
    fits, states = reconstruct(snapshots, targets, end_images, batch)
    for target, fit in zip(targets, fits):
        log("\n".join(fit_report(target, fit)))
    return dict(zip(stds, states))
