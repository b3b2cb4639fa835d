"""The diffusion wrapper: loss, label dropout, sampler (Heun/Euler, the multistep solvers, schedules,
CFG interval, NFE), EMA."""

import math

import numpy as np
import pytest
import torch

from denoiser import CONVERSIONS, TRUTHS, Denoiser
from model_jit import JiT, JiT_models
from sampling import METHODS, MULTISTEP, SAMPLERS, SamplerSettings, cfg_scale_at, sample, schedule_warp, time_grid
from util.ema import EMA


def golden_denoiser(golden):
    net = JiT(**golden["config"])
    net.load_state_dict(golden["state_dict"])
    return Denoiser(net, num_classes=golden["config"]["num_classes"], noise_scale=1.0, t_eps=0.05).eval()


def test_loss_matches_reference_release(golden):
    d = golden_denoiser(golden)
    with torch.no_grad():
        loss = d(golden["x"], golden["loss_labels"], t=golden["t"], noise=golden["loss_noise"])
    torch.testing.assert_close(loss, golden["loss"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["heun", "euler"])
def test_samples_match_reference_release(golden, method):
    d = golden_denoiser(golden)
    out = d.generate(
        golden["sample_labels"],
        SamplerSettings(method=method, steps=4, cfg=2.0, interval_min=0.1),
        noise=golden["sample_z0"],
    )
    torch.testing.assert_close(out, golden[f"sample_{method}"], rtol=0, atol=1e-4)


def naive_sample(net, z, labels, null, steps, method, cfg, lo, hi, t_eps):
    """SPEC's sampler written out literally: separate cond/uncond passes at every evaluation."""
    ts = torch.linspace(0, 1, steps + 1)

    def v(z, t):
        tb = t.expand(z.shape[0])
        vc = (net(z, tb, labels) - z) / (1 - t).clamp_min(t_eps)
        vu = (net(z, tb, torch.full_like(labels, null)) - z) / (1 - t).clamp_min(t_eps)
        s = cfg if (t < hi) and (lo == 0 or t > lo) else 1.0
        return vu + s * (vc - vu)

    for i in range(steps - 1):
        t, tn = ts[i], ts[i + 1]
        vt = v(z, t)
        if method == "heun":
            z = z + (tn - t) * (0.5 * (vt + v(z + (tn - t) * vt, tn)))
        else:
            z = z + (tn - t) * vt
    return z + (ts[-1] - ts[-2]) * v(z, ts[-2])


@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.3, 0.7), (0.1, 1.0)])
def test_batched_and_skipping_sampler_equals_naive_sampler(golden, interval):
    d = golden_denoiser(golden)
    z0, labels = golden["sample_z0"], golden["sample_labels"]
    with torch.no_grad():
        fast = sample(
            d.net,
            z0,
            labels,
            SamplerSettings(steps=6, cfg=3.0, interval_min=interval[0], interval_max=interval[1]),
            null_label=3,
        )
        slow = naive_sample(d.net, z0, labels, 3, 6, "heun", 3.0, *interval, 0.05)
    torch.testing.assert_close(fast, slow, rtol=0, atol=2e-6)


