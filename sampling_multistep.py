"""The multistep solvers of sampling.py: one network evaluation per step, the data prediction D (x̂ of
the guided velocity) of earlier nodes extrapolated over the next step, the linear part integrated
exactly (exponential integrators).

The sampler's ODE, dz/dt = (D - z)/max(1 - t, t_eps), is the probability-flow ODE of the noise schedule
    σ̃(t) = e^{-ρ(t)},  α̃(t) = 1 - σ̃(t),  ρ(t) = ∫₀ᵗ dτ/max(1 - τ, t_eps)
(σ̃ = 1 - t and α̃ = t up to 1 - t_eps: the paper's z = t·x + (1 - t)·e; beyond it the clip makes σ̃ decay
exponentially to t_eps/e at t = 1, which is why the reference's samples keep a little noise). Its
solution from node s to node t is (Lu et al. 2022, arXiv 2211.01095, eq. (9))
    z_t = (σ̃_t/σ̃_s)·z_s + α̃_t ∫ e^{-(λ_t - λ)} D(λ) dλ   over [λ_s, λ_t],  λ = log(α̃/σ̃) (half the log-SNR),
so DPM-Solver++ and UniPC apply as written, in λ = logit t below 1 - t_eps; with t_eps = 0 they are the
flow-matching solvers of diffusers (tests/test_solver_parity.py). ab2/ab3 interpolate D in t instead.

Each step is taken at order min(the method's, the nodes of the history) and lower at the end:
- lower-order final (diffusers' lower_order_final): below LOWER_FINAL_BELOW steps, the last step is
  first order and the one before at most second;
- bounded step ratio: a step longer than MAX_RATIO times the one before (in the method's variable)
  is taken at first order, so D is never extrapolated far beyond the nodes it was fitted on;
- a step of infinite length in λ (into t = 1 with t_eps = 0, or back to t = 0) is first order;
- UniPC's corrector is left out after a step backwards longer than MAX_CORRECTED_BACK in λ: its
  coefficient grows as e^{|h|} there (the kernel e^{-(λ_t - λ)} runs backwards), and the first step of
  an inversion out of t = 1, of length about log(1/t_eps), made inverted noise of size about 1/t_eps
  (tests/test_solvers.py).
Every step works in either direction (t increasing: sampling; decreasing: inversion).
"""

import math

import numpy as np

# method -> (variable D is interpolated in, order): "lambda" (DPM-Solver++, UniPC) or "t" (ab_weights).
MULTISTEP = {
    "dpm++2m": ("lambda", 2),
    "dpm++3m": ("lambda", 3),
    "unipc2": ("lambda", 2),
    "unipc3": ("lambda", 3),
    "ab2": ("t", 2),
    "ab3": ("t", 3),
}
LOWER_FINAL_BELOW = 15
FINAL_ORDERS = (1, 2)  # the highest order of the last step, of the one before
MAX_RATIO = 3.0
MAX_CORRECTED_BACK = 1.0  # the longest step backwards (in λ) after which UniPC's corrector runs


def rho(t: float, t_eps: float) -> float:
    """ρ(t) = ∫₀ᵗ dτ / max(1 - τ, t_eps): -log(1 - t) up to 1 - t_eps, then linear. Infinite at t = 1
    only for t_eps = 0."""
    if t <= 1 - t_eps:
        return -math.log1p(-t) if t < 1 else math.inf
    return -math.log(t_eps) + (t - 1 + t_eps) / t_eps


class Node:
    """The schedule at time t: α̃, σ̃ (see the module docstring) and λ = log(α̃/σ̃) (±inf at the ends)."""

    def __init__(self, t: float, t_eps: float):
        if t <= 1 - t_eps:
            self.alpha, self.sigma = t, 1.0 - t
        else:
            self.sigma = t_eps * math.exp(-(t - 1 + t_eps) / t_eps)
            self.alpha = 1.0 - self.sigma
        self.t = t
        self.lam = (math.log(self.alpha) if self.alpha > 0 else -math.inf) - (
            math.log(self.sigma) if self.sigma > 0 else -math.inf
        )


def first_order(z, s: Node, t: Node, d0):
    """DDIM / DPM-Solver++(1): z_t = (σ̃_t/σ̃_s)·z + α̃_t(1 - e^{-h})·D₀, h = λ_t - λ_s; the second factor
    as α̃_t - σ̃_t·α̃_s/σ̃_s where h is infinite (t = 0 or 1 at either end)."""
    h = t.lam - s.lam
    if math.isinf(h):
        if t.sigma == 0:  # into t = 1 with t_eps = 0
            return d0
        return (t.sigma / s.sigma) * z + (t.alpha - t.sigma * s.alpha / s.sigma) * d0
    return (t.sigma / s.sigma) * z + (t.alpha * -math.expm1(-h)) * d0


