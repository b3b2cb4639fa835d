"""main_jit.py --fsdp and --grad_checkpoint end to end (2 CPU processes, gloo): FSDP training equal to
DDP (post-hoc EMA's power EMAs and snapshots included, and the sample grids), sharded checkpoints
(torch.distributed.checkpoint folders) moving FSDP <-> DDP <-> one process <-> the reference's file by
convert_checkpoint.py, FSDP starting from other weights (--init_from, an EMA added on resume),
SIGTERM mid-epoch and mid-evaluation and kill -9, each rerun bit-exact and each step recorded once,
bad input."""

import os
import signal

import numpy as np
import pytest
import torch
from helpers import (
    REF_KEYS,
    TINY,
    assert_same_state,
    load_last,
    read_metrics,
    read_until,
    run_script,
    save_reference_checkpoint,
    tiny_denoiser,
    worker_pids,
)
from PIL import Image

import convert_checkpoint
from util import checkpoint, checkpoint_dcp, phema_files

ROUNDING = 1e-6  # float32 rounding: FSDP's reduce-scatter sums in another order than DDP's all-reduce
# Power EMAs (post-hoc EMA) in the runs compared: 2 epochs of 6 steps, snapshots at steps 4, 8 and 12.
PHEMA = ["--phema_stds", 0.05, 0.1, "--phema_every", 4, "--phema_from", 3]


@pytest.fixture(scope="module")
def data(data48):
    return data48  # 48 images: 6 steps per epoch on 2 ranks


def train(data, out, *extra, epochs=2, nproc=2, check=True):
    return run_script(
        "main_jit.py",
        *TINY,
        "--epochs",
        epochs,
        "--data_path",
        data,
        "--output_dir",
        out,
        *extra,
        nproc=nproc,
        check=check,
    )


@pytest.fixture(scope="module")
def online_eval(inception_weights, fid_ref_stats):
    """Flags of an online evaluation (after epoch 0 and the last; EMA 2, 12 tiny images)."""
    return [
        "--online_eval",
        "--eval_freq",
        10,
        "--ema",
        2,
        "--num_images",
        12,
        "--gen_bsz",
        2,
        "--num_sampling_steps",
        2,
        "--cfg",
        2.0,
        "--fid_stats",
        fid_ref_stats,
        "--inception_weights",
        inception_weights,
    ]


def load_any(out) -> dict:
    """The dict of the newest checkpoint in `out` (a file, or a sharded folder read whole)."""
    state, _ = checkpoint.load_checkpoint(str(out))
    return checkpoint_dcp.plain(checkpoint.to_dict(state))


def eval_record(out) -> dict:
    """The evaluation after the last epoch (--eval_freq 10 also evaluates after epoch 0)."""
    return read_metrics(out, "eval")[-1]


@pytest.fixture(scope="module")
def ddp(data, tmp_path_factory, online_eval):
    """Two epochs with DDP and an online evaluation: the reference of the FSDP runs."""
    out = tmp_path_factory.mktemp("ddp")
    train(data, out, *online_eval, *PHEMA, "--sample_every", 1)
    return {**load_any(out), "eval": eval_record(out), "snapshots": snapshots(out), "grids": grids(out)}


@pytest.fixture(scope="module")
def fsdp(data, tmp_path_factory, online_eval):
    """Two epochs with FSDP, power EMAs, an online evaluation and sample grids, run in base/run (with
    --resume of it, as a rerun's command) and then moved to base/straight: a rerun of the same command
    in base/run is the same run, file for file. Returns its checkpoint, records, snapshots, grids and base."""
    base = tmp_path_factory.mktemp("fsdp")
    out = base / "run"
    p = train(data, out, "--fsdp", "--resume", out, *online_eval, *PHEMA, "--sample_every", 1)
    assert "2 process(es) (FSDP)" in p.stdout
    os.rename(out, base / "straight")
    out = base / "straight"
    return {**load_any(out), "eval": eval_record(out), "snapshots": snapshots(out), "grids": grids(out), "base": base}


