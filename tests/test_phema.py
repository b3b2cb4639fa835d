"""Post-hoc EMA (util/phema.py, reconstruct_ema.py): the profile math against independent computations
(quadrature, explicit weighted averages of stored weights, a brute-force residual), snapshots, and the
reconstruction CLI."""

import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import TINY, tiny_denoiser
from scipy import integrate, optimize

import main_jit
import reconstruct_ema
import sample
from util import checkpoint, phema, phema_files, phema_run
from util.ema import EMA, PowerEMA, lerp_together_


def power_density(tau, end, gamma):
    """p(τ) = (γ + 1)/T · (τ/T)^γ on (0, T], written out again for the tests."""
    return np.where((tau > 0) & (tau <= end), (gamma + 1) / end * (np.clip(tau, 0, None) / end) ** gamma, 0.0)


def toy_trajectory(steps, shape=(3, 4), seed=0):
    """A random walk of `steps` + 1 weight tensors (θ_0 the initial weights), float64."""
    g = torch.Generator().manual_seed(seed)
    return torch.cumsum(torch.randn(steps + 1, *shape, generator=g, dtype=torch.float64), dim=0)


def track(trajectory, batches, emas):
    """Run `emas` (PowerEMA or EMA) over a module whose weight follows `trajectory`[1:]; returns the
    module. batches[k]: images in step k + 1. Every average takes the one update signature."""
    model = nn.Linear(4, 3, bias=False)
    images = 0
    for theta, batch in zip(trajectory[1:], batches):
        with torch.no_grad():
            model.weight.copy_(theta)
        images += batch
        for ema in emas:
            ema.update(model, images, batch)
    return model


def start_module(trajectory):
    model = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(trajectory[0])
    return model


@pytest.mark.parametrize("sigma_rel", [1e-4, 0.003, 0.0067, 0.013, 0.05, 0.1, 0.2, 0.288])
def test_gamma_is_the_cubic_root_and_round_trips(sigma_rel):
    gamma = phema.gamma_from_sigma_rel(sigma_rel)
    s = sigma_rel**-2
    cubic = gamma**3 + 7 * gamma**2 + (16 - s) * gamma + (12 - s)
    assert abs(cubic) <= 1e-12 * max(gamma**3, s * gamma)
    assert phema.sigma_rel_from_gamma(gamma) == pytest.approx(sigma_rel, rel=1e-13)
    # Independently: σ_rel(γ) is decreasing on γ > 0, so bisection finds the same γ.
    root = optimize.brentq(
        lambda g: math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) - sigma_rel, 0, 1e9, xtol=1e-14, rtol=1e-14
    )
    assert gamma == pytest.approx(root, rel=1e-10)


def test_gamma_matches_edm2_quoted_values():
    assert phema.gamma_from_sigma_rel(0.05) == pytest.approx(16.97, abs=0.005)  # EDM2 §3.1
    assert phema.gamma_from_sigma_rel(0.10) == pytest.approx(6.94, abs=0.005)


@pytest.mark.parametrize("bad", [0.0, -0.01, 1 / math.sqrt(12), 0.29, 1.0])
def test_sigma_rel_out_of_range_is_a_value_error(bad):
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        phema.gamma_from_sigma_rel(bad)


def test_power_profile_has_the_asked_relative_std():
    gamma, end = phema.gamma_from_sigma_rel(0.05), 7.0
    mass = integrate.quad(lambda t: power_density(t, end, gamma), 0, end)[0]
    mean = integrate.quad(lambda t: t * power_density(t, end, gamma), 0, end)[0]
    var = integrate.quad(lambda t: (t - mean) ** 2 * power_density(t, end, gamma), 0, end)[0]
    assert mass == pytest.approx(1, rel=1e-10)
    assert math.sqrt(var) / end == pytest.approx(0.05, rel=1e-9)