class RecordingNet:
    """Returns x̂ = 0 and records (t, batch size) of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, z, t, y):
        self.calls.append((round(float(t[0]), 6), z.shape[0]))
        return torch.zeros_like(z)


def test_generate_uses_a_given_stand_in_net(golden):
    """A compiled module is passed as `net`; it must be used as is (not truth-tested)."""
    d = golden_denoiser(golden)

    class StandIn:
        def __bool__(self):
            raise TypeError("truth value of a module")

        def __call__(self, z, t, y):
            assert t.is_contiguous()  # no stride-0 expand: it would recompile a compiled net
            return torch.zeros_like(z)

    out = d.generate(
        golden["sample_labels"], SamplerSettings(method="euler", steps=1), noise=golden["sample_z0"], net=StandIn()
    )
    torch.testing.assert_close(out, torch.zeros_like(out))  # one Euler step from t = 0 with x̂ = 0


def test_cfg_interval_edges():
    grid = time_grid(10)  # 0, 0.1, ..., 1 in float32
    assert grid[2] == torch.tensor(0.2) and grid[8] == torch.tensor(0.8)
    assert cfg_scale_at(grid[2], 3.0, 0.2, 0.8) == 1.0  # t == interval_min: outside
    assert cfg_scale_at(grid[3], 3.0, 0.2, 0.8) == 3.0
    assert cfg_scale_at(grid[8], 3.0, 0.2, 0.8) == 1.0  # t == interval_max: outside
    assert cfg_scale_at(grid[0], 3.0, 0.0, 0.8) == 3.0  # interval_min == 0 includes t = 0
    assert cfg_scale_at(grid[0], 3.0, 0.1, 0.8) == 1.0


def test_unconditional_pass_only_inside_the_interval():
    net = RecordingNet()
    sample(
        net,
        torch.zeros(2, 3, 4, 4),
        torch.tensor([0, 1]),
        SamplerSettings(method="euler", steps=10, cfg=2.0, interval_min=0.2, interval_max=0.8),
        null_label=5,
    )
    assert net.calls == [(round(i / 10, 6), 4 if 2 < i < 8 else 2) for i in range(10)]
    net = RecordingNet()
    sample(net, torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]), SamplerSettings(steps=4, cfg=1.0), null_label=5)
    assert all(b == 2 for _, b in net.calls)  # cfg 1: never an unconditional pass
    assert [t for t, _ in net.calls] == [0.0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75]  # Heun, last step Euler


def test_guidance_formula():
    """v = v_u + cfg·(v_c - v_u) with x̂_c = 1 and x̂_u = -1 at t = 0 (v = x̂ - z)."""
    null = 4
    net = lambda z, t, y: torch.where((y == null).view(-1, 1, 1, 1), -1.0, 1.0).expand_as(z)  # noqa: E731
    z = torch.zeros(1, 1, 1, 1)
    out = sample(net, z, torch.tensor([0]), SamplerSettings(method="euler", steps=1, cfg=3.0), null_label=null)
    assert out.item() == pytest.approx(-1 + 3.0 * 2)  # one Euler step of size 1 from t = 0


class GaussianDenoiser:
    """Ideal x̂(z, t) = E[x | z_t] for data x ~ N(m, s²) and z_t = t·x + (1 - t)·e, e ~ N(0, σ²)."""

    def __init__(self, m, s, sigma):
        self.m, self.s, self.sigma = m, s, sigma

    def __call__(self, z, t, y):
        t = t.view(-1, 1, 1, 1).double()
        gain = t * self.s**2 / (t**2 * self.s**2 + (1 - t) ** 2 * self.sigma**2)
        return (self.m + gain * (z.double() - t * self.m)).to(z.dtype)


def test_sampler_transports_noise_to_the_gaussian_data():
    """For Gaussian data the exact flow maps z₀ to m + (s/σ)·z₀. 50-step Heun must land there
    (t_eps tiny here: the reference's clamp at 0.05 is a deliberate bias near t = 1)."""
    m, s, sigma = 0.3, 0.5, 1.0
    net = GaussianDenoiser(m, s, sigma)
    z0 = torch.randn(2048, 3, 8, 8, dtype=torch.float64) * sigma
    y = torch.zeros(2048, dtype=torch.long)
    heun = sample(net, z0, y, SamplerSettings(method="heun", steps=50), null_label=1, t_eps=1e-6)
    euler = sample(net, z0, y, SamplerSettings(method="euler", steps=50), null_label=1, t_eps=1e-6)
    exact = m + s / sigma * z0
    assert abs(heun.mean().item() - m) < 5e-3 and abs(heun.std().item() - s) < 5e-3
    err_heun, err_euler = (heun - exact).abs().max().item(), (euler - exact).abs().max().item()
    assert err_heun < 3e-3
    assert err_heun * 5 < err_euler  # second order beats first order at equal steps


def test_loss_matches_hand_computation():
    net = lambda z, t, y: 0.5 * z + 0.1 * y.view(-1, 1, 1, 1)  # noqa: E731
    d = Denoiser(net, num_classes=10, t_eps=0.05, label_drop_prob=0.5).eval()  # eval: labels kept
    x = torch.rand(3, 3, 4, 4) * 2 - 1
    t = torch.tensor([0.2, 0.6, 0.99])  # the last one hits the t_eps clamp
    e = torch.randn(3, 3, 4, 4)
    y = torch.tensor([1, 2, 3])
    loss = d(x, y, t=t, noise=e)
    xn, tn, en, yn = x.double().numpy(), t.double().numpy()[:, None, None, None], e.double().numpy(), y.numpy()
    z = tn * xn + (1 - tn) * en
    denom = np.maximum(1 - tn, 0.05)
    v = (xn - z) / denom
    v_hat = (0.5 * z + 0.1 * yn[:, None, None, None] - z) / denom
    expected = ((v - v_hat) ** 2).reshape(3, -1).mean(axis=1).mean()
    assert loss.item() == pytest.approx(expected, rel=1e-5)


class CaptureNet:
    def __call__(self, z, t, y):
        self.z, self.t, self.y = z, t, y
        return z


def test_label_dropout_only_in_training():
    net = CaptureNet()
    d = Denoiser(net, num_classes=7, label_drop_prob=1.0)
    x, y = torch.zeros(64, 3, 2, 2), torch.arange(64) % 7
    d.train()(x, y)
    assert (net.y == 7).all()
    d.eval()(x, y)
    assert torch.equal(net.y, y)
    d = Denoiser(net, num_classes=7, label_drop_prob=0.1).train()
    d(torch.zeros(20000, 1, 1, 1), torch.zeros(20000, dtype=torch.long))
    assert abs((net.y == 7).float().mean().item() - 0.1) < 0.01


def test_training_time_and_noise_distribution():
    net = CaptureNet()
    d = Denoiser(net, num_classes=2, P_mean=-0.8, P_std=0.8, noise_scale=2.0).eval()
    x = torch.zeros(40000, 1, 1, 1)
    d(x, torch.zeros(40000, dtype=torch.long))
    t = net.t
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() + 0.8) < 0.02 and abs(logit.std().item() - 0.8) < 0.02
    noise = net.z.flatten() / (1 - t)  # x = 0, so z = (1 - t)·e
    assert abs(noise.std().item() - 2.0) < 0.03


