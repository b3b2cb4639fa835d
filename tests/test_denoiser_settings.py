"""The denoiser's settings the sampler runs with (sampling.check_denoiser): noise_scale, t_eps and the
prediction. Every value either samples (and inverts) to a finite, bounded result or is refused in one
line, in the functions and before any work in every command that builds a denoiser."""

import json
import math
import os
import sys

import pytest
import torch
from helpers import TINY, save_reference_checkpoint, tiny_denoiser
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import export
import invert as invert_script
import main_jit
import sample as sample_script
from denoiser import CONVERSIONS
from model_jit import JiT_models
from model_jit_adapters import build_denoiser
from sampling import METHODS, MIN_T_EPS, SCHEDULES, SamplerSettings, check_denoiser, invert, sample
from util.errors import BadValue

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from mixture import CLASSES, Mixture  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # the mixture's tensors are tiny
    yield


class PredMixture(Mixture):
    """The mixture's exact x̂ given as a `pred` network's output (CONVERSIONS["x"][pred], with the clip)."""

    def __init__(self, pred: str, noise_scale: float, t_eps: float):
        super().__init__(noise_scale=noise_scale)
        self.pred, self.t_eps = pred, t_eps

    def __call__(self, z, t, y):
        tt = t.view(-1, 1)
        return CONVERSIONS["x"][self.pred](super().__call__(z, t, y), z, tt, self.t_eps)


T_EPS_EDGES = [0.0, MIN_T_EPS, MIN_T_EPS / 2, 1e-30, 1e-6, 0.05, 0.5, 0.99, 1.0, 2.0, -0.05, math.nan, math.inf]


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    t_eps=st.one_of(st.sampled_from(T_EPS_EDGES), st.floats(0, 1), st.floats(1e-9, 1e-4)),
    noise_scale=st.one_of(st.sampled_from([1.0, 2.0, 0.0, -1.0, math.nan, math.inf, 1e-3, 50.0]), st.floats(0.1, 5)),
    pred=st.sampled_from(list(CONVERSIONS)),
    method=st.sampled_from(METHODS),
    schedule=st.sampled_from(list(SCHEDULES)),
    steps=st.integers(1, 25),
)
def test_every_denoiser_setting_samples_and_inverts_to_a_bounded_result_or_is_refused(
    t_eps, noise_scale, pred, method, schedule, steps
):
    """Over t_eps from 0 to beyond 1, noise scales and x-, ε- and v-networks: check_denoiser refuses in
    one line, or sampling and inversion (t_eps > 0) give finite values and the inverted noise stays
    within a few noise stds and data scales (UniPC's corrector after the first inversion step, about log(1/t_eps) long
    in λ, made noise of size about 1/t_eps: 9e3 at t_eps 1e-4)."""
    try:
        check_denoiser(noise_scale, t_eps, pred)
        s = SamplerSettings(method=method, steps=steps, cfg=2.0, interval_min=0.1, schedule=schedule)
    except ValueError as e:
        assert str(e) and "\n" not in str(e)
        return
    net = PredMixture(pred, noise_scale, t_eps)
    z0, y = net.noise(8, 0, dtype=torch.float32)
    x = sample(net, z0, y, s, null_label=CLASSES, t_eps=t_eps, pred=pred)
    assert bool(torch.isfinite(x).all()), (s, t_eps, pred)
    if t_eps > 0:
        z = invert(net, x, y, s, null_label=CLASSES, t_eps=t_eps, pred=pred)
        assert bool(torch.isfinite(z).all()) and z.abs().max() < 8 * (noise_scale + 1), (s, t_eps, pred, z.abs().max())


def test_check_denoiser_refuses_what_cannot_sample():
    for bad, match in (
        ((1.0, MIN_T_EPS / 2, "x"), "t_eps must be 0 or in"),  # below float32's resolution of 1 - t
        ((1.0, 1.0, "x"), "t_eps must be 0 or in"),
        ((1.0, math.nan, "x"), "t_eps must be 0 or in"),
        ((1.0, 0.0, "eps"), "ε-prediction network needs t_eps > 0"),
        ((0.0, 0.05, "x"), "noise_scale"),
        ((math.inf, 0.05, "x"), "noise_scale"),
    ):
        with pytest.raises(ValueError, match=match):
            check_denoiser(*bad)
    check_denoiser(2.0, 0.0, "x")  # t_eps = 0: the x-network samples (the flow's last step is exact)
    check_denoiser(None, None, None)  # not known yet: nothing to check
    mix = Mixture()
    z0, y = mix.noise(4, 0)
    with pytest.raises(ValueError, match="t_eps must be 0 or in"):  # the functions refuse it too
        sample(mix, z0, y, SamplerSettings(steps=4), null_label=CLASSES, t_eps=1e-30)


@pytest.mark.parametrize("method", ["heun", "dpm++3m", "unipc3", "ab3"])
def test_noise_scale_2_solves_the_same_ode(method):
    """The sampler's ODE dz/dt = (x̂ - z)/max(1 - t, t_eps) holds for any noise std (the paper's 2 at
    512 px): every solver converges to the same answer from noise_scale·N(0, I) as an exact reference
    (a 400-step UniPC-3), to a few thousandths of the noise at 64 steps."""
    mix = Mixture(noise_scale=2.0)
    z0, y = mix.noise(64, 1)
    g = dict(cfg=2.0, interval_min=0.1, schedule="logit:3")
    ref = sample(mix, z0, y, SamplerSettings(method="unipc3", steps=400, **g), null_label=CLASSES)
    out = sample(mix, z0, y, SamplerSettings(method=method, steps=64, **g), null_label=CLASSES)
    assert (out - ref).pow(2).mean().sqrt() < 0.02, (out - ref).pow(2).mean().sqrt()


