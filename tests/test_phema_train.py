"""Post-hoc EMA wired into training and evaluation (main_jit.py --phema_stds, --evaluate_gen --phema
--ema_std): the power EMAs of a real run against util.ema.PowerEMA over its weights, resume bit-exact
with the snapshot series continued, one-line errors, and the σ_rel sweep against reconstruct_ema.py.
The runs are in this process (tiny JiT, 2 epochs of 6 steps: about 2 s each)."""

import csv
import dataclasses
import json
import os
import signal

import numpy as np
import pytest
import torch
from helpers import TINY, assert_same_state, load_last, read_metrics, tiny_denoiser

import engine_jit
import main_jit
import reconstruct_ema
import run_build
from sampling import SamplerSettings
from util import checkpoint as ckpt_util
from util import phema, phema_files, sweep
from util.ema import PowerEMA

STDS = (0.05, 0.1)
# 2 epochs of 6 steps, global batch 4: snapshots at steps 5, 10 and 12 (the last).
PHEMA = ["--phema_stds", *map(str, STDS), "--phema_every", "5", "--phema_from", "3"]
DUE = (5, 10, 12)


def train_args(data, out, *extra) -> list[str]:
    return [*TINY, "--epochs", "2", "--data_path", data, "--output_dir", str(out), "--resume", str(out), *PHEMA, *extra]


def snapshot_files(out) -> dict:
    """{file name: bytes} of out/phema."""
    folder = os.path.join(out, "phema")
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """An uninterrupted run, recording the weights after every optimiser step; then moved aside, so
    that a run of the same command (the same output_dir in its args) can be compared file for file.
    Returns (folder, [parameters after step k for k = 1..12])."""
    base = tmp_path_factory.mktemp("phema_runs")
    trajectory = []
    real_step = engine_jit.train_step

    def recording(parts, *args):
        out = real_step(parts, *args)
        trajectory.append([p.detach().clone() for p in parts.denoiser.parameters()])
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_jit, "train_step", recording)
        assert main_jit.main(main_jit.parse_args(train_args(data, base / "run"))) == 0
    os.rename(base / "run", base / "straight")
    return base, trajectory


def power_ema_over(trajectory, sigma_rel: float, steps: int, batch: int = 4) -> dict:
    """util.ema.PowerEMA run over the first `steps` weights of the trajectory; its state dict."""
    model = tiny_denoiser()
    ema = PowerEMA(model, sigma_rel)
    for k, params in enumerate(trajectory[:steps], 1):
        with torch.no_grad():
            for p, v in zip(model.parameters(), params):
                p.copy_(v)
        ema.update(model, k * batch, batch)
    return ema.state_dict()


