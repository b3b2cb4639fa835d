"""The evaluation features of issue 36 under the inputs and combinations researchers make: DINOv2 files
that do not load, reference files of another image size, --seed / --eval_seeds over their range,
prepare_ref.py's flags and tiny datasets, --phema_run names; and --eval_seeds runs that are stopped by
SIGTERM between seeds, reuse a single-seed evaluation, meet records written before `protocol`, have
their checkpoint replaced by another run's, or run on two processes."""

import csv
import json
import os
import signal

import numpy as np
import pytest
import torch
from helpers import (
    TINY_MODEL,
    main_jit_here,
    make_image_folder,
    make_standin_dinov2_weights,
    read_metrics,
    run_script,
    save_reference_checkpoint,
    tiny_denoiser,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import engine_eval
import main_jit
import prepare_ref
from sampling import SamplerSettings
from util import dinov2, fid, phema_files, prc, seeds
from util.errors import BadValue
from util.evaluation import check_eval_flags, smaller_decay

CPU = torch.device("cpu")


def test_dinov2_files_that_do_not_load_are_refused_when_the_extractor_is_built(tmp_path):
    """Before: a file that is no DINOv2 failed at the first batch (after training, for --online_eval),
    with the first line of torch's message only, or with a KeyError traceback."""
    from timm.models.vision_transformer import VisionTransformer

    plain = VisionTransformer(img_size=224, patch_size=16, embed_dim=128, depth=2, num_heads=2)  # no LayerScale, a head
    torch.save(plain.state_dict(), tmp_path / "vit.pth")
    with pytest.raises(BadValue) as e:
        dinov2.DINOv2(str(tmp_path / "vit.pth"), CPU)
    assert str(e.value) == (
        f"{tmp_path / 'vit.pth'}: does not load into a DINOv2 ViT-?/16, 2 blocks, width 128 (missing "
        "blocks.0.ls1.gamma; missing blocks.0.ls2.gamma; missing blocks.1.ls1.gamma and 3 more)"
    )
    good = torch.load(make_standin_dinov2_weights(str(tmp_path / "dino.pth")), weights_only=True)
    for name, change, message in (
        ("nopatch", lambda s: s.pop("patch_embed.proj.weight"), "no patch_embed.proj.weight"),
        ("patch15", lambda s: s.update({"patch_embed.proj.weight": torch.zeros(128, 3, 15, 15)}), "patch size 15"),
        ("wide", lambda s: s.update({"blocks.1.attn.qkv.weight": torch.zeros(3, 128)}), "blocks.1.attn.qkv.weight is"),
    ):
        state = dict(good)
        change(state)
        torch.save(state, tmp_path / f"{name}.pth")
        with pytest.raises(BadValue, match=message):
            dinov2.DINOv2(str(tmp_path / f"{name}.pth"), CPU)
    extractor = dinov2.DINOv2(str(tmp_path / "dino.pth"), CPU)
    assert extractor._net is None  # checked without building it
    assert extractor.features(torch.zeros(1, 3, 16, 16, dtype=torch.uint8)).shape == (1, 128)


@settings(max_examples=40, deadline=None)
@given(
    recorded=st.one_of(st.none(), st.sampled_from([16, 32, 256])), run=st.one_of(st.none(), st.sampled_from([16, 32]))
)
def test_reference_files_of_another_image_size_are_refused(tmp_path_factory, recorded, run):
    folder = tmp_path_factory.mktemp("ref")
    stats, feats = str(folder / "stats.npz"), str(folder / "feats.npz")
    fid.save_stats(stats, {"mu": np.zeros(4, np.float32), "sigma": np.eye(4)}, img_size=recorded)
    prc.save_features(feats, torch.zeros(5, 4), np.arange(5), 5, img_size=recorded)
    for what, read in (
        (f"--dinov2_stats {stats}", lambda: fid.load_stats(stats, 4, "--dinov2_stats", img_size=run)),
        (f"--ref_features {feats}", lambda: prc.check_features(feats, 4, img_size=run)),
    ):
        if recorded is not None and run is not None and recorded != run:
            with pytest.raises(BadValue) as e:
                read()
            assert str(e.value) == (
                f"{what} is of {recorded} px images, this evaluation's are {run} px: make it with "
                f"`python prepare_ref.py --img_size {run} ...`"
            )
        else:
            read()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A checkpoint of the tiny model (epoch 7) whose args name its run, "run-a"."""
    return write_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "checkpoint-last.pth"), seed=1, run_id="run-a")


def write_checkpoint(path: str, seed: int, run_id: str) -> str:
    save_reference_checkpoint(path, tiny_denoiser(seed=seed), epoch=7)
    state = torch.load(path, weights_only=False)
    state["args"].run_id = run_id
    torch.save(state, path)
    return path


def eval_argv(checkpoint, out, inception_weights, stats, *extra) -> list[str]:
    argv = ["--model", TINY_MODEL["model"], "--img_size", 16, "--class_num", 3, "--num_images", 3, "--gen_bsz", 3]
    argv += ["--num_sampling_steps", 2, "--evaluate_gen", "--resume", checkpoint, "--output_dir", out]
    argv += ["--device", "cpu", "--fid_stats", stats, "--inception_weights", inception_weights, *extra]
    return [str(a) for a in argv]


def test_reference_files_of_another_size_stop_main_before_any_work(
    tmp_path, checkpoint, inception_weights, fid_ref_stats
):
    """Before: prepare_ref.py's files of 32 px images were used by a 16 px evaluation without a word."""
    for flag in ("fid_stats", "dinov2_stats", "ref_features"):
        dim = 128 if flag == "dinov2_stats" else fid.FEATURE_DIM
        path = str(tmp_path / f"{flag}.npz")
        if flag == "ref_features":
            prc.save_features(path, torch.zeros(5, dim), np.arange(5), 5, img_size=32)
        else:
            fid.save_stats(path, {"mu": np.zeros(dim, np.float32), "sigma": np.eye(dim)}, img_size=32)
        extra = [f"--{flag}", path]
        if flag == "dinov2_stats":
            extra += ["--dinov2_weights", make_standin_dinov2_weights(str(tmp_path / "dino.pth"))]
        argv = eval_argv(checkpoint, tmp_path / "out", inception_weights, fid_ref_stats, *extra)
        with pytest.raises(BadValue, match=rf"--{flag} {path} is of 32 px images, this evaluation's are 16 px"):
            main_jit_here(*argv)
        assert not (tmp_path / "out").exists()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(-(2**40), 2**40), n=st.integers(-2, 10**12))
