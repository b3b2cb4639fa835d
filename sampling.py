"""Sampling: pure functions of a network callable `net(z, t, y)` that integrate the flow ODE
dz/dt = v(z, t) from noise (t = 0) to an image (t = 1); see denoiser.py for the conventions.

`SamplerSettings` is one sampler setting (method, steps, schedule, CFG scale and interval); `sample`
runs it. The reference's path is `heun_step` (Euler on the last interval) over linspace(0, 1, steps + 1)
with `guided_velocity` and `cfg_scale_at` (the CFG interval); the multistep solvers (one network
evaluation per step) and the step schedules are additions.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from denoiser import CONVERSIONS


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample: `method` (one of METHODS) over `steps` intervals of [0, 1] placed by `schedule`
    (see SCHEDULES), with classifier-free guidance scale `cfg` inside the time interval
    (interval_min, interval_max) (see cfg_scale_at)."""

    method: str = "heun"
    steps: int = 50
    cfg: float = 1.0
    interval_min: float = 0.0
    interval_max: float = 1.0
    schedule: str = "uniform"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"sampling method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.steps < 1:
            raise ValueError(f"the sampler needs at least 1 step, got {self.steps}")
        if self.cfg < 0:
            raise ValueError(f"the CFG scale must be >= 0, got {self.cfg}")
        if not 0 <= self.interval_min < self.interval_max <= 1:
            raise ValueError(
                f"the guidance interval needs 0 <= interval_min < interval_max <= 1, "
                f"got ({self.interval_min}, {self.interval_max})"
            )
        parse_schedule(self.schedule)  # ValueError for an unknown one
        pieces = len(self.breaks()) + 1
        if self.steps < pieces:
            raise ValueError(
                f"{self.method} steps from node to node of the guidance interval: it needs at least {pieces} "
                f"steps for the interval ({self.interval_min}, {self.interval_max}), got {self.steps}"
            )

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

    def evaluations(self) -> list:
        """(time, guidance scale) of every network evaluation of one sample, in order: Heun two per
        interval but the last (the velocity at t = 1 is undefined), Euler one per interval, a multistep
        method one per interval (at its start, with the scale of the interval it starts)."""
        grid = self.grid()
        if self.method in MULTISTEP:
            return [(grid[i], segment_cfg(grid, i, self)) for i in range(self.steps)]
        heun = self.method == "heun"
        times = [j for i in range(self.steps) for j in ((i, i + 1) if heun and i < self.steps - 1 else (i,))]
        return [(grid[i], cfg_scale_at(grid[i], self.cfg, self.interval_min, self.interval_max)) for i in times]

    def nfe(self) -> int:
        """Network evaluations per image (NFE): sequential calls of the network; a guided evaluation
        (conditional and unconditional in one doubled batch) counts once."""
        return len(self.evaluations())

    def net_passes(self) -> int:
        """Network passes per image (the cost): one per evaluation, two where guidance applies
        (conditional and unconditional)."""
        return sum(1 + (scale != 1.0) for _, scale in self.evaluations())


def parse_schedule(schedule: str) -> tuple[str, float]:
    """'name' or 'name:param' of SCHEDULES -> (name, param); ValueError for anything else."""
    name, _, param = schedule.partition(":")
    if name not in SCHEDULES:
        raise ValueError(
            f"schedule must be one of {', '.join(SCHEDULES)} (optionally name:parameter), got {schedule!r}"
        )
    try:
        value = float(param) if param else SCHEDULES[name]
    except ValueError:
        raise ValueError(f"schedule {schedule!r}: the parameter after ':' must be a number") from None
    if name == "uniform":
        if param:
            raise ValueError(f"schedule 'uniform' takes no parameter, got {schedule!r}")
    elif not (value > 0 and math.isfinite(value)):
        raise ValueError(f"schedule {schedule!r}: the parameter must be a positive number")
    return name, value


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def schedule_warp(schedule: str):
    """(warp, inverse) of a schedule: increasing maps of [0, 1] onto itself, u (uniform in the step
    index) -> t. uniform: t = u. shift:s (SD3's time shift, Esser et al. 2024, eq. 23, in our t):
    t = u / (u + s·(1 - u)), s > 1 puts steps near the noise. edm:ρ (Karras et al. 2022, eq. 5, with
    the noise fraction 1 - t in the place of σ, from 1 to 0): 1 - t = (1 - u)^ρ, ρ > 1 puts steps near
    the image. logsnr:L: uniform in log-SNR λ = logit(t) over [-L, L], rescaled to reach t = 0 and 1."""
    name, p = parse_schedule(schedule)
    if name == "uniform":
        return (lambda u: u), (lambda t: t)
    if name == "shift":
        return (lambda u: u / (u + p * (1 - u))), (lambda t: p * t / (1 - t + p * t))
    if name == "edm":
        return (lambda u: 1 - (1 - u) ** p), (lambda t: 1 - (1 - t) ** (1 / p))
    lo, hi = _sigmoid(-p), _sigmoid(p)

    def inverse(t):
        s = lo + t * (hi - lo)
        return (math.log(s / (1 - s)) + p) / (2 * p)

    return (lambda u: (_sigmoid(-p + 2 * p * u) - lo) / (hi - lo)), inverse


