"""Learning-rate schedule: linear warmup, then constant or half-cycle cosine (set every iteration)."""

import math


def lr_at(
    epoch: float, *, lr: float, warmup_epochs: float, schedule: str = "constant", epochs: float = 0, min_lr: float = 0.0
) -> float:
    """Learning rate at fractional epoch `epoch` (epoch index + step / steps_per_epoch)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r} (constant or cosine)")


def set_lr(optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr
