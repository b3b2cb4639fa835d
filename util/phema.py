"""Post-hoc EMA, the math (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion
Models", CVPR 2024, §3 and App. C.2; EDM2's training/phema.py): power-function EMAs tracked during
training, and the weights that reconstruct the EMA of another length from snapshots of them.

Time is counted in images seen, t. The weights after the optimiser step that brings t from t' to t
stand for the interval (t', t], so the training trajectory θ(τ) is piecewise constant. A snapshot
taken at t_i of a power-function EMA with exponent γ averages it with the profile

    p_i(τ) = (γ + 1) / t_i · (τ / t_i)^γ   for 0 < τ ≤ t_i, 0 after                   (EDM2 eq. 121)

and the per-step update of PowerEMA realises that average exactly, for any sequence of batch sizes.
An EMA of another length (another power profile, or a classic per-step decay) is reconstructed by
the weights x that make Σ x_i p_i closest to its profile in L2 over τ (a least-squares problem whose
Gram matrix has a closed form), normalised to sum to 1.

The snapshot files, their writer and the weighted sums over them are util/phema_files.py; what a
run and an evaluation use (flags, resume, the weights of --evaluate_gen --phema) util/phema_run.py.
"""

import math
from dataclasses import dataclass

import numpy as np

SIGMA_REL_MAX = 1 / math.sqrt(12)  # γ = 0, the plain average over the whole run


POOR_FIT = 0.01  # profile-space fit error above which the snapshots do not cover a target well


def sigma_rel_from_gamma(gamma: float) -> float:
    """Relative standard deviation of the power profile with exponent γ (its standard deviation over
    its end time): σ_rel = sqrt((γ + 1) / ((γ + 2)² (γ + 3))) (EDM2 eq. 123)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent γ > 0 of the power profile of relative standard deviation σ_rel: the largest real
    root of γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) = 0 (EDM2 eq. 126, Alg. 2), polished by Newton steps.
    ValueError unless 0 < σ_rel < 1/√12 ≈ 0.2887."""
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(
            f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}) (a power profile with exponent > 0), got {sigma_rel}"
        )
    s = sigma_rel**-2
    coefficients = (1.0, 7.0, 16.0 - s, 12.0 - s)
    gamma = max(r.real for r in np.roots(coefficients) if abs(r.imag) <= 1e-6 * abs(r))
    for _ in range(3):
        value = ((gamma + 7.0) * gamma + 16.0 - s) * gamma + 12.0 - s
        slope = (3.0 * gamma + 14.0) * gamma + 16.0 - s
        gamma -= value / slope
    return float(gamma)


def power_ema_weight(images_seen: int, batch: int, gamma: float) -> float:
    """The lerp weight of the new weights, 1 − β with β = (1 − Δ/t)^(γ + 1) (EDM2 eq. 127), where t is
    the images seen including this step's batch of Δ images (0 < Δ ≤ t). It is 1 on the first step."""
    if not 0 < batch <= images_seen:
        raise ValueError(f"need 0 < batch <= images_seen, got batch {batch}, images_seen {images_seen}")
    if batch == images_seen:
        return 1.0
    return -math.expm1((gamma + 1) * math.log1p(-batch / images_seen))


# Inner products of profiles (L2 over τ, in units of 1/images).


def power_inner(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """⟨p_a, p_b⟩ = ∫ p_a(τ) p_b(τ) dτ of power profiles ending at t_a and t_b (EDM2 eq. 151):
    (γ_a + 1)(γ_b + 1) / ((γ_a + γ_b + 1) T) · (t / T)^γ_T with T = max(t_a, t_b), t = min(t_a, t_b)
    and γ_T the exponent of the profile that ends at T. Arguments broadcast (numpy, float64)."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    hi, lo = np.maximum(t_a, t_b), np.minimum(t_a, t_b)
    gamma_hi = np.where(t_a >= t_b, gamma_a, gamma_b)
    return (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * hi) * (lo / hi) ** gamma_hi


def ema_step_weights(decay: float, steps: int) -> np.ndarray:
    """(steps,) float64: the weight of the weights after step k = 1..steps in a classic EMA
    (p ← d·p + (1 − d)·θ, started from the initial weights) after `steps` steps: (1 − d)·d^(steps − k).
    The initial weights' share d^steps, in no snapshot, is given to step 1, so the weights sum to 1."""
    w = (1 - decay) * decay ** np.arange(steps - 1, -1, -1, dtype=np.float64)
    w[0] += decay**steps
    return w


def step_masses(end_step: int, gamma: float, first: int = 1) -> np.ndarray:
    """(end_step − first + 1,) float64: the mass of the power profile ending at step `end_step` on
    each step k = first..end_step, ∫ over ((k − 1)Δ, kΔ] of p = (k/m)^(γ+1) − ((k − 1)/m)^(γ+1),
    m = end_step: the weight of step k's weights in the tracked power EMA (constant batch Δ)."""
    k = np.arange(first - 1, end_step + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        c = np.exp((gamma + 1) * (np.log(k) - math.log(end_step)))  # (k/m)^(γ+1); 0 at k = 0
    return np.diff(c)


def ema_power_inner(decay: float, steps: int, batch: int, end_steps, gammas, cutoff: float = 1e-20) -> np.ndarray:
    """⟨q, p_i⟩ for the piecewise-constant profile q of a classic EMA of per-step decay d after
    `steps` steps of `batch` images (q = w_k / Δ on step k's interval, w = ema_step_weights) and power
    profiles ending at steps end_steps[i] with exponents gammas[i]: Σ_k w_k / Δ · mass_i(k), summed
    exactly on the step grid; steps whose w_k is below `cutoff`·max(w) are left out."""
    w = ema_step_weights(decay, steps)
    first = int(np.argmax(w >= cutoff * w.max())) + 1
    out = []
    for m, gamma in zip(end_steps, gammas):
        m = int(m)
        if m < first:
            out.append(0.0)
            continue
        masses = step_masses(m, gamma, first)  # steps first..m
        out.append(float(np.dot(w[first - 1 : min(m, steps)], masses[: min(m, steps) - first + 1])) / batch)
    return np.array(out)


def ema_self_inner(decay: float, steps: int, batch: int) -> float:
    """⟨q, q⟩ = Σ_k w_k² / Δ of a classic EMA's profile (see ema_power_inner)."""
    return float(np.sum(ema_step_weights(decay, steps) ** 2)) / batch


# Reconstruction.


@dataclass(frozen=True)
class Fit:
    """Reconstruction weights for one target profile q from snapshot profiles p_i. weights: (S,),
    summing to 1. cond: 2-norm condition number of the Gram matrix ⟨p_i, p_j⟩. gain: Σ|x_i| (1 for
    a convex combination; how much rounding in the snapshots can grow). fit_error: the relative
    residual in profile space ‖Σ x_i p_i − q‖ / ‖q‖ with these (normalised) weights; values below
    about 1e-7 are at the float64 floor of its computation."""

    weights: np.ndarray
    cond: float
    gain: float
    fit_error: float


def solve_weights(gram: np.ndarray, cross: np.ndarray, target_sq: float) -> Fit:
    """Least squares in profile space (EDM2 App. C.2, Alg. 3): x minimising ‖Σ x_i p_i − q‖² solves
    gram·x = cross with gram_ij = ⟨p_i, p_j⟩, cross_i = ⟨p_i, q⟩ (float64, SVD-based lstsq, so that
    a nearly singular gram still gives the minimum-norm solution); then x / Σx. target_sq: ⟨q, q⟩."""
    x = np.linalg.lstsq(gram, cross, rcond=None)[0]
    x = x / x.sum()
    residual_sq = x @ gram @ x - 2 * x @ cross + target_sq
    return Fit(
        weights=x,
        cond=float(np.linalg.cond(gram)),
        gain=float(np.abs(x).sum()),
        fit_error=math.sqrt(max(residual_sq, 0.0) / target_sq),
    )


def gram_matrix(images, gammas) -> np.ndarray:
    """(S, S) ⟨p_i, p_j⟩ of power profiles ending at images[i] with exponents gammas[i]."""
    t, g = np.asarray(images, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    return power_inner(t[:, None], g[:, None], t[None, :], g[None, :])


def fit_power(images, gammas, end_images: int, sigma_rel: float) -> Fit:
    """Weights that reconstruct, at images seen `end_images`, the power EMA of relative std σ_rel
    from snapshot profiles ending at images[i] with exponents gammas[i]."""
    gamma = gamma_from_sigma_rel(sigma_rel)
    cross = power_inner(images, gammas, end_images, gamma)
    return solve_weights(gram_matrix(images, gammas), cross, float(power_inner(end_images, gamma, end_images, gamma)))


def fit_decay(images, gammas, end_images: int, decay: float, batch: int) -> Fit:
    """Weights that reconstruct, at images seen `end_images`, the classic EMA of per-step `decay`
    (constant global batch of `batch` images, so step k ends at k·batch) from snapshot profiles."""
    if not 0 < decay < 1:
        raise ValueError(f"an EMA decay must be in (0, 1), got {decay}")
    steps, end_steps = end_images // batch, np.asarray(images) // batch
    cross = ema_power_inner(decay, steps, batch, end_steps, gammas)
    return solve_weights(gram_matrix(images, gammas), cross, ema_self_inner(decay, steps, batch))


def sigma_rel_of_decay(decay: float, steps: int) -> float:
    """The relative standard deviation of a classic EMA's step profile after `steps` steps: the
    profile's standard deviation in steps over `steps` (about √d / ((1 − d)·steps) for long runs)."""
    w = ema_step_weights(decay, steps)
    k = np.arange(1, steps + 1, dtype=np.float64) - 0.5  # each step's interval midpoint
    mean = np.dot(w, k)
    var = np.dot(w, (k - mean) ** 2) + 1 / 12  # + the spread within a step
    return math.sqrt(var) / steps


def fit_target(target: tuple[str, float], snapshots: list, end_images: int, batch: int | None) -> Fit:
    """The reconstruction weights of a target ('std', σ_rel) or ('decay', d) at `end_images` images
    (a decay needs the constant global `batch`) from `snapshots` (their images_seen and gamma)."""
    images = np.array([s.images_seen for s in snapshots], dtype=np.float64)
    gammas = np.array([s.gamma for s in snapshots])
    kind, value = target
    if kind == "std":
        return fit_power(images, gammas, end_images, value)
    return fit_decay(images, gammas, end_images, value, batch)


def stds_text(stds) -> str:
    """σ_rel values for messages: '0.05 0.1', or 'none'."""
    return " ".join(f"{s:g}" for s in stds) or "none"


def describe_target(target: tuple[str, float]) -> str:
    kind, value = target
    return f"σ_rel {value:g}" if kind == "std" else f"decay {value:g}"


def fit_report(target: tuple[str, float], fit: Fit) -> list[str]:
    """How well the snapshots cover a target: one line, and a warning line when the fit is poor."""
    name = describe_target(target)
    lines = [
        f"{name}: condition {fit.cond:.1e}, Σ|w| {fit.gain:.2f}, fit error {fit.fit_error:.1e} (relative, in profile "
        "space)"
    ]
    if fit.fit_error > POOR_FIT:
        lines.append(
            f"warning: {name} is poorly covered by these snapshots (fit error above {POOR_FIT}): "
            "track a σ_rel nearer to it, or snapshot more often"
        )
    return lines
