"""The training loop (one epoch, resumable at any step) and the evaluation entry point."""
import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from util import distributed as D
from util import sharding
from util.evaluation import evaluate  # noqa: F401  (engine_jit.evaluate, as in the reference)
from util.logger import hms
from util.lr_sched import set_lr


class StopRun(Exception):
    """Raised to end training cleanly; `code` is the process exit status."""

    def __init__(self, message: str, code: int = 0):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class LoopConfig:
    """What the epoch loop needs to know. batch_size: per process and micro-batch; accum_iter:
    micro-batches per optimiser step; epochs: of the whole run (for its ETA); print_freq / log_freq:
    console / TensorBoard + metrics.jsonl every N steps; save_every_steps: step checkpoints (0: off);
    max_bad_frac: unreadable images per epoch that stop the run; max_nonfinite_steps: in a row."""

    batch_size: int
    epochs: int
    accum_iter: int = 1
    print_freq: int = 20
    log_freq: int = 100
    save_every_steps: int = 0
    max_bad_frac: float = 0.001
    max_nonfinite_steps: int = 10


def nonfinite_flag(params) -> torch.Tensor:
    """0-dim float tensor on the params' device: 1.0 if any gradient holds inf/NaN, else 0.0."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.stack(torch._foreach_norm(grads)).sum()
    return (~torch.isfinite(total)).float()


def train_step(model, denoiser, optimizer, emas, micro_batches, *, device, accum_iter: int = 1):
    """One optimiser step over `accum_iter` micro-batches of (uint8 images (B, 3, H, W), labels (B,)).

    Gradients are synchronised between ranks on the last micro-batch only (DDP's no_sync; FSDP2's
    requires_gradient_sync when the denoiser is sharded). The step is applied on the device only if
    every gradient (shard) of every rank is finite (AdamW's `found_inf`), so a non-finite loss never
    reaches the weights, the optimizer state, or the EMAs, and no host synchronisation is needed.
    Returns (mean loss, skipped flag) as 0-dim device tensors.
    """
    sharded = sharding.is_sharded(denoiser)
    loss_sum = torch.zeros((), device=device)
    for j, (x, labels) in enumerate(micro_batches):
        x = x.to(device, non_blocking=True).float().div_(255).mul_(2).sub_(1)  # uint8 -> [-1, 1]
        labels = labels.to(device, non_blocking=True)
        sync = j == accum_iter - 1
        if sharded:  # read during backward: set before the forward, kept until the next micro-batch
            sharding.set_grad_sync(denoiser, sync)
        no_sync = not sync and hasattr(model, "no_sync")
        with (model.no_sync() if no_sync else contextlib.nullcontext()), D.autocast(device):
            loss = model(x, labels)
        (loss / accum_iter).backward()
        loss_sum += loss.detach()
    params = [p for p in denoiser.parameters() if p.requires_grad]
    skipped = (sharding.nonfinite_flag if sharded else nonfinite_flag)(params)
    optimizer.found_inf = skipped  # fused AdamW leaves params, moments and step count untouched
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for ema in emas:  # towards unchanged weights on a skipped step, so they stay finite
        ema.update(denoiser)
    return loss_sum / accum_iter, skipped


class StepMonitor:
    """Device-side counters, read back only when progress is shown or logged (no per-step host sync)."""

    def __init__(self, device):
        self.loss_sum = torch.zeros((), device=device)
        self.skipped = torch.zeros((), device=device)
        self.streak = torch.zeros((), device=device)
        self.max_streak = torch.zeros((), device=device)
        self.steps = 0

    def add(self, loss, skipped):
        self.loss_sum += torch.where(skipped > 0, 0.0, loss)
        self.skipped += skipped
        self.streak.mul_(skipped).add_(skipped)
        torch.maximum(self.max_streak, self.streak, out=self.max_streak)
        self.steps += 1

    def read(self):
        """(mean finite loss, skipped steps, longest run of skipped steps), and reset the window."""
        loss_sum, skipped, max_streak = D.all_reduce_mean(torch.stack([self.loss_sum, self.skipped, self.max_streak])).tolist()
        good = self.steps - skipped
        out = (loss_sum / good if good else float("nan"), round(skipped), round(max_streak))
        self.loss_sum.zero_(), self.skipped.zero_(), self.max_streak.copy_(self.streak)
        self.steps = 0
        return out


def log_scalars(log, *, epoch, step, steps_per_epoch, loss, lr, img_s, mem, skipped):
    """One training record: TensorBoard (x = epoch·1000, the reference's axis) and metrics.jsonl."""
    log.record({"kind": "train", "epoch": epoch, "step": step, "global_step": epoch * steps_per_epoch + step,
                "loss": loss, "lr": lr, "img_per_s": img_s, "skipped": skipped})
    scalars = {"lr": lr, "img_per_s": img_s}
    if not math.isnan(loss):
        scalars["train_loss"] = loss
    if mem:
        scalars["peak_mem_gib"] = mem
    log.scalars(scalars, int((epoch + step / steps_per_epoch) * 1000))


def train_one_epoch(model, denoiser, optimizer, emas, loader, *, epoch: int, start_step: int, steps_per_epoch: int,
                    device, loop: LoopConfig, lr_at: Callable[[float], float], log=None, stopper=None,
                    save_fn=None) -> bool:
    """Train from step `start_step` to the end of `epoch`.

    loader yields (images, labels, bad-file counts) micro-batches from the sampler's position;
    lr_at(fractional epoch) gives the learning rate of each step; `save_fn(epoch, next_step)` writes
    a resumable checkpoint and returns whether it could; `stopper.requested` is set by SIGTERM/SIGUSR1; `log` is a RunLog.
    Raises StopRun after trying to save when a stop is requested, and without saving when too many
    non-finite steps come in a row or too many images are unreadable. Returns True when a step
    checkpoint was written after the last step (the epoch's end is saved already).
    """
    model.train()
    monitor = StepMonitor(device)
    it = iter(loader)
    bad_files = 0
    images_per_step = loop.batch_size * loop.accum_iter * D.get_world_size()
    bad_limit = loop.max_bad_frac * steps_per_epoch * images_per_step
    t_window, window_steps = time.time(), 0
    saved_at_end = False
    for step in range(start_step, steps_per_epoch):
        lr = lr_at(epoch + step / steps_per_epoch)
        set_lr(optimizer, lr)
        micro, step_bad = [], 0
        for _ in range(loop.accum_iter):
            x, labels, bad = next(it)
            micro.append((x, labels))
            step_bad += int(bad.sum())
        loss, skipped = train_step(model, denoiser, optimizer, emas, micro, device=device, accum_iter=loop.accum_iter)
        monitor.add(loss, skipped)
        window_steps += 1

        # One small host-side collective per step: stop requests and unreadable files of all ranks.
        stop_votes, step_bad = D.host_all_reduce_sum([float(stopper.requested if stopper else 0), step_bad])
        bad_files += round(step_bad)
        last = step + 1 == steps_per_epoch
        if bad_files > bad_limit:
            raise StopRun(f"{bad_files} unreadable images in epoch {epoch} (more than --max_bad_frac "
                          f"{loop.max_bad_frac} of the epoch); fix the dataset", code=1)
        show = (step + 1) % loop.print_freq == 0 or last or stop_votes
        write = (step + 1) % loop.log_freq == 0 or last
        if show or write:
            loss_avg, n_skipped, max_streak = monitor.read()
            elapsed = time.time() - t_window
            img_s = window_steps * images_per_step / max(elapsed, 1e-9)
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
            if show:
                per_step = elapsed / window_steps
                left_epoch = steps_per_epoch - step - 1
                left_run = left_epoch + (loop.epochs - epoch - 1) * steps_per_epoch
                D.print0(f"Epoch [{epoch}] [{step + 1}/{steps_per_epoch}] loss {loss_avg:.4f} lr {lr:.3e} "
                         f"{img_s:.0f} img/s eta {hms(left_epoch * per_step)} (run {hms(left_run * per_step)})"
                         + (f" mem {mem:.1f}GiB" if mem else "") + (f" skipped {n_skipped}" if n_skipped else ""))
            if write and log is not None:
                log_scalars(log, epoch=epoch, step=step + 1, steps_per_epoch=steps_per_epoch,
                            loss=loss_avg, lr=lr, img_s=img_s, mem=mem, skipped=n_skipped)
            if max_streak >= loop.max_nonfinite_steps:
                raise StopRun(f"the loss was not finite for {max_streak} steps in a row (epoch {epoch}, step "
                              f"{step + 1}); stopping without saving, the last good checkpoint is kept", code=1)
            t_window, window_steps = time.time(), 0
        if stop_votes:
            saved = save_fn(epoch, step + 1) if save_fn else False
            raise StopRun(f"stop requested (signal) at epoch {epoch}, step {step + 1}"
                          + (": checkpoint saved; rerun the same command to continue" if saved else ""))
        if loop.save_every_steps and (epoch * steps_per_epoch + step + 1) % loop.save_every_steps == 0 and save_fn:
            saved_at_end = save_fn(epoch, step + 1) and last
    if bad_files:
        D.print0(f"Epoch [{epoch}]: {bad_files} unreadable images were replaced by other samples (see the warnings above)")
    return saved_at_end