def time_grid(steps: int, schedule: str = "uniform", breaks: tuple = ()):
    """The sampler's times (steps + 1,) as a float32 CPU tensor, from 0 to 1. Uniform without breaks:
    linspace(0, 1, steps + 1), the reference's grid. Else `breaks` (times in (0, 1)) are nodes: they
    cut [0, 1] into pieces, each piece gets steps in proportion to its share of the schedule's u (at
    least one, largest remainders), placed by the schedule's warp within the piece."""
    if schedule == "uniform" and not breaks:
        return torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float32)
    warp, inverse = schedule_warp(schedule)
    ends = [0.0, *sorted(set(breaks)), 1.0]
    us = [0.0, *(inverse(b) for b in ends[1:-1]), 1.0]
    shares = [steps * (b - a) for a, b in zip(us, us[1:])]
    counts = [max(1, int(s)) for s in shares]
    while sum(counts) < steps:  # the piece furthest below its share gets a step
        counts[max(range(len(counts)), key=lambda k: shares[k] - counts[k])] += 1
    while sum(counts) > steps:  # (pieces raised to one step) the piece furthest above its share gives one
        counts[max((k for k in range(len(counts)) if counts[k] > 1), key=lambda k: counts[k] - shares[k])] -= 1
    nodes = [0.0]
    for a, b, tb, n in zip(us, us[1:], ends[1:], counts):
        nodes += [warp(a + (b - a) * j / n) for j in range(1, n)] + [tb]
    return torch.tensor(nodes, dtype=torch.float64).float()


def segment_cfg(grid: torch.Tensor, i: int, settings: "SamplerSettings") -> float:
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


# Single-step method name (--sampling_method) -> one integration step.
SAMPLERS = {"heun": heun_step, "euler": euler_step}


# Multistep method name -> (order, the variable x̂ is extrapolated in: "rho" (multistep_update) or "t" (ab_weights)).
MULTISTEP = {"dpm++2m": (2, "rho"), "dpm++3m": (3, "rho"), "ab2": (2, "t"), "ab3": (3, "t")}


METHODS = (*SAMPLERS, *MULTISTEP)


# Schedule name -> its parameter's default (see schedule_warp).
SCHEDULES = {"uniform": 0.0, "shift": 3.0, "edm": 7.0, "logsnr": 5.0}


def rho(t: float, t_eps: float) -> float:
    """ρ(t) = ∫₀ᵗ dτ / max(1 - τ, t_eps): -log(1 - t) up to 1 - t_eps, then linear (the sampler's ODE
    dz/dt = (D - z) / max(1 - t, t_eps) is dz/dρ = D - z). Infinite at t = 1 only for t_eps = 0."""
    if t <= 1 - t_eps:
        return -math.log1p(-t) if t < 1 else math.inf
    return -math.log(t_eps) + (t - 1 + t_eps) / t_eps


