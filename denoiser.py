"""Flow-matching diffusion around a JiT network: training loss, EMA, and sampler.

Conventions (Li & He, arXiv 2511.13720): time t in [0, 1] with t = 1 the clean image,
z_t = t·x + (1 - t)·e with e ~ N(0, noise_scale²), images x in [-1, 1], velocity v = x - e.
By default the network predicts x̂ and the loss is taken on velocities v̂ = (x̂ - z)/(1 - t) (the
paper's method); the paper's ablations (Table 2) predict e or v and take the loss on x or e instead
(see CONVERSIONS).
"""
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn


def velocity(x_pred, z, t, t_eps: float):
    """v̂ = (x̂ - z) / max(1 - t, t_eps). x_pred, z: (B, C, H, W); t broadcastable to them."""
    return (x_pred - z) / (1.0 - t).clamp_min(t_eps)


def identity(out, z, t, t_eps: float):
    """The network's output is already in the wanted space."""
    return out


def x_to_eps(x_pred, z, t, t_eps: float):
    """ê = (z - t·x̂) / max(1 - t, t_eps)."""
    return (z - t * x_pred) / (1.0 - t).clamp_min(t_eps)


def eps_to_x(eps_pred, z, t, t_eps: float):
    """x̂ = (z - (1 - t)·ê) / max(t, t_eps)."""
    return (z - (1.0 - t) * eps_pred) / t.clamp_min(t_eps)


def eps_to_v(eps_pred, z, t, t_eps: float):
    """v̂ = (z - ê) / max(t, t_eps)."""
    return (z - eps_pred) / t.clamp_min(t_eps)


def v_to_x(v_pred, z, t, t_eps: float):
    """x̂ = (1 - t)·v̂ + z."""
    return (1.0 - t) * v_pred + z


def v_to_eps(v_pred, z, t, t_eps: float):
    """ê = z - t·v̂."""
    return z - t * v_pred


# CONVERSIONS[pred][space](out, z, t, t_eps): the network output `out` of parameterisation `pred`
# ("x", "eps" or "v": what the network predicts) expressed in `space`, from z = t·x + (1 - t)·e and
# v = x - e. Every division by 1 - t or by t is by max(·, t_eps): the paper clips 1 - t; clipping t
# (e- and v-prediction only) is our choice. out, z: (B, ...); t broadcastable to them.
CONVERSIONS = {
    "x": {"x": identity, "eps": x_to_eps, "v": velocity},
    "eps": {"x": eps_to_x, "eps": identity, "v": eps_to_v},
    "v": {"x": v_to_x, "eps": v_to_eps, "v": identity},
}

