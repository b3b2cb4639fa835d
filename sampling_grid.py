"""Where the sampler's steps go: the schedules, and the float32 time grid from t = 0 (noise) to t = 1
(image) they give (see sampling.py).

A schedule is `name` or `name:parameter` (SCHEDULES: the default parameter and its accepted range).
Every grid is checked when it is made: float32 nodes strictly increasing from 0 to 1, else a one-line
ValueError (a schedule that packs nodes closer than float32 can hold would divide by a zero step).
"""

import math

import numpy as np
import torch

# name -> (default parameter, (lowest, highest) accepted); uniform takes none.
SCHEDULES = {
    "uniform": (None, None),
    "shift": (3.0, (0.01, 100.0)),
    "logit": (5.0, (0.01, 20.0)),
    "power": (2.0, (0.1, 10.0)),
    "karras": (7.0, (0.5, 20.0)),
}
KARRAS_SIGMAS = (0.002, 80.0)  # EDM's σ_min, σ_max (Karras et al. 2022, Table 1)

# Names that meant something else before (metrics.jsonl records and exported folders may hold them):
# old name -> (new name, the old default parameter).
RENAMED = {"edm": ("power", 7.0), "logsnr": ("logit", 5.0)}

FINE = 4096  # steps of the fine grid that places nodes between the guidance interval's ends


def upgrade_schedule(schedule: str) -> str:
    """A schedule written before the renames (RENAMED) as its new name with the same grid: 'edm:2' ->
    'power:2', 'logsnr' -> 'logit:5'; anything else unchanged. For settings read from files."""
    name, _, param = schedule.partition(":")
    if name not in RENAMED:
        return schedule
    new, default = RENAMED[name]
    return f"{new}:{param if param else f'{default:g}'}"


def renamed_message(schedule: str) -> str:
    name = schedule.partition(":")[0]
    new = RENAMED[name][0]
    what = {
        "power": "1 - t = (1 - u)^p; EDM's σ spacing (Karras et al. 2022) is karras[:ρ]",
        "logit": "uniform in logit t = log-SNR/2",
    }[new]
    return f"schedule {name!r} was renamed: use {upgrade_schedule(schedule)} (the same grid: {what})"


def parse_schedule(schedule: str) -> tuple[str, float | None]:
    """'name' or 'name:param' -> (name, param); ValueError (one line) for anything else, a parameter
    outside the name's range included."""
    name, colon, text = str(schedule).partition(":")
    if name in RENAMED:
        raise ValueError(renamed_message(schedule))
    if name not in SCHEDULES:
        raise ValueError(
            f"schedule must be one of {', '.join(SCHEDULES)} (optionally name:parameter), got {schedule!r}"
        )
    default, bounds = SCHEDULES[name]
    if bounds is None:
        if colon:
            raise ValueError(f"schedule 'uniform' takes no parameter, got {schedule!r}")
        return name, None
    if not colon:
        return name, default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"schedule {schedule!r}: the parameter after ':' must be a number") from None
    lo, hi = bounds
    if not lo <= value <= hi:  # NaN fails too
        raise ValueError(f"schedule {schedule!r}: the parameter of {name} must be in [{lo:g}, {hi:g}]")
    return name, value


def _logit_nodes(u: np.ndarray, L: float) -> np.ndarray:
    lo, hi = 1 / (1 + math.exp(L)), 1 / (1 + math.exp(-L))
    return (1 / (1 + np.exp(L - 2 * L * u)) - lo) / (hi - lo)


def _karras_nodes(n: int, rho: float) -> np.ndarray:
    """t = 1/(1 + σ) at EDM's σ_i = (σ_max^{1/ρ} + i/(n - 1)·(σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ, i = 0..n - 1,
    then σ = 0 (t = 1); the first node σ_max is t = 0 (pure noise, as EDM starts from N(0, σ_max²))."""
    if n == 1:
        return np.array([0.0, 1.0])
    lo, hi = (s ** (1 / rho) for s in KARRAS_SIGMAS)
    sigma = (hi + np.arange(1, n) / (n - 1) * (lo - hi)) ** rho
    return np.concatenate([[0.0], 1 / (1 + sigma), [1.0]])


