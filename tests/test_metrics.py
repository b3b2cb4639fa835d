"""The metrics beside FID / IS: precision and recall (against an independent float64 computation),
FD-DINOv2 (torch-fidelity's DINOv2 preprocessing, the weights files, an independent float64 Fréchet
distance), several noise seeds (their summary, the csv columns), the scoring protocol in records."""

import hashlib
import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers import make_image_folder, make_standin_dinov2_weights
from hypothesis import given, settings
from hypothesis import strategies as st

import prepare_ref
from util import dinov2, fid, prc, seeds, sweep, sweep_report
from util.errors import BadValue, MissingFile
from util.scorer import Scorer

CPU = torch.device("cpu")


def numpy_precision_recall(gen: np.ndarray, ref: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019 in float64 numpy, brute force: a sample counts when it lies within the
    k-th-nearest-neighbour radius (itself excluded) of some sample of the other set."""

    def dist(a, b):
        return np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0))

    radius_gen = np.sort(dist(gen, gen), axis=1)[:, k]  # column 0 is the point itself
    radius_ref = np.sort(dist(ref, ref), axis=1)[:, k]
    precision = (dist(gen, ref) <= radius_ref[None, :]).any(axis=1).mean()
    recall = (dist(ref, gen) <= radius_gen[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def numpy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance of two feature sets' Gaussians, all in float64 numpy / scipy."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_precision_recall_equal_an_independent_float64_computation():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((220, 16))
    found = []
    for shift in (0.0, 0.7, 3.0):  # the generated set further and further from the reference
        gen = rng.standard_normal((150, 16)) * 1.3 + shift
        ours = prc.precision_recall(torch.from_numpy(gen).float(), torch.from_numpy(ref).float(), CPU)
        assert ours == pytest.approx(numpy_precision_recall(gen.astype(np.float32), ref.astype(np.float32)), rel=1e-6)
        found.append(ours)
    assert found[0][0] > found[1][0] > found[2][0] and found[2][0] < 0.2  # precision falls as the sets part
    assert all(math.isnan(x) for x in prc.precision_recall(torch.zeros(3, 16), torch.zeros(9, 16), CPU))


@settings(max_examples=40, deadline=None)
@given(total=st.integers(1, 500), num=st.one_of(st.none(), st.integers(-5, 600)), seed=st.integers(0, 2**32 - 1))
def test_the_reference_subset_is_sorted_unique_reproducible_or_refused(total, num, seed):
    if num is not None and num < total and num <= prc.K:
        with pytest.raises(BadValue, match="more than k"):
            prc.subset(total, num, seed)
        return
    idx = prc.subset(total, num, seed)
    assert idx.dtype == np.int64 and len(idx) == (total if num is None else min(num, total))
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < total
    assert np.array_equal(idx, prc.subset(total, num, seed))


def test_reference_features_round_trip_and_errors(tmp_path):
    feats = torch.randn(7, 2048)
    path = str(tmp_path / "f.npz")
    prc.save_features(path, feats, np.arange(7) * 3, 21)
    assert torch.equal(prc.load_features(path), feats)
    with np.load(path) as f:
        assert f["indices"].tolist() == [0, 3, 6, 9, 12, 15, 18] and int(f["total"]) == 21
    with pytest.raises(MissingFile, match="prepare_ref.py --ref_features"):
        prc.load_features(str(tmp_path / "none.npz"))
    np.savez(tmp_path / "small.npz", features=np.zeros((7, 64), np.float32))
    with pytest.raises(BadValue, match=r"expected float32 features of shape \(N > 3, 2048\), got float32 \(7, 64\)"):
        prc.load_features(str(tmp_path / "small.npz"))
    np.savez(tmp_path / "f64.npz", features=np.zeros((7, 2048)))
    with pytest.raises(BadValue, match=r"got float64 \(7, 2048\)"):
        prc.check_features(str(tmp_path / "f64.npz"))
    assert prc.check_features(path) == 7
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(BadValue, match="not a features file"):
        prc.load_features(str(tmp_path / "junk.npz"))


@pytest.fixture(scope="module")
def dino_weights(tmp_path_factory) -> str:
    return make_standin_dinov2_weights(str(tmp_path_factory.mktemp("dino") / "dinov2_standin.pth"))


def torch_fidelity_dinov2(model, images):
    """torch-fidelity's FeatureExtractorDinoV2.forward, with `model` in place of its torch.hub download."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2

    extractor = FeatureExtractorDinoV2.__new__(FeatureExtractorDinoV2)
    FeatureExtractorBase.__init__(extractor, "dinov2-vit-l-14", ["dinov2"])
    extractor.feature_extractor_internal_dtype = torch.float32
    extractor.model = model
    with torch.no_grad():
        return extractor(images)[0]


@pytest.mark.parametrize("size", [16, 32, 224, 256])
def test_dinov2_features_are_torch_fidelitys_preprocessing_of_the_same_network(dino_weights, size):
    extractor = dinov2.DINOv2(dino_weights, CPU)
    images = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8)
    ours = extractor.features(images)
    assert ours.shape == (3, 128) and ours.dtype == torch.float32
    assert torch.equal(ours, torch_fidelity_dinov2(extractor._net, images))  # bit for bit
    assert ours.std(0).mean() > 1e-3  # the images' features differ