@pytest.mark.parametrize("batches", [[8] * 40, [8] * 15 + [24] * 10 + [4] * 15], ids=["constant", "changing"])
def test_power_ema_equals_explicit_weighted_average_of_stored_weights(batches):
    """The tracked EMA after step n equals Σ_k θ_k ∫_{t_{k-1}}^{t_k} p_n(τ) dτ, the profile integrated by
    quadrature over each step's interval of images."""
    theta = toy_trajectory(len(batches))
    ema = PowerEMA(start_module(theta), sigma_rel=0.15)
    model = track(theta, batches, [ema])
    edges = np.concatenate([[0], np.cumsum(batches)]).astype(np.float64)
    w = [
        integrate.quad(lambda t: power_density(t, edges[-1], ema.gamma), a, b)[0] for a, b in zip(edges[:-1], edges[1:])
    ]
    explicit = sum(wk * theta[k + 1] for k, wk in enumerate(w))
    assert sum(w) == pytest.approx(1, rel=1e-10)
    torch.testing.assert_close(ema.module.weight.double(), explicit, rtol=1e-5, atol=1e-5)
    assert model.weight.requires_grad and not ema.module.weight.requires_grad


def test_first_update_copies_the_weights_and_weight_is_eq_127():
    assert phema.power_ema_weight(8, 8, 3.0) == 1.0
    assert phema.power_ema_weight(1000, 8, 3.0) == pytest.approx(1 - (1 - 8 / 1000) ** 4, rel=1e-14)
    with pytest.raises(ValueError):
        phema.power_ema_weight(4, 8, 3.0)


def test_fused_update_equals_separate_updates_bit_for_bit():
    model = tiny_denoiser()
    a = [PowerEMA(model, 0.01), PowerEMA(model, 0.1)]
    b = [PowerEMA(model, 0.01), PowerEMA(model, 0.1)]
    classic_a, classic_b = EMA(model, 0.999), EMA(model, 0.999)
    for step in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.1)
        images = 16 * step
        for ema in a:
            ema.update(model, images, 16)
        classic_a.update(model)
        targets = [e.tensors() for e in b] + [list(classic_b.module.parameters())]
        weights = [e.weight(images, 16) for e in b] + [1 - classic_b.decay]
        lerp_together_(targets, list(model.parameters()), weights)
    for x, y in zip(a + [classic_a], b + [classic_b]):
        for k, v in x.state_dict().items():
            assert torch.equal(v, y.state_dict()[k]), k


@pytest.mark.parametrize(
    "t_a, g_a, t_b, g_b", [(1.0, 3.0, 2.0, 5.0), (2.0, 3.0, 1.5, 0.5), (3.0, 10.0, 3.0, 40.0), (5.0, 0.2, 4.0, 90.0)]
)
def test_power_inner_product_matches_quadrature(t_a, g_a, t_b, g_b):
    numeric = integrate.quad(
        lambda t: power_density(t, t_a, g_a) * power_density(t, t_b, g_b),
        0,
        min(t_a, t_b),
        epsabs=0,
        epsrel=1e-12,
        limit=200,
    )[0]
    assert float(phema.power_inner(t_a, g_a, t_b, g_b)) == pytest.approx(numeric, rel=1e-9)
    assert float(phema.power_inner(t_b, g_b, t_a, g_a)) == pytest.approx(numeric, rel=1e-9)