def test_build_denoiser_refuses_settings_from_weights_before_building():
    """config.json or a checkpoint holding a t_eps or noise_scale no sampler can run: one line (BadValue)."""
    network = {**JiT_models["JiT-XS/4"].keywords, "input_size": 16, "num_classes": 3}
    for denoiser, match in (({"t_eps": 1e-30}, "t_eps must be"), ({"noise_scale": -1.0}, "noise_scale")):
        with pytest.raises(BadValue, match=match):
            build_denoiser(network, denoiser, {})
    with pytest.raises(BadValue, match="ε-prediction network needs t_eps > 0"):
        build_denoiser(network, {"pred": "eps", "t_eps": 0.0}, {})
    with pytest.raises(BadValue, match="t_eps must be given, got None"):  # a config.json edited to null
        build_denoiser(network, {"t_eps": None}, {})


@pytest.mark.parametrize(
    "cli,args,message",
    [
        (main_jit.cli, ["--t_eps", 1e-30], "t_eps must be 0 or in"),
        (main_jit.cli, ["--noise_scale", 0], "noise_scale (the std of the noise) must be"),
        (main_jit.cli, ["--pred", "eps", "--t_eps", 0], "ε-prediction network needs t_eps > 0"),
        (main_jit.cli, ["--evaluate_gen", "--resume", "/nonexistent", "--t_eps", 1.0], "t_eps must be 0 or in"),
        (sample_script.cli, ["--resume", "/nonexistent/ckpt.pth", "--t_eps", "nan"], "t_eps must be 0 or in"),
        (sample_script.cli, ["--resume", "/nonexistent/ckpt.pth", "--noise_scale", -2], "noise_scale"),
    ],
)
def test_commands_refuse_a_bad_denoiser_setting_before_any_work(cli, args, message, tmp_path, capsys, monkeypatch):
    """Refused in one line (exit 2) before the data, weights or output folder are touched: the paths
    here do not exist, and nothing is written."""
    monkeypatch.chdir(tmp_path)
    base = [*TINY, "--data_path", "/nonexistent/data", "--output_dir", "out"] if cli is main_jit.cli else []
    code = cli([*base, *map(str, args)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert os.listdir(tmp_path) == []


def test_an_exported_folder_whose_sampler_or_denoiser_cannot_run_is_refused_in_one_line(tmp_path, capsys):
    """config.json written before the renames (edm:7 at 50 steps is power:7 now, whose float32 grid
    holds t = 1 twice) or edited: sample.py and invert.py exit 2 with one line naming the file, and an
    override of the sampler flags samples it."""
    save_reference_checkpoint(tmp_path / "checkpoint-last.pth", tiny_denoiser(seed=1), epoch=1)
    folder = tmp_path / "exported"
    assert export.cli([str(tmp_path / "checkpoint-last.pth"), str(folder)]) == 0
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "images" / "a").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(tmp_path / "images" / "a" / "0.png")
    commands = {
        sample_script.cli: ["--per_class", "1", "--output", str(tmp_path / "grid.png")],
        invert_script.cli: ["--images", str(tmp_path / "images"), "--output", str(tmp_path / "inverted")],
    }
    for change, message in (
        ({"sampler": {**config["sampler"], "method": "dpm++3m", "schedule": "edm:7"}}, "schedule power:7 with 50"),
        ({"sampler": {**config["sampler"], "cfg": math.nan}}, "the CFG scale must be"),
        ({"denoiser": {**config["denoiser"], "t_eps": 1e-30}}, "t_eps must be 0 or in"),
    ):
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        for cli, args in commands.items():
            code = cli(["--resume", str(folder), "--device", "cpu", *args])
            err = capsys.readouterr().err
            assert code == 2 and err.count("\n") == 1 and message in err, err
            assert not os.path.exists(tmp_path / "grid.png") and not os.path.exists(tmp_path / "inverted")
    (folder / "config.json").write_text(json.dumps({**config, "sampler": {**config["sampler"], "schedule": "edm:7"}}))
    cli_args = [
        "--resume",
        str(folder),
        "--device",
        "cpu",
        "--sampling_schedule",
        "power:2",
        "--num_sampling_steps",
        "4",
    ]
    assert sample_script.cli([*cli_args, "--per_class", "1", "--output", str(tmp_path / "grid.png")]) == 0


def test_evaluate_gen_refuses_a_checkpoint_t_eps_before_reading_the_inputs(tmp_path, capsys, monkeypatch):
    """--evaluate_gen adopts the checkpoint's t_eps: one no sampler can run is refused right after the
    checkpoint is read, before the FID statistics and Inception weights (absent here) are opened."""
    path = tmp_path / "checkpoint-last.pth"
    save_reference_checkpoint(path, tiny_denoiser(seed=1), epoch=1)
    state = torch.load(path, weights_only=False)
    state["args"].t_eps = 1e-30
    torch.save(state, path)
    monkeypatch.chdir(tmp_path)
    code = main_jit.cli([*TINY, "--evaluate_gen", "--resume", str(path), "--output_dir", "out", "--num_images", "6"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "t_eps must be 0 or in" in err, err