def multistep_update(z, h: float, history: list):
    """z at ρ + h from z at ρ, where history = [(ρ₀, D₀), (ρ₋₁, D₋₁), ...] (newest first) are the data
    predictions D (the x̂ of the guided velocity) at the last nodes, ρ₀ = ρ; the order is the history's
    length (1, 2 or 3).

    The ODE dz/dρ = D - z has the exact solution (the variation-of-constants formula of DPM-Solver++,
    Lu et al. 2022, arXiv 2211.01095, eq. (9), there in log-SNR λ; here in ρ, see rho())
        z(ρ + h) = e^{-h}·z(ρ) + ∫₀ʰ e^{-(h - s)} D(ρ + s) ds.
    D is replaced by its Newton polynomial through the history (exponential Adams–Bashforth: DEIS,
    Zhang & Chen 2022, arXiv 2204.13902, eq. (14); Hochbruck & Ostermann 2011, Acta Numerica 19, §2.5),
    integrated exactly: with I₀ = 1 - e^{-h}, I₁ = h - 1 + e^{-h}, I₂ = h² - 2h + 2 - 2e^{-h},
        order 1 (DDIM):   z' = e^{-h}·z + I₀·D₀                          = ((1 - t')·z + (t' - t)·D₀)/(1 - t)
        order 2 (2M):     z' += I₁·D[0, -1]                               (D[0, -1] = (D₀ - D₋₁)/(ρ₀ - ρ₋₁))
        order 3 (3M):     z' += (I₂ + (ρ₀ - ρ₋₁)·I₁)·D[0, -1, -2]         (Newton divided differences)
    For order 2 this is DPM-Solver++(2M) (Alg. 2 there) with the φ₂ term exact instead of
    (1 - e^{-h})/(2r)·(D₀ - D₋₁): the same to O(h³). h = ∞ (t' = 1 with t_eps = 0) takes order 1: z' = D₀."""
    (r0, d0) = history[0]
    if math.isinf(h):
        return d0
    e = math.exp(-h)
    out = e * z + (-math.expm1(-h)) * d0
    if len(history) >= 2:
        r1, d1 = history[1]
        i1 = h + math.expm1(-h)
        d01 = (d0 - d1) / (r0 - r1)
        out = out + i1 * d01
        if len(history) >= 3:
            r2, d2 = history[2]
            i2 = h * h - 2 * h - 2 * math.expm1(-h)
            d012 = (d01 - (d1 - d2) / (r1 - r2)) / (r0 - r2)
            out = out + (i2 + (r0 - r1) * i1) * d012
    return out


GAUSS_LEGENDRE = np.polynomial.legendre.leggauss(32)  # (nodes, weights) on [-1, 1], float64


def t_of_rho(r, t_eps: float):
    """The inverse of rho() (numpy arrays)."""
    if t_eps <= 0:
        return -np.expm1(-r)
    star = -math.log(t_eps)
    return np.where(r <= star, -np.expm1(-np.minimum(r, star)), 1 - t_eps * (1 - (r - star)))


def ab_weights(t: float, t_next: float, nodes: list, t_eps: float) -> tuple[float, list]:
    """(a, [w_j]) with z(t_next) ≈ a·z(t) + Σ_j w_j·D_j: the exact solution of dz/dρ = D - z (see
    multistep_update) with D the Lagrange polynomial in t (not ρ) through (nodes[j], D_j): a = e^{-h},
    w_j = ∫ e^{-(ρ' - r)} ℓ_j(t(r)) dr over the step, by 32-point Gauss–Legendre in ρ on each side of
    the clamp's kink at 1 - t_eps (the integrand is smooth there: exact to rounding for these steps).
    This is DEIS's tAB (Zhang & Chen 2022, arXiv 2204.13902, eq. (14): the polynomial in the original
    time, the weights by quadrature) for the data prediction. x̂ is smooth in t up to t = 1, while in
    ρ (or log-SNR) it flattens out as t → 1, where a long last step extrapolates it too far. With
    ρ' = ∞ (t_next = 1, t_eps = 0) the kernel is a point mass at t = 1: a = 0, w_j = ℓ_j(1)."""

    def basis(tau):
        out = []
        for j, tj in enumerate(nodes):
            lj = np.ones_like(tau)
            for k, tk in enumerate(nodes):
                if k != j:
                    lj = lj * (tau - tk) / (tj - tk)
            out.append(lj)
        return out

    r0, r1 = rho(t, t_eps), rho(t_next, t_eps)
    if math.isinf(r1):
        return 0.0, [float(b) for b in basis(np.array(t_next))]
    x, w = GAUSS_LEGENDRE
    star = -math.log(t_eps) if t_eps > 0 else math.inf
    weights = np.zeros(len(nodes))
    for a, b in ((r0, min(r1, star)), (max(r0, star), r1)):
        if b <= a:
            continue
        r = (a + b) / 2 + (b - a) / 2 * x
        kernel = np.exp(-(r1 - r)) * w * (b - a) / 2
        weights += [float((kernel * lj).sum()) for lj in basis(t_of_rho(r, t_eps))]
    return math.exp(-(r1 - r0)), list(weights)


