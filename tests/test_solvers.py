"""The multistep solvers (sampling_multistep.py): their order against exact Gaussian flows, parity
with diffusers' DPMSolverMultistepScheduler and UniPCMultistepScheduler (values recorded once by
tests/data/record_solver_parity.py), lower-order final steps and the step-ratio bound, the
conversions of ε- and v-networks, and ODE inversion (sampling.invert) with its round trip."""

import json
import math
import os
import sys

import pytest
import torch

import sampling_multistep as ms
from denoiser import CONVERSIONS, TRUTHS
from sampling import MULTISTEP, SamplerSettings, invert, sample

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "bench"))
from mixture import CLASSES, Mixture  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds synchronisation
    yield


class GuidedGaussian:
    """x̂ of Gaussian data N(m, s²), noise N(0, σ²), with mean m_c for a class and m_u for the null
    class: guidance w gives the x̂ of a Gaussian of mean m_u + w·(m_c - m_u)."""

    def __init__(self, m_c=0.6, m_u=-0.2, s=0.5, sigma=1.0, null=1, pred="x"):
        self.m_c, self.m_u, self.s, self.sigma, self.null, self.pred = m_c, m_u, s, sigma, null, pred

    def gain(self, t):
        return t * self.s**2 / (t**2 * self.s**2 + (1 - t) ** 2 * self.sigma**2)

    def __call__(self, z, t, y):
        t = t.view(-1, *[1] * (z.ndim - 1)).double()
        m = torch.where((y == self.null).view(-1, *[1] * (z.ndim - 1)), self.m_u, self.m_c)
        x = m + self.gain(t) * (z - t * m)
        e = (z - t * x) / (1 - t)  # E[e | z]: exact (t < 1 here)
        return TRUTHS[self.pred](x, e)

    def c(self, t):
        return math.sqrt(t * t * self.s**2 + (1 - t) ** 2 * self.sigma**2)

    def flow(self, z, a: float, b: float, m: float):
        """The exact flow of Gaussian data of mean m from t = a to t = b (both <= 1 - t_eps): it keeps
        (z - t·m)/c(t) constant, c(t)² = t²s² + (1 - t)²σ²."""
        return b * m + self.c(b) / self.c(a) * (z - a * m)

    def solution(self, z0, cfg, lo, hi, t_eps):
        """z at t = 1 of the sampler's ODE dz/dt = (x̂_w - z)/max(1 - t, t_eps), x̂_w the guided x̂ (guidance
        w = cfg for lo < t < hi): the exact flow up to 1 - t_eps, then the ODE is linear in z,
        integrated by adaptive quadrature: z(1) = A·z + B."""
        from scipy.integrate import quad

        mean = lambda t: self.m_u + (cfg if lo < t < hi else 1.0) * (self.m_c - self.m_u)  # noqa: E731
        knots = sorted({0.0, *(b for b in (lo, hi) if 0 < b < 1 - t_eps), 1 - t_eps})
        z = z0.double()
        for a, b in zip(knots, knots[1:]):
            z = self.flow(z, a, b, mean((a + b) / 2))
        k = lambda t: (self.gain(t) - 1) / t_eps  # noqa: E731  dz/dt = k(t)·z + mean·(1 - t·gain)/t_eps
        big_k = lambda a, b: quad(k, a, b, epsabs=1e-14)[0]  # noqa: E731
        start = 1 - t_eps
        A = math.exp(big_k(start, 1))
        B = quad(lambda t: math.exp(big_k(t, 1)) * mean(t) * (1 - t * self.gain(t)) / t_eps, start, 1, epsabs=1e-14)[0]
        return A * z + B


# The order each method reaches. dpm++3m as diffusers and the DPM-Solver repository write it is second
# order: its D2 = (D1_0 - D1_1)/(r0 + r1) ≈ h²·D''/2 enters with φ₃ where the Taylor term needs h²·D''
# (half the quadratic term; a quadratic D(λ) gets half its integral). UniPC's corrector adds one order.
ORDERS = {"dpm++2m": 2, "dpm++3m": 2, "unipc2": 3, "unipc3": 4, "ab2": 2, "ab3": 3}