def dpm_solver_pp(z, s: Node, t: Node, history: list, order: int):
    """DPM-Solver++(2M) / (3M) (Lu et al. 2022, Alg. 2; the 3M step as diffusers' DPMSolverMultistepScheduler,
    solver_type "midpoint"): history = [(Node, D)] newest first, history[0] at s."""
    d0 = history[0][1]
    if order == 1:
        return first_order(z, s, t, d0)
    h = t.lam - s.lam
    phi1 = -math.expm1(-h)  # 1 - e^{-h}
    r0 = (s.lam - history[1][0].lam) / h
    d1_0 = (d0 - history[1][1]) / r0
    out = (t.sigma / s.sigma) * z + (t.alpha * phi1) * d0
    if order == 2:
        return out + (0.5 * t.alpha * phi1) * d1_0
    r1 = (history[1][0].lam - history[2][0].lam) / h
    d1_1 = (history[1][1] - history[2][1]) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi2 = -phi1 / h + 1
    phi3 = phi2 / h - 0.5
    return out + (t.alpha * phi2) * d1 - (t.alpha * phi3) * d2


def unipc_coefficients(h: float, rks: list, order: int, corrector: bool) -> list:
    """UniPC's ρ coefficients (Zhao et al. 2023, arXiv 2302.04867, B(h) = e^h - 1, "bh2", data
    prediction; as diffusers' UniPCMultistepScheduler): rks = (λ_i - λ_s)/h of the older nodes."""
    hh = -h
    h_phi_k = math.expm1(hh) / hh - 1
    b_h = math.expm1(hh)
    rs = np.array([*rks, 1.0])
    rows, b, factorial = [], [], 1
    for i in range(1, order + 1):
        rows.append(rs ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = np.array(rows), np.array(b)
    if corrector:
        return [0.5] if order == 1 else list(np.linalg.solve(R, b))
    if order == 1:
        return []
    return [0.5] if order == 2 else list(np.linalg.solve(R[:-1, :-1], b[:-1]))


def unipc(z, s: Node, t: Node, history: list, order: int, d_new=None):
    """UniP-p (d_new None: the predictor of order p = `order`) or UniC-p (the corrector, with d_new = D
    evaluated at the predicted z_t: of order p + 1 at no extra evaluation) from node s to t, with
    history = [(Node, D)] newest first, history[0] at s."""
    d0 = history[0][1]
    h = t.lam - s.lam
    if math.isinf(h):
        return first_order(z, s, t, d0)
    base = (t.sigma / s.sigma) * z + (t.alpha * -math.expm1(-h)) * d0
    rks = [(node.lam - s.lam) / h for node, _ in history[1:order]]
    coef = unipc_coefficients(h, rks, order, corrector=d_new is not None)
    res = 0.0
    for c, rk, (_, d) in zip(coef, rks, history[1:order]):
        res = res + (c / rk) * (d - d0)
    if d_new is not None:
        res = res + coef[-1] * (d_new - d0)
    return base - (t.alpha * math.expm1(-h)) * res


GAUSS_LEGENDRE = np.polynomial.legendre.leggauss(32)  # (nodes, weights) on [-1, 1], float64


def t_of_rho(r, t_eps: float):
    """The inverse of rho() (numpy arrays)."""
    if t_eps <= 0:
        return -np.expm1(-r)
    star = -math.log(t_eps)
    return np.where(r <= star, -np.expm1(-np.minimum(r, star)), 1 - t_eps * (1 - (r - star)))


def lagrange(tau, nodes: list) -> list:
    """The Lagrange basis polynomials of `nodes` at tau."""
    out = []
    for j, tj in enumerate(nodes):
        lj = np.ones_like(tau)
        for k, tk in enumerate(nodes):
            if k != j:
                lj = lj * (tau - tk) / (tj - tk)
        out.append(lj)
    return out


def ab_weights(t: float, t_next: float, nodes: list, t_eps: float) -> tuple[float, list]:
    """(a, [w_j]) with z(t_next) ≈ a·z(t) + Σ_j w_j·D_j: the exact solution of dz/dρ = D - z with D the
    Lagrange polynomial in t through (nodes[j], D_j): a = e^{-(ρ' - ρ)}, w_j = ∫ e^{-(ρ' - r)} ℓ_j(t(r)) dr
    from ρ to ρ' (either direction), by 32-point Gauss–Legendre in ρ on each side of the clip's kink at
    1 - t_eps (exact to rounding for these steps). DEIS's tAB (Zhang & Chen 2022, arXiv 2204.13902,
    eq. (14)) for the data prediction. With ρ' = ∞ (t_next = 1, t_eps = 0) the kernel is a point mass
    at t = 1: a = 0, w_j = ℓ_j(1)."""
    r0, r1 = rho(t, t_eps), rho(t_next, t_eps)
    if math.isinf(r1):
        return 0.0, [float(b) for b in lagrange(np.array(t_next), nodes)]
    x, w = GAUSS_LEGENDRE
    star = -math.log(t_eps) if t_eps > 0 else math.inf
    lo, hi = min(r0, r1), max(r0, r1)
    sign = 1.0 if r1 >= r0 else -1.0
    weights = np.zeros(len(nodes))
    for a, b in ((lo, min(hi, star)), (max(lo, star), hi)):
        if b <= a:
            continue
        r = (a + b) / 2 + (b - a) / 2 * x
        kernel = sign * np.exp(-(r1 - r)) * w * (b - a) / 2
        weights += [float((kernel * lj).sum()) for lj in lagrange(t_of_rho(r, t_eps), nodes)]
    return math.exp(-(r1 - r0)), list(weights)


def adams(z, s: Node, t: Node, history: list, order: int, t_eps: float):
    """ab2 / ab3: one step of ab_weights with the newest `order` nodes of the history."""
    a, ws = ab_weights(s.t, t.t, [node.t for node, _ in history[:order]], t_eps)
    out = a * z
    for wj, (_, dj) in zip(ws, history):
        out = out + wj * dj
    return out


def position(node: Node, variable: str) -> float:
    return node.lam if variable == "lambda" else node.t


def step_order(method: str, i: int, nodes: list, history: list) -> int:
    """The order of step i (nodes[i] -> nodes[i + 1]) of a grid of Nodes: the method's, limited by the
    history (nodes with a finite position; the history restarts where the guidance scale changes), by
    lower-order final and the step ratio bound (see the module docstring)."""
    variable, order = MULTISTEP[method]
    steps = len(nodes) - 1
    usable = 0
    for node, _ in history:
        if not math.isfinite(position(node, variable)):
            break
        usable += 1
    k = min(order, usable)
    h = position(nodes[i + 1], variable) - position(nodes[i], variable)
    if not math.isfinite(h):
        return 1
    if steps < LOWER_FINAL_BELOW and i >= steps - len(FINAL_ORDERS):
        k = min(k, FINAL_ORDERS[steps - 1 - i])
    if k > 1:
        h_before = position(history[0][0], variable) - position(history[1][0], variable)
        if abs(h) > MAX_RATIO * abs(h_before):
            k = 1
    return k


def step(method: str, z, s: Node, t: Node, history: list, order: int, t_eps: float):
    """z at node t from z at node s (history[0]'s) by `method` at `order` (the predictor for UniPC)."""
    if method.startswith("dpm++"):
        return dpm_solver_pp(z, s, t, history, order)
    if method.startswith("unipc"):
        return unipc(z, s, t, history, order)
    return adams(z, s, t, history, order, t_eps)


def integrate_multistep(method: str, z, times: list, scales: list, data_at, t_eps: float):
    """z at times[-1] from z at times[0] by `method` (MULTISTEP) over the nodes `times` (floats,
    monotone in either direction). scales[i]: the guidance scale of step i; data_at(z, i, scale) -> D
    at node i. The history restarts where the scale changes (the guided velocity jumps there: no step
    extrapolates over it); UniPC's corrector runs at each new node of a step within one scale, but
    not after the last step (no evaluation there) nor after a long step backwards (see the module
    docstring)."""
    nodes = [Node(t, t_eps) for t in times]
    history, scale_before, last = [], None, None
    for i in range(len(times) - 1):
        d = data_at(z, i, scales[i])
        if scales[i] != scale_before:
            history = []
        elif last is not None and method.startswith("unipc") and nodes[i].lam - nodes[i - 1].lam > -MAX_CORRECTED_BACK:
            z_before, order_before = last
            z = unipc(z_before, nodes[i - 1], nodes[i], history, order_before, d_new=d)
        history = [(nodes[i], d), *history][:3]
        order = step_order(method, i, nodes, history)
        last = (z, order)
        z = step(method, z, nodes[i], nodes[i + 1], history, order, t_eps)
        scale_before = scales[i]
    return z