def test_classic_ema_step_weights_are_what_the_ema_does():
    """util.ema.EMA over one-hot weights θ_k = e_k (θ_0 = θ_1, the documented approximation) gives back
    ema_step_weights."""
    n, d = 30, 0.9
    theta = torch.cat([torch.eye(n, dtype=torch.float64)[:1], torch.eye(n, dtype=torch.float64)])  # θ_0, θ_1..θ_n
    model = nn.Linear(n, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(theta[0][None])
    ema = EMA(model, d)
    for k in range(1, n + 1):
        with torch.no_grad():
            model.weight.copy_(theta[k][None])
        ema.update(model)
    np.testing.assert_allclose(ema.module.weight[0].numpy(), phema.ema_step_weights(d, n), rtol=1e-12, atol=1e-15)


def test_classic_ema_inner_products_match_quadrature():
    n, d, batch = 25, 0.8, 4.0
    w = phema.ema_step_weights(d, n)
    for end_step, gamma in [(25, 3.0), (17, 12.0), (25, 0.5), (3, 2.0)]:
        numeric = sum(
            w[k]
            / batch
            * integrate.quad(
                lambda t, end_step=end_step, gamma=gamma: power_density(t, end_step * batch, gamma),
                k * batch,
                (k + 1) * batch,
                epsabs=0,
                epsrel=1e-12,
            )[0]
            for k in range(n)
        )
        got = phema.ema_power_inner(d, n, int(batch), [end_step], [gamma])[0]
        assert got == pytest.approx(numeric, rel=1e-10)
    assert phema.ema_self_inner(d, n, int(batch)) == pytest.approx(np.sum(w**2) / batch, rel=1e-14)
    # σ_rel of a long classic EMA: about √d / ((1 - d)·steps)
    assert phema.sigma_rel_of_decay(0.999, 100_000) == pytest.approx(math.sqrt(0.999) / (1e-3 * 1e5), rel=1e-3)


def brute_force_fit_error(images, gammas, x, q, end):
    """‖Σ x_i p_i − q‖ / ‖q‖ by quadrature on a grid of the profiles' breakpoints."""
    points = sorted(set(images) | {end})

    def residual_sq(t):
        return (sum(xi * power_density(t, ti, gi) for xi, ti, gi in zip(x, images, gammas)) - q(t)) ** 2

    num = sum(
        integrate.quad(residual_sq, a, b, epsabs=0, epsrel=1e-11, limit=200)[0]
        for a, b in zip([0] + points[:-1], points)
    )
    den = integrate.quad(lambda t: q(t) ** 2, 0, end, epsabs=0, epsrel=1e-11, limit=200)[0]
    return math.sqrt(num / den)


def test_fit_error_is_the_profile_space_residual():
    stds = [0.05, 0.15]
    images = [t for t in (60.0, 80.0, 100.0) for _ in stds]
    gammas = [phema.gamma_from_sigma_rel(s) for _ in (60, 80, 100) for s in stds]
    fit = phema.fit_power(images, gammas, 100, 0.09)
    assert fit.weights.sum() == pytest.approx(1, abs=1e-12)
    gamma = phema.gamma_from_sigma_rel(0.09)
    brute = brute_force_fit_error(images, gammas, fit.weights, lambda t: power_density(t, 100.0, gamma), 100.0)
    assert 1e-4 < fit.fit_error < 0.1
    assert fit.fit_error == pytest.approx(brute, rel=1e-5)
    assert fit.gain >= 1 and fit.cond > 1


def write_toy_snapshots(folder, stds=(0.05, 0.15), steps=60, every=10, batch=8, dtype="float32"):
    """Train-free run: a tiny denoiser whose weights random-walk for `steps` steps; PowerEMAs for
    `stds` and a snapshot of each every `every` steps. Returns the EMAs at the end and the run args."""
    model = tiny_denoiser()
    emas = [PowerEMA(model, s) for s in stds]
    args = {"model": "JiT-XS/4", "img_size": 16, "class_num": 3, "batch_size": batch}
    g = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g), alpha=0.01)
        for ema in emas:
            ema.update(model, step * batch, batch)
        if phema_files.snapshot_due(step, every=every, start=every, total=steps):
            for ema in emas:
                phema_files.write_snapshot(
                    folder,
                    ema.state_dict(),
                    sigma_rel=ema.sigma_rel,
                    step=step,
                    images_seen=step * batch,
                    epoch=step // 20 - 1,
                    args=args,
                    dtype=dtype,
                    keep=phema_files.frozen_names(model),
                )
    return emas, model, args