def test_the_seed_flags_work_or_are_refused_up_front(seed, n):
    """Before: a negative --seed or one of 2**32 and more was a numpy traceback while the run was built
    (and 2**32 - 1 on two processes, from its rank offset); a huge --eval_seeds made its list of seeds."""
    flags = main_jit.parse_args(["--seed", str(seed), "--eval_seeds", str(n)])
    if n < 1 or not 0 <= seed < 2**32:
        with pytest.raises(BadValue, match=r"--eval_seeds must be at least 1|--seed must be in \[0, 2\*\*32 - 1\]"):
            check_eval_flags(flags)
        return
    check_eval_flags(flags)
    listed = seeds.seed_list(seed, n)
    assert len(listed) == n and listed[0] == seed and listed[-1] == seed + n - 1
    np.random.default_rng([listed[-1], 0])  # the last seed's noise can be drawn


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(-5, 2**33),
    img_size=st.integers(-2, 600),
    batch=st.integers(-2, 200),
    num=st.one_of(st.none(), st.integers(-3, 10**7)),
)
def test_prepare_ref_flags_work_or_are_refused_up_front(seed, img_size, batch, num):
    argv = ["--ref_features", "f.npz", "--seed", str(seed), "--img_size", str(img_size), "--batch_size", str(batch)]
    args = prepare_ref.parse_args(argv + ([] if num is None else ["--ref_features_num", str(num)]))
    if seed < 0 or img_size < 1 or batch < 1 or (num is not None and num <= prc.K):
        with pytest.raises(BadValue):
            prepare_ref.check_ref_args(args)
        return
    prepare_ref.check_ref_args(args)
    if num is not None:  # the draw works for any dataset size above k
        total = int(np.random.default_rng(seed).integers(prc.K + 1, 50))
        assert len(prc.subset(total, num, seed)) == min(num, total)


def test_prepare_ref_refuses_a_dataset_too_small_for_precision_and_recall(tmp_path, inception_weights):
    """Before: a dataset of 3 images gave a features file that every evaluation then refused."""
    make_image_folder(tmp_path / "data", classes=1, per_class=3)
    argv = ["--data_path", str(tmp_path / "data"), "--img_size", "16", "--device", "cpu", "--num_workers", "0"]
    argv += ["--inception_weights", inception_weights, "--ref_features", str(tmp_path / "f.npz")]
    with pytest.raises(BadValue, match="need more than k = 3 reference images, .* has 3$"):
        prepare_ref.main(prepare_ref.parse_args(argv))
    assert not (tmp_path / "f.npz").exists()


