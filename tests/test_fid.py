"""FID / IS: the math against scipy, stats files, weights resolution offline, prepare_ref.py, and the
in-memory evaluation against torch-fidelity's own calculate_metrics on the same images as PNGs."""

import dataclasses
import os
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
from helpers import TINY_MODEL, evaluation_of, make_image_folder, read_metrics, run_script, tiny_denoiser

from engine_eval import evaluate
from sampling import SamplerSettings
from util import fid
from util.evaluation import GenerationSpec, Scorer, image_folder_name
from util.logger import RunLog

SAMPLER = SamplerSettings(steps=2, cfg=2.0, interval_min=0.1)


def random_stats(rng, d, n=None):
    """Gaussian statistics in torch-fidelity's dtypes: mu float32 (d,), sigma float64 (d, d) PSD."""
    a = rng.standard_normal((d, n or 2 * d))
    return {"mu": rng.standard_normal(d).astype(np.float32), "sigma": a @ a.T / a.shape[1]}


def scipy_frechet(s1, s2):
    """The Fréchet distance of two Gaussians with scipy's matrix square root (independent path)."""
    mu1, mu2 = s1["mu"].astype(np.float64), s2["mu"].astype(np.float64)
    covmean = scipy.linalg.sqrtm(s1["sigma"] @ s2["sigma"]).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1["sigma"]) + np.trace(s2["sigma"]) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    s1, s2 = random_stats(rng, 32), random_stats(rng, 32)
    assert fid.frechet_distance(s1, s2) == pytest.approx(scipy_frechet(s1, s2), rel=1e-6)


def test_fid_of_a_set_against_its_own_statistics_is_zero():
    feats = torch.randn(500, 64) * 3 + 1
    stats = fid.statistics(feats)
    assert stats["mu"].dtype == np.float32 and stats["sigma"].dtype == np.float64
    assert abs(fid.frechet_distance(stats, stats)) < 1e-6 * np.trace(stats["sigma"])


def test_float64_mu_from_another_tool_is_promoted():
    rng = np.random.default_rng(1)
    s1, s2 = random_stats(rng, 16), random_stats(rng, 16)
    s2_64 = {"mu": s2["mu"].astype(np.float64), "sigma": s2["sigma"]}
    assert fid.frechet_distance(s1, s2_64) == pytest.approx(scipy_frechet(s1, s2), rel=1e-6)


def test_stats_file_round_trip_and_errors(tmp_path):
    stats = random_stats(np.random.default_rng(2), fid.FEATURE_DIM, n=8)
    path = str(tmp_path / "ref.npz")
    fid.save_stats(path, stats)
    back = fid.load_stats(path)
    for k in ("mu", "sigma"):
        assert back[k].dtype == stats[k].dtype and np.array_equal(back[k], stats[k])
    with pytest.raises(FileNotFoundError, match="prepare_ref.py"):
        fid.load_stats(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "bad.npz", mean=stats["mu"])
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        fid.load_stats(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "small.npz", mu=stats["mu"][:10], sigma=stats["sigma"][:10, :10])
    with pytest.raises(ValueError, match="expected mu"):
        fid.load_stats(str(tmp_path / "small.npz"))


def test_the_scorer_checks_its_files_when_built(tmp_path, inception_weights):
    stats = str(tmp_path / "ref.npz")
    fid.save_stats(stats, random_stats(np.random.default_rng(3), fid.FEATURE_DIM, n=4))
    scorer = Scorer(stats, inception_weights, torch.device("cpu"))
    assert scorer.inception.weights == inception_weights and scorer.inception._net is None  # built at the first batch
    with pytest.raises(FileNotFoundError, match="--fid_stats"):
        Scorer(str(tmp_path / "none.npz"), inception_weights, torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="--inception_weights"):
        Scorer(stats, str(tmp_path / "none.pth"), torch.device("cpu"))


