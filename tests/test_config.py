"""The run config (util/config.py): built once from the flags, frozen, in sections derived from the
parser's groups, with the flags the user typed; and the seams it closes: a typed default contradicts
the weights (bug 7), resume keeps the objective (bug 6), snapshots carry their run (bug 4)."""

import json
import os
import time

import pytest
from helpers import TINY, tiny_denoiser

import main_jit
from util import checkpoint as ckpt_util
from util import phema_files
from util.config import DERIVED, merge, parse, sections_of
from util.ema import PowerEMA
from util.errors import BadValue


def test_sections_come_from_the_parser_groups_and_a_new_flag_lands_in_its_own():
    parser = main_jit.get_args_parser()
    group = next(g for g in parser._action_groups if g.title == "training")
    group.add_argument("--a_new_flag", default=3, type=int)
    config = parse(parser, ["--model", "JiT-XS/4"])
    assert config.sections == ("model", "training", "sampling and evaluation", "data and output", "distributed")
    assert config.section("training")["a_new_flag"] == 3 and config.a_new_flag == 3
    assert config.section("model")["model"] == "JiT-XS/4" and "epochs" in config.section("training")
    assert set(config.as_dict()) == {n for names in sections_of(parser).values() for n in names}


def test_the_config_is_frozen_and_replace_returns_a_new_one():
    config = main_jit.parse_args(["--epochs", "3"])
    with pytest.raises(AttributeError, match="frozen"):
        config.epochs = 4
    new = config.replace(epochs=4, init_origin={"path": "x"})
    assert (config.epochs, new.epochs, new.init_origin) == (3, 4, {"path": "x"}) and "init_origin" not in config
    assert "init_origin" in new.section(DERIVED) and new.given == config.given == {"epochs"}
    assert isinstance(new.as_dict(), dict) and new.as_dict()["epochs"] == 4


def test_typed_flags_are_what_the_command_line_names_whatever_the_value():
    config = main_jit.parse_args(["--model", "JiT-B/16", "--no_compile", "--cfg", "1.0", "--demo"])
    assert config.given == {"model", "compile", "cfg", "demo"}
    assert config.model == "JiT-B/16" and config.img_size == 32  # --demo's default, not typed
    assert main_jit.parse_args([]).given == frozenset()


def test_merge_takes_the_implied_values_and_the_typed_flags_override_or_contradict():
    implied = {"model": "JiT-B/16", "cfg": 2.0, "steps": 50}
    values, notes = merge(implied, {"cfg": [3.0], "steps": None, "seed": 1}, fixed=("model",), where="W")
    assert (
        values == {"model": "JiT-B/16", "cfg": 3.0, "steps": 50} and implied["cfg"] == 2.0
    )  # no new keys, input untouched
    assert notes == ["--cfg 3.0 overrides 2.0 of W"]
    assert merge(implied, {"model": "JiT-B/16"}, fixed=("model",), where="W") == (implied, [])  # agreeing: no note
    with pytest.raises(BadValue, match=r"^--model JiT-L/16 disagrees with W \(JiT-B/16\)"):
        merge(implied, {"model": "JiT-L/16"}, fixed=("model",), where="W")
    loose = merge(implied, {"model": "b"}, fixed=("model",), where="W", agrees=lambda f, v, vals: v.upper() in vals[f])
    assert loose == (implied, [])


def exported_tiny(tmp_path) -> str:
    import export

    sd = tiny_denoiser().state_dict()
    ckpt = str(tmp_path / "checkpoint-last.pth")
    ckpt_util.save(
        ckpt_util.TrainState(
            model=sd,
            emas=[sd, sd],
            optimizer=None,
            epoch=0,
            start={"epoch": 1, "step": 0},
            args={"model": "JiT-XS/4", "img_size": 16, "class_num": 3},
        ),
        ckpt,
    )
    assert export.cli([ckpt, str(tmp_path / "jit")]) == 0
    return ckpt


@pytest.mark.parametrize("source", ["checkpoint", "exported"])
def test_a_typed_default_that_contradicts_the_weights_is_refused(tmp_path, source):
    """Seam bug 7: --model JiT-B/16 (the default, typed) with JiT-XS/4 weights is a contradiction
    (exit 2), not silently the weights' model; without it the weights' model is taken."""
    ckpt = exported_tiny(tmp_path)
    weights = ckpt if source == "checkpoint" else str(tmp_path / "jit")
    base = ["--evaluate_gen", "--resume", weights, "--output_dir", str(tmp_path / "eval"), "--device", "cpu"]
    with pytest.raises(ValueError, match="--model JiT-B/16 disagrees with"):  # util.errors.BadValue: exit 2
        main_jit.setup(main_jit.parse_args([*base, "--model", "JiT-B/16"]))
    with pytest.raises(ValueError, match="--img_size 256 disagrees with"):
        main_jit.setup(main_jit.parse_args([*base, "--img_size", "256"]))
    assert not (tmp_path / "eval").exists()


def test_sample_takes_a_typed_default_sampler_flag(tmp_path):
    """Seam bug 7 in sample.py: --cfg 1.0 typed (the default) beats the folder's recommended CFG."""
    import sample

    exported_tiny(tmp_path)
    folder = str(tmp_path / "jit")
    path = os.path.join(folder, "config.json")
    raw = json.load(open(path))
    raw["sampler"]["cfg"] = 2.0
    json.dump(raw, open(path, "w"))
    assert sample.load(sample.parse_args(["--resume", folder])).sampler.cfg == 2.0
    assert sample.load(sample.parse_args(["--resume", folder, "--cfg", "1.0"])).sampler.cfg == 1.0