# TRUTHS[pred](x, e): the exact value of what a `pred` network predicts, for data x and noise e.
TRUTHS = {"x": lambda x, e: x, "eps": lambda x, e: e, "v": lambda x, e: x - e}


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample: `method` (a key of SAMPLERS) over `steps` intervals of [0, 1], with
    classifier-free guidance scale `cfg` inside the time interval (interval_min, interval_max)
    (see cfg_scale_at)."""

    method: str = "heun"
    steps: int = 50
    cfg: float = 1.0
    interval_min: float = 0.0
    interval_max: float = 1.0

    def __post_init__(self):
        if self.method not in SAMPLERS:
            raise ValueError(f"sampling method must be one of {', '.join(SAMPLERS)}, got {self.method!r}")
        if self.steps < 1:
            raise ValueError(f"the sampler needs at least 1 step, got {self.steps}")
        if self.cfg < 0:
            raise ValueError(f"the CFG scale must be >= 0, got {self.cfg}")
        if not 0 <= self.interval_min < self.interval_max <= 1:
            raise ValueError(f"the guidance interval needs 0 <= interval_min < interval_max <= 1, "
                             f"got ({self.interval_min}, {self.interval_max})")

    def net_passes(self) -> int:
        """Network evaluations per image: one per velocity (Heun: two per interval but the last),
        two where guidance applies (conditional and unconditional)."""
        grid = time_grid(self.steps)
        heun = self.method == "heun"
        times = [*range(self.steps), *(range(1, self.steps) if heun else [])]
        return sum(1 + (cfg_scale_at(grid[i], self.cfg, self.interval_min, self.interval_max) != 1.0) for i in times)


class Denoiser(nn.Module):
    """Owns the network `net(z, t, y)` and the diffusion objective.

    The network predicts `pred` ("x": x̂, the paper's method; "eps": ê; "v": v̂) and the loss is the
    mean squared error in the space `loss` ("x", "eps" or "v"; the paper's: "v") between the
    network's output and the exact value of its target, both converted by CONVERSIONS[pred][loss].
    Where no clip is active this is the pred-space error weighted by the squared conversion factor,
    e.g. for x-prediction 1, t²/(1 - t)², 1/(1 - t)² for the x-, e- and v-loss (paper, footnote 4).

    forward(x, labels, t=None, noise=None) returns the scalar training loss; `t` (B,) and `noise`
    (like x, already scaled by noise_scale) may be given to make it deterministic. Labels are
    replaced by the null class `num_classes` with probability `label_drop_prob` in training mode.
    With per_sample=True it returns (loss, per-sample losses (B,), t (B,)), the loss being the mean of
    the very same per-sample values (what the training monitor bins by noise level).
    """

    def __init__(self, net, num_classes: int, P_mean=-0.8, P_std=0.8, noise_scale=1.0, t_eps=0.05, label_drop_prob=0.1,
                 pred="x", loss="v"):
        super().__init__()
        for name, value in (("pred", pred), ("loss", loss)):
            if value not in CONVERSIONS:
                raise ValueError(f"{name} must be one of {', '.join(CONVERSIONS)}, got {value!r}")
        self.net = net
        self.pred = pred
        self.loss = loss
        self.num_classes = num_classes
        self.P_mean = P_mean
        self.P_std = P_std
        self.noise_scale = noise_scale
        self.t_eps = t_eps
        self.label_drop_prob = label_drop_prob

    def sample_t(self, n: int, device):
        """Logit-normal training times: t = sigmoid(n), n ~ N(P_mean, P_std²). Returns (n,)."""
        return torch.sigmoid(torch.randn(n, device=device) * self.P_std + self.P_mean)

    def drop_labels(self, labels):
        drop = torch.rand(labels.shape[0], device=labels.device) < self.label_drop_prob
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, x, labels, t=None, noise=None, per_sample: bool = False):
        if self.training and self.label_drop_prob > 0:
            labels = self.drop_labels(labels)
        if t is None:
            t = self.sample_t(x.shape[0], x.device)
        if noise is None:
            noise = torch.randn_like(x) * self.noise_scale
        t = t.view(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
        z = t * x + (1 - t) * noise
        to_loss_space = CONVERSIONS[self.pred][self.loss]
        target = to_loss_space(TRUTHS[self.pred](x, noise), z, t, self.t_eps)  # x-pred, v-loss: (x - z)/max(1 - t, t_eps)
        out = to_loss_space(self.net(z, t.flatten(), labels), z, t, self.t_eps)
        losses = ((target - out) ** 2).mean(dim=tuple(range(1, x.ndim)))  # (B,)
        if per_sample:
            return losses.mean(), losses.detach(), t.detach().flatten()
        return losses.mean()

    @torch.no_grad()
    def generate(self, labels, settings: SamplerSettings, *, noise=None, net=None):
        """Sample images (B, C, H, W) in about [-1, 1] for `labels` (B,) with this denoiser's net.

        noise: the initial z₀ (B, C, H, W), already scaled; default noise_scale·N(0, I) at the
        net's resolution. net: a stand-in for self.net with the same weights (a compiled one).
        """
        if noise is None:
            size = self.net.input_size
            shape = (labels.shape[0], self.net.in_channels, size, size)
            noise = torch.randn(shape, device=labels.device) * self.noise_scale
        return sample(self.net if net is None else net, noise, labels, settings, null_label=self.num_classes, t_eps=self.t_eps,
                      pred=self.pred)


def time_grid(steps: int):
    """The sampler's times linspace(0, 1, steps + 1) as a float32 CPU tensor."""
    return torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float32)


def cfg_scale_at(t: torch.Tensor, cfg: float, interval_min: float, interval_max: float) -> float:
    """Guidance scale at time t (a float32 scalar tensor): `cfg` when t < interval_max and
    (interval_min == 0 or t > interval_min), else 1. Compared in float32, as the reference does."""
    inside = bool(t < interval_max) and (interval_min == 0 or bool(t > interval_min))
    return cfg if inside else 1.0


def guided_velocity(net, z, t, labels, *, null_label: int, cfg: float, t_eps: float, pred: str = "x"):
    """v = v_u + cfg·(v_c - v_u) at one time t (0-dim tensor), each v̂ converted from the output of a
    `pred` network. Conditional and unconditional passes share one batch; with cfg == 1 the
    unconditional pass is skipped (v = v_c)."""
    B = z.shape[0]
    to_v = CONVERSIONS[pred]["v"]
    if cfg == 1.0:
        return to_v(net(z, t.repeat(B), labels), z, t, t_eps)
    out = net(torch.cat([z, z]), t.repeat(2 * B), torch.cat([labels, torch.full_like(labels, null_label)]))
    v_cond, v_uncond = to_v(out, torch.cat([z, z]), t, t_eps).chunk(2)
    return v_uncond + cfg * (v_cond - v_uncond)


def euler_step(v_at, z, i: int, ts):
    """z at ts[i + 1] from z at ts[i]: z + dt·v(z, t_i). v_at(z, i) is the velocity at ts[i]."""
    return z + (ts[i + 1] - ts[i]) * v_at(z, i)


def heun_step(v_at, z, i: int, ts):
    """Heun's 2nd-order step: z + dt·(v(z, t_i) + v(z + dt·v, t_{i+1}))/2. The last interval takes an
    Euler step (the velocity at t = 1 is undefined)."""
    if i == len(ts) - 2:
        return euler_step(v_at, z, i, ts)
    dt = ts[i + 1] - ts[i]
    v = v_at(z, i)
    v_next = v_at(z + dt * v, i + 1)
    return z + dt * (0.5 * (v + v_next))


# Sampling method name (--sampling_method) -> one integration step.
SAMPLERS = {"heun": heun_step, "euler": euler_step}


def sample(net, z, labels, settings: SamplerSettings, *, null_label: int, t_eps: float = 0.05, pred: str = "x"):
    """Integrate dz/dt = v(z, t) from t = 0 (noise z) to t = 1 (image) on linspace(0, 1, steps + 1).

    net(z, t, y) is any callable predicting `pred` (x̂ by default, see CONVERSIONS). z: (B, C, H, W)
    initial noise; labels: (B,). Returns (B, C, H, W).
    """
    grid = time_grid(settings.steps)
    ts = grid.to(z.device)
    step = SAMPLERS[settings.method]

    def v_at(z_, i):
        scale = cfg_scale_at(grid[i], settings.cfg, settings.interval_min, settings.interval_max)
        return guided_velocity(net, z_, ts[i], labels, null_label=null_label, cfg=scale, t_eps=t_eps, pred=pred)

    for i in range(settings.steps):
        z = step(v_at, z, i, ts)
    return z


class EMA:
    """Exponential moving average of all parameters of a module: p_ema ← d·p_ema + (1 - d)·p.

    Holds a frozen copy of the module (`self.module`), used directly for sampling. The state dict
    is the copy's full state dict, as the reference stores `model_ema1` / `model_ema2`.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._ema = list(self.module.parameters())

    def tensors(self) -> list[torch.Tensor]:
        """The tensors update() writes: the copy's parameters."""
        return self._ema

    def weight(self, images_seen: int | None = None, batch: int | None = None) -> float:
        """The lerp weight of the new weights in every step, 1 - d (the arguments, which a power EMA's
        weight depends on, do not matter here)."""
        return 1.0 - self.decay

    @torch.no_grad()
    def update(self, model: nn.Module):
        """One EMA step towards `model`'s parameters (one fused foreach op, no host sync)."""
        torch._foreach_lerp_(self.tensors(), [p.detach() for p in model.parameters()], self.weight())

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state_dict):
        self.module.load_state_dict(state_dict)
