"""The toy experiment (paper Fig. 2): its pieces, the exact denoiser through the repo's conversions and
sampler, the t_eps clip of every --pred/--loss pair, a short seeded run, and the script's flags."""

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import toy_manifold
from denoiser import CONVERSIONS, TRUTHS, Denoiser
from sampling import SamplerSettings, sample
from toy_manifold import ExactNet, ToyConfig, ToyMLP, embedding, run_cells, sliced_wasserstein, spiral


def test_embedding_has_orthonormal_columns():
    P = embedding(512, torch.Generator().manual_seed(0))
    assert P.shape == (512, 2)
    torch.testing.assert_close(P.T @ P, torch.eye(2), rtol=0, atol=1e-6)


def test_mlp_is_five_relu_layers_of_256_on_z_and_t():
    net = ToyMLP(16)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (17, 256),
        (256, 256),
        (256, 256),
        (256, 256),
        (256, 16),
    ]
    assert net(torch.randn(3, 16), torch.rand(3), torch.zeros(3, dtype=torch.long)).shape == (3, 16)


def test_sliced_wasserstein_of_a_shift():
    """Shifting a set by (d, 0) moves every projection on direction θ by d·cos θ."""
    a = spiral(500, torch.Generator().manual_seed(0))
    angles = torch.linspace(0, math.pi, 7)
    directions = torch.stack([torch.cos(angles), torch.sin(angles)])  # (2, 7)
    assert sliced_wasserstein(a, a, directions) == 0
    shifted = sliced_wasserstein(a + torch.tensor([0.3, 0.0]), a, directions)
    assert abs(shifted - 0.3 * angles.cos().abs().mean().item()) < 1e-6