@pytest.mark.parametrize("method", list(MULTISTEP))
def test_multistep_solvers_reach_their_order_on_an_exact_gaussian_flow(method):
    """From t = 0.05 to 0.95 on a grid uniform in λ = logit t (no clip, no guidance, no lower-order
    final at these step counts): the error to the exact flow falls as steps^-order."""
    g = GuidedGaussian()
    z = torch.randn(256, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a, b = 0.05, 0.95
    exact = g.flow(z, a, b, g.m_c)
    la, lb = math.log(a / (1 - a)), math.log(b / (1 - b))
    y = torch.zeros(z.shape[0], dtype=torch.long)
    errors = []
    for n in (16, 32, 64):
        times = [1 / (1 + math.exp(-(la + (lb - la) * i / n))) for i in range(n + 1)]
        data_at = lambda z_, i, _, times=times: g(z_, torch.tensor([times[i]]), y)  # noqa: E731
        errors.append((ms.integrate_multistep(method, z, times, [1.0] * n, data_at, 0.05) - exact).abs().max().item())
    orders = [math.log2(e0 / e1) for e0, e1 in zip(errors, errors[1:])]
    assert ORDERS[method] - 0.3 < orders[-1] < ORDERS[method] + 0.5, (errors, orders)


@pytest.mark.parametrize("method", ["euler", *MULTISTEP])
def test_solvers_converge_from_noise_to_the_exact_guided_flow(method):
    """From t = 0 with guidance 2 on (0.1, 1) (a node at 0.1, the history restarted there) and the
    reference's t_eps clip, against the exact solution: every multistep solver is at least second
    order here (the first steps out of t = 0, where λ = -inf, are first order), Euler first."""
    net = GuidedGaussian()
    z0 = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.zeros(64, dtype=torch.long)
    exact = net.solution(z0, 2.0, 0.1, 1.0, 0.05)
    errors = []
    for n in (32, 64, 128):
        s = SamplerSettings(method=method, steps=n, cfg=2.0, interval_min=0.1)
        errors.append((sample(net, z0, y, s, null_label=1, t_eps=0.05) - exact).abs().max().item())
    order = math.log2(errors[-2] / errors[-1])
    assert order > (0.8 if method == "euler" else 1.7), errors
    assert errors[-1] < (0.03 if method == "euler" else 3e-3), errors


def test_multistep_solvers_take_the_velocity_of_eps_and_v_networks_through_the_conversions():
    """The solvers integrate the guided v̂ of CONVERSIONS[pred]["v"], as Heun does: a v-network of the
    same Gaussian samples as its x-network; an ε-network's v̂ = (z - ε̂)/max(t, t_eps) is 0 at t = 0
    (the 0/0 of ε-prediction), so its samples differ, and the solver follows that field."""
    z0 = torch.randn(16, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.zeros(16, dtype=torch.long)
    for method in MULTISTEP:
        s = SamplerSettings(method=method, steps=12, cfg=2.0, interval_min=0.1, interval_max=0.8, schedule="power:2")
        x = sample(GuidedGaussian(pred="x"), z0, y, s, null_label=1, t_eps=1e-3)
        v = sample(GuidedGaussian(pred="v"), z0, y, s, null_label=1, t_eps=1e-3, pred="v")
        torch.testing.assert_close(v, x, rtol=0, atol=1e-8)
        eps_net = GuidedGaussian(pred="eps")
        eps = sample(eps_net, z0, y, s, null_label=1, t_eps=1e-3, pred="eps")

        def as_x(z, t, y_, eps_net=eps_net):  # the x̂ of the ε-network's velocity field
            t = t.view(-1, 1, 1, 1)
            return z + (1 - t).clamp_min(1e-3) * CONVERSIONS["eps"]["v"](eps_net(z, t.flatten(), y_), z, t, 1e-3)

        torch.testing.assert_close(eps, sample(as_x, z0, y, s, null_label=1, t_eps=1e-3), rtol=0, atol=1e-9)
        assert (eps - x).abs().max() > 1e-3


def test_dpm_solver_pp_and_unipc_match_diffusers_on_a_shared_grid():
    """tests/data/solver_parity.json: diffusers' DPMSolverMultistepScheduler (dpmsolver++, midpoint,
    orders 2, 3) and UniPCMultistepScheduler (bh2, orders 2, 3), flow sigmas, on 11 steps of the
    mixture's exact x̂ ending at σ = 0. Ours with t_eps = 0 (the same ODE, λ = logit t) agree to the
    float32 arithmetic of diffusers' coefficients; ab2 on the same grid is 1e-3 away (the tolerance
    separates methods)."""
    with open(os.path.join(HERE, "data", "solver_parity.json")) as f:
        rec = json.load(f)
    mix, z0 = Mixture(), torch.tensor(rec["z0"], dtype=torch.float64)
    labels = torch.full((z0.shape[0],), rec["label"])
    times = [1 - s for s in rec["sigmas"]] + [1.0]
    steps = len(rec["sigmas"])

    def run(method):
        data_at = lambda z, i, scale: mix(z, torch.full((z.shape[0],), times[i], dtype=torch.float64), labels)  # noqa: E731
        return ms.integrate_multistep(method, z0, times, [1.0] * steps, data_at, 0.0)

    assert set(rec["results"]) == {"dpm++2m", "dpm++3m", "unipc2", "unipc3"}
    for method, expected in rec["results"].items():
        diff = (run(method) - torch.tensor(expected, dtype=torch.float64)).abs().max().item()
        assert diff < 2e-7, (method, diff)
    assert (run("ab2") - torch.tensor(rec["results"]["dpm++2m"], dtype=torch.float64)).abs().max() > 1e-3


def node_orders(method: str, times: list) -> list:
    """The order of every step of `method` over `times` with a full history (no guidance)."""
    nodes = [ms.Node(t, 0.05) for t in times]
    return [
        ms.step_order(method, i, nodes, [(nodes[j], None) for j in range(i, -1, -1)]) for i in range(len(times) - 1)
    ]


def test_lower_order_final_steps_and_the_step_ratio_bound():
    """Below 15 steps the last step is first order and the one before at most second (diffusers'
    lower_order_final); from 15 on every step keeps the method's order; a step more than 3 times as
    long as the one before (in λ) is first order; the first step out of t = 0 (λ = -inf) and the
    next one (no finite history yet) are first order."""
    uniform = lambda n: [i / n for i in range(n + 1)]  # noqa: E731
    assert node_orders("dpm++3m", uniform(10)) == [1, 1, 2, 3, 3, 3, 3, 3, 2, 1]
    assert node_orders("unipc2", uniform(10)) == [1, 1, 2, 2, 2, 2, 2, 2, 2, 1]
    assert node_orders("dpm++3m", uniform(15))[-3:] == [3, 3, 3]
    assert node_orders("ab3", uniform(10)) == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]  # t = 0 is a usable node in t
    lam = [-2.0, -1.0, -0.5, 1.6, 2.0, 2.2, 2.4, 2.6, 2.8, 3.0, 3.2, 3.4, 3.6, 3.8, 4.0, 4.2, 4.4]  # 16 steps
    times = [1 / (1 + math.exp(-x)) for x in lam]
    assert node_orders("dpm++2m", times)[1:4] == [2, 1, 2]  # the step of 2.1 after one of 0.5: first order


def test_lower_order_final_keeps_a_few_step_solver_on_the_mixture():
    """The issue's case: at 6 steps on the mixture with the guidance interval, the full-order last
    steps (lower-order final off) land several times further from the converged solution."""
    mix = Mixture()
    z0, y = mix.noise(500, 0)
    g = dict(cfg=2.0, interval_min=0.1)
    ref = sample(mix, z0, y, SamplerSettings(method="unipc3", steps=400, **g), null_label=CLASSES)
    s = SamplerSettings(method="dpm++3m", steps=6, **g)
    with_final = (sample(mix, z0, y, s, null_label=CLASSES) - ref).pow(2).mean().sqrt().item()
    below = ms.LOWER_FINAL_BELOW
    try:
        ms.LOWER_FINAL_BELOW = 0
        without = (sample(mix, z0, y, s, null_label=CLASSES) - ref).pow(2).mean().sqrt().item()
    finally:
        ms.LOWER_FINAL_BELOW = below
    assert without > 3 * with_final, (without, with_final)


@pytest.mark.parametrize("method", ["heun", "euler", "dpm++2m", "unipc2", "unipc3", "ab3"])
@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_inversion_round_trip_error_falls_as_steps_grow(method, cfg):
    """invert then sample (same settings) gives back the samples, and invert recovers the noise they
    came from, closer with more steps (both directions converge to the same ODE flow, a bijection)."""
    mix = Mixture()
    z0, y = mix.noise(200, 3)
    errors = []
    for steps in (10, 20, 50):
        s = SamplerSettings(method=method, steps=steps, cfg=cfg, interval_min=0.1)
        x = sample(mix, z0, y, s, null_label=CLASSES)
        z = invert(mix, x, y, s, null_label=CLASSES)
        back = sample(mix, z, y, s, null_label=CLASSES)
        errors.append(((z - z0).pow(2).mean().sqrt().item(), (back - x).pow(2).mean().sqrt().item()))
    noise, images = zip(*errors)
    assert noise[0] > noise[1] > noise[2] and images[0] > images[2], errors
    assert noise[2] < noise[0] / 2.5, errors


def test_inversion_needs_t_eps_above_zero():
    mix = Mixture()
    x, y = mix.noise(4, 0)
    with pytest.raises(ValueError, match="t_eps > 0"):
        invert(mix, x, y, SamplerSettings(steps=4), null_label=CLASSES, t_eps=0.0)


@pytest.mark.parametrize("method", ["unipc2", "unipc3"])
def test_unipc_inversion_stays_bounded_as_t_eps_falls(method):
    """The first step of an inversion, out of t = 1, is about log(1/t_eps) long in λ; UniPC's corrector
    after it (a coefficient growing as e^{|h|}) made inverted noise of size about 1/t_eps (9475 at
    t_eps 1e-4). Left out after such steps: the noise stays near its std at every t_eps, and the
    round trip at the reference's t_eps and 50 steps keeps its accuracy (the corrector runs there)."""
    mix = Mixture()
    z0, y = mix.noise(64, 0)
    for t_eps in (0.05, 1e-2, 1e-4, 1e-6):
        for steps in (3, 20):
            s = SamplerSettings(method=method, steps=steps, cfg=2.0, interval_min=0.1)
            z = invert(
                mix, sample(mix, z0, y, s, null_label=CLASSES, t_eps=t_eps), y, s, null_label=CLASSES, t_eps=t_eps
            )
            assert z.abs().max() < 6, (t_eps, steps, z.abs().max())
    s = SamplerSettings(method=method, steps=50, cfg=2.0, interval_min=0.1)
    z = invert(mix, sample(mix, z0, y, s, null_label=CLASSES), y, s, null_label=CLASSES)
    assert (z - z0).pow(2).mean().sqrt() < 0.05


def test_inversion_makes_the_evaluations_it_counts():
    """SamplerSettings.evaluations(reverse=True) lists the inversion's network calls (times, guided or
    not): Heun two per step (its second-order step everywhere, no Euler step backwards), the others one."""

    class Recording:
        def __init__(self):
            self.calls = []

        def __call__(self, z, t, y):
            self.calls.append((float(t[0]), z.shape[0]))
            return torch.zeros_like(z)

    for method in ("heun", "euler", "dpm++2m", "unipc3", "ab3"):
        s = SamplerSettings(method=method, steps=7, cfg=2.0, interval_min=0.1, interval_max=0.9, schedule="logit:3")
        net = Recording()
        invert(net, torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), s, null_label=3)
        expected = [(float(t), 4 if scale != 1 else 2) for t, scale in s.evaluations(reverse=True)]
        assert net.calls == expected and len(expected) == (14 if method == "heun" else 7), method
