"""Sweeps of the sampling settings with --evaluate_gen: lists of values, each point equal to a single
run, resume after SIGTERM, sweep.csv / sweep.png, --final_num_images, the third EMA, bad input."""

import csv
import dataclasses
import json
import signal

import numpy as np
import pytest
import torch
from helpers import (
    REF_KEYS,
    TINY,
    TINY_MODEL,
    load_last,
    main_jit_here,
    read_metrics,
    read_until,
    run_script,
    save_reference_checkpoint,
    tiny_denoiser,
)
from PIL import Image

import main_jit
import run_build
from sampling import SamplerSettings
from util import checkpoint as ckpt_util
from util import sweep, sweep_report
from util.stop import StopSignal


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A reference-format checkpoint whose model and two EMAs all differ."""
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-last.pth"
    save_reference_checkpoint(
        path, tiny_denoiser(seed=1), ema1=tiny_denoiser(seed=2), ema2=tiny_denoiser(seed=3), epoch=7
    )
    return path


def eval_args(checkpoint, out, inception_weights, fid_ref_stats, *extra):
    return [
        "--model",
        TINY_MODEL["model"],
        "--img_size",
        16,
        "--class_num",
        3,
        "--num_images",
        6,
        "--gen_bsz",
        6,
        "--num_sampling_steps",
        2,
        "--seed",
        0,
        "--evaluate_gen",
        "--resume",
        checkpoint,
        "--output_dir",
        out,
        "--device",
        "cpu",
        "--fid_stats",
        fid_ref_stats,
        "--inception_weights",
        inception_weights,
        *extra,
    ]


@pytest.mark.slow
def test_each_point_of_a_sweep_equals_a_single_run(checkpoint, tmp_path, inception_weights, fid_ref_stats, capsys):
    common = eval_args(checkpoint, tmp_path / "sweep", inception_weights, fid_ref_stats)
    assert main_jit_here(*common, "--cfg", 2.0, "--interval_min", 0.0, 0.3, "--ema", 1, 2) == 0
    out = capsys.readouterr().out
    records = read_metrics(tmp_path / "sweep", "eval")
    assert len(records) == 4 and len({sweep.record_key(r) for r in records}) == 4
    assert [(r["ema"], r["interval_min"]) for r in records] == [(1, 0.0), (1, 0.3), (2, 0.0), (2, 0.3)]
    assert all(r["checkpoint"] == str(checkpoint) and r["checkpoint_epoch"] == 7 for r in records)
    assert [(r["nfe"], r["net_passes"]) for r in records] == [
        (3, 6),
        (3, 5),
    ] * 2  # Heun 2 steps; from 0.3 on, t = 0 is unguided
    assert len({r["fid"] for r in records}) == 4  # the EMAs and intervals really differ
    best = min(records, key=lambda r: r["fid"])
    assert (
        f"best: EMA {best['ema']}, cfg {best['cfg']}, interval ({best['interval_min']}, {best['interval_max']})" in out
    )
    assert out.count("img/s; sweep ETA") == 4

    for r in [records[1], records[2]]:  # two points, run on their own
        single = tmp_path / f"single{r['ema']}{r['cfg']}{r['interval_min']}"
        assert (
            main_jit_here(
                *eval_args(checkpoint, single, inception_weights, fid_ref_stats),
                "--cfg",
                r["cfg"],
                "--interval_min",
                r["interval_min"],
                "--ema",
                r["ema"],
            )
            == 0
        )
        (one,) = read_metrics(single, "eval")
        for key in ("fid", "inception_score", "inception_score_std"):
            assert one[key] == r[key], key

    with open(tmp_path / "sweep" / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(x["fid"]) for x in rows] == sorted(r["fid"] for r in records)
    assert {(int(x["ema"]), float(x["cfg"]), float(x["interval_min"])) for x in rows} == {
        (r["ema"], r["cfg"], r["interval_min"]) for r in records
    }
    assert Image.open(tmp_path / "sweep" / "sweep.png").size == (1000, 400)


@pytest.mark.slow
def test_a_single_point_run_writes_the_same_record_as_a_sweep_point(
    checkpoint, tmp_path, inception_weights, fid_ref_stats
):
    assert main_jit_here(*eval_args(checkpoint, tmp_path, inception_weights, fid_ref_stats), "--cfg", 2.0) == 0
    (r,) = read_metrics(tmp_path, "eval")  # a single point's record holds its EMA and checkpoint as a sweep's does
    assert r["ema"] == 1 and r["checkpoint"] == str(checkpoint) and r["cfg"] == 2.0 and r["checkpoint_epoch"] == 7
    assert not (tmp_path / "sweep.csv").exists()


@pytest.mark.slow
def test_final_num_images_evaluates_the_best_point_again(checkpoint, tmp_path, inception_weights, fid_ref_stats):
    assert (
        main_jit_here(
            *eval_args(checkpoint, tmp_path, inception_weights, fid_ref_stats),
            "--cfg",
            1.0,
            3.0,
            "--final_num_images",
            9,
        )
        == 0
    )
    records = read_metrics(tmp_path, "eval")
    assert [r["num_images"] for r in records] == [6, 6, 9]
    best = min(records[:2], key=lambda r: r["fid"])
    assert records[2]["cfg"] == best["cfg"] and records[2]["ema"] == best["ema"]


@pytest.mark.slow
def test_a_sweep_stopped_by_sigterm_continues_without_recomputing(
    checkpoint, tmp_path, inception_weights, fid_ref_stats, start
):
    base = ["main_jit.py", *eval_args(checkpoint, tmp_path, inception_weights, fid_ref_stats)]
    args = [*base, "--cfg", 1.0, 2.0, "--ema", 1, 2]
    proc = start(*args)
    read_until(proc, "sweep point 1/4: FID")
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0 and "sweep stopped (signal)" in rest, rest
    finished = len(read_metrics(tmp_path, "eval"))
    assert 1 <= finished < 4
    p = run_script(*args)
    assert f"{finished} of 4 points already finished" in p.stdout
    assert p.stdout.count("img/s; sweep ETA") == 4 - finished  # only the rest was computed
    records = read_metrics(tmp_path, "eval")
    assert len(records) == 4 and len({sweep.record_key(r) for r in records}) == 4
    with open(tmp_path / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_finished_points_match_all_settings_the_checkpoint_and_its_epoch(tmp_path):
    context = dict(
        checkpoint="/a/checkpoint-last.pth",
        checkpoint_epoch=7,
        seed=0,
        gen_bsz=6,
        class_num=3,
        img_size=16,
        fid_stats="ref.npz",
    )
    point = sweep.Point(1, SamplerSettings(cfg=2.0), 6)
    record = {
        "kind": "eval",
        "fid": 3.0,
        "inception_score": 2.0,
        **context,
        "ema": 1,
        "num_images": 6,
        **dataclasses.asdict(point.sampler),
    }
    others = [
        {**record, "cfg": 2.5},
        {**record, "ema": 2},
        {**record, "num_images": 12},
        {**record, "checkpoint_epoch": 8},
        {**record, "checkpoint": "/b/checkpoint-last.pth"},
        {**record, "seed": 1},
        {**record, "kind": "train"},
        {**record, "fid": None},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [record, *others]) + '{"kind": "ev')  # a line cut by a kill
    done = sweep.finished(str(path), context)
    assert list(done) == [
        point.key(),
        sweep.Point(1, SamplerSettings(cfg=2.5), 6).key(),
        sweep.Point(2, point.sampler, 6).key(),
        sweep.Point(1, point.sampler, 12).key(),
    ]
    assert done[point.key()] == record


@pytest.mark.slow
def test_a_third_ema_round_trip(data, tmp_path, inception_weights, fid_ref_stats, capsys):
    """Train with --ema_decay3; the checkpoint adds model_ema3 (the reference's keys unchanged and
    loadable); resume keeps it; --evaluate_gen --ema 3 and sample.py --ema 3 sample it."""
    out = tmp_path / "out"
    train = [*TINY, "--ema_decay3", "0.9", "--data_path", data, "--output_dir", out]
    assert (
        main_jit_here(*train, "--epochs", 1) == 0
    )  # in this process: the commands' own processes are tested elsewhere
    ckpt = load_last(out)
    assert REF_KEYS | {"model_ema3"} <= set(ckpt)
    fresh = tiny_denoiser()
    for key in ("model", "model_ema1", "model_ema2", "model_ema3"):  # what the reference loads, and ours
        fresh.load_state_dict(ckpt[key], strict=True)
    assert not torch.equal(
        ckpt["model_ema3"]["net.final_layer.linear.weight"], ckpt["model_ema1"]["net.final_layer.linear.weight"]
    )
    capsys.readouterr()
    assert main_jit_here(*train, "--epochs", 2, "--resume", out) == 0
    resumed = load_last(out)
    assert "epoch 1, step 0" in capsys.readouterr().out and resumed["epoch"] == 1 and "model_ema3" in resumed
    assert not torch.equal(
        resumed["model_ema3"]["net.final_layer.linear.weight"], ckpt["model_ema3"]["net.final_layer.linear.weight"]
    )

    last = out / "checkpoint-last.pth"
    assert main_jit_here(*eval_args(last, tmp_path / "eval", inception_weights, fid_ref_stats), "--ema", 3) == 0
    (r,) = read_metrics(tmp_path / "eval", "eval")
    assert r["ema"] == 3 and np.isfinite(r["fid"])
    import sample

    argv = [str(a) for a in ("--resume", last, "--ema", 3, "--classes", 0, 1, "--per_class", 1)]
    assert (
        sample.cli([*argv, "--num_sampling_steps", "2", "--output", str(tmp_path / "grid.png"), "--device", "cpu"]) == 0
    )
    assert (tmp_path / "grid.png").exists()


@pytest.mark.slow
def test_ema_3_on_a_checkpoint_without_one_is_a_clear_error(checkpoint, tmp_path, inception_weights, fid_ref_stats):
    with pytest.raises(ckpt_util.CheckpointError, match="has no model_ema3"):
        main_jit_here(*eval_args(checkpoint, tmp_path, inception_weights, fid_ref_stats), "--ema", 1, 3)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--cfg", "2.0", "-1.0"], "CFG scale must be >= 0"),
        (["--interval_min", "0.5", "--interval_max", "0.5"], "0 <= interval_min < interval_max <= 1"),
        (["--interval_max", "1.5"], "0 <= interval_min < interval_max <= 1"),
        (["--final_num_images", "10"], "must be a positive multiple of --class_num"),
    ],
)
def test_bad_sweep_settings_are_rejected_before_any_work(checkpoint, tmp_path, extra, message):
    args = main_jit.parse_args(
        [
            "--model",
            "JiT-XS/4",
            "--img_size",
            "16",
            "--class_num",
            "3",
            "--evaluate_gen",
            "--resume",
            str(checkpoint),
            "--output_dir",
            str(tmp_path / "out"),
            "--device",
            "cpu",
            *extra,
        ]
    )
    with pytest.raises(ValueError, match=message):  # a util.errors.BadValue: exit status 2
        main_jit.main(args)
    assert not (tmp_path / "out").exists()


def test_ema_0_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main_jit.parse_args(["--ema", "0"])
    assert "invalid choice: 0" in capsys.readouterr().err


class Stopped(StopSignal):
    """As if SIGTERM had come before the first point."""

    def __init__(self):
        super().__init__()
        self.requested = signal.SIGTERM


@pytest.mark.slow
def test_a_sweep_of_more_than_50_points_prints_its_cost_first(
    checkpoint, tmp_path, inception_weights, fid_ref_stats, monkeypatch, capsys
):
    monkeypatch.setattr(run_build, "StopSignal", Stopped)
    cfgs = [f"{1 + i / 10:.1f}" for i in range(26)]
    assert (
        main_jit_here(*eval_args(checkpoint, tmp_path, inception_weights, fid_ref_stats), "--cfg", *cfgs, "--ema", 1, 2)
        == 0
    )
    out = capsys.readouterr().out
    assert "sweep of 52 points: 312 images" in out and "M network passes" in out
    assert "sweep stopped (signal) after 0 of 52 points" in out


def test_the_sampler_flags_are_sweep_axes_with_nfe_in_the_csv_and_the_plot_against_nfe(tmp_path):
    flags = main_jit.parse_args(
        [
            "--sampling_method",
            "heun",
            "dpm++2m",
            "--num_sampling_steps",
            "5",
            "10",
            "--sampling_schedule",
            "uniform",
            "power:2",
            "--cfg",
            "2.0",
            "--interval_min",
            "0.1",
        ]
    )
    points = sweep.eval_points(flags, 6)
    assert [(p.sampler.method, p.sampler.schedule, p.sampler.steps) for p in points] == [
        (m, s, n) for m in ("heun", "dpm++2m") for s in ("uniform", "power:2") for n in (5, 10)
    ]
    assert [p.sampler.nfe() for p in points] == [9, 19, 9, 19, 5, 10, 5, 10]
    assert "dpm++2m 10 steps power:2 (10 NFE)" in points[-1].label()
    with pytest.raises(ValueError, match="schedule"):  # BadValue: exit status 2
        sweep.eval_points(main_jit.parse_args(["--sampling_schedule", "cosine"]), 6)
    with pytest.raises(ValueError, match="renamed: use power:2"):  # a renamed schedule names its new spelling
        sweep.eval_points(main_jit.parse_args(["--sampling_schedule", "edm:2"]), 6)
    records = [
        {
            "kind": "eval",
            "fid": 10.0 - p.sampler.nfe() / 4,
            "inception_score": 1.0,
            "inception_score_std": 0.1,
            "ema": 1,
            "num_images": 6,
            **dataclasses.asdict(p.sampler),
            "nfe": p.sampler.nfe(),
        }
        for p in points
    ]
    old = {k: v for k, v in records[0].items() if k not in ("schedule", "nfe")}  # a record from before the sampler axes
    assert sweep.record_key(old) == points[0].key() and sweep.nfe_of(old) == 9
    sweep_report.write_csv(str(tmp_path / "sweep.csv"), [old, *records[1:]])
    with open(tmp_path / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["schedule"], int(r["nfe"])) for r in rows][0] == ("heun", "uniform", 19)
    assert sorted(int(r["nfe"]) for r in rows) == sorted(p.sampler.nfe() for p in points)
    x, label, log_x, line_of, _ = sweep_report.plot_axes(records)
    assert (x, log_x) == ("nfe", True) and len({line_of(r) for r in records}) == 4  # one line per method and schedule
    sweep_report.plot(str(tmp_path / "sweep.png"), records)
    assert Image.open(tmp_path / "sweep.png").size == (1000, 400)
    assert sweep_report.plot_axes(records[:1])[0] == "cfg"  # one sampler: against the CFG scale as before


def test_an_exported_sampler_carries_the_schedule_and_older_folders_mean_uniform():
    """Records and folders written before the schedules were renamed (edm:ρ, logsnr:L) sample with
    the same grid under the new names (power:ρ, logit:L)."""
    import model_card
    import weights

    records = [
        {
            "checkpoint": "c.pth",
            "checkpoint_epoch": 3,
            "ema": 1,
            "num_images": 6,
            "fid": fid,
            "method": m,
            "steps": n,
            "cfg": 2.0,
            "interval_min": 0.1,
            "interval_max": 1.0,
            **({"schedule": s} if s else {}),
        }
        for fid, m, n, s in ((5.0, "heun", 50, None), (4.0, "ab3", 10, "edm:2"))
    ]
    best = model_card.recommended_sampler({}, records, ema=1, epoch=3)
    assert (best["method"], best["steps"], best["schedule"]) == ("ab3", 10, "power:2")
    assert model_card.recommended_sampler({}, records[:1], ema=1, epoch=3)["schedule"] == "uniform"
    assert (
        model_card.recommended_sampler({"sampling_schedule": ["logsnr:3", "uniform"]}, [], ema=1, epoch=3)["schedule"]
        == "logit:3"
    )
    values = weights.flag_values(
        {"sampler": {k: v for k, v in best.items() if k != "schedule"}}
    )  # a folder exported before
    assert weights.sampler_from(values) == SamplerSettings("ab3", 10, 2.0, 0.1, 1.0, "uniform")
    assert weights.sampler_from(weights.flag_values({"sampler": best})).schedule == "power:2"
    old_folder = weights.flag_values({"sampler": {**best, "schedule": "logsnr"}})
    assert weights.sampler_from(old_folder).schedule == "logit:5"