def test_snapshots_round_trip_and_list_in_step_order(tmp_path):
    emas, model, args = write_toy_snapshots(str(tmp_path), steps=30, dtype="float16")
    (tmp_path / ".phema-0000000030-0.05.pth.tmp-123").write_bytes(b"partial")  # a killed write: ignored
    found = phema_files.list_snapshots(str(tmp_path))
    assert [(s.step, s.sigma_rel) for s in found] == [(st, sd) for st in (10, 20, 30) for sd in (0.05, 0.15)]
    info, data = phema_files.read_snapshot(found[-1].path)
    assert (info.images_seen, info.dtype, info.epoch, data["args"]) == (240, "float16", 0, args)
    assert info.gamma == phema.gamma_from_sigma_rel(0.15)
    state = data["state_dict"]
    assert state["net.pos_embed"].dtype == torch.float32  # frozen: kept exact
    assert state["net.pos_embed"].equal(emas[1].state_dict()["net.pos_embed"])
    trained = [k for k in state if k != "net.pos_embed"]
    assert all(state[k].dtype == torch.float16 for k in trained)
    torch.testing.assert_close(state[trained[0]].float(), emas[1].state_dict()[trained[0]], rtol=1e-3, atol=1e-4)
    one = phema_files.snapshot_file_bytes(model.state_dict(), "float16", phema_files.frozen_names(model))
    assert abs(os.path.getsize(found[-1].path) - one) < 0.1 * one


def test_snapshot_count_and_cost():
    for every, start, total in [(10, 0, 95), (10, 35, 100), (7, 50, 50), (5, 60, 50), (2502, 675540, 750600)]:
        brute = sum(phema_files.snapshot_due(s, every=every, start=start, total=total) for s in range(1, total + 1))
        assert phema_files.snapshot_count(every=every, start=start, total=total) == brute
    assert phema_files.snapshot_cost(1000, 3, every=2502, start=675540, total=750600) == (93, 93_000)
    assert phema_files.default_schedule(750600) == (2502, 675540)  # ImageNet 600 epochs: every 2 epochs from epoch 540
    assert phema_files.default_schedule(100) == (1, 90)


def test_float16_overflow_is_refused():
    with pytest.raises(ValueError, match="float16 range"):
        phema_files.cast_state({"w": torch.tensor([1e5])}, "float16")


def test_reconstruction_of_a_tracked_profile_is_that_ema(tmp_path):
    """Item 5 (a): the reconstruction of a tracked σ_rel at a snapshot time is the tracked EMA."""
    emas, _, _ = write_toy_snapshots(str(tmp_path))
    snaps = phema_files.list_snapshots(str(tmp_path))
    images = [s.images_seen for s in snaps]
    gammas = [s.gamma for s in snaps]
    fits = [phema.fit_power(images, gammas, snaps[-1].images_seen, ema.sigma_rel) for ema in emas]
    for fit in fits:
        assert fit.fit_error < 1e-6
    got = phema_files.combine(snaps, np.stack([f.weights for f in fits], 1))
    for ema, state in zip(emas, got):
        for k, v in ema.state_dict().items():
            torch.testing.assert_close(state[k], v, rtol=0, atol=1e-6)


