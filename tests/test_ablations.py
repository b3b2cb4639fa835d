"""The paper's ablations: prediction targets and loss spaces (Table 2), the patch-embedding
bottleneck (Fig. 4) and the in-context class tokens (Table 4)."""

import argparse
import io
import json

import numpy as np
import pytest
import torch
from helpers import TINY, TINY_MODEL, make_image_folder, run_script

import main_jit
import run_build
from denoiser import CONVERSIONS, TRUTHS, Denoiser, velocity
from engine_jit import build_optimizer
from model_jit import ARCH_KNOBS, JiT_models
from sampling import SamplerSettings

SPACES = tuple(CONVERSIONS)
CPU = torch.device("cpu")

# The squared factor of the network output in CONVERSIONS[pred][space]: a `space` loss is the
# `pred`-space squared error times this weight (unclipped). The x row is the paper's footnote 4.
WEIGHTS = {
    "x": {"x": lambda t: 1.0, "eps": lambda t: t**2 / (1 - t) ** 2, "v": lambda t: 1 / (1 - t) ** 2},
    "eps": {"x": lambda t: (1 - t) ** 2 / t**2, "eps": lambda t: 1.0, "v": lambda t: 1 / t**2},
    "v": {"x": lambda t: (1 - t) ** 2, "eps": lambda t: t**2, "v": lambda t: 1.0},
}


def noisy_batch(lo=0.1, hi=0.9):
    """float64 x (6, 3, 4, 4) in [-1, 1], e, t (6, 1, 1, 1) in [lo, hi] and z = t·x + (1 - t)·e."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    e = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    t = (lo + (hi - lo) * torch.rand(6, generator=g, dtype=torch.float64)).view(-1, 1, 1, 1)
    return x, e, t, t * x + (1 - t) * e


@pytest.mark.parametrize("pred", SPACES)
@pytest.mark.parametrize("space", SPACES)
def test_each_conversion_maps_the_exact_prediction_to_the_exact_value(pred, space):
    x, e, t, z = noisy_batch()  # t in [0.1, 0.9]: no clip at t_eps 0.05
    out = CONVERSIONS[pred][space](TRUTHS[pred](x, e), z, t, 0.05)
    torch.testing.assert_close(out, TRUTHS[space](x, e), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pred", SPACES)
@pytest.mark.parametrize("space", SPACES)
def test_conversions_agree_with_each_other_on_any_output(pred, space):
    """For any network output: pred -> space equals pred -> x -> space, and space -> pred undoes it."""
    x, e, t, z = noisy_batch()
    out = torch.randn_like(x)
    direct = CONVERSIONS[pred][space](out, z, t, 0.05)
    via_x = CONVERSIONS["x"][space](CONVERSIONS[pred]["x"](out, z, t, 0.05), z, t, 0.05)
    torch.testing.assert_close(direct, via_x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(CONVERSIONS[space][pred](direct, z, t, 0.05), out, rtol=1e-12, atol=1e-12)


def test_every_division_uses_the_clipped_denominator():
    out, z = torch.full((2, 1), 3.0, dtype=torch.float64), torch.full((2, 1), 1.0, dtype=torch.float64)
    t = torch.tensor([[0.01], [0.99]], dtype=torch.float64)
    div = lambda a, b: a / b  # noqa: E731
    torch.testing.assert_close(
        CONVERSIONS["x"]["v"](out, z, t, 0.05), div(out - z, torch.tensor([[0.99], [0.05]], dtype=torch.float64))
    )
    torch.testing.assert_close(
        CONVERSIONS["x"]["eps"](out, z, t, 0.05), div(z - t * out, torch.tensor([[0.99], [0.05]], dtype=torch.float64))
    )
    torch.testing.assert_close(
        CONVERSIONS["eps"]["v"](out, z, t, 0.05), div(z - out, torch.tensor([[0.05], [0.99]], dtype=torch.float64))
    )
    torch.testing.assert_close(
        CONVERSIONS["eps"]["x"](out, z, t, 0.05),
        div(z - (1 - t) * out, torch.tensor([[0.05], [0.99]], dtype=torch.float64)),
    )


class FixedOutput:
    """A network that returns `out` whatever its input."""

    def __init__(self, out):
        self.out = out

    def __call__(self, z, t, y):
        return self.out


@pytest.mark.parametrize("pred", SPACES)
@pytest.mark.parametrize("loss", SPACES)
def test_each_loss_is_the_prediction_error_with_the_papers_weights(pred, loss):
    x, e, t, _ = noisy_batch()
    truth = TRUTHS[pred](x, e)
    out = truth + 0.1 * torch.randn_like(truth)
    d = Denoiser(FixedOutput(out), num_classes=3, pred=pred, loss=loss).eval()
    got = d(x, torch.zeros(6, dtype=torch.long), t=t.flatten(), noise=e)
    per_sample = ((out - truth) ** 2).mean(dim=(1, 2, 3)) * WEIGHTS[pred][loss](t.flatten())
    torch.testing.assert_close(got, per_sample.mean(), rtol=1e-12, atol=0)


def test_default_is_x_prediction_with_the_v_loss_bit_for_bit():
    """The default path computes exactly the reference's expressions, in the same order."""
    torch.manual_seed(0)
    net = JiT_models["JiT-XS/4"](input_size=16, num_classes=3)
    d = Denoiser(net, num_classes=3).eval()
    assert (d.pred, d.loss) == ("x", "v") and CONVERSIONS["x"]["v"] is velocity
    x, e, y = torch.rand(4, 3, 16, 16) * 2 - 1, torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    t = torch.tensor([0.1, 0.5, 0.96, 0.99])  # the last two clip
    with torch.no_grad():
        tb = t.view(-1, 1, 1, 1)
        z = tb * x + (1 - tb) * e
        v = (x - z) / (1 - tb).clamp_min(0.05)
        v_pred = (net(z, t, y) - z) / (1.0 - tb).clamp_min(0.05)
        expected = ((v - v_pred) ** 2).mean(dim=(1, 2, 3)).mean()
        assert torch.equal(d(x, y, t=t, noise=e), expected)