@settings(max_examples=200, deadline=None)
@given(steps=st.integers(1, 10**7))
def test_the_decay_a_note_recommends_keeps_under_one_percent(steps):
    """Before: runs of under 44 steps were told that 0.9 keeps under 1% (0.9² = 81%)."""
    d = float(smaller_decay(steps))
    assert d**steps < 0.01 and 0.0 <= d < 1.0


def test_a_summary_over_seeds_is_strict_json_and_fails_the_run_when_a_seed_could_not_save_its_images(tmp_path):
    """Before: --eval_seeds with --save_images on a full disk exited 0 (the summary dropped images_saved),
    and the per-seed IS of fewer than 10 images went to metrics.jsonl as `NaN`, which is not JSON."""
    from util.logger import RunLog

    result = dict(fid=1.0, inception_score=2.0, inception_score_std=0.1, num_images=4, seconds=1.0)
    log = RunLog(str(tmp_path))
    log.record(seeds.summarize([result, {**result, "inception_score": float("nan")}]))
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    record = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in {line}"))
    assert record["inception_score_seeds"] == [2.0, None] and record["inception_score"] is None
    assert "images_saved" not in record
    assert seeds.summarize([{**result, "images_saved": True}] * 2)["images_saved"] is True
    assert (
        seeds.summarize([{**result, "images_saved": True}, {**result, "images_saved": False}])["images_saved"] is False
    )


def test_phema_run_names_unnamed_by_a_prefix_and_refuses_an_empty_name(tmp_path):
    folder = str(tmp_path / "phema")
    state = tiny_denoiser().state_dict()
    for step, run in ((10, None), (20, "abc123")):
        phema_files.write_snapshot(
            folder, state, sigma_rel=0.1, step=step, images_seen=8 * step, epoch=0, args={"run_id": run}
        )
    assert [s.step for s in phema_files.usable_snapshots(folder, run="unn")] == [10]
    assert [s.step for s in phema_files.usable_snapshots(folder, run="ab")] == [20]
    with pytest.raises(BadValue, match="--phema_run : no run of"):
        phema_files.usable_snapshots(folder, run="")


def seed_records(out) -> dict:
    """{(cfg, seed): [eval_seed records]} of a run folder."""
    found = {}
    for r in read_metrics(out, "eval_seed"):
        found.setdefault((r["cfg"], r["seed"]), []).append(r)
    return found


def assert_summary(summary: dict, per_seed: list[dict]):
    fids = [r["fid"] for r in per_seed]
    assert summary["fid_seeds"] == fids and summary["seeds"] == [r["seed"] for r in per_seed]
    assert summary["fid"] == pytest.approx(np.mean(fids), rel=1e-12)
    assert summary["fid_seed_std"] == pytest.approx(np.std(fids, ddof=1), rel=1e-9)