def run_cli(argv, capsys):
    code = reconstruct_ema.cli(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_checkpoints_that_sample_py_reads(tmp_path, capsys):
    snap_dir, out_dir = str(tmp_path / "phema"), str(tmp_path / "out")
    emas, _, args = write_toy_snapshots(snap_dir)
    code, out, err = run_cli(
        ["--snapshots", snap_dir, "--std", "0.15", "0.1", "--decay", "0.97", "--output_dir", out_dir], capsys
    )
    assert code == 0, err
    assert "float64" in out and out.count(" -> ") == 3
    names = sorted(os.listdir(out_dir))
    assert names == [
        "ema-decay0.97-step0000000060.pth",
        "ema-std0.1-step0000000060.pth",
        "ema-std0.15-step0000000060.pth",
    ]
    state = checkpoint.load_checkpoint(os.path.join(out_dir, names[2]))[0]
    assert state.args == args and state.optimizer is None
    for k, v in emas[1].state_dict().items():  # the tracked σ_rel 0.15, reconstructed at its own snapshot
        torch.testing.assert_close(state.weights("ema1")[k], v, rtol=0, atol=1e-6)
    record = torch.load(os.path.join(out_dir, names[2]), weights_only=True)["phema"]
    assert record["sigma_rel"] == 0.15 and record["accum"] == "float64" and len(record["weights"]) == 12
    grid = str(tmp_path / "grid.png")
    sample.main(
        sample.parse_args(
            [
                "--resume",
                os.path.join(out_dir, names[1]),
                "--classes",
                "0",
                "1",
                "--per_class",
                "1",
                "--num_sampling_steps",
                "2",
                "--device",
                "cpu",
                "--output",
                grid,
            ]
        )
    )
    assert os.path.getsize(grid) > 0


def test_cli_at_an_earlier_step_uses_only_snapshots_up_to_it(tmp_path, capsys):
    snap_dir, out_dir = str(tmp_path / "phema"), str(tmp_path / "out")
    write_toy_snapshots(snap_dir)
    code, out, err = run_cli(
        ["--snapshots", snap_dir, "--std", "0.05", "--at", "35", "--accum", "float32", "--output_dir", out_dir], capsys
    )
    assert code == 0, err
    assert "6 snapshots up to step 30" in out and "float32" in out
    record = torch.load(os.path.join(out_dir, "ema-std0.05-step0000000035.pth"), weights_only=True)["phema"]
    assert record["images_seen"] == 35 * 8 and len(record["snapshots"]) == 6


def test_cli_warns_when_the_snapshots_do_not_cover_a_target(tmp_path, capsys):
    snap_dir = str(tmp_path / "phema")
    write_toy_snapshots(snap_dir, steps=20)
    code, out, err = run_cli(["--snapshots", snap_dir, "--std", "0.01", "0.15"], capsys)
    assert code == 0, err
    assert out.count("warning: σ_rel 0.01 is poorly covered") == 1 and "σ_rel 0.15 is poorly" not in out
    assert os.path.isfile(os.path.join(snap_dir, "reconstructed", "ema-std0.01-step0000000020.pth"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--snapshots", "{missing}", "--std", "0.05"], "no such folder"),
        (["--snapshots", "{empty}", "--std", "0.05"], "no phema-*.pth snapshots"),
        (["--snapshots", "{snaps}", "--std", "0.3"], "σ_rel must be in"),
        (["--snapshots", "{snaps}", "--decay", "1.0"], "a decay must be in"),
        (["--snapshots", "{snaps}", "--std", "0.05", "--at", "5"], "no snapshot at or before"),
        (["--snapshots", "{snaps}"], "at least one target"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    snaps = tmp_path / "phema"
    write_toy_snapshots(str(snaps), steps=20)
    (tmp_path / "empty").mkdir()
    paths = {"missing": str(tmp_path / "nope"), "empty": str(tmp_path / "empty"), "snaps": str(snaps)}
    code, out, err = run_cli([a.format(**paths) for a in argv], capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def folder_bytes(folder) -> dict:
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder)) if n.endswith(".pth")}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_float32_sums_of_several_targets_equal_float64_and_leave_the_snapshots_alone(tmp_path, dtype):
    """Seam bug 1: with --accum float32 and several targets, each output is its own weighted sum (the
    snapshot's tensor is never scaled in place), equal to the float64 sums to float32 rounding; the
    frozen entries (float32 also in float16 snapshots) too."""
    snap_dir = str(tmp_path / "phema")
    write_toy_snapshots(snap_dir, dtype=dtype)
    before = folder_bytes(snap_dir)
    snaps = phema_files.list_snapshots(snap_dir)
    targets = [("std", 0.05), ("std", 0.1), ("std", 0.15)]
    fits, wide = phema_files.reconstruct(snaps, targets, snaps[-1].images_seen, None, torch.float64)
    _, narrow = phema_files.reconstruct(snaps, targets, snaps[-1].images_seen, None, torch.float32)
    gain = max(f.gain for f in fits)
    for a, b in zip(narrow, wide):
        for name, value in b.items():
            scale = float(value.abs().max()) or 1.0
            torch.testing.assert_close(a[name], value, rtol=0, atol=4 * gain * len(snaps) * scale * 2**-24)
    assert not torch.equal(narrow[0]["net.final_layer.linear.weight"], narrow[2]["net.final_layer.linear.weight"])
    assert all(narrow[0][k].data_ptr() != narrow[1][k].data_ptr() for k in narrow[0])
    pos = phema_files.read_snapshot(snaps[0].path)[1]["state_dict"]["net.pos_embed"]  # frozen: the weights sum to 1
    assert all(torch.allclose(out["net.pos_embed"], pos.float(), rtol=0, atol=1e-6) for out in narrow)
    assert folder_bytes(snap_dir) == before


def test_a_snapshot_folder_that_cannot_be_made_is_a_write_error(tmp_path):
    """Seam bug 5: the folder's creation is inside the write-error handling (a WriteError, which
    SnapshotWriter reports and counts; other ranks are not left waiting at the barrier)."""
    from util import files

    blocked = tmp_path / "phema"
    blocked.write_text("a file where the folder should be")
    model = tiny_denoiser()
    with pytest.raises(files.WriteError, match="could not write"):
        phema_files.write_snapshot(
            str(blocked), model.state_dict(), sigma_rel=0.05, step=1, images_seen=8, epoch=0, args={}
        )
    writer = phema_files.SnapshotWriter(
        str(blocked),
        [PowerEMA(model, 0.05)],
        every=1,
        start=1,
        total=2,
        steps_per_epoch=2,
        dtype="float32",
        args={},
    )
    writer(1, 8)
    assert writer.failed == 1


def test_a_folder_with_a_stray_snapshot_of_another_run_is_refused_until_a_run_is_picked(tmp_path, capsys):
    """Issue 36 item 6: one newer file of another run copied into the folder; reconstruct_ema.py and
    --evaluate_gen --phema refuse it in one line naming both runs, their counts and steps, and how to
    pick; --run / --phema_run picks one (by name or prefix)."""
    snap_dir = tmp_path / "phema"
    write_toy_snapshots(str(snap_dir))  # 12 snapshots, steps 10-60, written before runs had a name
    stray = phema_files.read_snapshot(phema_files.list_snapshots(str(snap_dir))[-1].path)[1]
    stray.update(run="f0e1d2c3b4a59687", step=70)
    torch.save(stray, snap_dir / "phema-0000000070-0.05.pth")
    listing = "run unnamed (12 snapshots, steps 10-60), run f0e1d2c3b4a59687 (1 snapshot, step 70)"
    code, out, err = run_cli(["--snapshots", str(snap_dir), "--std", "0.1"], capsys)
    assert code == 2 and err == (
        f"error: {snap_dir} holds the snapshots of 2 runs: {listing}; pick one with --run RUN, or move the other "
        "run's files out of the folder\n"
    )
    assert not (snap_dir / "reconstructed").exists()
    for run, step, count in (("unnamed", 60, 12), ("f0e1", 70, 1)):
        code, out, err = run_cli(["--snapshots", str(snap_dir), "--std", "0.1", "--run", run], capsys)
        assert code == 0 and f"{count} snapshots up to step {step}" in out, err
        assert os.path.isfile(snap_dir / "reconstructed" / f"ema-std0.1-step{step:010d}.pth")
    code, out, err = run_cli(["--snapshots", str(snap_dir), "--std", "0.1", "--run", "zz"], capsys)
    assert code == 2 and err == f"error: --run zz: no run of {snap_dir} match; it holds {listing}\n"
    argv = [*TINY, "--evaluate_gen", "--phema", str(snap_dir), "--ema_std", "0.1", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ValueError, match=re.escape(f"2 runs: {listing}; pick one with --phema_run RUN")):
        main_jit.main(main_jit.parse_args(argv))
    config = main_jit.parse_args([*argv, "--phema_run", "unnamed"])
    state, step = phema_run.snapshot_state(config.phema, None, config.phema_run)
    assert step == 60 and state.args["class_num"] == 3