def grids(out) -> dict:
    """{file name: (H, W, 3) uint8} of out/samples."""
    folder = os.path.join(out, "samples")
    return {name: np.asarray(Image.open(os.path.join(folder, name))) for name in sorted(os.listdir(folder))}


def snapshots(out) -> dict:
    """{(step, σ_rel): (images seen, state dict)} of the post-hoc EMA snapshots in out/phema."""
    found = phema_files.list_snapshots(os.path.join(out, "phema"))
    return {(s.step, s.sigma_rel): (s.images_seen, phema_files.read_snapshot(s.path)[1]["state_dict"]) for s in found}


def assert_same_tensors(a: dict, b: dict, atol: float = 0.0):
    for name, t in a.items():
        torch.testing.assert_close(t, b[name], rtol=0, atol=atol, msg=name)


@pytest.mark.slow
def test_fsdp_training_equals_ddp_and_converts_to_the_same_format(ddp, fsdp, tmp_path, capsys):
    """The sharded run writes a folder (every rank its shards), no file; convert_checkpoint.py makes the
    reference's file of it, in the format of the DDP run's, with the folder's tensors bit for bit."""
    folder = fsdp["base"] / "straight"
    assert [n for n in sorted(os.listdir(folder)) if n.startswith("checkpoint-")] == ["checkpoint-last.dcp"]
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "train_state.pth"} == set(
        os.listdir(folder / "checkpoint-last.dcp")
    )
    file = tmp_path / "checkpoint-last.pth"
    assert convert_checkpoint.cli([str(folder), str(file)]) == 0
    assert "(epoch 1, resume at epoch 2, step 0, written by 2 processes)" in capsys.readouterr().out
    assert convert_checkpoint.cli([str(folder), str(file)]) == 2  # no --overwrite
    converted = torch.load(file, weights_only=True)
    assert set(converted) == set(ddp) - {"eval", "snapshots", "grids"} and REF_KEYS <= set(converted)
    assert converted["optimizer"]["param_groups"] == ddp["optimizer"]["param_groups"]
    assert list(converted["optimizer"]["state"]) == list(ddp["optimizer"]["state"])
    assert list(converted["model"]) == list(ddp["model"])
    assert_same_state(converted, fsdp)  # bit for bit the folder's
    assert_same_state(converted, ddp, atol=ROUNDING)
    fresh = tiny_denoiser()
    for key in ("model", "model_ema1", "model_ema2"):  # what the reference and sample.py load
        fresh.load_state_dict(converted[key], strict=True)


@pytest.mark.slow
def test_sharded_power_emas_and_their_snapshots_equal_ddps(ddp, fsdp):
    """The power EMAs, sharded like the model, update their shards and are gathered to full weights for
    the checkpoint and for the snapshots that rank 0 writes: as DDP's, up to the rounding of the weights."""
    assert fsdp["phema_stds"] == ddp["phema_stds"] == [0.05, 0.1]
    for a, b in zip(fsdp["model_phema"], ddp["model_phema"]):
        assert_same_tensors(a, b, ROUNDING)
    assert sorted(fsdp["snapshots"]) == sorted(ddp["snapshots"]) == [(k, s) for k in (4, 8, 12) for s in (0.05, 0.1)]
    for key, (images, state) in fsdp["snapshots"].items():
        assert images == ddp["snapshots"][key][0] == key[0] * 8  # global batch: 4 per process
        assert_same_tensors(state, ddp["snapshots"][key][1], ROUNDING)
    assert_same_tensors(fsdp["snapshots"][(12, 0.1)][1], fsdp["model_phema"][1])  # the last step's is the tracked one