@pytest.mark.slow
def test_tracked_power_emas_are_phema_power_emas_of_the_weights(straight):
    base, trajectory = straight
    ckpt = load_last(base / "straight")
    assert ckpt["phema_stds"] == list(STDS) and len(ckpt["model_phema"]) == 2 and len(trajectory) == 12
    names = [n for n, _ in tiny_denoiser().named_parameters()]
    for sigma_rel, tracked in zip(STDS, ckpt["model_phema"]):
        reference = power_ema_over(trajectory, sigma_rel, 12)
        for name in names:  # the fused update of all EMAs is PowerEMA's own, bit for bit
            assert torch.equal(tracked[name], reference[name]), (sigma_rel, name)
        # and the explicit average: the weights after step k with the profile's mass on step k (EDM2 eq. 121)
        masses = phema.step_masses(12, phema.gamma_from_sigma_rel(sigma_rel))
        for j, name in enumerate(names):
            explicit = sum(float(m) * params[j].double() for m, params in zip(masses, trajectory))
            torch.testing.assert_close(tracked[name].double(), explicit, rtol=0, atol=1e-6)
    assert not torch.equal(
        ckpt["model_phema"][0]["net.final_layer.linear.weight"], ckpt["model_phema"][1]["net.final_layer.linear.weight"]
    )

    snaps = phema_files.list_snapshots(str(base / "straight" / "phema"))
    assert [(s.step, s.sigma_rel) for s in snaps] == [(k, s) for k in DUE for s in STDS]
    assert [(s.images_seen, s.epoch) for s in snaps[::2]] == [(20, -1), (40, 0), (48, 1)]
    info, data = phema_files.read_snapshot(snaps[0].path)  # step 5: the PowerEMA after 5 steps, float32
    assert data["args"]["phema_stds"] == list(STDS) and info.dtype == "float32"
    for name, value in power_ema_over(trajectory, STDS[0], 5).items():
        assert torch.equal(data["state_dict"][name], value), name


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_resumes_bit_exact_and_continues_the_snapshot_series(straight, data, capsys):
    """SIGTERM during step 7 (epoch 1): the run saves and stops; the same command finishes it. The
    weights, EMAs, power EMAs and optimizer equal the uninterrupted run's, and so do the snapshot
    files, byte for byte (steps 5 by the first process, 10 and 12 by the second; none twice)."""
    base, _ = straight
    out = base / "run"
    calls = []
    real_step = engine_jit.train_step

    def sigterm_at_7(parts, *args):
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGTERM)  # StopSignal's handler: the loop saves after this step and stops
        return real_step(parts, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_jit, "train_step", sigterm_at_7)
        assert main_jit.main(main_jit.parse_args(train_args(data, out))) == 0
    first = capsys.readouterr().out
    assert "stop requested (signal) at epoch 1, step 1" in first
    assert sorted(snapshot_files(out)) == [f"phema-{5:010d}-{s:g}.pth" for s in STDS]
    assert main_jit.main(main_jit.parse_args(train_args(data, out))) == 0
    second = capsys.readouterr().out
    assert "resumed from" in second and "epoch 1, step 1" in second and "4 still to write" in second
    assert "snapshots at step 5" not in second and "snapshots at step 10" in second

    resumed, uninterrupted = load_last(out), load_last(base / "straight")
    assert_same_state(resumed, uninterrupted)
    assert resumed["phema_stds"] == uninterrupted["phema_stds"]
    for a, b in zip(resumed["model_phema"], uninterrupted["model_phema"]):
        assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert snapshot_files(out) == snapshot_files(base / "straight")


@pytest.mark.slow
@pytest.mark.parametrize(
    "stds, message",
    [
        (
            ["--phema_stds", "0.05", "0.2"],
            "tracks post-hoc EMAs of σ_rel 0.05 0.1, this run --phema_stds 0.05 0.2: resume with --phema_stds 0.05 0.1",
        ),
        ([], "this run --phema_stds none: resume with --phema_stds 0.05 0.1"),
    ],
)
def test_resuming_with_other_phema_stds_is_a_one_line_error(straight, data, tmp_path, stds, message):
    base, _ = straight
    argv = [
        *TINY,
        "--epochs",
        "3",
        "--data_path",
        data,
        "--output_dir",
        str(tmp_path),
        "--resume",
        str(base / "straight"),
        *stds,
    ]
    with pytest.raises(ckpt_util.CheckpointError, match=message):  # util.errors.BadInput: exit status 2
        main_jit.setup(main_jit.parse_args(argv))


def eval_argv(out, inception_weights, fid_ref_stats, *extra) -> list[str]:
    """--evaluate_gen of 6 images, 2 Heun steps, CFG 2 from 0.1 (no model flags: they come from the weights)."""
    return [
        str(a)
        for a in (
            "--evaluate_gen",
            "--output_dir",
            out,
            "--num_images",
            6,
            "--gen_bsz",
            6,
            "--num_sampling_steps",
            2,
            "--cfg",
            2.0,
            "--interval_min",
            0.1,
            "--device",
            "cpu",
            "--fid_stats",
            fid_ref_stats,
            "--inception_weights",
            inception_weights,
            *extra,
        )
    ]


