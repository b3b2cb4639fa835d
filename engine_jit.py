"""The training loop: one epoch, resumable at any step; the step (its optimizer, the fused EMA
update, the device-side skip of non-finite steps) and its monitor (loss by noise level, gradient
norm, update ratio). Evaluation (FID / IS of one sampler setting or a sweep) is engine_eval.py."""

import contextlib
import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from util import distributed, lr_sched, sharding
from util.ema import lerp_together_
from util.logger import hms
from util.stop import StopRun, StopSignal


@dataclass(frozen=True)
class LoopConfig:
    """What the epoch loop needs to know (the flags of the same names). batch_size: per process and
    micro-batch; accum_iter: micro-batches per optimiser step; epochs: of the whole run (for its ETA
    and the schedule); lr, min_lr, warmup_epochs, lr_schedule: the learning rate (lr_at);
    print_freq / log_freq: console / TensorBoard + metrics.jsonl every N steps; save_every_steps:
    step checkpoints (0: off); max_bad_frac: unreadable images per epoch that stop the run;
    max_nonfinite_steps: in a row."""

    batch_size: int
    epochs: int
    lr: float
    accum_iter: int = 1
    warmup_epochs: int = 0
    lr_schedule: str = "constant"
    min_lr: float = 0.0
    print_freq: int = 20
    log_freq: int = 100
    save_every_steps: int = 0
    max_bad_frac: float = 0.001
    max_nonfinite_steps: int = 10

    @classmethod
    def from_flags(cls, flags) -> "LoopConfig":
        """The loop's fields taken from an object with attributes of the same names."""
        return cls(**{f.name: getattr(flags, f.name) for f in dataclasses.fields(cls)})

    def lr_at(self, epoch: float) -> float:
        """The learning rate at a fractional epoch (util.lr_sched)."""
        return lr_sched.lr_at(
            epoch,
            lr=self.lr,
            warmup_epochs=self.warmup_epochs,
            schedule=self.lr_schedule,
            epochs=self.epochs,
            min_lr=self.min_lr,
        )


@dataclass
class StepParts:
    """What one optimiser step touches. model: what the step calls (the denoiser, DDP-wrapped and/or
    compiled); denoiser: the plain (or FSDP-sharded) module; optimizer: fused AdamW (build_optimizer);
    emas: updated after every step, and so are phemas, the power-function EMAs of post-hoc EMA
    (util.ema.PowerEMA; none unless --phema_stds); probe: a StepMonitor that the step hands its
    per-sample losses and times, and on its marked steps the gradient norm and update size (None: none).
    """

    model: torch.nn.Module
    denoiser: torch.nn.Module
    optimizer: torch.optim.Optimizer
    emas: list
    device: torch.device
    phemas: list = dataclasses.field(default_factory=list)
    probe: "StepMonitor | None" = None


@dataclass
class RunIO:
    """How the loop talks to the run. log: a RunLog (None: no records); stopper: a StopSignal (None:
    no signals); save: save(epoch, next_step) writes a resumable checkpoint and returns whether it could;
    snapshot: snapshot(global step, images seen), called after every optimiser step, writes the
    post-hoc EMA snapshots due then (util.phema_files.SnapshotWriter; collective; None: none)."""

    log: object = None
    stopper: StopSignal | None = None
    save: Callable[[int, int], bool] | None = None
    snapshot: Callable[[int, int], None] | None = None


