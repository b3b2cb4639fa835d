"""A nonlinear test problem with an exact x-prediction: 8 Gaussian modes N(μ_k, s²I) in 2-D, μ_k on a
circle of radius 0.8, 4 classes of 2 neighbouring modes each (the null class: all 8). For
z = t·x + (1 - t)·e, e ~ N(0, σ²I), the ideal denoiser is the posterior mean
    x̂(z, t) = Σ_k w_k(z, t)·(μ_k + t·s²/c²·(z - t·μ_k)),  c² = t²s² + (1 - t)²σ²,
with w_k ∝ π_k·N(z; t·μ_k, c²I) over the modes of the class. Sharp modes (s = 0.05) make x̂ change
quickly near t = 1, as a trained image model's does. Used by bench/solver_error.py and the tests.
"""

import math

import torch

MODES = 8
CLASSES = 4  # class c holds modes 2c and 2c + 1; label CLASSES is the null class (all modes)


class Mixture:
    """x̂(z, t, y) of the mixture (a net callable for sampling.sample): z (B, 2), t (B,), y (B,) in
    0..CLASSES (CLASSES: unconditional). Computed in float64, returned in z's dtype."""

    def __init__(self, radius: float = 0.8, s: float = 0.05, noise_scale: float = 1.0):
        angles = torch.arange(MODES, dtype=torch.float64) * (2 * math.pi / MODES)
        self.mu = radius * torch.stack([angles.cos(), angles.sin()], dim=1)  # (K, 2)
        self.s, self.sigma = s, noise_scale
        member = torch.zeros(CLASSES + 1, MODES, dtype=torch.bool)
        for c in range(CLASSES):
            member[c, 2 * c : 2 * c + 2] = True
        member[CLASSES] = True
        self.member = member  # (classes + 1, K)

    def __call__(self, z, t, y):
        zd, td = z.double(), t.double().view(-1, 1, 1)  # (B, 2), (B, 1, 1)
        c2 = td**2 * self.s**2 + (1 - td) ** 2 * self.sigma**2
        diff = zd[:, None, :] - td * self.mu[None]  # (B, K, 2)
        logw = -(diff**2).sum(-1, keepdim=True) / (2 * c2)  # (B, K, 1)
        logw = logw.masked_fill(~self.member[y][:, :, None], -math.inf)
        w = torch.softmax(logw, dim=1)
        means = self.mu[None] + td * self.s**2 / c2 * diff  # (B, K, 2)
        return (w * means).sum(1).to(z.dtype)

    def noise(self, n: int, seed: int, dtype=torch.float64):
        """(z₀ (n, 2), labels (n,)): noise_scale·N(0, I) and classes i mod CLASSES."""
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, 2, generator=g, dtype=dtype) * self.sigma, torch.arange(n) % CLASSES