def signal_while_scoring(monkeypatch):
    """SIGTERM to this process as engine_eval finishes scoring a seed (the run's StopSignal records it:
    the next seed is not begun)."""
    score_seed = engine_eval.score_seed

    def signalled(*args, **kwargs):
        result = score_seed(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(engine_eval, "score_seed", signalled)
    return lambda: monkeypatch.setattr(engine_eval, "score_seed", score_seed)


@pytest.mark.slow
def test_eval_seeds_are_reused_stopped_between_and_kept_to_their_run(
    tmp_path, inception_weights, fid_ref_stats, monkeypatch, capsys
):
    """One output folder, in order: a single-seed evaluation is read back as seed 0 of --eval_seeds 2
    (before: scored again, though the docs said otherwise); a sweep stopped by SIGTERM while a seed is
    scored finishes and records that seed and stops (before: every seed of the point was scored first,
    and a single-point evaluation ignored the signal); its rerun scores the rest once each, an old
    record (no protocol) of the same point neither crashes it nor counts; once checkpoint-last.pth is
    replaced by another run's at the same epoch nothing is reused (before: the old run's numbers were
    given for the new weights)."""
    ck = write_checkpoint(str(tmp_path / "checkpoint-last.pth"), seed=1, run_id="run-a")
    out = tmp_path / "out"
    os.makedirs(out)
    old = dict(kind="eval", epoch=7, checkpoint=ck, checkpoint_epoch=7, seed=0, gen_bsz=3, class_num=3, img_size=16)
    old |= dict(fid_stats=fid_ref_stats, fid=1.0, inception_score=None, inception_score_std=None, num_images=3)
    old |= dict(seconds=1.0, ema=1, eval_seeds=2, **vars(SamplerSettings(steps=2, cfg=3.0)))
    (out / "metrics.jsonl").write_text(json.dumps(old) + "\n")
    argv = eval_argv(ck, out, inception_weights, fid_ref_stats, "--eval_seeds", "2", "--cfg", "2.0")
    assert main_jit_here(*argv, "--eval_seeds", "1") == 0  # one seed
    (single,) = read_metrics(out, "eval")[1:]
    assert single["run_id"] == "run-a" and single["eval_seeds"] == 1 and single["seed"] == 0
    assert main_jit_here(*argv) == 0
    assert "eval seed 0 (1 of 2, found in metrics.jsonl)" in capsys.readouterr().out
    first = read_metrics(out, "eval")[-1]
    assert_summary(first, [single, *read_metrics(out, "eval_seed")])

    restore = signal_while_scoring(monkeypatch)
    assert main_jit_here(*argv, "3.0") == 0
    text = capsys.readouterr().out
    assert "sweep: 1 of 2 points already finished" in text and "eval seed 1 (2 of 2" not in text
    assert "stop requested (signal) after 1 of 2 seeds of EMA 1, cfg 3.0" in text
    assert "their records are in metrics.jsonl" in text
    assert "sweep stopped (signal) after 1 of 2 points; rerun" in text and sorted(seed_records(out)) == [
        (2.0, 1),
        (3.0, 0),
    ]
    restore()
    assert main_jit_here(*argv, "3.0") == 0
    text = capsys.readouterr().out
    assert "eval seed 0 (1 of 2, found in metrics.jsonl)" in text and text.count("found in metrics.jsonl") == 1
    found = seed_records(out)
    assert sorted(found) == [(2.0, 1), (3.0, 0), (3.0, 1)] and all(len(v) == 1 for v in found.values())
    summary = read_metrics(out, "eval")[-1]
    assert summary["cfg"] == 3.0 and summary["fid"] != 1.0
    assert_summary(summary, [found[(3.0, s)][0] for s in (0, 1)])
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(float(row["fid"]) for row in rows) == sorted([first["fid"], summary["fid"]])
    assert {row["eval_seeds"] for row in rows} == {"2"}

    write_checkpoint(ck, seed=2, run_id="run-b")  # another run's weights, same file, same epoch
    signal_while_scoring(monkeypatch)
    assert main_jit_here(*argv) == 0
    text = capsys.readouterr().out
    assert "found in metrics.jsonl" not in text and "stop requested (signal) after 1 of 2 seeds" in text
    new = read_metrics(out, "eval_seed")[-1]
    assert (new["run_id"], new["seed"], new["cfg"]) == ("run-b", 0, 2.0) and new["fid"] != single["fid"]
    assert read_metrics(out, "eval")[-1] == summary  # no summary of the stopped evaluation


@pytest.mark.slow
def test_eval_seeds_on_two_processes_with_every_score_from_the_last_numpy_seed(
    tmp_path, checkpoint, inception_weights, fid_ref_stats
):
    """torchrun, 2 CPU processes: --seed 2**32 - 1 (before: rank 1's numpy seed 2**32 was a traceback),
    --eval_seeds 2 (seeds 2**32 - 1 and 2**32) with precision / recall and FD-DINOv2: a record per seed
    and their summary."""
    dino = make_standin_dinov2_weights(str(tmp_path / "dino.pth"))
    rng = np.random.default_rng(0)
    fid.save_stats(str(tmp_path / "dino.npz"), fid.statistics(torch.from_numpy(rng.random((20, 128), np.float32))), 16)
    prc.save_features(str(tmp_path / "f.npz"), torch.from_numpy(rng.random((6, 2048), np.float32)), np.arange(6), 6, 16)
    extra = ["--seed", 2**32 - 1, "--eval_seeds", 2, "--ref_features", tmp_path / "f.npz"]
    extra += ["--dinov2_weights", dino, "--dinov2_stats", tmp_path / "dino.npz", "--num_images", 6]
    run_script(
        "main_jit.py", *eval_argv(checkpoint, tmp_path / "out", inception_weights, fid_ref_stats, *extra), nproc=2
    )
    per_seed, (summary,) = read_metrics(tmp_path / "out", "eval_seed"), read_metrics(tmp_path / "out", "eval")
    assert [r["seed"] for r in per_seed] == [2**32 - 1, 2**32] and summary["world_size"] == 2
    assert summary["run_id"] == "run-a" and summary["protocol"]["ref_features_count"] == 6
    for key in ("precision", "recall", "fd_dinov2"):
        assert summary[f"{key}_seeds"] == [r[key] for r in per_seed] and np.isfinite(summary[key]), key
    assert_summary(summary, per_seed)