@pytest.mark.slow
def test_online_evaluation_of_a_sharded_run_equals_ddps(ddp, fsdp):
    """The sharded EMA 2 is gathered into a full copy on each rank and samples as DDP's does."""
    a, b = fsdp["eval"], ddp["eval"]
    assert a["ema"] == b["ema"] == 2 and a["epoch"] == b["epoch"] == 1 and a["num_images"] == 12
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-4)
    assert a["inception_score"] == b["inception_score"]  # None: the near-uniform samples of this tiny run give NaN


@pytest.mark.slow
def test_the_sample_grids_of_a_sharded_run_are_ddps(ddp, fsdp):
    """EMA 1, sharded, is gathered into a full copy on each rank, each samples its share of the grid and
    rank 0 alone writes it: DDP's pictures, up to a level where the weights' rounding moves a pixel."""
    assert list(fsdp["grids"]) == list(ddp["grids"]) == ["epoch-0000.png", "epoch-0001.png"]  # no temporary files
    for name, picture in fsdp["grids"].items():
        diff = np.abs(picture.astype(int) - ddp["grids"][name])
        assert picture.shape == (3 * 18 + 2, 10 * 18 + 2, 3) and diff.max() <= 1 and (diff > 0).mean() < 0.01, name


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [("--fsdp", None), (None, "--fsdp")])
def test_checkpoints_move_between_fsdp_and_ddp(data, tmp_path, ddp, first, then):
    """One epoch one way, the second the other way: the same as two epochs of DDP."""
    train(data, tmp_path, *[f for f in [first] if f], epochs=1)
    p = train(data, tmp_path, *[f for f in [then] if f], "--resume", tmp_path)
    assert "resumed from" in p.stdout and "epoch 1, step 0" in p.stdout
    assert_same_state(load_any(tmp_path), ddp, atol=ROUNDING)


@pytest.mark.slow
def test_fsdp_starts_from_other_weights_and_a_folder_resumes_as_its_file(data, tmp_path, fsdp, capsys):
    """FSDP loading one state dict into several modules: --fsdp --init_from (the straight run's folder;
    the model, both EMAs and both power EMAs start from its EMA 1) trains an epoch. Its checkpoint
    folder, and the file convert_checkpoint.py makes of it, are each resumed under --fsdp adding
    --ema_decay3 (EMA 3 starts from the model's weights), and each by one process (2 -> 1): a resume
    from the folder equals the resume from the file, bit for bit, every EMA and power EMA included."""
    a = tmp_path / "a"
    p = train(data, a, "--fsdp", "--init_from", fsdp["base"] / "straight", *PHEMA, epochs=1)
    assert "--init_from: the model and every EMA start from the ema1 weights of" in p.stdout, p.stdout
    started = load_any(a)
    assert started["resume"] == {"epoch": 1, "step": 0} and len(started["model_phema"]) == 2
    folder, file = a / "checkpoint-last.dcp", tmp_path / "a.pth"
    assert convert_checkpoint.cli([str(a), str(file)]) == 0
    capsys.readouterr()
    runs = {}
    for form, source in (("folder", folder), ("file", file)):
        for nproc, extra in ((2, ["--fsdp", "--ema_decay3", 0.9]), (None, [])):
            out = tmp_path / f"{form}-{nproc}"
            p = train(data, out, "--resume", source, *PHEMA, *extra, nproc=nproc)
            assert f"resumed from {source}: epoch 1, step 0" in p.stdout, p.stdout
            assert ("EMA 3 starts from the loaded weights" in p.stdout) == (nproc == 2)
            runs[form, nproc] = load_any(out)
    for nproc in (2, None):
        x, y = runs["folder", nproc], runs["file", nproc]
        assert_same_state(x, y)
        for key in ("model_ema3", "model_phema") if nproc else ("model_phema",):
            for a_sd, b_sd in zip(*((z[key] if isinstance(z[key], list) else [z[key]]) for z in (x, y))):
                assert_same_tensors(a_sd, b_sd)
    assert not torch.equal(
        runs["folder", 2]["model_ema3"]["net.final_layer.linear.weight"],
        started["model"]["net.final_layer.linear.weight"],
    )