def sample_multistep(net, z, labels, settings: SamplerSettings, *, null_label: int, t_eps: float, pred: str):
    """A multistep method of MULTISTEP over settings.grid(): one evaluation per interval, at its start,
    of the guided velocity v̂ (guided_velocity: any `pred` through CONVERSIONS, the t_eps clamp
    included, so the ODE is the one Heun integrates), turned into the data prediction
    D = z + max(1 - t, t_eps)·v̂ (x̂ itself for x-prediction); then multistep_update (dpm++: D
    extrapolated in ρ) or ab_weights (ab: in t). The history restarts (order 1) at a node where the
    guidance scale changes (the grid holds the interval's ends, SamplerSettings.breaks), so no step
    crosses the jump of the guided velocity or extrapolates over it. The ends: ρ(0) = 0 is finite, so
    t = 0 needs no special step (the first is order 1, having no history); with t_eps > 0 ρ(1) is
    finite too (the clamp makes the ODE regular at t = 1) and the last step keeps its order; with
    t_eps = 0 the step into t = 1 is order 1 for dpm++ (h = ∞, z = D) and ab extrapolates D to t = 1."""
    grid = settings.grid()
    ts = grid.to(z.device)
    order, variable = MULTISTEP[settings.method]
    history, scale_before = [], None
    for i in range(settings.steps):
        scale = segment_cfg(grid, i, settings)
        if scale != scale_before:
            history = []
        t = ts[i]
        v = guided_velocity(net, z, t, labels, null_label=null_label, cfg=scale, t_eps=t_eps, pred=pred)
        t0, t1 = float(grid[i]), float(grid[i + 1])
        d = z + (1.0 - t).clamp_min(t_eps) * v  # D = z + max(1 - t, t_eps)·v
        if variable == "rho":
            history = [(rho(t0, t_eps), d), *history][:order]
            z = multistep_update(z, rho(t1, t_eps) - rho(t0, t_eps), history)
        else:
            history = [(t0, d), *history][:order]
            a, ws = ab_weights(t0, t1, [tj for tj, _ in history], t_eps)
            z = a * z
            for wj, (_, dj) in zip(ws, history):
                z = z + wj * dj
        scale_before = scale
    return z


def sample(net, z, labels, settings: SamplerSettings, *, null_label: int, t_eps: float = 0.05, pred: str = "x"):
    """Integrate dz/dt = v(z, t) from t = 0 (noise z) to t = 1 (image) on settings.grid()
    (linspace(0, 1, steps + 1) by default).

    net(z, t, y) is any callable predicting `pred` (x̂ by default, see CONVERSIONS). z: (B, C, H, W)
    initial noise; labels: (B,). Returns (B, C, H, W).
    """
    if settings.method in MULTISTEP:
        return sample_multistep(net, z, labels, settings, null_label=null_label, t_eps=t_eps, pred=pred)
    grid = settings.grid()
    ts = grid.to(z.device)
    step = SAMPLERS[settings.method]

    def v_at(z_, i):
        scale = cfg_scale_at(grid[i], settings.cfg, settings.interval_min, settings.interval_max)
        return guided_velocity(net, z_, ts[i], labels, null_label=null_label, cfg=scale, t_eps=t_eps, pred=pred)

    for i in range(settings.steps):
        z = step(v_at, z, i, ts)
    return z
