"""Sampling: pure functions of a network callable `net(z, t, y)` that integrate the flow ODE
dz/dt = v(z, t) from noise (t = 0) to an image (t = 1), and back (inversion); see denoiser.py for the
conventions.

`SamplerSettings` is one sampler setting (method, steps, schedule, CFG scale and interval), checked
when it is made: a setting either samples to a finite result or is refused there, in one line
(ValueError); `check_denoiser` does the same for the denoiser's noise_scale, t_eps and prediction.
`sample` runs it; `invert` runs it from an image back to its noise. The reference's path is
`heun_step` (Euler on the last interval) over linspace(0, 1, steps + 1) with `guided_velocity` and
`cfg_scale_at` (the CFG interval); the multistep solvers (sampling_multistep.py) and the schedules
(sampling_grid.py) are additions.
"""

import math
from dataclasses import dataclass
from numbers import Integral

import numpy as np
import torch

import sampling_multistep
from denoiser import CONVERSIONS
from sampling_grid import SCHEDULES, parse_schedule, time_grid, upgrade_schedule  # noqa: F401  (re-exported)
from sampling_multistep import MULTISTEP

MAX_STEPS = 1000
MAX_CFG = 100.0
MIN_T_EPS = (
    2.0**-24
)  # float32's spacing of times just below 1: a smaller positive clip is below its resolution of 1 - t


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample: `method` (one of METHODS) over `steps` (1 to MAX_STEPS) intervals of [0, 1] placed
    by `schedule` (see sampling_grid.SCHEDULES), with classifier-free guidance scale `cfg` (0 to
    MAX_CFG) inside the time interval (interval_min, interval_max) (see cfg_scale_at). ValueError (one
    line) for a setting that cannot sample: a value outside its range, an interval float32 cannot
    hold, a grid whose float32 nodes are not strictly increasing."""

    method: str = "heun"
    steps: int = 50
    cfg: float = 1.0
    interval_min: float = 0.0
    interval_max: float = 1.0
    schedule: str = "uniform"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"sampling method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not isinstance(self.steps, Integral) or isinstance(self.steps, bool) or not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"the sampler takes 1 to {MAX_STEPS} steps (an integer), got {self.steps!r}")
        if not 0 <= self.cfg <= MAX_CFG:  # NaN fails too
            raise ValueError(f"the CFG scale must be >= 0 and <= {MAX_CFG:g}, got {self.cfg}")
        check_interval(self.interval_min, self.interval_max)
        parse_schedule(self.schedule)  # ValueError for an unknown one or a parameter out of range
        pieces = len(self.breaks()) + 1
        if self.steps < pieces:
            raise ValueError(
                f"{self.method} steps from node to node of the guidance interval: it needs at least {pieces} "
                f"steps for the interval ({self.interval_min}, {self.interval_max}), got {self.steps}"
            )
        self.grid()  # ValueError for float32 nodes that are not strictly increasing

    def breaks(self) -> tuple:
        """Interior times the grid must hold as nodes: for a multistep method the ends of the guidance
        interval inside (0, 1) (where the guided velocity jumps); none for Heun and Euler (the
        reference's grid)."""
        if self.method not in MULTISTEP or self.cfg == 1.0:
            return ()
        return tuple(b for b in (self.interval_min, self.interval_max) if 0 < b < 1)

    def grid(self) -> torch.Tensor:
        """The time nodes (steps + 1,) float32, from 0 to 1."""
        return time_grid(self.steps, self.schedule, self.breaks())

    def evaluations(self, reverse: bool = False) -> list:
        """(time, guidance scale) of every network evaluation of one sample (reverse: of one inversion),
        in order: Heun two per interval but a last one into t = 1 (the reference's Euler step), Euler one
        per interval, a multistep method one per interval (at its start, with the scale of the interval
        it starts)."""
        grid = self.grid().flip(0) if reverse else self.grid()
        if self.method in MULTISTEP:
            return [(grid[i], segment_cfg(grid, i, self)) for i in range(self.steps)]
        heun = self.method == "heun"
        times = [j for i in range(self.steps) for j in ((i, i + 1) if heun and grid[i + 1] != 1 else (i,))]
        return [(grid[i], cfg_scale_at(grid[i], self.cfg, self.interval_min, self.interval_max)) for i in times]

    def nfe(self) -> int:
        """Network evaluations per image (NFE): sequential calls of the network; a guided evaluation
        (conditional and unconditional in one doubled batch) counts once."""
        return len(self.evaluations())

    def net_passes(self) -> int:
        """Network passes per image (the cost): one per evaluation, two where guidance applies
        (conditional and unconditional)."""
        return sum(1 + (scale != 1.0) for _, scale in self.evaluations())


def check_interval(lo: float, hi: float):
    """ValueError unless 0 <= lo < hi <= 1 hold in float32 too (the sampler compares float32 times)."""
    if not 0 <= lo < hi <= 1:  # NaN fails too
        raise ValueError(f"the guidance interval needs 0 <= interval_min < interval_max <= 1, got ({lo}, {hi})")
    lo32, hi32 = float(np.float32(lo)), float(np.float32(hi))
    if lo32 >= hi32 or (lo > 0 and lo32 == 0) or (hi < 1 and hi32 == 1):
        raise ValueError(
            f"the guidance interval ({lo}, {hi}) is ({lo32}, {hi32}) in float32, the sampler's time: "
            "its ends must stay apart and inside (0, 1)"
        )


def check_t_eps(t_eps: float, pred: str = "x", inverting: bool = False):
    """ValueError (one line) unless the sampler can run a `pred` network with this clip: t_eps = 0 or
    MIN_T_EPS <= t_eps < 1 (a smaller positive clip is below float32's resolution of 1 - t: it would
    divide by a denormal, or act as 0 in some steps and not in others); an ε-network needs t_eps > 0
    (its velocity (z - ε̂)/max(t, t_eps) is 0/0 at t = 0), inversion too (it starts at t = 1)."""
    if not (t_eps == 0 or MIN_T_EPS <= t_eps < 1):  # NaN fails too
        raise ValueError(f"t_eps must be 0 or in [{MIN_T_EPS:.3g}, 1) (2^-24 to 1), got {t_eps}")
    if t_eps == 0 and pred == "eps":
        raise ValueError("an ε-prediction network needs t_eps > 0: its velocity (z - ε̂)/max(t, t_eps) is 0/0 at t = 0")
    if t_eps == 0 and inverting:
        raise ValueError("inversion needs t_eps > 0: with t_eps = 0 the velocity at t = 1 is undefined")


def check_denoiser(noise_scale: float | None, t_eps: float | None, pred: str | None):
    """ValueError (one line) for denoiser settings no sampler can run: noise_scale (the std of the
    initial noise) not a positive finite number, or a clip check_t_eps refuses for a `pred` network.
    None: not known yet (a command line's flag left to the weights), not checked."""
    if noise_scale is not None and not 0 < noise_scale < math.inf:  # NaN fails too
        raise ValueError(f"noise_scale (the std of the noise) must be a positive finite number, got {noise_scale}")
    if t_eps is not None:
        check_t_eps(t_eps, pred or "x")


def segment_cfg(grid: torch.Tensor, i: int, settings: SamplerSettings) -> float:
    """Guidance scale on the interval (grid[i], grid[i + 1]) of a grid whose nodes hold the guidance
    interval's ends: that of its midpoint (a node at an end is evaluated with the scale of the
    interval it starts)."""
    mid = (grid[i].double() + grid[i + 1].double()) / 2
    return cfg_scale_at(mid, settings.cfg, settings.interval_min, settings.interval_max)


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


def euler_step(v_at, z, i: int, ts, euler_only: bool = False):
    """z at ts[i + 1] from z at ts[i]: z + dt·v(z, t_i). v_at(z, i) is the velocity at ts[i]."""
    return z + (ts[i + 1] - ts[i]) * v_at(z, i)


def heun_step(v_at, z, i: int, ts, euler_only: bool = False):
    """Heun's 2nd-order step: z + dt·(v(z, t_i) + v(z + dt·v, t_{i+1}))/2. An Euler step where
    euler_only (a step into t = 1: the velocity there is undefined)."""
    if euler_only:
        return euler_step(v_at, z, i, ts)
    dt = ts[i + 1] - ts[i]
    v = v_at(z, i)
    v_next = v_at(z + dt * v, i + 1)
    return z + dt * (0.5 * (v + v_next))


# Single-step method name (--sampling_method) -> one integration step.
SAMPLERS = {"heun": heun_step, "euler": euler_step}


METHODS = (*SAMPLERS, *MULTISTEP)


def integrate(net, z, labels, settings: SamplerSettings, grid, *, null_label: int, t_eps: float, pred: str):
    """z at grid[-1] from z at grid[0] over the float32 nodes `grid` (settings.grid() or its reverse);
    ValueError (check_t_eps) for a clip t_eps the sampler cannot run."""
    check_t_eps(t_eps, pred, inverting=bool(grid[0] > grid[-1]))
    ts = grid.to(z.device)
    if settings.method in MULTISTEP:

        def data_at(z_, i, scale):  # D = z + max(1 - t, t_eps)·v̂: x̂ itself for x-prediction
            v = guided_velocity(net, z_, ts[i], labels, null_label=null_label, cfg=scale, t_eps=t_eps, pred=pred)
            return z_ + (1.0 - ts[i]).clamp_min(t_eps) * v

        scales = [segment_cfg(grid, i, settings) for i in range(settings.steps)]
        return sampling_multistep.integrate_multistep(settings.method, z, grid.tolist(), scales, data_at, t_eps)
    step = SAMPLERS[settings.method]

    def v_at(z_, i):
        scale = cfg_scale_at(grid[i], settings.cfg, settings.interval_min, settings.interval_max)
        return guided_velocity(net, z_, ts[i], labels, null_label=null_label, cfg=scale, t_eps=t_eps, pred=pred)

    ends_at_one = (grid[1:] == 1).tolist()
    for i in range(settings.steps):
        z = step(v_at, z, i, ts, ends_at_one[i])
    return z


def sample(net, z, labels, settings: SamplerSettings, *, null_label: int, t_eps: float = 0.05, pred: str = "x"):
    """Integrate dz/dt = v(z, t) from t = 0 (noise z) to t = 1 (image) on settings.grid()
    (linspace(0, 1, steps + 1) by default).

    net(z, t, y) is any callable predicting `pred` (x̂ by default, see CONVERSIONS). z: (B, C, H, W)
    initial noise; labels: (B,). Returns (B, C, H, W).
    """
    grid = settings.grid()
    return integrate(net, z, labels, settings, grid, null_label=null_label, t_eps=t_eps, pred=pred)


def invert(net, x, labels, settings: SamplerSettings, *, null_label: int, t_eps: float = 0.05, pred: str = "x"):
    """The noise z₀ that `sample` with these settings maps to x (approximately: the same ODE integrated
    from t = 1 back to t = 0 on the reversed grid, with the same guidance): ODE inversion. x: (B, C, H, W)
    the state at t = 1 (a sample or an image in [-1, 1]); labels: (B,). Returns (B, C, H, W). Heun takes
    its second-order step everywhere (the velocity at t = 1 is defined where t_eps > 0); ValueError for
    t_eps = 0 (the flow is singular at t = 1: no step can start there)."""
    grid = settings.grid().flip(0)
    return integrate(net, x, labels, settings, grid, null_label=null_label, t_eps=t_eps, pred=pred)