@pytest.mark.slow
def test_export_sample_and_evaluate_gen_read_a_folder_as_its_file(fsdp, tmp_path, online_eval, capsys):
    """export.py and sample.py given the sharded run's folder do what they do given the file
    convert_checkpoint.py makes of it; --evaluate_gen loads it (--dry_run: up to the evaluation, whose
    cost is the Inception pass). One process each, no launcher."""
    import export
    import main_jit
    import sample
    import weights

    folder, file = fsdp["base"] / "straight" / "checkpoint-last.dcp", tmp_path / "checkpoint-last.pth"
    assert convert_checkpoint.cli([str(folder), str(file)]) == 0
    exported, grids = {}, {}
    for form, source in (("folder", folder), ("file", file)):
        assert export.cli([str(source), str(tmp_path / f"export-{form}")]) == 0
        exported[form] = weights.load_exported(str(tmp_path / f"export-{form}"))[1]
        png = tmp_path / f"grid-{form}.png"
        flags = ["--resume", str(source), "--classes", "0", "2", "--per_class", "2", "--num_sampling_steps", "2"]
        assert sample.cli([*flags, "--output", str(png), "--device", "cpu"]) == 0
        grids[form] = png.read_bytes()
    assert_same_tensors(exported["folder"], exported["file"])
    assert_same_tensors(exported["folder"], fsdp["model_ema1"])
    assert grids["folder"] == grids["file"]
    capsys.readouterr()
    flags = ["--evaluate_gen", "--resume", str(folder), "--output_dir", str(tmp_path / "eval"), "--dry_run"]
    assert main_jit.cli([*map(str, online_eval[1:]), *flags, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"resumed from {folder}: epoch 2, step 0" in printed and "dry run:" in printed, printed


TIMING = ("seconds", "time", "per_s")  # the wall-clock fields of an eval record


def same_records(a: list, b: list) -> bool:
    drop = lambda r: {k: v for k, v in r.items() if not any(w in k for w in TIMING)}  # noqa: E731
    return [drop(r) for r in a] == [drop(r) for r in b]


def tensorboard_scalars(out, tag: str) -> list[tuple[int, float]]:
    """[(x, value)] of a TensorBoard scalar as TensorBoard shows it (events a restart marker purges left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out)).Reload().Scalars(tag)
    return [(e.step, e.value) for e in events]


def file_bytes(folder) -> dict:
    return {
        n: open(os.path.join(folder, n), "rb").read()
        for n in sorted(os.listdir(folder))
        if n.endswith((".pth", ".png"))
    }


@pytest.mark.slow
def test_fsdp_power_emas_and_online_eval_stopped_by_sigterm_rerun_bit_exact(data, fsdp, online_eval, start, capsys):
    """The combination users make: FSDP on 2 processes + --phema_stds + --online_eval + sample grids,
    stopped three ways, each time followed by the same command: SIGTERM mid-epoch; SIGTERM to one rank
    between two generation batches of the evaluation after epoch 0 (each batch slowed by 1.5 s,
    tests/launch_worker.py slow_eval: the ranks vote between batches, the epoch's checkpoint is there,
    the rerun does the evaluation first); kill -9 mid-epoch 1 (the rerun trains its first steps again).
    The weights, every EMA, the power EMAs, the optimizer, the snapshot files and grids byte for byte,
    the eval records and every train record (metrics.jsonl and TensorBoard: each step once) equal the
    uninterrupted run's. Then on its snapshots, check_reconstruction."""
    out = fsdp["base"] / "run"
    args = [
        *TINY,
        "--epochs",
        2,
        "--data_path",
        data,
        "--output_dir",
        out,
        "--fsdp",
        "--resume",
        out,
        *online_eval,
        *PHEMA,
        "--sample_every",
        1,
    ]
    proc = start("main_jit.py", *args, nproc=2)
    read_until(proc, "Epoch [0] [1/6]")
    os.kill(worker_pids(proc.pid)[0], signal.SIGTERM)  # one rank is enough: the ranks vote every step
    rest = proc.stdout.read()
    assert proc.wait(timeout=300) == 0 and "stop requested" in rest, rest
    stopped = load_any(out)["resume"]
    assert stopped["epoch"] == 0 and stopped["step"] > 0  # mid-epoch

    proc = start("tests/launch_worker.py", "slow_eval=1.5", *args, nproc=2)
    head = "".join(read_until(proc, "eval: rank 0 batch 1/3"))
    assert f"epoch {stopped['epoch']}, step {stopped['step']}" in head, head
    os.kill(worker_pids(proc.pid)[1], signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=300) == 0, rest
    assert "stop requested (signal) between two generation batches after epoch 0: checkpoint saved" in rest, rest
    assert load_any(out)["resume"] == {"epoch": 1, "step": 0} and not read_metrics(out, "eval")

    proc = start("main_jit.py", *args, nproc=2)
    head = "".join(read_until(proc, "Epoch [1] [3/6]"))
    os.kill(worker_pids(proc.pid)[0], signal.SIGKILL)
    proc.stdout.read()
    proc.wait(timeout=300)
    assert "the evaluation of epoch 0 was not finished before the run stopped: evaluating now" in head, head
    assert [r["epoch"] for r in read_metrics(out, "eval")] == [0]
    assert read_metrics(out, "train")[-1]["epoch"] == 1  # steps of epoch 1 logged, after the newest checkpoint

    p = run_script("main_jit.py", *args, nproc=2)
    assert (
        "resumed from" in p.stdout
        and "epoch 1, step 0" in p.stdout
        and "record(s) after epoch 1, step 0 dropped" in p.stdout
    )
    resumed = load_any(out)
    assert_same_state(resumed, fsdp)
    assert resumed["args"]["run_id"] == fsdp["args"]["run_id"]
    for a, b in zip(resumed["model_phema"], fsdp["model_phema"]):  # the sharded power EMAs resume exactly
        assert_same_tensors(a, b)
    straight = fsdp["base"] / "straight"
    assert file_bytes(out / "phema") == file_bytes(straight / "phema")  # each step once, byte for byte
    assert same_records(read_metrics(out, "eval"), read_metrics(straight, "eval"))
    assert len(read_metrics(out, "eval")) == 2
    assert same_records(read_metrics(out, "train"), read_metrics(straight, "train"))  # each step once
    assert len(read_metrics(out, "train")) == 12
    assert tensorboard_scalars(out, "train_loss") == tensorboard_scalars(straight, "train_loss")
    assert file_bytes(out / "samples") == file_bytes(straight / "samples")  # the grids too, byte for byte

    check_reconstruction(out, fsdp["args"]["run_id"], capsys)


def check_reconstruction(out, run_id: str, capsys):
    """On a run's snapshots: reconstruct_ema.py with three targets sums in float32 as in float64 (to
    float32 rounding) and leaves the files unchanged, and a stale snapshot of another run is refused and
    named until --run picks the run."""
    import reconstruct_ema

    before = file_bytes(out / "phema")
    outputs = {}
    for accum in ("float32", "float64"):
        target = out / f"rec-{accum}"
        assert (
            reconstruct_ema.cli(
                [
                    "--snapshots",
                    str(out / "phema"),
                    "--std",
                    "0.04",
                    "0.07",
                    "0.1",
                    "--accum",
                    accum,
                    "--output_dir",
                    str(target),
                ]
            )
            == 0
        )
        outputs[accum] = {n: torch.load(target / n, weights_only=True)["model"] for n in sorted(os.listdir(target))}
    assert len(outputs["float32"]) == 3 and file_bytes(out / "phema") == before
    for name, state in outputs["float32"].items():
        assert_same_tensors(state, outputs["float64"][name], 1e-6)
    a, b = list(outputs["float32"].values())[:2]
    assert not torch.equal(a["net.final_layer.linear.weight"], b["net.final_layer.linear.weight"])

    stale = out / "phema" / "phema-0000000016-0.05.pth"  # another run's (DDP, other folder) later snapshot
    other = phema_files.read_snapshot(str(out / "phema" / "phema-0000000012-0.05.pth"))[1]
    other["run"], other["step"] = "another-run", 16
    torch.save(other, stale)
    os.utime(stale, (1, 1))
    capsys.readouterr()
    rec = ["--snapshots", str(out / "phema"), "--std", "0.07", "--output_dir", str(out / "rec-stale")]
    assert reconstruct_ema.cli(rec) == 2
    assert "run another-run (1 snapshot, step 16); pick one with --run RUN" in capsys.readouterr().err
    assert reconstruct_ema.cli([*rec, "--run", run_id]) == 0
    assert os.listdir(out / "rec-stale") == [
        "ema-std0.07-step0000000012.pth"
    ]  # not step 16: the stale one sets nothing


@pytest.mark.slow
def test_a_reference_checkpoint_resumes_under_fsdp(data, tmp_path):
    ref = tmp_path / "ref.pth"
    save_reference_checkpoint(ref, tiny_denoiser().train(), epoch=0, steps=1)
    train(data, tmp_path / "out", "--fsdp", "--resume", ref)
    steps = {float(s["step"]) for s in load_any(tmp_path / "out")["optimizer"]["state"].values()}
    assert steps == {7.0}  # 1 step in the reference checkpoint + 6 here


@pytest.mark.slow
def test_an_fsdp_checkpoint_of_another_model_is_a_clear_error(data, tmp_path, fsdp):
    """A sharded folder of another model: every rank reads its metadata and raises before loading
    anything (exit 2 each); a damaged file that rank 0 alone reads: every rank exits 2 at once."""
    path = fsdp["base"] / "straight" / "checkpoint-last.dcp"
    p = train(
        data, tmp_path / "out", "--fsdp", "--model", "JiT-T/4", "--resume", path, *PHEMA, "--dry_run", check=False
    )
    assert (
        p.returncode != 0 and p.stdout.count("does not fit this model") == 2
    )  # each worker exits 2: torchrun says 1 and "--model JiT-XS/4" in p.stdout
    assert 'main_jit.py", line' not in p.stdout  # no traceback from the workers (torchrun prints its own)
    bad = tmp_path / "checkpoint-bad.pth"  # rank 0 alone reads it (sharded): rank 1 must not wait for it
    bad.write_bytes(b"not a checkpoint")
    p = train(data, tmp_path / "out2", "--fsdp", "--resume", bad, *PHEMA, "--dry_run", "--dist_timeout", 1, check=False)
    # each worker exits 2 at once with one line (torchrun may end rank 1 before it prints its own)
    errors = [line for line in p.stdout.splitlines() if line.startswith("error: ")]
    assert p.returncode != 0 and 1 <= len(errors) <= 2 and all(str(bad) in e for e in errors), p.stdout[-2000:]
    assert "Timeout" not in p.stdout and "timed out" not in p.stdout  # no rank waited for --dist_timeout


@pytest.mark.slow
def test_grad_checkpoint_trains_bit_identically_and_single_process_fsdp_says_so(data, tmp_path):
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    train(data, plain, epochs=1, nproc=None)
    p = train(data, ckpt, "--grad_checkpoint", "--fsdp", epochs=1, nproc=None)
    assert "--fsdp in a single process: nothing to shard, this is a plain run" in p.stdout
    assert_same_state(load_last(ckpt), load_last(plain))