def tiny_run_args(tmp_path, *extra):
    return main_jit.parse_args([*TINY, "--data_path", str(tmp_path), "--output_dir", str(tmp_path), *map(str, extra)])


def train_steps(d, opt, n: int):
    """n optimiser steps on fixed random images (the Denoiser draws t, noise, label dropout)."""
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
        d(x, torch.arange(4) % 3).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("pred", ["eps", "v"])
def test_eps_and_v_prediction_train_resume_bit_exactly_and_sample(pred, tmp_path):
    """Built by main_jit's flags; 4 steps straight equal 2 steps, a save / load into fresh objects
    (weights, AdamW state, RNG) and 2 more steps, bit for bit; then the sampler gives finite images."""
    args = tiny_run_args(tmp_path, "--pred", pred, "--loss", "x")

    def build(seed):
        torch.manual_seed(seed)
        d = run_build.new_denoiser(args, CPU).train()
        return d, build_optimizer(d, 1e-3, 0.0)

    d1, o1 = build(0)
    assert (d1.pred, d1.loss) == (pred, "x")
    train_steps(d1, o1, 2)
    buf = io.BytesIO()
    torch.save({"model": d1.state_dict(), "optimizer": o1.state_dict(), "rng": torch.get_rng_state()}, buf)
    train_steps(d1, o1, 2)

    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    d2, o2 = build(1)
    d2.load_state_dict(state["model"], strict=True)
    o2.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    train_steps(d2, o2, 2)
    for (name, a), b in zip(d1.state_dict().items(), d2.state_dict().values()):
        assert torch.equal(a, b), name
    for s1, s2 in zip(o1.state_dict()["state"].values(), o2.state_dict()["state"].values()):
        assert all(torch.equal(s1[k], s2[k]) for k in s1)

    images = d2.eval().generate(torch.tensor([0, 1, 2]), SamplerSettings(steps=3, cfg=2.0, interval_min=0.1))
    assert images.shape == (3, 3, 16, 16) and torch.isfinite(images).all()


