"""invert.py: images -> the noise the sampler maps to them (sampling.invert), written as noise.pt; the
round trip back to the images; one-line errors (exit 2) for bad input before any work."""

import os

import numpy as np
import pytest
import torch
from helpers import save_reference_checkpoint, tiny_denoiser
from PIL import Image

import invert
from sampling import SamplerSettings
from sampling import invert as invert_fn


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # a 16 px model: a second thread only adds synchronisation on a busy machine
    yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-last.pth"
    save_reference_checkpoint(path, tiny_denoiser(seed=1), ema1=tiny_denoiser(seed=2), epoch=3)
    return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An ImageFolder tree of 2 classes × 2 images, 20 px (center-cropped to 16)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        os.makedirs(root / c)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return str(root)


def run(capsys, *args):
    code = invert.cli([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_invert_writes_the_noise_of_each_image_and_the_round_trip_returns_them(checkpoint, images, tmp_path, capsys):
    errors = []
    for steps in (4, 16):
        out_dir = tmp_path / f"out{steps}"
        common = ["--resume", checkpoint, "--images", images, "--device", "cpu", "--output", out_dir]
        sampler = ["--sampling_method", "unipc2", "--num_sampling_steps", steps, "--cfg", 2.0, "--interval_min", 0.1]
        code, out, _ = run(capsys, *common, *sampler, "--roundtrip", "--batch", 3)
        assert code == 0, out
        rec = torch.load(out_dir / "noise.pt", weights_only=False)
        assert rec["noise"].shape == (4, 3, 16, 16) and rec["labels"].tolist() == [0, 0, 1, 1]
        assert [os.path.relpath(f, images) for f in rec["files"]] == ["a/0.png", "a/1.png", "b/0.png", "b/1.png"]
        assert rec["sampler"]["method"] == "unipc2" and rec["t_eps"] == 0.05
        assert len(os.listdir(out_dir / "roundtrip")) == 4
        errors.append(float(out.split("round trip: RMSE ")[1].split()[0]))
    # the same numbers as sampling.invert on the EMA-1 weights and the center-cropped images
    d = tiny_denoiser(seed=2)
    x = invert.read_images(rec["files"], 16)
    settings = SamplerSettings("unipc2", 16, 2.0, 0.1, 1.0)
    with torch.no_grad():
        expected = invert_fn(d.net, x, rec["labels"], settings, null_label=3, t_eps=0.05)
    torch.testing.assert_close(rec["noise"], expected, rtol=1e-4, atol=1e-4)  # batches of 3 vs 4
    assert errors[1] < errors[0], errors  # the inversion's error falls as the steps grow


def test_a_flat_folder_takes_the_class_label(checkpoint, images, tmp_path, capsys):
    flat = os.path.join(images, "a")
    code, out, _ = run(capsys, "--resume", checkpoint, "--images", flat, "--class_label", 2, "--device", "cpu",
                       "--num_sampling_steps", 2, "--output", tmp_path)  # fmt: skip
    assert code == 0 and torch.load(tmp_path / "noise.pt", weights_only=False)["labels"].tolist() == [2, 2]
    assert "with heun 2 steps (4 NFE)" in out  # Heun's second-order step everywhere backwards: 2 per step


@pytest.mark.parametrize(
    "args,message",
    [
        (["--images", "/nonexistent"], "--images /nonexistent: no such folder"),
        (["--images", "FLAT"], "is a flat folder: give the images' class with --class_label"),
        (["--class_label", 3], "class labels must be in [0, 3), got 3..3"),
        (["--t_eps", 0], "inversion needs t_eps > 0"),
        (["--cfg", -1], "the CFG scale must be >= 0"),
        (["--sampling_schedule", "edm:2"], "renamed: use power:2"),
        (["--batch", 0], "--batch must be >= 1"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(checkpoint, images, tmp_path, capsys, args, message):
    args = [os.path.join(images, "a") if a == "FLAT" else a for a in args]
    base = ["--resume", checkpoint, "--images", images, "--device", "cpu", "--output", tmp_path / "out"]
    code, _, err = run(capsys, *base, *args)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not os.path.exists(tmp_path / "out")


def test_the_image_files_training_reads_are_inverted(checkpoint, tmp_path, capsys):
    """Every extension torchvision's ImageFolder reads (training's classes and files), any case, in any
    mode PIL opens (grey, palette, RGBA, 16-bit grey), of any size (center-cropped to the model's)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    assert set(invert.EXTENSIONS) == set(IMG_EXTENSIONS)
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    rgb.save(tmp_path / "a" / "0.TIF")
    rgb.convert("L").save(tmp_path / "a" / "1.pgm")
    rgb.save(tmp_path / "a" / "2.ppm")
    rgb.convert("P").save(tmp_path / "b" / "0.png")
    rgb.convert("RGBA").save(tmp_path / "b" / "1.webp")
    Image.fromarray(rng.integers(0, 65536, (8, 8), dtype=np.uint16)).save(tmp_path / "b" / "2.tiff")
    code, out, err = run(capsys, "--resume", checkpoint, "--images", tmp_path, "--device", "cpu",
                         "--num_sampling_steps", 2, "--output", tmp_path / "out")  # fmt: skip
    rec = torch.load(tmp_path / "out" / "noise.pt", weights_only=False)
    assert code == 0 and rec["labels"].tolist() == [0, 0, 0, 1, 1, 1] and bool(torch.isfinite(rec["noise"]).all()), err