def test_ema_update_arithmetic_and_independence():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    expected = 0.9 * start["weight"] + 0.1 * model.weight.detach()
    torch.testing.assert_close(ema.state_dict()["weight"], expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(ema.state_dict()["bias"], start["bias"], rtol=0, atol=0)
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert ema.module.weight.data_ptr() != model.weight.data_ptr()


def test_ema_state_dict_is_a_full_denoiser_state_dict():
    d = Denoiser(JiT_models["JiT-XS/4"](input_size=16, num_classes=3), num_classes=3)
    ema = EMA(d, 0.999)
    assert list(ema.state_dict()) == list(d.state_dict())
    assert all(k.startswith("net.") for k in ema.state_dict())


def test_a_few_optimiser_steps_reduce_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    d = Denoiser(JiT_models["JiT-XS/4"](input_size=16, num_classes=3), num_classes=3).eval()
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    y = torch.randint(0, 3, (8,))
    t, e = torch.rand(8) * 0.9, torch.randn(8, 3, 16, 16)
    opt = torch.optim.AdamW(d.parameters(), lr=1e-3, betas=(0.9, 0.95))
    first = d(x, y, t=t, noise=e)
    assert torch.isfinite(first)
    for _ in range(10):
        opt.zero_grad()
        d(x, y, t=t, noise=e).backward()
        opt.step()
    assert d(x, y, t=t, noise=e).item() < 0.8 * first.item()


def test_sampler_settings_reject_unknown_methods_and_zero_steps():
    assert set(SAMPLERS) == {"heun", "euler"} and set(MULTISTEP) == {"dpm++2m", "dpm++3m", "ab2", "ab3"}
    with pytest.raises(ValueError, match="heun, euler, dpm"):
        SamplerSettings(method="rk4")
    with pytest.raises(ValueError, match="at least 1 step"):
        SamplerSettings(steps=0)
    for bad in ("cosine", "edm:-1", "shift:0", "uniform:2", "logsnr:x"):
        with pytest.raises(ValueError, match="schedule"):
            SamplerSettings(schedule=bad)
    with pytest.raises(
        ValueError, match="at least 3 steps"
    ):  # a multistep solver steps from end to end of the interval
        SamplerSettings(method="ab2", steps=2, cfg=2.0, interval_min=0.1, interval_max=0.9)


class GuidedGaussian:
    """x̂ of Gaussian data N(m, s²), noise N(0, σ²), with mean m_c for a class and m_u for the null
    class: guidance w gives the x̂ of a Gaussian of mean m_u + w·(m_c - m_u)."""

    def __init__(self, m_c=0.6, m_u=-0.2, s=0.5, sigma=1.0, null=1, pred="x"):
        self.m_c, self.m_u, self.s, self.sigma, self.null, self.pred = m_c, m_u, s, sigma, null, pred

    def gain(self, t):
        return t * self.s**2 / (t**2 * self.s**2 + (1 - t) ** 2 * self.sigma**2)

    def __call__(self, z, t, y):
        t = t.view(-1, 1, 1, 1).double()
        m = torch.where((y == self.null).view(-1, 1, 1, 1), self.m_u, self.m_c)
        x = m + self.gain(t) * (z - t * m)
        e = (z - t * x) / (1 - t)  # E[e | z]: exact (t < 1 here)
        return TRUTHS[self.pred](x, e)

    def c(self, t):
        return math.sqrt(t * t * self.s**2 + (1 - t) ** 2 * self.sigma**2)

    def solution(self, z0, cfg, lo, hi, t_eps):
        """z at t = 1 of the sampler's ODE dz/dt = (x̂_w - z)/max(1 - t, t_eps), x̂_w the guided x̂ (guidance
        w = cfg for lo < t < hi). Closed form up to 1 - t_eps (for a Gaussian of mean m the flow keeps
        (z - t·m)/c(t) constant, c(t)² = t²s² + (1 - t)²σ²); then the ODE is linear in z, integrated by
        adaptive quadrature: z(1) = A·z + B."""
        from scipy.integrate import quad

        mean = lambda t: self.m_u + (cfg if lo < t < hi else 1.0) * (self.m_c - self.m_u)  # noqa: E731
        knots = sorted({0.0, *(b for b in (lo, hi) if 0 < b < 1 - t_eps), 1 - t_eps})
        z = z0.double()
        for a, b in zip(knots, knots[1:]):
            m = mean((a + b) / 2)
            z = b * m + self.c(b) / self.c(a) * (z - a * m)
        k = lambda t: (self.gain(t) - 1) / t_eps  # noqa: E731  dz/dt = k(t)·z + mean·(1 - t·gain)/t_eps
        big_k = lambda a, b: quad(k, a, b, epsabs=1e-14)[0]  # noqa: E731
        start = 1 - t_eps
        A = math.exp(big_k(start, 1))
        B = quad(lambda t: math.exp(big_k(t, 1)) * mean(t) * (1 - t * self.gain(t)) / t_eps, start, 1, epsabs=1e-14)[0]
        return A * z + B


@pytest.mark.parametrize("method,order", [("euler", 1), ("dpm++2m", 2), ("ab2", 2), ("dpm++3m", 3), ("ab3", 3)])
def test_solvers_converge_at_their_order_to_the_exact_flow_of_gaussian_data(method, order):
    """Guidance 2 on (0.1, 1) (a node at 0.1, the history restarted there) and the reference's t_eps
    clamp: the error to the exact solution falls as steps^-order when the steps double."""
    net = GuidedGaussian()
    z0 = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.zeros(64, dtype=torch.long)
    exact = net.solution(z0, 2.0, 0.1, 1.0, 0.05)
    errors = [
        (
            sample(
                net, z0, y, SamplerSettings(method=method, steps=n, cfg=2.0, interval_min=0.1), null_label=1, t_eps=0.05
            )
            - exact
        )
        .abs()
        .max()
        .item()
        for n in (32, 64, 128)
    ]
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    print(method, errors, orders)
    assert orders[-1] > order - 0.3 and orders[0] > order - 1, (errors, orders)


def test_multistep_solvers_take_the_velocity_of_eps_and_v_networks_through_the_conversions():
    """The solvers integrate the guided v̂ of CONVERSIONS[pred]["v"], as Heun does: a v-network of the
    same Gaussian samples as its x-network; an ε-network's v̂ = (z - ε̂)/max(t, t_eps) is 0 at t = 0
    (the 0/0 of ε-prediction), so its samples differ, and the solver follows that field."""
    z0 = torch.randn(16, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.zeros(16, dtype=torch.long)
    for method in MULTISTEP:
        s = SamplerSettings(method=method, steps=12, cfg=2.0, interval_min=0.1, interval_max=0.8, schedule="edm:2")
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


@pytest.mark.parametrize("schedule", ["uniform", "shift:3", "shift:0.5", "edm:7", "logsnr:5"])
def test_schedules_map_the_unit_interval_onto_itself_and_hold_the_interval_ends(schedule):
    warp, inverse = schedule_warp(schedule)
    u = [i / 64 for i in range(65)]
    t = [warp(x) for x in u]
    assert t[0] == pytest.approx(0, abs=1e-12) and t[-1] == pytest.approx(1, abs=1e-12)
    assert all(a < b for a, b in zip(t, t[1:]))
    assert [inverse(x) for x in t] == pytest.approx(u, abs=1e-9)
    grid = SamplerSettings(
        method="dpm++2m", steps=12, cfg=2.0, interval_min=0.1, interval_max=0.7, schedule=schedule
    ).grid()
    assert grid.dtype == torch.float32 and len(grid) == 13 and grid[0] == 0 and grid[-1] == 1
    assert bool((grid[1:] > grid[:-1]).all())
    assert {torch.tensor(0.1).item(), torch.tensor(0.7).item()} <= set(grid.tolist())
    assert torch.equal(
        SamplerSettings(method="dpm++2m", steps=12, cfg=1.0, schedule=schedule).grid(), time_grid(12, schedule)
    )


def test_the_default_grid_is_the_references_and_heun_keeps_it_with_guidance():
    assert torch.equal(SamplerSettings().grid(), torch.linspace(0, 1, 51))
    assert torch.equal(SamplerSettings(cfg=2.9, interval_min=0.1).grid(), torch.linspace(0, 1, 51))
    assert SamplerSettings().schedule == "uniform"


@pytest.mark.parametrize("method", METHODS)
def test_nfe_and_net_passes_count_the_calls_the_sampler_makes(method):
    """One call per evaluation (NFE), twice the batch where guided (net passes); a multistep solver
    evaluates at the interval's start node with guidance (the step it starts is guided), Heun and
    Euler without (t == interval_min is outside, as in the reference)."""
    s = SamplerSettings(method=method, steps=10, cfg=2.0, interval_min=0.2, interval_max=0.8, schedule="edm:2")
    net = RecordingNet()
    sample(net, torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]), s, null_label=5)
    assert s.nfe() == len(net.calls) == {"heun": 19}.get(method, 10)
    assert s.net_passes() == sum(b for _, b in net.calls) // 2
    assert [(round(float(t), 6), 4 if scale != 1 else 2) for t, scale in s.evaluations()] == net.calls
    if method in MULTISTEP:
        guided = [t for t, b in net.calls if b == 4]
        assert guided[0] == round(torch.tensor(0.2).item(), 6) and max(guided) < 0.8