def test_knob_flags_default_to_the_presets_network(tmp_path):
    args = tiny_run_args(tmp_path)
    assert [getattr(args, k) for k in ARCH_KNOBS] == [None, None, None] and (args.pred, args.loss) == ("x", "v")
    torch.manual_seed(0)
    built = run_build.new_denoiser(args, CPU).state_dict()
    torch.manual_seed(0)
    plain = Denoiser(JiT_models[TINY_MODEL["model"]](input_size=16, num_classes=3), num_classes=3).state_dict()
    assert list(built) == list(plain) and all(torch.equal(built[k], plain[k]) for k in plain)


@pytest.mark.parametrize("name", sorted(JiT_models))
def test_presets_given_their_own_knob_values_are_unchanged(name):
    own = {k: JiT_models[name].keywords[k] for k in ARCH_KNOBS}
    with torch.device("meta"):
        a, b = JiT_models[name](input_size=64).state_dict(), JiT_models[name](input_size=64, **own).state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)


def test_no_bottleneck_is_one_linear_patch_embedding():
    net = JiT_models["JiT-XS/4"](input_size=16, num_classes=3, bottleneck_dim=0)
    names = [k for k in net.state_dict() if k.startswith("x_embedder.")]
    assert names == ["x_embedder.proj.weight", "x_embedder.proj.bias"]
    w, b = net.x_embedder.proj.weight, net.x_embedder.proj.bias
    assert w.shape == (64, 3, 4, 4) and torch.equal(b, torch.zeros(64))
    bound = (6 / (3 * 4 * 4 + 64)) ** 0.5  # xavier-uniform on the flattened kernel (64, 48)
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    out = net(torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 3]))
    assert out.shape == (2, 3, 16, 16)


def test_no_in_context_tokens():
    net = JiT_models["JiT-XS/4"](input_size=16, num_classes=3, in_context_len=0)
    assert "in_context_posemb" not in net.state_dict() and net.rope_cos.shape[0] == 16  # patch tokens only
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(std=0.05)
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    with torch.no_grad():
        assert not torch.equal(
            net(x, t, torch.tensor([0, 0])), net(x, t, torch.tensor([1, 1]))
        )  # adaLN still conditions


@pytest.mark.parametrize(
    "knobs",
    [
        dict(bottleneck_dim=0),
        dict(bottleneck_dim=8),
        dict(in_context_len=0),
        dict(in_context_len=2, in_context_start=0),
    ],
)
def test_knob_state_dicts_load_strictly_into_the_same_knobs_only(knobs):
    a = JiT_models["JiT-XS/4"](input_size=16, num_classes=3, **knobs)
    b = JiT_models["JiT-XS/4"](input_size=16, num_classes=3, **knobs)
    b.load_state_dict(a.state_dict(), strict=True)
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.equal(a(x, t, y), b(x, t, y))
    if "in_context_start" not in knobs:  # a start block changes no parameter
        with pytest.raises(RuntimeError):
            JiT_models["JiT-XS/4"](input_size=16, num_classes=3).load_state_dict(a.state_dict(), strict=True)


def test_bad_knobs_are_a_clear_error():
    with pytest.raises(ValueError, match=">= 0"):
        JiT_models["JiT-XS/4"](input_size=16, bottleneck_dim=-1)
    with pytest.raises(ValueError, match="in_context_start"):
        JiT_models["JiT-XS/4"](input_size=16, in_context_start=4)
    with pytest.raises(ValueError, match="x, eps, v"):
        Denoiser(FixedOutput(None), num_classes=3, pred="noise")


