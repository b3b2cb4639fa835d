"""The sampler's settings, grids and evaluations (sampling.py, sampling_grid.py): the CFG interval,
NFE counting, schedules, the renamed schedules, and the property that every setting either samples
to a finite result or is refused when it is made, in one line. The multistep solvers' accuracy,
their parity with diffusers and inversion are tests/test_solvers.py."""

import math
import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sampling import (
    MAX_CFG,
    MAX_STEPS,
    METHODS,
    MULTISTEP,
    SAMPLERS,
    SCHEDULES,
    SamplerSettings,
    cfg_scale_at,
    invert,
    sample,
    time_grid,
    upgrade_schedule,
)
from sampling_grid import KARRAS_SIGMAS, RENAMED, schedule_nodes

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from mixture import CLASSES, Mixture  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """The mixture's tensors are tiny: a second thread only adds synchronisation (10× slower under load)."""
    torch.set_num_threads(1)
    yield


class RecordingNet:
    """Returns x̂ = 0 and records (t, batch size) of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, z, t, y):
        self.calls.append((round(float(t[0]), 6), z.shape[0]))
        return torch.zeros_like(z)


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


def refused(match: str, **kwargs):
    with pytest.raises(ValueError, match=match) as info:
        SamplerSettings(**kwargs)
    assert "\n" not in str(info.value)


def test_sampler_settings_refuse_what_cannot_sample_in_one_line():
    assert set(SAMPLERS) == {"heun", "euler"}
    assert set(MULTISTEP) == {"dpm++2m", "dpm++3m", "unipc2", "unipc3", "ab2", "ab3"}
    refused("heun, euler, dpm", method="rk4")
    for steps in (0, -3, MAX_STEPS + 1, 2.5, True):
        refused("1 to 1000 steps", steps=steps)
    for cfg in (-0.1, math.nan, math.inf, MAX_CFG * 1.01):
        refused("CFG scale", cfg=cfg)
    for bad in ("cosine", "karras:-1", "shift:0", "uniform:2", "logit:x", "logit:", "logit:40", "logit:1e-20"):
        refused("schedule", schedule=bad)
    for bad in ("shift:1e-30", "karras:300", "power:nan", "shift:inf"):
        refused("must be in", schedule=bad)
    refused("at least 3 steps", method="ab2", steps=2, cfg=2.0, interval_min=0.1, interval_max=0.9)
    for lo, hi in ((0.5, 0.4), (0.5, 0.50000001), (1e-46, 0.5), (0.2, 1 - 1e-9), (math.nan, 1.0)):
        refused("guidance interval", cfg=2.0, interval_min=lo, interval_max=hi)
    refused("t = 1 twice", method="dpm++2m", steps=30, schedule="power:7")  # 1 - t = (1 - u)^7 underflows
    refused("closer than float32", method="heun", steps=1000, schedule="logit:20")


def test_the_renamed_schedules_are_refused_by_name_and_upgraded_from_files():
    """edm:ρ (the power law 1 - t = (1 - u)^ρ) is power:ρ now, logsnr:L (uniform in logit t) logit:L;
    the message names the new spelling, upgrade_schedule gives the same grid (computed here from the
    old definitions)."""
    refused("use power:2 ", schedule="edm:2")
    refused("use power:7 ", schedule="edm")
    refused("use logit:3 ", schedule="logsnr:3")
    assert set(RENAMED) == {"edm", "logsnr"}
    assert [upgrade_schedule(s) for s in ("edm:2", "edm", "logsnr:3", "logsnr", "karras:7", "uniform")] == [
        "power:2",
        "power:7",
        "logit:3",
        "logit:5",
        "karras:7",
        "uniform",
    ]
    u = np.arange(11) / 10
    old_edm = 1 - (1 - u) ** 2.0
    lo, hi = 1 / (1 + math.exp(3)), 1 / (1 + math.exp(-3))
    old_logsnr = (1 / (1 + np.exp(3 - 6 * u)) - lo) / (hi - lo)
    for old, new in ((old_edm, "power:2"), (old_logsnr, "logit:3")):
        grid = SamplerSettings(method="unipc2", steps=10, schedule=new).grid()
        torch.testing.assert_close(grid, torch.tensor(old).float(), rtol=0, atol=0)


def test_metrics_records_holding_an_old_schedule_name_are_the_points_of_its_new_name(tmp_path):
    """A sweep resumed over metrics.jsonl records written before the renames reuses them for the
    points of the new names (the same grid), and the csv, names and NFE of such records (one written
    before records held the NFE too) are computed, not a ValueError."""
    import json

    from util import sweep, sweep_report

    rec = dict(kind="eval", ema=1, num_images=8, method="dpm++2m", steps=10, cfg=2.0, interval_min=0.1)
    rec.update(interval_max=1.0, fid=5.0, inception_score=3.0)
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({**rec, "schedule": s}) + "\n" for s in ("edm:2", "logsnr")))
    points = sweep.grid(
        emas=[1], interval_mins=[0.1], interval_maxs=[1.0], cfgs=[2.0], method="dpm++2m", steps=10,
        num_images=8, schedule=["power:2", "logit:5"],
    )  # fmt: skip
    assert sorted(sweep.finished(str(path), {})) == sorted(p.key() for p in points)
    records = sweep.eval_records(str(path))
    assert [sweep.nfe_of(r) for r in records] == [10, 10]
    assert sweep.sampler_name(records[0]) == "dpm++2m 10 steps power:2 (10 NFE)"
    sweep_report.write_csv(str(tmp_path / "sweep.csv"), records)
    csv = (tmp_path / "sweep.csv").read_text()
    assert csv.count("\n") == 3 and ",power:2," in csv and ",logit:5," in csv


def test_the_recommended_sampler_is_the_best_point_the_sampler_still_runs():
    """An old sweep's best point heun 50 steps edm:7 is power:7 now, whose float32 grid holds t = 1
    twice (refused): export recommends the best point that samples, not one every loader refuses."""
    import model_card

    base = dict(
        checkpoint="c.pth", checkpoint_epoch=3, ema=1, num_images=6, cfg=2.0, interval_min=0.1, interval_max=1.0
    )
    records = [
        {**base, "fid": 4.0, "method": "heun", "steps": 50, "schedule": "edm:7"},
        {**base, "fid": 5.0, "method": "heun", "steps": 10, "schedule": "edm:7"},
        {**base, "fid": 6.0, "method": "heun", "steps": 50},
    ]
    assert not model_card.runnable(records[0]) and model_card.runnable(records[1])
    best = model_card.recommended_sampler({}, records, ema=1, epoch=3)
    assert (best["method"], best["steps"], best["schedule"]) == ("heun", 10, "power:7")
    SamplerSettings(**{k: best[k] for k in ("method", "steps", "cfg", "interval_min", "interval_max", "schedule")})


def test_karras_is_edms_sigma_spacing_from_pure_noise():
    """karras:ρ with N steps: t = 1/(1 + σ_i) at EDM's σ_i (eq. 5, σ in [0.002, 80]), i = 1..N - 1, with
    the first node (σ_max) at t = 0 and the last at t = 1 (σ = 0)."""
    sigma_min, sigma_max = KARRAS_SIGMAS
    for n, r in ((6, 7.0), (10, 3.0), (2, 7.0)):
        sigmas = [
            (sigma_max ** (1 / r) + i / (n - 1) * (sigma_min ** (1 / r) - sigma_max ** (1 / r))) ** r for i in range(n)
        ]
        expected = [0.0, *(1 / (1 + s) for s in sigmas[1:]), 1.0]
        assert schedule_nodes(f"karras:{r}", n) == pytest.approx(expected, rel=1e-12, abs=0)
    assert SamplerSettings(method="heun", steps=1, schedule="karras").grid().tolist() == [0.0, 1.0]


@pytest.mark.parametrize("schedule", ["uniform", "shift:3", "shift:0.5", "power:2", "logit:5", "karras", "karras:3"])
def test_schedules_are_increasing_from_0_to_1_and_hold_the_interval_ends(schedule):
    t = schedule_nodes(schedule, 64)
    assert t[0] == 0 and t[-1] == 1 and bool((np.diff(t) > 0).all())
    settings = SamplerSettings(
        method="dpm++2m", steps=12, cfg=2.0, interval_min=0.1, interval_max=0.7, schedule=schedule
    )
    grid = settings.grid()
    assert grid.dtype == torch.float32 and len(grid) == 13 and grid[0] == 0 and grid[-1] == 1
    assert bool((grid[1:] > grid[:-1]).all())
    assert {torch.tensor(0.1).item(), torch.tensor(0.7).item()} <= set(grid.tolist())
    unguided = SamplerSettings(method="dpm++2m", steps=12, cfg=1.0, schedule=schedule).grid()
    assert torch.equal(unguided, time_grid(12, schedule))
    if schedule != "uniform":  # (uniform: torch.linspace, the reference's grid)
        assert torch.equal(unguided, torch.tensor(schedule_nodes(schedule, 12)).float())


def test_the_default_grid_is_the_references_and_heun_keeps_it_with_guidance():
    assert torch.equal(SamplerSettings().grid(), torch.linspace(0, 1, 51))
    assert torch.equal(SamplerSettings(cfg=2.9, interval_min=0.1).grid(), torch.linspace(0, 1, 51))
    assert SamplerSettings().schedule == "uniform" and set(SCHEDULES) == {
        "uniform",
        "shift",
        "logit",
        "power",
        "karras",
    }


@pytest.mark.parametrize("method", METHODS)
def test_nfe_and_net_passes_count_the_calls_the_sampler_makes(method):
    """One call per evaluation (NFE), twice the batch where guided (net passes); a multistep solver
    evaluates at the interval's start node with guidance (the step it starts is guided), Heun and
    Euler without (t == interval_min is outside, as in the reference); UniPC's corrector costs no call.
    Inversion makes the same calls in reverse, Heun two on every step (none ends at t = 1)."""
    s = SamplerSettings(method=method, steps=10, cfg=2.0, interval_min=0.2, interval_max=0.8, schedule="power:2")
    for reverse in (False, True):
        net = RecordingNet()
        (invert if reverse else sample)(net, torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]), s, null_label=5)
        expected = [(round(float(t), 6), 4 if scale != 1 else 2) for t, scale in s.evaluations(reverse)]
        assert expected == net.calls
        assert len(net.calls) == {"heun": 20 if reverse else 19}.get(method, 10)
    assert s.nfe() == len(s.evaluations()) and s.net_passes() == sum(1 + (c != 1) for _, c in s.evaluations())
    if method in MULTISTEP:
        guided = [round(float(t), 6) for t, c in s.evaluations() if c != 1]
        assert guided[0] == round(torch.tensor(0.2).item(), 6) and max(guided) < 0.8


def test_common_settings_are_accepted():
    """The refusals stay at the edges: every method with every schedule's default at the usual step
    counts and guidance intervals samples."""
    for method in METHODS:
        for schedule in SCHEDULES:
            for steps in (3, 6, 10, 20, 50, 100):
                for lo, hi in ((0.0, 1.0), (0.1, 1.0), (0.1, 0.9)):
                    SamplerSettings(
                        method=method, steps=steps, cfg=2.5, interval_min=lo, interval_max=hi, schedule=schedule
                    )


MIX = Mixture()
Z0, LABELS = MIX.noise(6, 0, dtype=torch.float32)
EDGES = [0.0, 1.0, 0.5, 0.1, 1e-46, 1e-9, 1 - 1e-9, 0.50000001, math.nan, math.inf, -1.0]
names = st.sampled_from([*SCHEDULES, *RENAMED, "cosine"])
params = st.one_of(
    st.floats(0, 25), st.floats(0, 1), st.floats(-1, 400), st.sampled_from([1e-30, 1000.0, 1e300, math.nan, math.inf])
)
schedules = st.one_of(st.just("uniform"), names, st.builds(lambda n, p: f"{n}:{p!r}", names, params))
ordered = st.tuples(st.floats(0, 1), st.floats(0, 1, exclude_min=True)).map(lambda p: (p[0], p[0] + (1 - p[0]) * p[1]))
narrow = st.tuples(st.floats(0, 1), st.sampled_from([0.0, 1e-12, 1e-8, 6e-8, 1e-7])).map(lambda p: (p[0], p[0] + p[1]))
intervals = st.one_of(
    st.sampled_from([(0.0, 1.0), (0.1, 1.0)]),
    ordered,
    ordered,
    narrow,
    st.tuples(st.sampled_from(EDGES), st.sampled_from(EDGES)),
)
few_steps = st.integers(-1, 40)
steps_drawn = st.one_of(*[few_steps] * 7, st.integers(41, MAX_STEPS + 1))  # 1 in 8 above 40 steps (0.5 s each)


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(METHODS),
    steps=steps_drawn,
    cfg=st.one_of(st.floats(0, 5), st.floats(-1, MAX_CFG + 10), st.sampled_from(EDGES)),
    interval=intervals,
    schedule=schedules,
    t_eps=st.sampled_from([0.05, 0.0]),
)
def test_every_setting_samples_to_a_finite_result_or_is_refused_in_one_line(
    method, steps, cfg, interval, schedule, t_eps
):
    """Over the whole accepted range and beyond it, on the 8-mode mixture (its exact x̂, float32, as a
    trained net runs): SamplerSettings either raises a one-line ValueError or the setting samples to
    finite values, at the reference's t_eps and at 0; inversion too (t_eps > 0)."""
    lo, hi = interval
    try:
        s = SamplerSettings(method=method, steps=steps, cfg=cfg, interval_min=lo, interval_max=hi, schedule=schedule)
    except ValueError as e:
        assert str(e) and "\n" not in str(e)
        return
    out = sample(MIX, Z0, LABELS, s, null_label=CLASSES, t_eps=t_eps)
    assert bool(torch.isfinite(out).all()), (s, t_eps)
    if t_eps > 0 and steps <= 40:
        assert bool(torch.isfinite(invert(MIX, out, LABELS, s, null_label=CLASSES, t_eps=t_eps)).all()), s


def in_range(name: str):
    default, bounds = SCHEDULES[name]
    if bounds is None:
        return st.just(name)
    return st.floats(*bounds).map(lambda p: f"{name}:{p!r}")


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(METHODS),
    steps=steps_drawn,
    cfg=st.floats(0, MAX_CFG),
    lo=st.floats(0, 0.95),
    frac=st.floats(0.01, 1),
    schedule=st.sampled_from(list(SCHEDULES)).flatmap(in_range),
    t_eps=st.sampled_from([0.05, 0.0]),
)
def test_settings_inside_the_documented_ranges_sample_or_are_refused_for_float32(
    method, steps, cfg, lo, frac, schedule, t_eps
):
    """Inside every documented range the one reason left to refuse a setting is a grid float32 cannot
    hold (or too few steps for the guidance interval's pieces); all others sample to finite values."""
    try:
        s = SamplerSettings(method, steps, cfg, lo, lo + (1 - lo) * frac, schedule)
    except ValueError as e:
        assert "float32" in str(e) or "steps for the interval" in str(e) or "1 to 1000 steps" in str(e), e
        return
    assert bool(torch.isfinite(sample(MIX, Z0, LABELS, s, null_label=CLASSES, t_eps=t_eps)).all()), (s, t_eps)