@pytest.mark.slow
def test_a_sweep_of_post_hoc_emas_equals_reconstruct_ema_checkpoints(
    straight, tmp_path, inception_weights, fid_ref_stats, capsys
):
    """--phema --ema_std: σ_rel 0.07 first alone, then with 0.05 (its finished point is found by its
    σ_rel and not scored again); the 0.07 point equals reconstruct_ema.py's checkpoint evaluated
    with --evaluate_gen --resume; sweep.csv has the ema_std column, sweep.png plots against σ_rel."""
    base, _ = straight
    snapshots, out = str(base / "straight" / "phema"), tmp_path / "sweep"

    def sweep_of(*stds):
        return main_jit.main(
            main_jit.parse_args(
                eval_argv(out, inception_weights, fid_ref_stats, "--phema", snapshots, "--ema_std", *stds)
            )
        )

    assert sweep_of(0.07) == 0
    assert sweep_of(0.05, 0.07) == 0
    log = capsys.readouterr().out
    assert "note: from " + os.path.abspath(snapshots) + ": --model JiT-XS/4 --img_size 16 --class_num 3" in log
    assert "1 of 2 points already finished" in log and log.count("img/s; sweep ETA") == 1
    assert "σ_rel 0.05: condition" in log and "fit error 0.0e+00" in log  # a tracked σ_rel, at its own snapshot
    records = read_metrics(out, "eval")
    assert [r["ema_std"] for r in records] == [0.07, 0.05] and all(r["ema"] is None for r in records)
    assert all(
        r["checkpoint"] == os.path.abspath(snapshots) and r["phema_step"] == 12 and r["checkpoint_epoch"] == 1
        for r in records
    )
    assert records[0]["fid"] != records[1]["fid"]
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0])[3:6] == ["ema", "ema_std", "cfg"]
    assert sorted(float(r["ema_std"]) for r in rows) == [0.05, 0.07]
    assert (out / "sweep.png").stat().st_size > 0

    assert reconstruct_ema.cli(["--snapshots", snapshots, "--std", "0.07", "--output_dir", str(tmp_path / "rec")]) == 0
    single = tmp_path / "single"
    resume = tmp_path / "rec" / "ema-std0.07-step0000000012.pth"
    assert (
        main_jit.main(main_jit.parse_args(eval_argv(single, inception_weights, fid_ref_stats, "--resume", resume))) == 0
    )
    (one,) = read_metrics(single, "eval")
    np.testing.assert_equal([one["fid"], one["inception_score"]], [records[0]["fid"], records[0]["inception_score"]])


def test_finished_points_are_matched_by_their_sigma_rel(tmp_path):
    context = dict(checkpoint="/run/phema", checkpoint_epoch=1, phema_step=12, seed=0)
    point = sweep.Point(None, SamplerSettings(cfg=2.0), 6, ema_std=0.05)
    record = {
        "kind": "eval",
        "fid": 3.0,
        **context,
        "ema": None,
        "ema_std": 0.05,
        "num_images": 6,
        **dataclasses.asdict(point.sampler),
    }
    others = [
        {**record, "ema_std": 0.07},
        {**record, "phema_step": 10},
        {**{k: v for k, v in record.items() if k != "ema_std"}, "ema": 1},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [record, *others]))
    done = sweep.finished(str(path), context)
    assert list(done) == [
        point.key(),
        dataclasses.replace(point, ema_std=0.07).key(),
        sweep.Point(1, point.sampler, 6).key(),
    ]
    assert point.weights == 0.05 and sweep.Point(2, point.sampler, 6).weights == 2
    assert (
        sweep.describe_record({**record, "inception_score": None})
        == "σ_rel 0.05, cfg 2.0, interval (0.0, 1.0): FID 3.0000, IS n/a"
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--phema_stds", "0.3"], "--phema_stds 0.3: σ_rel must be in (0, 0.2887)"),
        (["--phema_stds", "0.05", "0.05"], "the values must differ"),
        (["--phema_stds", "0.05", "--phema_every", "0"], "--phema_every must be at least 1"),
        (["--phema", "x"], "--phema evaluates post-hoc EMAs: add --evaluate_gen"),
        (["--evaluate_gen", "--phema", "x"], "give the σ_rel of the post-hoc EMAs to evaluate with --ema_std"),
        (["--evaluate_gen", "--phema", "x", "--ema_std", "0.05", "--resume", "y"], "--phema and --resume both name"),
        (["--evaluate_gen", "--phema", "x", "--ema_std", "0.05", "--ema", "2"], "--ema chooses an EMA of a checkpoint"),
        (["--evaluate_gen", "--phema", "x", "--ema_std", "0"], "--ema_std 0.0: σ_rel must be in"),
        (["--evaluate_gen", "--resume", "y", "--ema_std", "0.05"], "--ema_std needs --phema"),
        (["--evaluate_gen", "--resume", "y", "--phema_run", "abc"], "--phema_run needs --phema"),
        (
            ["--evaluate_gen", "--phema", "/nonexistent", "--ema_std", "0.05"],
            "/nonexistent: no such folder of snapshots",
        ),
    ],
)
def test_bad_phema_flags_are_rejected_before_any_work(tmp_path, extra, message):
    args = main_jit.parse_args([*TINY, "--output_dir", str(tmp_path / "out"), *extra])
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(").replace(")", r"\)")):
        main_jit.main(args)  # util.errors.BadValue / MissingFile: exit status 2
    assert not (tmp_path / "out").exists()