@pytest.mark.slow
def test_an_ablation_run_records_its_choices_and_evaluates(tmp_path, inception_weights, fid_ref_stats, capsys):
    """One epoch of e-prediction with the x-loss, no bottleneck and no in-context tokens, evaluated
    online: the checkpoint's args rebuild the same network (strict load), the FID is finite, and
    --evaluate_gen of the checkpoint (no ablation flags given) reproduces it; so do its export as jit
    and sample.py of the export with no model flags; --format diffusers of it is one line, exit 2."""
    data, out = make_image_folder(tmp_path / "data"), tmp_path / "out"
    run_script(
        "main_jit.py",
        *TINY,
        "--epochs",
        1,
        "--pred",
        "eps",
        "--loss",
        "x",
        "--bottleneck_dim",
        0,
        "--in_context_len",
        0,
        "--online_eval",
        "--num_images",
        6,
        "--gen_bsz",
        6,
        "--num_sampling_steps",
        2,
        "--fid_stats",
        fid_ref_stats,
        "--inception_weights",
        inception_weights,
        "--data_path",
        data,
        "--output_dir",
        out,
    )
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    saved = ckpt["args"]
    assert (saved["pred"], saved["loss"], saved["bottleneck_dim"], saved["in_context_len"]) == ("eps", "x", 0, 0)
    rebuilt = run_build.new_denoiser(argparse.Namespace(**saved), CPU)
    assert (rebuilt.pred, rebuilt.loss) == ("eps", "x")
    for key in ("model", "model_ema1", "model_ema2"):
        rebuilt.load_state_dict(ckpt[key], strict=True)
    with open(out / "metrics.jsonl") as f:
        (record,) = [r for r in map(json.loads, f) if r["kind"] == "eval"]
    assert np.isfinite(record["fid"])

    # --evaluate_gen without --pred / --loss / knobs: the checkpoint's are used, and EMA 1 evaluates
    # to the online evaluation's FID of the same weights, seeds and sampler.
    args = main_jit.parse_args(
        [
            str(a)
            for a in (
                "--evaluate_gen",
                "--resume",
                out,
                "--output_dir",
                tmp_path / "eval",
                "--num_images",
                6,
                "--gen_bsz",
                6,
                "--num_sampling_steps",
                2,
                "--device",
                "cpu",
                "--fid_stats",
                fid_ref_stats,
                "--inception_weights",
                inception_weights,
            )
        ]
    )
    assert main_jit.main(args) == 0
    with open(tmp_path / "eval" / "metrics.jsonl") as f:
        (again,) = [r for r in map(json.loads, f) if r["kind"] == "eval"]
    assert again["fid"] == pytest.approx(record["fid"], rel=1e-6)  # this process runs 2 threads, the training 1
    assert again["img_size"] == 16 and again["checkpoint"] == str(out / "checkpoint-last.pth")

    import export
    import sample

    exported = str(tmp_path / "exported")
    assert export.cli([str(out), exported]) == 0
    assert export.cli([str(out), str(tmp_path / "diffusers"), "--format", "diffusers"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--bottleneck_dim 0" in err and "--format jit" in err
    args = main_jit.parse_args(
        [
            str(a)
            for a in (
                "--evaluate_gen",
                "--resume",
                exported,
                "--output_dir",
                tmp_path / "eval_export",
                "--num_images",
                6,
                "--gen_bsz",
                6,
                "--num_sampling_steps",
                2,
                "--cfg",
                1.0,
                "--interval_min",
                0.0,
                "--device",
                "cpu",
                "--fid_stats",
                fid_ref_stats,
                "--inception_weights",
                inception_weights,
            )
        ]
    )  # the sampler typed: the folder recommends its own
    assert main_jit.main(args) == 0
    with open(tmp_path / "eval_export" / "metrics.jsonl") as f:
        (exported_record,) = [r for r in map(json.loads, f) if r["kind"] == "eval"]
    assert exported_record["fid"] == pytest.approx(again["fid"], rel=1e-6)
    grid = tmp_path / "grid.png"
    assert (
        sample.main(
            sample.parse_args(
                [
                    "--resume",
                    exported,
                    "--per_class",
                    "1",
                    "--num_sampling_steps",
                    "2",
                    "--device",
                    "cpu",
                    "--output",
                    str(grid),
                ]
            )
        )
        == 0
    )
    assert "wrote 3×1 grid" in capsys.readouterr().out