def test_no_network_without_weights_flag_gives_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache

    def offline(url, dst, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError, match="--inception_weights PATH") as e:
        fid.resolve_inception_weights(None)
    assert "name resolution" in str(e.value)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, inception_weights):
    """A 12-image ImageFolder -> prepare_ref.py on 2 processes: (PNG folder, statistics file)."""
    root = tmp_path_factory.mktemp("ref")
    make_image_folder(root / "data", classes=2, per_class=6)
    png_dir, stats = root / "pngs", root / "stats.npz"
    run_script(
        "prepare_ref.py",
        "--data_path",
        root / "data",
        "--img_size",
        TINY_MODEL["img_size"],
        "--png_dir",
        png_dir,
        "--stats",
        stats,
        "--inception_weights",
        inception_weights,
        "--device",
        "cpu",
        "--batch_size",
        4,
        "--num_workers",
        0,
        nproc=2,
    )
    return str(png_dir), str(stats)


class Recorder:
    """Stands in for a SummaryWriter: records add_scalar calls."""

    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        pass


@pytest.fixture(scope="module")
def evaluated(reference, tmp_path_factory, inception_weights):
    """One in-memory evaluation of 12 tiny-model images (batches of 5), keeping the PNGs."""
    out = str(tmp_path_factory.mktemp("eval_out"))
    log = RunLog(out)
    log.writer = Recorder()
    spec = GenerationSpec(
        num_images=12, class_num=TINY_MODEL["class_num"], img_size=TINY_MODEL["img_size"], sampler=SAMPLER, gen_bsz=5
    )
    scorer = Scorer(reference[1], inception_weights, torch.device("cpu"))
    result = evaluate(
        evaluation_of(tiny_denoiser(), spec, scorer, log, out, save_images=True), epoch=4, weights_epoch=3
    )
    writer = log.writer
    log.close()
    return result, out, writer


@pytest.mark.slow
def test_prepare_ref_writes_center_cropped_pngs_in_order(reference):
    names = sorted(os.listdir(reference[0]))
    assert names == [f"{i:05d}.png" for i in range(12)]
    img = torch_fidelity.datasets.ImagesPathDataset([os.path.join(reference[0], names[0])])[0]
    assert img.shape == (3, TINY_MODEL["img_size"], TINY_MODEL["img_size"]) and img.dtype == torch.uint8


@pytest.mark.slow
def test_in_memory_metrics_equal_torch_fidelity_on_pngs(reference, evaluated, inception_weights):
    """torch-fidelity reads the saved PNGs: equal numbers also mean the PNGs are the images scored."""
    result, out, _ = evaluated
    gen_dir = os.path.join(out, image_folder_name(SAMPLER, 12, TINY_MODEL["img_size"]))
    tf = torch_fidelity.calculate_metrics(
        input1=gen_dir,
        input2=reference[0],
        fid=True,
        isc=True,
        cuda=False,
        cache=False,
        verbose=False,
        save_cpu_ram=True,
        batch_size=5,
        feature_extractor_weights_path=inception_weights,
    )
    assert result["fid"] > 1 and result["inception_score"] > 1.05  # the stand-in features are not degenerate
    assert result["fid"] == pytest.approx(tf[torch_fidelity.KEY_METRIC_FID], rel=1e-6)
    assert result["inception_score"] == pytest.approx(tf[torch_fidelity.KEY_METRIC_ISC_MEAN], rel=1e-6)
    assert result["inception_score_std"] == pytest.approx(tf[torch_fidelity.KEY_METRIC_ISC_STD], rel=1e-6, abs=1e-9)


@pytest.mark.slow
def test_metrics_logged_to_tensorboard_and_jsonl(evaluated, reference):
    result, out, writer = evaluated
    assert writer.scalars == [("fid_cfg2.0_res16", result["fid"], 4), ("is_cfg2.0_res16", result["inception_score"], 4)]
    (line,) = read_metrics(out)
    assert line == result and line["kind"] == "eval" and line["epoch"] == 4 and line["checkpoint_epoch"] == 3
    assert line["ema"] == 1 and line["checkpoint"] is None and line["images_saved"] is True
    assert line["fid"] == result["fid"] and line["inception_score"] == result["inception_score"]
    assert line["num_images"] == 12 and line["fid_stats"] == reference[1]
    assert {
        k: line[k] for k in ("method", "steps", "cfg", "interval_min", "interval_max", "schedule")
    } == dataclasses.asdict(SAMPLER)
