"""Records diffusers' multistep solvers on a shared grid, once, into solver_parity.json (read by
tests/test_solver_parity.py, which needs no diffusers).

    pip install diffusers        # only to rerun this script
    python tests/data/record_solver_parity.py

The problem: bench/mixture.py's 8-mode mixture, its exact x̂ (class 1, no guidance) as the model, in
flow-matching form (diffusers' flow sigmas σ = 1 - t, prediction_type "flow_prediction": the model
returns (z - x̂)/σ), from z at t = 1 - σ₀ over the flow sigmas SIGMAS (exact in binary, so 1 - σ is too),
then σ = 0. DPMSolverMultistepScheduler (dpmsolver++, midpoint, orders 2 and 3) takes the grid by
setting its sigmas; UniPCMultistepScheduler (bh2, orders 2 and 3) through set_timesteps(sigmas=...).
Both use their defaults otherwise (lower_order_final, final_sigmas_type "zero").
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "bench"))
from mixture import Mixture  # noqa: E402

SIGMAS = [0.9375, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.1875, 0.125, 0.0625, 0.03125]  # 11 steps with σ = 0
LABEL = 1
SCHEDULERS = {"dpm++2m": ("dpm", 2), "dpm++3m": ("dpm", 3), "unipc2": ("unipc", 2), "unipc3": ("unipc", 3)}


def start(n: int = 16):
    """z at t = 1 - SIGMAS[0]: t·x + σ·e for points x near the modes (float64)."""
    g = torch.Generator().manual_seed(0)
    x = Mixture().mu[torch.arange(n) % 8] + 0.05 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    e = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return (1 - SIGMAS[0]) * x + SIGMAS[0] * e


def scheduler(kind: str, order: int):
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    common = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0, solver_order=order)
    if kind == "unipc":
        s = UniPCMultistepScheduler(solver_type="bh2", predict_x0=True, **common)
        s.set_timesteps(sigmas=np.array(SIGMAS))
        return s
    s = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_type="midpoint", **common)
    s.set_timesteps(len(SIGMAS))
    s.sigmas = torch.tensor([*SIGMAS, 0.0], dtype=torch.float32)
    s.timesteps = torch.tensor([1000 * x for x in SIGMAS])
    return s


def run(kind: str, order: int, z):
    s = scheduler(kind, order)
    assert torch.equal(s.sigmas, torch.tensor([*SIGMAS, 0.0])), s.sigmas  # the shared grid
    mix, labels = Mixture(), torch.full((z.shape[0],), LABEL)
    for i, timestep in enumerate(s.timesteps):
        sigma, t = SIGMAS[i], 1 - SIGMAS[i]
        x_pred = mix(z, torch.full((z.shape[0],), t, dtype=torch.float64), labels)
        z = s.step((z - x_pred) / sigma, timestep, z).prev_sample
    return z


def main():
    argparse.ArgumentParser(description="Record diffusers' solver outputs into solver_parity.json.").parse_args()
    import diffusers

    z0 = start()
    out = {
        "diffusers": diffusers.__version__,
        "sigmas": SIGMAS,
        "label": LABEL,
        "z0": z0.tolist(),
        "results": {name: run(*spec, z0).tolist() for name, spec in SCHEDULERS.items()},
    }
    with open(os.path.join(HERE, "solver_parity.json"), "w") as f:
        json.dump(out, f)
        f.write("\n")


if __name__ == "__main__":
    main()