def param_groups(denoiser, weight_decay: float) -> list[dict]:
    """The reference's two AdamW groups, in its order (so that its optimizer state loads): biases
    and 1-D parameters without weight decay, then the rest with `weight_decay`."""
    decay, no_decay = [], []
    for name, p in denoiser.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(denoiser, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.95) over param_groups. Fused: train_step's device-side skip of non-finite steps
    (`found_inf`) needs it."""
    return torch.optim.AdamW(param_groups(denoiser, weight_decay), lr=lr, betas=(0.9, 0.95), fused=True)


def train_step(parts: StepParts, micro_batches: list, images_seen: int | None = None, batch: int | None = None):
    """One optimiser step over micro-batches of (uint8 images (B, 3, H, W), labels (B,)).

    Gradients are synchronised between ranks on the last micro-batch only (DDP's no_sync; FSDP2's
    requires_gradient_sync when the denoiser is sharded). The step is applied on the device only if
    every gradient (shard) of every rank is finite (AdamW's `found_inf`), so a non-finite loss never
    reaches the weights, the optimizer state, or the EMAs, and no host synchronisation is needed.
    Then every EMA, classic and power, moves towards the new weights in one fused lerp (local
    shards under FSDP); a power EMA's weight depends on `images_seen` (the run's images including
    this step's, global) and the global `batch` (images per optimiser step), needed only with
    parts.phemas. With parts.probe, the same forward also returns its per-sample losses and times
    (the loss is their mean, unchanged), which the probe bins by t on the device; on a step the probe
    marks (measure_next), it also reads the global gradient norm and the size of the update.
    Returns (mean loss, skipped flag) as 0-dim device tensors.
    """
    model, denoiser, optimizer, device, probe = parts.model, parts.denoiser, parts.optimizer, parts.device, parts.probe
    accum_iter = len(micro_batches)
    sharded = sharding.is_sharded(denoiser)
    loss_sum = torch.zeros((), device=device)
    for j, (x, labels) in enumerate(micro_batches):
        x = x.to(device, non_blocking=True).float().div_(255).mul_(2).sub_(1)  # uint8 -> [-1, 1]
        labels = labels.to(device, non_blocking=True)
        sync = j == accum_iter - 1
        if sharded:  # read during backward: set before the forward, kept until the next micro-batch
            sharding.set_grad_sync(denoiser, sync)
        no_sync = not sync and hasattr(model, "no_sync")
        with model.no_sync() if no_sync else contextlib.nullcontext(), distributed.autocast(device):
            if probe is None:
                loss = model(x, labels)
            else:
                loss, per_sample, t = model(x, labels, per_sample=True)
                probe.add_samples(per_sample, t)
        (loss / accum_iter).backward()
        loss_sum += loss.detach()
    params = [p for p in denoiser.parameters() if p.requires_grad]
    skipped = sharding.nonfinite_flag(params)  # all-reduced when sharded
    optimizer.found_inf = skipped  # fused AdamW leaves params, moments and step count untouched
    measure = probe is not None and probe.measure_next
    before = probe.before_step(params, sharded) if measure else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if probe is not None:
        probe.end_step(skipped, params, before, sharded)
    averages = parts.emas + parts.phemas  # towards unchanged weights on a skipped step, so they stay finite
    if averages:
        lerp_together_(
            [a.tensors() for a in averages],
            sharding.local_tensors(denoiser.parameters()),
            [a.weight(images_seen, batch) for a in averages],
        )
    return loss_sum / accum_iter, skipped


T_BINS = 8  # bins of the training time t for the loss by noise level


def t_bin_edges(P_mean: float, P_std: float, bins: int = T_BINS) -> list[float]:
    """Edges 0 < e_1 < ... < e_{bins-1} < 1 of `bins` bins of t that each hold 1/bins of the training
    times t = sigmoid(N(P_mean, P_std²)) (its quantiles, rounded to 4 decimals), with 0 and 1 at the ends.
    Bin k holds e_k < t <= e_{k+1}; t near 0 is noise, near 1 clean images."""
    normal = statistics.NormalDist(P_mean, P_std)
    inner = [round(1 / (1 + math.exp(-normal.inv_cdf(k / bins))), 4) for k in range(1, bins)]
    return [0.0, *inner, 1.0]


def squared_norm(tensors, sharded: bool) -> torch.Tensor:
    """Σ‖x‖² over the (local shards of the) tensors, as a 0-dim float32 device tensor; summed over
    ranks when they are shards (collective), else every rank holds the whole."""
    local = sharding.local_tensors(tensors)
    total = torch.stack(torch._foreach_norm(local)).float().square().sum()
    if sharded:
        torch.distributed.all_reduce(total)
    return total


class StepMonitor:
    """Device-side counters, read back only when progress is shown or logged (no per-step host sync):
    the loss and skipped steps of the window, the per-sample losses binned by training time t (edges:
    t_bin_edges; kept from one `read(bins=True)` to the next), and the global gradient norm and
    update-to-weight ratio ‖Δw‖/‖w‖ of the last step marked with `measure_next`."""

    def __init__(self, device, edges: list[float] | None = None):
        self.loss_sum = torch.zeros((), device=device)
        self.skipped = torch.zeros((), device=device)
        self.streak = torch.zeros((), device=device)
        self.max_streak = torch.zeros((), device=device)
        self.steps = 0
        self.edges = list(edges or [0.0, 1.0])
        n = len(self.edges) - 1
        self.inner = torch.tensor(self.edges[1:-1], dtype=torch.float32, device=device)
        self.bins = torch.zeros(2, n, device=device)  # (sum of losses, count) per bin, of the steps taken
        self.step_bins = torch.zeros(2, n, device=device)  # the current step's
        self.measured = torch.full((2,), float("nan"), device=device)  # grad norm, update ratio
        self.measure_next = False

    def add_samples(self, losses, t):
        """Per-sample losses (B,) at times t (B,) of one micro-batch of the current step."""
        k = torch.bucketize(t.float(), self.inner)  # e_k < t <= e_{k+1}
        self.step_bins[0].index_add_(0, k, losses.float())
        self.step_bins[1].index_add_(0, k, torch.ones_like(losses, dtype=torch.float32))

    def before_step(self, params, sharded: bool) -> list[torch.Tensor]:
        """On a measured step: the gradient norm (before the update), and a copy of the weights (local
        shards) to measure the update by. The optimiser step's memory peak is far below the backward's."""
        self.measured[0] = squared_norm([p.grad for p in params if p.grad is not None], sharded).sqrt()
        return [t.clone() for t in sharding.local_tensors(params)]

    def end_step(self, skipped, params, before, sharded: bool):
        """The step's bins count unless it was skipped; on a measured step, ‖w_new - w_old‖ / ‖w_new‖."""
        self.bins += torch.where(skipped > 0, 0.0, self.step_bins)
        self.step_bins.zero_()
        if before is not None:
            after = sharding.local_tensors(params)
            torch._foreach_sub_(before, after)
            update = squared_norm(before, sharded=False)
            weights = squared_norm(after, sharded=False)
            if sharded:
                both = torch.stack([update, weights])
                torch.distributed.all_reduce(both)
                update, weights = both
            self.measured[1] = (update / weights).sqrt()
            self.measure_next = False

    def add(self, loss, skipped):
        self.loss_sum += torch.where(skipped > 0, 0.0, loss)
        self.skipped += skipped
        self.streak.mul_(skipped).add_(skipped)
        torch.maximum(self.max_streak, self.streak, out=self.max_streak)
        self.steps += 1

    def read(self, bins: bool = False):
        """(mean finite loss, skipped steps, longest run of skipped steps), and reset the window. With
        bins: also {"loss_by_t": mean loss per bin of t (None: empty), "t_edges", "grad_norm",
        "update_ratio"} (None where not measured), whose window resets then."""
        values = torch.cat(
            [torch.stack([self.loss_sum, self.skipped, self.max_streak]), self.bins.flatten(), self.measured]
        )
        values = distributed.all_reduce_mean(
            values
        ).tolist()  # one collective; ranks hold equal norms, sums average as well
        loss_sum, skipped, max_streak = values[:3]
        n = len(self.edges) - 1
        sums, counts, (grad_norm, ratio) = values[3 : 3 + n], values[3 + n : 3 + 2 * n], values[-2:]
        good = self.steps - skipped
        out = (loss_sum / good if good else float("nan"), round(skipped), round(max_streak))
        self.loss_sum.zero_(), self.skipped.zero_(), self.max_streak.copy_(self.streak)
        self.steps = 0
        if not bins:
            return out
        self.bins.zero_()
        self.measured.fill_(float("nan"))
        detail = {
            "loss_by_t": [s / c if c > 0 else None for s, c in zip(sums, counts)],
            "t_edges": self.edges,
            "grad_norm": grad_norm,
            "update_ratio": ratio,
        }
        return out + (detail,)


def log_train(log, record: dict, x: int, mem: float):
    """One training record (kind 'train': epoch, step, loss, lr, img_per_s, ..., and when measured
    loss_by_t with its t_edges, grad_norm, update_ratio) to metrics.jsonl, and its scalars to
    TensorBoard at x (epoch·1000, the reference's axis; the loss of t bin (a, b] as loss_t/a-b);
    mem: peak GiB (0: none)."""
    log.record(record)
    scalars = {"lr": record["lr"], "img_per_s": record["img_per_s"]}
    if not math.isnan(record["loss"]):
        scalars["train_loss"] = record["loss"]
    if mem:
        scalars["peak_mem_gib"] = mem
    for key in ("grad_norm", "update_ratio"):
        if record.get(key) is not None and math.isfinite(record[key]):
            scalars[key] = record[key]
    edges = record.get("t_edges", [])
    for lo, hi, value in zip(edges, edges[1:], record.get("loss_by_t", [])):
        if value is not None:
            scalars[f"loss_t/{lo:.3f}-{hi:.3f}"] = value
    log.scalars(scalars, x)


def train_one_epoch(parts: StepParts, data, loop: LoopConfig, io: RunIO, *, epoch: int, start_step: int = 0) -> bool:
    """Train from step `start_step` to the end of `epoch`.

    data: the training data (util.data.Data): its loader yields (images, labels, bad-file counts)
    micro-batches from the sampler's position, steps_per_epoch optimiser steps make an epoch.
    Raises StopRun after trying to save when a stop is requested (io.stopper), and without saving
    when too many non-finite steps come in a row or too many images are unreadable. Returns True
    when a step checkpoint was written after the last step (the epoch's end is saved already).
    """
    parts.model.train()
    steps_per_epoch, device, log, stopper = data.steps_per_epoch, parts.device, io.log, io.stopper
    monitor = StepMonitor(device, t_bin_edges(parts.denoiser.P_mean, parts.denoiser.P_std))
    parts = dataclasses.replace(parts, probe=monitor)
    it = iter(data.loader)
    bad_files = 0
    images_per_step = loop.batch_size * loop.accum_iter * distributed.get_world_size()
    bad_limit = loop.max_bad_frac * steps_per_epoch * images_per_step
    t_window, window_steps = time.time(), 0
    saved_at_end = False
    for step in range(start_step, steps_per_epoch):
        lr = loop.lr_at(epoch + step / steps_per_epoch)
        lr_sched.set_lr(parts.optimizer, lr)
        micro, step_bad = [], 0
        for _ in range(loop.accum_iter):
            x, labels, bad = next(it)
            micro.append((x, labels))
            step_bad += int(bad.sum())
        global_step = epoch * steps_per_epoch + step + 1  # a function of the position only: resume is exact
        last = step + 1 == steps_per_epoch
        write = (step + 1) % loop.log_freq == 0 or last
        monitor.measure_next = write and log is not None
        loss, skipped = train_step(parts, micro, global_step * images_per_step, images_per_step)
        if io.snapshot:
            io.snapshot(global_step, global_step * images_per_step)
        monitor.add(loss, skipped)
        window_steps += 1

        # One small host-side collective per step: stop requests and unreadable files of all ranks.
        stop_votes, step_bad = distributed.host_all_reduce_sum([float(stopper.requested if stopper else 0), step_bad])
        bad_files += round(step_bad)
        if bad_files > bad_limit:
            raise StopRun(
                f"{bad_files} unreadable images in epoch {epoch} (more than --max_bad_frac "
                f"{loop.max_bad_frac} of the epoch); fix the dataset",
                code=1,
            )
        show = (step + 1) % loop.print_freq == 0 or last or stop_votes
        if show or write:
            loss_avg, n_skipped, max_streak, *detail = monitor.read(bins=write)
            elapsed = time.time() - t_window
            img_s = window_steps * images_per_step / max(elapsed, 1e-9)
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
            if show:
                per_step = elapsed / window_steps
                left_epoch = steps_per_epoch - step - 1
                left_run = left_epoch + (loop.epochs - epoch - 1) * steps_per_epoch
                distributed.print0(
                    f"Epoch [{epoch}] [{step + 1}/{steps_per_epoch}] loss {loss_avg:.4f} lr {lr:.3e} "
                    f"{img_s:.0f} img/s eta {hms(left_epoch * per_step)} (run {hms(left_run * per_step)})"
                    + (f" mem {mem:.1f}GiB" if mem else "")
                    + (f" skipped {n_skipped}" if n_skipped else "")
                )
            if write and log is not None:
                record = {
                    "kind": "train",
                    "epoch": epoch,
                    "step": step + 1,
                    "global_step": global_step,
                    "loss": loss_avg,
                    "lr": lr,
                    "img_per_s": img_s,
                    "skipped": n_skipped,
                    "images_per_step": images_per_step,
                    "time": round(time.time(), 3),
                    **detail[0],
                }
                log_train(log, record, int((epoch + (step + 1) / steps_per_epoch) * 1000), mem)
            if max_streak >= loop.max_nonfinite_steps:
                raise StopRun(
                    f"the loss was not finite for {max_streak} steps in a row (epoch {epoch}, step "
                    f"{step + 1}); stopping without saving, the last good checkpoint is kept",
                    code=1,
                )
            t_window, window_steps = time.time(), 0
        if stop_votes:
            saved = io.save(epoch, step + 1) if io.save else False
            raise StopRun(
                f"stop requested (signal) at epoch {epoch}, step {step + 1}"
                + (": checkpoint saved; rerun the same command to continue" if saved else "")
            )
        if loop.save_every_steps and global_step % loop.save_every_steps == 0 and io.save:
            saved_at_end = io.save(epoch, step + 1) and last
    if bad_files:
        distributed.print0(
            f"Epoch [{epoch}]: {bad_files} unreadable images were replaced by other samples (see the warnings above)"
        )
    return saved_at_end


def compile_fsdp_blocks(denoiser, **compile_kwargs):
    """torch.compile for a sharded (FSDP2) denoiser: each block's own forward is compiled, and FSDP's
    hooks and the root (embeddings, in-context tokens, final layer) stay eager. Compiling the root
    instead makes dynamo break its graph at every block's FSDP hooks, and the blocks before and after
    the in-context tokens see other sequence lengths (bench/fsdp_compile.py counts both). Returns the
    denoiser (changed in place).
    Static shapes (dynamic=False): the two sequence lengths (the patches; the patches and the
    in-context tokens) get one specialised graph each, instead of a dynamic graph that torch's
    automatic dynamic shapes would make for every block after seeing the second length.
    """
    for block in denoiser.net.blocks:
        block.forward = torch.compile(block.forward, dynamic=False, **compile_kwargs)
    return denoiser