def test_the_position_embedding_is_resized_as_the_hub_model_does():
    pos = torch.randn(1, 1 + 37 * 37, 8)
    out = dinov2.hub_pos_embed(pos, 16)
    assert out.shape == (1, 257, 8) and torch.equal(out[:, 0], pos[:, 0])
    grid = pos[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    scale = 16.1 / 37  # DINOv2's interpolate_offset 0.1: not the same as resizing to 16 × 16
    expected = torch.nn.functional.interpolate(grid, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    assert torch.equal(out[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 256, 8))
    by_size = torch.nn.functional.interpolate(grid, size=(16, 16), mode="bicubic", antialias=False)
    assert not torch.allclose(expected, by_size, atol=1e-4)
    assert torch.equal(dinov2.hub_pos_embed(out, 16), out)  # already the grid: unchanged


def test_dinov2_weights_files_timm_names_and_bad_files(dino_weights, tmp_path):
    state = torch.load(dino_weights, weights_only=True)
    assert dinov2.architecture(state) == dict(dim=128, depth=2, heads=2, patch=14, mlp_ratio=4.0, grid=37)
    from safetensors.torch import save_file

    timm_file = str(tmp_path / "model.safetensors")  # timm's release: no mask_token, under "model" or plain
    save_file({k: v.contiguous() for k, v in state.items() if k != "mask_token"}, timm_file)
    images = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8)
    assert torch.equal(
        dinov2.DINOv2(timm_file, CPU).features(images), dinov2.DINOv2(dino_weights, CPU).features(images)
    )
    assert not dinov2.DINOv2(dino_weights, CPU).is_large()
    with pytest.raises(MissingFile, match="--dinov2_weights"):
        dinov2.DINOv2(str(tmp_path / "none.pth"), CPU)
    regs = make_standin_dinov2_weights(str(tmp_path / "reg.pth"), register_tokens=torch.zeros(1, 4, 128))
    with pytest.raises(BadValue, match="registers"):
        dinov2.DINOv2(regs, CPU)
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(BadValue, match="not a DINOv2"):
        dinov2.DINOv2(str(tmp_path / "other.pth"), CPU)
    (tmp_path / "cut.pth").write_bytes(open(dino_weights, "rb").read()[:1000])
    with pytest.raises(BadValue, match="cannot read"):
        dinov2.DINOv2(str(tmp_path / "cut.pth"), CPU)


@pytest.mark.slow
def test_scores_equal_independent_float64_computations(tmp_path, dino_weights, inception_weights):
    """The Scorer on given features: FD-DINOv2 equals a float64 numpy Fréchet distance of the same
    features, precision and recall the float64 brute force, within 1e-6 relative (FID: test_fid.py);
    the protocol names every file with its sha256. Slow: a 2048-dimensional matrix square root."""
    rng = np.random.default_rng(0)
    ref_dino = rng.standard_normal((300, 128)) * 0.5 + 0.1
    gen = torch.cat(
        [torch.randn(200, 2048) * 0.2, torch.randn(200, 1008), torch.from_numpy(rng.standard_normal((200, 128)))],
        dim=1,
    ).float()
    ref_pool = torch.randn(250, 2048) * 0.25 + 0.01
    paths = {k: str(tmp_path / f"{k}.npz") for k in ("fid", "dino", "feat")}
    fid.save_stats(paths["fid"], fid.statistics(ref_pool))
    fid.save_stats(paths["dino"], fid.statistics(torch.from_numpy(ref_dino).float()))
    prc.save_features(paths["feat"], ref_pool, np.arange(250), 250)
    scorer = Scorer(
        paths["fid"],
        inception_weights,
        CPU,
        ref_features=paths["feat"],
        dinov2_weights=dino_weights,
        dinov2_stats=paths["dino"],
    )
    assert scorer.feature_dim == 2048 + 1008 + 128
    out = scorer.scores(gen)
    assert out["fd_dinov2"] == pytest.approx(
        numpy_frechet(gen[:, 3056:].numpy(), ref_dino.astype(np.float32)), rel=1e-6
    )
    assert (out["precision"], out["recall"]) == pytest.approx(
        numpy_precision_recall(gen[:, :2048].numpy(), ref_pool.numpy()), rel=1e-6
    )
    p = scorer.protocol
    for key, flag in (("fid_stats", "fid"), ("dinov2_stats", "dino"), ("ref_features", "feat")):
        assert (
            p[key] == paths[flag] and p[f"{key}_sha256"] == hashlib.sha256(open(paths[flag], "rb").read()).hexdigest()
        )
    assert p["ref_features_count"] == 250 and "k = 3" in p["prc"] and "ViT-?/14, 2 blocks" in p["dinov2"]
    assert "TF1-compatible bilinear resize to 299 px" in p["inception"] and "224 px" in p["dinov2"]
    assert json.loads(json.dumps(p)) == p  # plain JSON, as records hold it
    with pytest.raises(BadValue, match=r"expected mu \(128,\)"):
        Scorer(paths["fid"], inception_weights, CPU, dinov2_weights=dino_weights, dinov2_stats=paths["fid"])
    with pytest.raises(MissingFile, match="prepare_ref.py --dinov2_stats"):
        Scorer(paths["fid"], inception_weights, CPU, dinov2_weights=dino_weights, dinov2_stats="none.npz")


def test_a_summary_over_seeds_is_mean_and_sample_std_of_the_seeds():
    results = [
        dict(fid=f, inception_score=i, inception_score_std=0.1 * k, precision=p, num_images=8, seconds=2.0)
        for k, (f, i, p) in enumerate([(10.0, 3.0, 0.5), (12.0, 3.5, 0.6), (11.5, 2.5, 0.55)])
    ]
    out = seeds.summarize(results)
    assert out["fid"] == pytest.approx(11.1666666667) and out["fid_seeds"] == [10.0, 12.0, 11.5]
    assert out["fid_seed_std"] == pytest.approx(float(np.std([10.0, 12.0, 11.5], ddof=1)))
    assert out["precision_seed_std"] == pytest.approx(0.05) and "recall" not in out
    assert out["inception_score_std"] == pytest.approx(0.1) and out["num_images"] == 8 and out["seconds"] == 6.0
    assert seeds.scores_text(out) == "FID 11.1667 ± 1.0408, IS 3.0000 ± 0.5000, precision 0.5500 ± 0.0500"
    assert seeds.scores_text(results[0]) == "FID 10.0000, IS 3.0000 ± 0.0000, precision 0.5000"
    assert list(seeds.seed_list(5, 3)) == [5, 6, 7]
    with pytest.raises(ValueError):
        seeds.summarize(results[:1])


def test_the_csv_has_the_new_scores_and_the_spread_over_seeds(tmp_path):
    base = dict(ema=1, cfg=1.0, interval_min=0.0, interval_max=1.0, method="heun", steps=2, num_images=8)
    plain = [{**base, "fid": 3.0, "inception_score": 2.0, "inception_score_std": 0.1}]
    assert sweep_report.csv_columns(plain) == list(sweep_report.COLUMNS)
    summary = {
        **plain[0],
        "cfg": 2.0,
        "fid_seed_std": 0.2,
        "inception_score_seed_std": 0.3,
        "precision": 0.5,
        "precision_seed_std": 0.01,
        "recall": 0.4,
        "recall_seed_std": 0.02,
        "eval_seeds": 3,
    }
    columns = sweep_report.csv_columns([*plain, summary])
    assert columns[:9] == [
        "fid",
        "fid_seed_std",
        "inception_score",
        "inception_score_seed_std",
        "inception_score_std",
        "precision",
        "precision_seed_std",
        "recall",
        "recall_seed_std",
    ]
    assert columns[-1] == "eval_seeds" and "fd_dinov2" not in columns
    sweep_report.write_csv(str(tmp_path / "s.csv"), [summary, *plain])
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert (
        lines[0] == ",".join(columns)
        and lines[1].startswith("3.0,0.2,2.0,0.3,0.1,0.5,0.01,0.4,0.02,")
        and lines[1].endswith(",3")
    )


def test_finished_points_need_the_same_seeds_and_protocol(tmp_path):
    from sampling import SamplerSettings

    point = sweep.Point(1, SamplerSettings(cfg=2.0), 6)
    context = dict(checkpoint="c.pth", seed=0, eval_seeds=1, protocol={"fid_stats_sha256": "ab"})
    old = {"kind": "eval", "fid": 3.0, "ema": 1, "num_images": 6, "checkpoint": "c.pth", "seed": 0}
    record = {**old, "eval_seeds": 1, "protocol": {"fid_stats_sha256": "ab"}}
    lines = [
        {**record, **{k: v for k, v in vars(point.sampler).items()}},
        {**record, "protocol": {"fid_stats_sha256": "cd"}, "cfg": 2.0},
        {**record, "kind": "eval_seed", "cfg": 2.0},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert list(sweep.finished(str(path), context)) == [point.key()]
    assert sweep.finished(str(path), {**context, "eval_seeds": 3}) == {}
    assert list(sweep.finished(str(path), context, kind="eval_seed")) == [point.key()]
    no_protocol = {k: v for k, v in context.items() if k != "protocol"}
    path.write_text(json.dumps({**old, **vars(point.sampler)}) + "\n")  # written before eval_seeds existed: one seed
    assert list(sweep.finished(str(path), no_protocol)) == [point.key()]
    assert sweep.finished(str(path), {**no_protocol, "eval_seeds": 2}) == {}


@pytest.mark.slow
def test_prepare_ref_writes_a_random_subset_of_the_features_reading_only_those_images(
    tmp_path, inception_weights, capsys
):
    """--ref_features with --ref_features_num alone reads only the drawn images; their features equal
    the rows of the whole set's, the file records which images they are and their size; a number above
    the dataset's size takes all (with a note); bad combinations exit 2."""
    make_image_folder(tmp_path / "data", classes=2, per_class=4)
    common = ["--data_path", str(tmp_path / "data"), "--img_size", "16", "--device", "cpu", "--num_workers", "0"]
    common += ["--inception_weights", inception_weights, "--batch_size", "4"]
    everything = ["--ref_features", str(tmp_path / "all.npz"), "--ref_features_num", "100"]
    prepare_ref.main(prepare_ref.parse_args([*common, *everything]))
    assert "note: --ref_features_num 100 is more than the 8 images of" in capsys.readouterr().out
    part = ["--ref_features", str(tmp_path / "part.npz"), "--ref_features_num", "5", "--seed", "3"]
    prepare_ref.main(prepare_ref.parse_args([*common, *part]))
    with np.load(tmp_path / "all.npz") as a, np.load(tmp_path / "part.npz") as p:
        assert a["indices"].tolist() == list(range(8)) and int(p["total"]) == 8
        assert int(a["img_size"]) == int(p["img_size"]) == 16
        assert p["indices"].tolist() == prc.subset(8, 5, 3).tolist()
        assert np.array_equal(p["features"], a["features"][p["indices"]])
    for argv, message in (
        (["--stats", "s.npz", "--ref_features_num", "5"], "--ref_features_num chooses the images of --ref_features"),
        (["--dinov2_stats", "x.npz"], "--dinov2_stats and --dinov2_weights go together"),
        (["--ref_features", "f.npz", "--ref_features_num", "3"], "--ref_features_num must be more than k = 3"),
    ):
        with pytest.raises(BadValue, match=message):
            prepare_ref.main(prepare_ref.parse_args([*common, *argv]))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(-3, 50), stats=st.booleans(), weights=st.booleans())
def test_the_evaluation_flags_work_or_are_refused_up_front(n, stats, weights):
    from main_jit import parse_args
    from util.evaluation import check_eval_flags

    argv = ["--eval_seeds", str(n)] + (["--dinov2_stats", "s.npz"] if stats else [])
    argv += ["--dinov2_weights", "w.pth"] if weights else []
    flags = parse_args(argv)
    if n < 1 or (stats and not weights):
        with pytest.raises(BadValue, match="--eval_seeds must be at least 1|--dinov2_stats is read for FD-DINOv2"):
            check_eval_flags(flags)
    else:
        check_eval_flags(flags)
        assert list(seeds.seed_list(flags.seed, n)) == list(range(n))


def test_the_report_page_shows_the_spread_over_seeds_and_the_new_scores():
    from util.report_page import evaluations_table

    base = dict(epoch=3, ema=1, cfg=2.0, interval_min=0.1, interval_max=1.0, steps=50, num_images=50000)
    html = evaluations_table(
        [
            {**base, "fid": 3.5, "inception_score": 200.0},
            {**base, "fid": 3.25, "fid_seed_std": 0.0125, "inception_score": 210.0, "inception_score_seed_std": 1.5}
            | {"eval_seeds": 3, "precision": 0.75, "recall": 0.625, "fd_dinov2": 80.5},
        ]
    )
    assert "<th>seeds</th><th>FID</th><th>IS</th><th>precision</th><th>recall</th><th>FD-DINOv2</th>" in html
    assert "<td>3</td><td>3.25 ± 0.0125</td><td>210 ± 1.5</td><td>0.75</td><td>0.625</td><td>80.5</td>" in html
    assert "<td>1</td><td>3.5</td><td>200</td><td></td><td></td><td></td>" in html