def test_a_snapshot_that_cannot_be_written_is_one_line_and_the_plan_warns_of_a_short_disk(
    tmp_path, monkeypatch, capsys
):
    from util import files

    model = tiny_denoiser()
    emas = [PowerEMA(model, s) for s in STDS]
    writer = phema_files.SnapshotWriter(
        str(tmp_path / "phema"),
        emas,
        every=2,
        start=1,
        total=5,
        steps_per_epoch=3,
        dtype="float16",
        args={"model": "JiT-XS/4"},
        keep=frozenset(phema_files.frozen_names(model)),
    )
    one = phema_files.snapshot_file_bytes(model.state_dict(), "float16", writer.keep)
    monkeypatch.setattr(files, "free_bytes", lambda path: 3 * one)
    plan = writer.plan(done=2)  # steps 4 and 5 still to come: 4 files
    assert plan[0].startswith(
        "post-hoc EMA: σ_rel 0.05 0.1; snapshots every 2 steps from step 1 and at the last (5): 6 files of "
    )
    assert "(float16)" in plan[0] and plan[0].endswith(", 4 still to write") and len(plan) == 2
    assert plan[1].startswith(f"warning: {tmp_path / 'phema'} has ") and "some will fail to be written" in plan[1]

    def full_disk(obj, path):
        raise files.WriteError(f"could not write {path}: No space left on device")

    monkeypatch.setattr(phema_files.checkpoint, "save_atomic", full_disk)
    writer(3, 12)  # not due: nothing happens
    writer(4, 16)
    out = capsys.readouterr().out
    assert writer.failed == 2 and out.count("error: post-hoc EMA snapshot σ_rel") == 2 and "No space left" in out
    assert "training goes on" in out and os.listdir(tmp_path / "phema") == []
    monkeypatch.undo()
    writer(5, 20)  # the last step
    assert [(s.step, s.images_seen, s.epoch, s.dtype) for s in phema_files.list_snapshots(writer.folder)] == [
        (5, 20, 0, "float16")
    ] * 2


def test_under_fsdp_each_copy_is_sharded_as_it_is_made(tmp_path, monkeypatch):
    """Issue 28 item 3: building the EMAs and power EMAs of an FSDP run never holds more than one
    full copy of the network besides the live one (counted on the CPU: copies made minus copies
    sharded, with a stand-in shard that frees a module's parameters)."""
    import copy

    from denoiser import Denoiser
    from util import sharding

    events = []
    real_deepcopy = copy.deepcopy

    def counting_deepcopy(x, memo=None, _nil=None):
        if isinstance(x, Denoiser):
            events.append(+1)
        return real_deepcopy(x, memo)

    def stand_in_shard(module, **kw):
        if any(m is module for m in live):  # the live denoiser: sharded last, not a copy
            return module
        with torch.no_grad():
            for p in module.parameters():
                p.data = torch.empty(0)
        events.append(-1)
        return module

    live = []
    monkeypatch.setattr(copy, "deepcopy", counting_deepcopy)
    monkeypatch.setattr(sharding, "shard", stand_in_shard)
    monkeypatch.setattr(sharding, "is_sharded", lambda m: False)
    config, _ = main_jit.resolve(main_jit.parse_args([*TINY, "--fsdp", *PHEMA, "--ema_decay3", "0.99"]), world_size=2)
    assert config.fsdp
    real_build = run_build.new_denoiser
    monkeypatch.setattr(run_build, "new_denoiser", lambda *a: live.append(real_build(*a)) or live[-1])
    denoiser, emas, phemas, _ = run_build.build_model(config, torch.device("cpu"))
    held = np.cumsum(events)
    assert events.count(1) == 3 + len(STDS) and held[-1] == 0 and held.max() == 1
    assert [e.sigma_rel for e in phemas] == list(STDS) and all(
        p.numel() == 0 for e in phemas for p in e.module.parameters()
    )
