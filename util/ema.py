"""The averages of the weights a run keeps: `EMA`, the reference's per-step exponential moving
average, and `PowerEMA`, EDM2's power-function average for post-hoc EMA (util/phema.py has its
math). Both hold a frozen copy of the module (`module`, which samples directly) and share one
interface: `tensors()` (what an update writes), `weight(images_seen, batch)` (the lerp weight of the
new weights), `update(model, images_seen, batch)`, `state_dict`, `load_state_dict`. The training
step moves all of them in one fused lerp (`lerp_together_`).

Under FSDP (sharded=True) the copy is made from the unsharded model and sharded at once with the
live model's plan (util.sharding.shard), so that each rank's local shard of every average lines up
with its local shard of the live weights and an update needs no communication; building N averages
never holds more than one extra full copy.
"""

import copy

import torch
import torch.nn as nn

from util import sharding
from util.phema import gamma_from_sigma_rel, power_ema_weight


@torch.no_grad()
def lerp_together_(targets: list[list[torch.Tensor]], source: list[torch.Tensor], weights: list[float]):
    """targets[e][j] ← lerp(targets[e][j], source[j], weights[e]) for every average e and tensor j, in
    one fused `_foreach_lerp_` (one weight per tensor; weights computed on the host, no device sync)."""
    flat = [t for ts in targets for t in ts]
    per_tensor = [float(w) for ts, w in zip(targets, weights) for _ in ts]
    torch._foreach_lerp_(flat, list(source) * len(targets), per_tensor)


class EMA:
    """Exponential moving average of all parameters of a module: p_ema ← d·p_ema + (1 - d)·p.

    The state dict is the copy's full state dict, as the reference stores `model_ema1` /
    `model_ema2` (sharded: DTensor values; checkpoints gather them, util.sharding.full_state).
    sharded: build from the unsharded model, before that is sharded (ValueError otherwise).
    """

    def __init__(
        self, model: nn.Module, decay: float | None, *, sharded: bool = False, mixed_precision: bool = False, mesh=None
    ):
        if sharded and sharding.is_sharded(model):
            raise ValueError(
                f"a sharded {type(self).__name__} copies the unsharded model: build it before sharding the model"
            )
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        if sharded:
            sharding.shard(self.module, mixed_precision=mixed_precision, mesh=mesh)
        # Unsharded, the parameters are fixed tensors: listed once. Sharded, their local shards are read afresh.
        self._params = None if sharded else list(self.module.parameters())

    def tensors(self) -> list[torch.Tensor]:
        """The tensors update() writes: the copy's parameters (this rank's shards of them)."""
        return self._params if self._params is not None else sharding.local_tensors(self.module.parameters())

    def weight(self, images_seen: int | None = None, batch: int | None = None) -> float:
        """The lerp weight of the new weights in every step, 1 - d (the arguments, which a power EMA's
        weight depends on, do not matter here)."""
        return 1.0 - self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, images_seen: int | None = None, batch: int | None = None):
        """One step towards `model`'s parameters (local shards; one fused foreach op, no host sync),
        after the optimiser step that brought the images seen to `images_seen` with a global batch of
        `batch` images (what a power EMA's weight depends on)."""
        lerp_together_([self.tensors()], sharding.local_tensors(model.parameters()), [self.weight(images_seen, batch)])

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state_dict):
        self.module.load_state_dict(state_dict)


class PowerEMA(EMA):
    """Power-function EMA (EDM2 §3) of relative standard deviation `sigma_rel`: its weight depends on
    the images seen (util.phema.power_ema_weight), and realises the power profile exactly for any
    sequence of batch sizes."""

    def __init__(self, model: nn.Module, sigma_rel: float, *, sharded: bool = False, mixed_precision: bool = False):
        self.sigma_rel = float(sigma_rel)
        self.gamma = gamma_from_sigma_rel(self.sigma_rel)
        super().__init__(model, None, sharded=sharded, mixed_precision=mixed_precision)

    def weight(self, images_seen: int, batch: int) -> float:
        """The lerp weight of the step that ends at `images_seen` with a global batch of `batch`."""
        return power_ema_weight(images_seen, batch, self.gamma)