def schedule_nodes(schedule: str, steps: int) -> np.ndarray:
    """The schedule's steps + 1 nodes (float64, 0 to 1) at u = i/steps:
    uniform  t = u
    shift:s  t = u / (u + s·(1 - u))   (SD3's time shift, Esser et al. 2024, eq. 23; s > 1: steps near noise)
    logit:L  uniform in logit t over [-L, L], rescaled to reach 0 and 1 (steps near both ends)
    power:p  1 - t = (1 - u)^p          (p > 1: steps near the image)
    karras:ρ EDM's spacing of σ = (1 - t)/t (Karras et al. 2022, eq. 5; σ in [0.002, 80], see _karras_nodes)"""
    name, p = parse_schedule(schedule)
    u = np.arange(steps + 1) / steps
    if name == "karras":
        return _karras_nodes(steps, p)
    t = {
        "uniform": lambda: u,
        "shift": lambda: u / (u + p * (1 - u)),
        "logit": lambda: _logit_nodes(u, p),
        "power": lambda: 1 - (1 - u) ** p,
    }[name]()
    t[0], t[-1] = 0.0, 1.0
    return t


def time_grid(steps: int, schedule: str = "uniform", breaks: tuple = ()) -> torch.Tensor:
    """The sampler's times (steps + 1,) as a float32 CPU tensor, from 0 to 1, strictly increasing
    (else ValueError). Uniform without breaks: linspace(0, 1, steps + 1), the reference's grid. Else
    `breaks` (times in (0, 1)) are nodes: they cut [0, 1] into pieces, each piece gets steps in
    proportion to its share of the schedule's u (at least one, largest remainders), placed within it
    as the schedule places them (by its fine grid of FINE steps)."""
    if schedule == "uniform" and not breaks:
        return check_grid(torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float32), schedule, steps)
    if not breaks:
        return check_grid(torch.tensor(schedule_nodes(schedule, steps)).float(), schedule, steps)
    fine_u, fine_t = np.linspace(0, 1, FINE + 1), schedule_nodes(schedule, FINE)
    ends = [0.0, *sorted(set(breaks)), 1.0]
    us = [0.0, *np.interp(ends[1:-1], fine_t, fine_u), 1.0]
    shares = [steps * (b - a) for a, b in zip(us, us[1:])]
    counts = [max(1, int(s)) for s in shares]
    while sum(counts) < steps:  # the piece furthest below its share gets a step
        counts[max(range(len(counts)), key=lambda k: shares[k] - counts[k])] += 1
    while sum(counts) > steps:  # (pieces raised to one step) the piece furthest above its share gives one
        counts[max((k for k in range(len(counts)) if counts[k] > 1), key=lambda k: counts[k] - shares[k])] -= 1
    nodes = [0.0]
    for a, b, tb, n in zip(us, us[1:], ends[1:], counts):
        nodes += [*np.interp([a + (b - a) * j / n for j in range(1, n)], fine_u, fine_t), tb]
    return check_grid(torch.tensor(nodes, dtype=torch.float64).float(), schedule, steps, breaks)


def check_grid(grid: torch.Tensor, schedule: str, steps: int, breaks: tuple = ()) -> torch.Tensor:
    """grid itself if its float32 nodes run strictly from 0 to 1, else a one-line ValueError."""
    bad = torch.nonzero(grid[1:] <= grid[:-1]).flatten()
    if grid[0] != 0 or grid[-1] != 1 or len(bad):
        at = f" (t = {grid[int(bad[0])].item():.9g} twice)" if len(bad) else ""
        with_breaks = f" and nodes at {', '.join(f'{b:g}' for b in breaks)}" if breaks else ""
        raise ValueError(
            f"schedule {schedule} with {steps} steps{with_breaks} puts float32 time nodes closer than float32 "
            f"can hold{at}: use fewer steps or a milder schedule"
        )
    return grid