@pytest.mark.parametrize("flag, value", [("pred", "eps"), ("loss", "x")])
def test_resuming_with_another_objective_is_refused(data, tmp_path, flag, value):
    """Seam bug 6: another --pred or --loss than the checkpoint's keeps every shape, so it is
    refused by name (exit 2), as other --phema_stds are; a reference checkpoint is x / v."""
    sd = tiny_denoiser().state_dict()
    ckpt = ckpt_util.TrainState(
        model=sd,
        emas=[sd, sd],
        optimizer=None,
        epoch=0,
        start={"epoch": 1, "step": 0},
        args={"model": "JiT-XS/4", "img_size": 16, "class_num": 3},
    )  # no pred / loss: x / v
    ckpt_util.save(ckpt, str(tmp_path / "checkpoint-last.pth"))
    argv = [*TINY, "--epochs", "2", "--data_path", data, "--output_dir", str(tmp_path), "--resume", str(tmp_path)]
    default = "x" if flag == "pred" else "v"
    with pytest.raises(
        ckpt_util.CheckpointError,
        match=f"was trained with --{flag} {default}, this run --{flag} {value}: resume with --{flag} {default}",
    ):
        main_jit.setup(main_jit.parse_args([*argv, f"--{flag}", value]))


def test_a_stale_snapshot_of_another_run_is_refused_and_named(tmp_path):
    """Seam bug 4: each snapshot records its run; a folder holding snapshots of several runs is
    refused (one line naming each run, its count and steps), and the run is picked by name or prefix."""
    model = tiny_denoiser()
    ema = PowerEMA(model, 0.1)
    folder = str(tmp_path / "phema")
    stale = phema_files.write_snapshot(
        folder,
        ema.state_dict(),
        sigma_rel=0.1,
        step=90,
        images_seen=720,
        epoch=10,
        args={"run_id": "old", "epochs": 12},
    )
    os.utime(stale, (time.time() - 3600,) * 2)
    for step in (10, 20):
        phema_files.write_snapshot(
            folder,
            ema.state_dict(),
            sigma_rel=0.1,
            step=step,
            images_seen=8 * step,
            epoch=0,
            args={"run_id": "new", "epochs": 3},
        )
    with pytest.raises(BadValue) as e:
        phema_files.usable_snapshots(folder)
    assert str(e.value) == (
        f"{folder} holds the snapshots of 2 runs: run new (2 snapshots, steps 10-20), run old (1 snapshot, step 90); "
        "pick one with --phema_run RUN, or move the other run's files out of the folder"
    )
    used = phema_files.usable_snapshots(folder, run="ne")
    assert [s.step for s in used] == [10, 20] and {s.run for s in used} == {"new"}
    assert phema_files.reconstruction_point(used)[0] == 20
    assert (
        phema_files.run_identity({"a": 1, "run_id": "x"})
        == phema_files.run_identity({"a": 1})
        != phema_files.run_identity({"a": 2})
    )


def test_resolve_reads_the_weights_once_and_returns_the_complete_config(data, tmp_path):
    """main_jit.resolve: the flags with what follows from them and the run's identity (a new run's
    own, a resumed checkpoint's, --init_from's origin), the weights in the Source, nothing written;
    build stores that config, unchanged, in every checkpoint (nothing patched afterwards)."""
    out = tmp_path / "out"
    base = [*TINY, "--data_path", data, "--output_dir", str(out)]
    config, source = main_jit.resolve(main_jit.parse_args([*base, "--resume", str(out)]), world_size=2)
    assert (config.lr, config.fid_stats) == (1e-3, os.path.join("fid_stats", "jit_in16_stats.npz"))
    assert config.run_id == phema_files.run_identity(config.as_dict()) and config.cfg == 1.0
    assert (source.state, source.init) == (None, None) and not out.exists()
    assert source.notes == (f"no checkpoint in {out}: training from scratch",)  # its own folder, still to come

    sd = tiny_denoiser().state_dict()
    origin = {"path": "/elsewhere", "weights": "ema1", "epoch": 3, "model": "JiT-XS/4", "img_size": 16, "class_num": 3}
    identity = {"model": "JiT-XS/4", "img_size": 16, "class_num": 3, "run_id": "a run", "init_origin": origin}
    kept = tmp_path / "kept"
    os.makedirs(kept)
    ckpt_util.save(
        ckpt_util.TrainState(
            model=sd, emas=[sd, sd], optimizer=None, epoch=0, start={"epoch": 1, "step": 0}, args=identity
        ),
        str(kept / "checkpoint-last.pth"),
    )
    config, source = main_jit.resolve(main_jit.parse_args([*base, "--resume", str(kept)]), world_size=1)
    assert (config.run_id, config.init_origin) == ("a run", origin) and source.path == str(kept / "checkpoint-last.pth")
    assert source.state.epoch == 0 and source.init is None and not out.exists()

    args = main_jit.parse_args([*base, "--init_from", str(kept), "--dry_run"])
    config, source = main_jit.resolve(args, world_size=1)
    assert config.init_origin["path"] == str(kept / "checkpoint-last.pth") and config.init_origin["epoch"] == 0
    assert config.run_id == phema_files.run_identity(config.as_dict()) != "a run" and source.state is None
    assert source.init.state_dict is not None and not out.exists()

    run = main_jit.setup(args)
    run.close()
    assert run.checkpoints.args == run.config.as_dict() and run.config == config