def test_exact_net_is_the_posterior_mean():
    """ExactNet's x̂ against a Monte-Carlo posterior mean: data points weighted by the likelihood of z."""
    P = embedding(3, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    x = (spiral(400_000, g) @ P.T).double()  # (N, 3)
    z = torch.tensor([[0.5, -0.2, 0.1], [0.0, 0.3, -0.4]], dtype=torch.float64)
    for t in (0.3, 0.7):
        logw = -((z[:, None, :] - t * x[None]) ** 2).sum(-1) / (2 * (1 - t) ** 2)  # (2, N)
        mc = torch.softmax(logw, dim=1) @ x
        got = ExactNet(P, "x")(z.float(), torch.full((2,), t), None).double()
        torch.testing.assert_close(got, mc, rtol=0, atol=2e-3)


@pytest.mark.slow
def test_exact_eps_and_v_networks_sample_as_sharply_as_the_exact_x_network():
    """The repo's conversions and sampler are not what blurs ε- and v-prediction: given the exact network
    of each target, Heun-50 (t_eps 0.05, as the toy) lands as close to the data as with x-prediction."""
    n, D = 1000, 8
    P = embedding(D, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(2)
    data, other = spiral(n, g), spiral(n, g)
    directions = torch.randn(2, 64, generator=g)
    directions /= directions.norm(dim=0)
    z0, y = torch.randn(n, D, generator=torch.Generator().manual_seed(1)), torch.zeros(n, dtype=torch.long)
    w1 = {}
    for pred in ("x", "eps", "v"):
        samples = sample(ExactNet(P, pred), z0, y, SamplerSettings(), null_label=1, t_eps=0.05, pred=pred)
        w1[pred] = sliced_wasserstein(samples @ P, data, directions)
    floor = sliced_wasserstein(other, data, directions)
    assert w1["x"] < 1.3 * floor and abs(w1["eps"] - w1["x"]) < 0.2 * w1["x"] and abs(w1["v"] - w1["x"]) < 0.2 * w1["x"]


# What the loss of each --pred/--loss pair weights the pred-space squared error by, with the Denoiser's
# clip (t_eps): the truth and the output go through the same CONVERSIONS[pred][loss], an affine map of
# slope a(t), so the loss is a(t)²·|out - truth|²; the clip only caps a(t).
def clipped_weight(pred: str, loss: str, t: torch.Tensor, t_eps: float) -> torch.Tensor:
    one_minus_t, tt = (1 - t).clamp_min(t_eps), t.clamp_min(t_eps)
    slopes = {
        ("x", "x"): torch.ones_like(t),
        ("x", "eps"): t / one_minus_t,
        ("x", "v"): 1 / one_minus_t,
        ("eps", "x"): (1 - t) / tt,
        ("eps", "eps"): torch.ones_like(t),
        ("eps", "v"): 1 / tt,
        ("v", "x"): 1 - t,
        ("v", "eps"): t,
        ("v", "v"): torch.ones_like(t),
    }
    return slopes[pred, loss] ** 2


class FixedOutput(torch.nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, z, t, y):
        return self.out


@pytest.mark.parametrize("pred", tuple(CONVERSIONS))
@pytest.mark.parametrize("loss", tuple(CONVERSIONS))
def test_the_t_eps_clip_of_the_target_only_caps_the_weight(pred, loss):
    """Times inside both clip regions (t < t_eps, t > 1 - t_eps) and between them: every pair's loss is
    the pred-space error times the clipped weight, so the loss's minimiser is E[pred target | z] at
    every t (the clipped target is no other target)."""
    g = torch.Generator().manual_seed(0)
    x, e = (
        torch.rand(5, 6, generator=g, dtype=torch.float64) * 2 - 1,
        torch.randn(5, 6, generator=g, dtype=torch.float64),
    )
    t = torch.tensor([0.0, 0.02, 0.5, 0.97, 0.999], dtype=torch.float64)
    truth = TRUTHS[pred](x, e)
    out = truth + 0.1 * torch.randn(5, 6, generator=g, dtype=torch.float64)
    d = Denoiser(FixedOutput(out), num_classes=1, t_eps=0.05, pred=pred, loss=loss).eval()
    _, per_sample, _ = d(x, torch.zeros(5, dtype=torch.long), t=t, noise=e, per_sample=True)
    expected = ((out - truth) ** 2).mean(dim=1) * clipped_weight(pred, loss, t, 0.05)
    torch.testing.assert_close(per_sample, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.slow
def test_x_prediction_beats_eps_prediction_at_high_dimension():
    """A short seeded run at D = 512: x-prediction lands near the data, e-prediction far off it
    (seeds 0-4 give 0.04-0.06 and 26.4-26.9: the bounds are far from both)."""
    cfg = ToyConfig(steps=150, num_samples=500, sampling_steps=10, beta2=0.999)
    _, scores, _, floor = run_cells(["x", "eps"], [512], cfg, log=lambda msg: None)
    assert scores["x", 512] < 0.2 and scores["eps", 512] > 5
    assert floor < 0.1


TINY = ["--steps", "3", "--batch_size", "8", "--num_samples", "40", "--sampling_steps", "2"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dims", "1"], "--dims must lie in 2 to 16384"),
        (["--dims", "2", "100000"], "--dims must lie in 2 to 16384"),
        (["--steps", "0"], "must be at least 1"),
        (["--lr", "nan"], "must be finite numbers"),
        (["--lr", "0"], "--lr must be positive"),
        (["--beta2", "1"], "--beta2 must lie in [0, 1)"),
        (["--P_std", "0"], "--P_std must be positive"),
        (["--t_eps", "0"], "--t_eps must lie in (0, 0.5]"),
        (["--seed", "-1"], "--seed must lie in 0 to 2^62"),
        (["--num_samples", "10000000000"], "more than half of this machine's"),
        (["--dpi", "10"], "--dpi must lie in 20 to 600"),
    ],
)
def test_bad_flags_exit_2_with_one_line_before_any_work(args, message, tmp_path, capsys):
    out = tmp_path / "toy"
    assert toy_manifold.cli([*TINY, *args, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_an_output_dir_that_is_a_file_exits_2(tmp_path, capsys):
    (tmp_path / "f").write_text("keep")
    assert toy_manifold.cli([*TINY, "--output_dir", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "f").read_text() == "keep"


def test_cells_are_cached_and_a_changed_setting_or_a_damaged_file_trains_again(tmp_path, monkeypatch, capsys):
    argv = [*TINY, "--dims", "2", "3", "--preds", "x", "v", "--output_dir", str(tmp_path)]
    assert toy_manifold.cli(argv) == 0
    first = (tmp_path / "toy_manifold.md").read_text()
    cells = sorted(os.listdir(tmp_path / "cells"))
    assert len(cells) == 4 and (tmp_path / "toy_manifold.png").stat().st_size > 0
    trained = []
    real = toy_manifold.train_cell
    monkeypatch.setattr(toy_manifold, "train_cell", lambda pred, P, cfg: trained.append(pred) or real(pred, P, cfg))
    assert toy_manifold.cli(argv) == 0 and trained == []  # every cell read back
    assert (tmp_path / "toy_manifold.md").read_text() == first
    (tmp_path / "cells" / cells[0]).write_bytes(b"damaged")
    assert toy_manifold.cli(argv) == 0 and len(trained) == 1
    assert (tmp_path / "toy_manifold.md").read_text() == first  # the same seeded cell again
    assert toy_manifold.cli([*argv, "--lr", "1e-3"]) == 0 and len(trained) == 5
    assert len(os.listdir(tmp_path / "cells")) == 8
    capsys.readouterr()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dims=st.lists(st.integers(0, 40), min_size=1, max_size=2),
    steps=st.integers(-1, 3),
    batch_size=st.integers(-1, 9),
    num_samples=st.integers(-1, 30),
    sampling_steps=st.integers(-1, 3),
    lr=st.floats(allow_nan=True, allow_infinity=True, width=32),
    beta2=st.floats(-0.5, 1.5),
    P_mean=st.floats(-1e3, 1e3),
    P_std=st.floats(-1.0, 1e3),
    t_eps=st.floats(-0.1, 0.7),
    loss=st.sampled_from(tuple(CONVERSIONS)),
)
def test_every_flag_value_works_or_is_refused_up_front(
    tmp_path_factory,
    capsys,
    dims,
    steps,
    batch_size,
    num_samples,
    sampling_steps,
    lr,
    beta2,
    P_mean,
    P_std,
    t_eps,
    loss,
):
    out = tmp_path_factory.mktemp("toy")
    values = dict(steps=steps, batch_size=batch_size, num_samples=num_samples, sampling_steps=sampling_steps, lr=lr)
    values.update(beta2=beta2, P_mean=P_mean, P_std=P_std, t_eps=t_eps, loss=loss)
    argv = ["--dims", *map(str, dims), *(f"--{k}={v}" for k, v in values.items())]  # "=": values like -1e-05
    argv += ["--preds", "x", "eps", "--output_dir", str(out / "run"), "--no_cache"]
    code = toy_manifold.cli(argv)
    err = capsys.readouterr().err
    if code == 2:
        assert err.startswith("error: ") and err.count("\n") == 1 and not (out / "run").exists()
    else:
        assert code == 0 and (out / "run" / "toy_manifold.md").exists() and (out / "run" / "toy_manifold.png").exists()


def test_the_commands_in_docs_parse_with_the_scripts_parser():
    """Every `python toy_manifold.py ...` line of docs/toy.md is accepted by get_args_parser (and by the
    checks of toy_config)."""
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "toy.md")) as f:
        commands = [line.split()[2:] for line in f if line.startswith("python toy_manifold.py")]
    assert len(commands) >= 3
    for argv in commands:
        toy_manifold.toy_config(toy_manifold.parse_args(argv))
