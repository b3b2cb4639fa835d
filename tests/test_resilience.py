"""Preemption and faults: atomic saves, exact resume after SIGTERM / SIGKILL, corrupt checkpoints and
images, non-finite losses."""

import math
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import (
    ROOT,
    TINY,
    assert_same_state,
    load_last,
    main_jit_here,
    make_image_folder,
    read_metrics,
    read_until,
    run_script,
)

import main_jit
from denoiser import Denoiser
from engine_jit import StepParts, build_optimizer, train_step
from model_jit import JiT_models
from util import checkpoint as ckpt_util
from util import files, logger
from util.ema import EMA
from util.logger import RunLog

# 48 images / batch 4 = 12 steps per epoch; JiT-T/4 at 32 px makes a step slow enough (tens of ms)
# that a signal sent after the first progress line lands well before the end of the run.
SLOW = [*TINY, "--model", "JiT-T/4", "--img_size", "32", "--epochs", "3"]


@pytest.fixture(scope="module")
def data(data48):
    return data48


def final_state(out):
    ckpt = load_last(out)
    assert ckpt["resume"] == {"epoch": 3, "step": 0}
    return ckpt


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_script("main_jit.py", *SLOW, "--data_path", data, "--output_dir", out)
    return final_state(out)


@pytest.mark.slow
def test_sigterm_then_same_command_is_bit_exact(data, tmp_path, uninterrupted, start):
    out = tmp_path / "out"
    args = [*SLOW, "--data_path", data, "--output_dir", out, "--resume", out]
    proc = start("main_jit.py", *args)
    read_until(proc, "Epoch [0] [1/12]")
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, rest
    assert "stop requested" in rest and "rerun the same command" in rest
    stopped = load_last(out)["resume"]
    assert stopped != {"epoch": 3, "step": 0}  # really stopped early
    p = run_script("main_jit.py", *args)
    assert f"epoch {stopped['epoch']}, step {stopped['step']}" in p.stdout
    assert_same_state(final_state(out), uninterrupted)


@pytest.mark.slow
def test_sigkill_with_step_checkpoints_then_same_command_is_bit_exact(data, tmp_path, uninterrupted, start):
    out = tmp_path / "out"
    args = [*SLOW, "--data_path", data, "--output_dir", out, "--resume", out, "--save_every_steps", "5"]
    proc = start("main_jit.py", *args)
    read_until(proc, "step 10)")  # the second step checkpoint
    proc.kill()
    proc.wait()
    p = run_script("main_jit.py", *args)
    assert "resumed from" in p.stdout
    assert_same_state(final_state(out), uninterrupted)


@pytest.mark.slow
def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    ckpt_util.save_atomic({"model": {"w": torch.ones(4)}}, str(path))
    child = textwrap.dedent(f"""
        import io, sys, time, torch
        sys.path.insert(0, {ROOT!r})
        from util import checkpoint
        real_save = torch.save
        def slow_save(obj, f):  # write half of the file, then hang until killed
            buf = io.BytesIO(); real_save(obj, buf); data = buf.getvalue()
            f.write(data[: len(data) // 2]); f.flush(); print("half written", flush=True); time.sleep(60)
        torch.save = slow_save
        checkpoint.save_atomic({{"model": {{"w": torch.zeros(100000)}}}}, {str(path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "half written"
    finally:
        proc.kill()
        proc.wait()
    assert torch.equal(ckpt_util.load_checkpoint(str(path))[0].model["w"], torch.ones(4))
    leftovers = [f for f in os.listdir(tmp_path) if ".tmp-" in f]
    assert leftovers  # the killed save's temporary file ...
    ckpt_util.remove_stale_temporaries(str(tmp_path))  # ... is cleaned up at the next start
    assert os.listdir(tmp_path) == ["checkpoint-last.pth"]


def torch_disk_full(real_save=torch.save):
    """A torch.save that writes part of the file, then fails as torch's zip writer does on a full
    disk: a RuntimeError whose context is the OSError."""

    def save(obj, f):
        real_save(obj, f)
        f.seek(f.tell() // 2)
        f.truncate()
        try:
            raise OSError(28, "No space left on device")
        except OSError as e:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from e

    return save


def test_a_full_disk_in_torch_save_is_one_line_with_sizes_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint-last.pth")
    ckpt_util.save_atomic({"model": {"w": torch.ones(2)}}, path)
    monkeypatch.setattr(torch, "save", torch_disk_full())
    with pytest.raises(files.WriteError) as e:
        ckpt_util.save_atomic({"model": {"w": torch.zeros(1000)}}, path)
    monkeypatch.undo()
    message = str(e.value)
    assert "\n" not in message and path in message and "No space left on device" in message
    assert "needs about 4.0 kB" in message and re.search(r"\d+\.\d [kMGT]?B free", message), message
    assert torch.equal(ckpt_util.load_checkpoint(path)[0].model["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["checkpoint-last.pth"]  # no temporary file left


def test_other_errors_in_torch_save_are_not_taken_for_a_full_disk(tmp_path, monkeypatch):
    def broken(obj, f):
        raise RuntimeError("a bug")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        ckpt_util.save_atomic({"w": torch.ones(2)}, str(tmp_path / "x.pth"))
    assert os.listdir(tmp_path) == []


def test_a_failed_append_leaves_no_partial_line(tmp_path, monkeypatch):
    path = str(tmp_path / "metrics.jsonl")
    files.append_line(path, '{"a": 1}')
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, data[:3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(files.WriteError, match="No space left"):
        files.append_line(path, '{"b": 2}')
    monkeypatch.undo()
    assert open(path).read() == '{"a": 1}\n'


def test_the_run_log_reports_a_failed_output_once_and_goes_on(tmp_path, monkeypatch, capsys):
    log = RunLog(str(tmp_path))
    log.record({"kind": "train", "loss": 1.0})

    def full(path, line):
        raise files.WriteError(f"could not write {path}: No space left on device")

    monkeypatch.setattr(logger, "append_line", full)
    log.record({"kind": "train", "loss": float("nan")})
    log.record({"kind": "train", "loss": 2.0})
    log.close()
    out = capsys.readouterr().out
    assert out.count("metrics.jsonl could not be written") == 1 and log.failed
    assert read_metrics(tmp_path) == [{"kind": "train", "loss": 1.0}]


@pytest.mark.slow
def test_a_failed_periodic_save_lets_training_go_on(data, tmp_path, monkeypatch, capsys):
    """The first of two saves fails: training goes on; the final one is written: status 0, with a warning."""
    torch_save = torch.save
    saves = []

    def first_fails(obj, f):
        saves.append(1)
        return (torch_disk_full(torch_save) if len(saves) == 1 else torch_save)(obj, f)

    monkeypatch.setattr(torch, "save", first_fails)
    args = main_jit.parse_args(
        [
            *TINY,
            "--epochs",
            "2",
            "--batch_size",
            "8",
            "--save_last_freq",
            "1",
            "--data_path",
            data,
            "--output_dir",
            str(tmp_path),
        ]
    )
    assert main_jit.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("could not write") == 1 and "No space left on device" in out and "training goes on" in out
    assert (
        "Epoch [1] [6/6]" in out
        and "1 checkpoint(s) of this run could not be written" in out
        and "training done" in out
    )
    assert ckpt_util.load_checkpoint(str(tmp_path / "checkpoint-last.pth"))[0].start == {"epoch": 2, "step": 0}


@pytest.mark.slow
def test_a_run_whose_final_checkpoint_fails_exits_non_zero_and_says_what_is_on_disk(
    data, tmp_path, monkeypatch, capsys
):
    args = main_jit.parse_args(
        [
            *TINY,
            "--epochs",
            "2",
            "--batch_size",
            "8",
            "--save_last_freq",
            "1",
            "--data_path",
            data,
            "--output_dir",
            str(tmp_path),
        ]
    )
    run = main_jit.setup(args)
    torch_save = torch.save
    saves = []

    def second_fails(obj, f):  # epoch 0 is written, epoch 1 (the final one) is not
        saves.append(1)
        return (torch_disk_full(torch_save) if len(saves) == 2 else torch_save)(obj, f)

    monkeypatch.setattr(torch, "save", second_fails)
    try:
        assert main_jit.train(run) == 1
    finally:
        run.close()
    out = capsys.readouterr().out
    last = tmp_path / "checkpoint-last.pth"
    assert f"the newest readable checkpoint is {last} (resume at epoch 1, step 0)" in out and "training done" not in out
    assert ckpt_util.load_checkpoint(str(last))[0].start == {"epoch": 1, "step": 0}
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


@pytest.fixture
def small_disk(tmp_path):
    """A real 10 MB filesystem (tmpfs): one checkpoint of the tiny model (6.8 MB) fits, two do not."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {p.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.slow
def test_a_real_full_disk(data, small_disk):
    out = small_disk / "out"
    p = run_script(
        "main_jit.py",
        *TINY,
        "--epochs",
        "3",
        "--batch_size",
        "8",
        "--save_last_freq",
        "1",
        "--data_path",
        data,
        "--output_dir",
        out,
        check=False,
    )
    assert p.returncode == 1, p.stdout
    assert "free, but saving a checkpoint" in p.stdout  # said at the start
    assert re.search(
        rf"could not write {out}/checkpoint-last.pth: No space left on device \(needs about 6\.\d MB, "
        r"\d+\.\d MB free\)",
        p.stdout,
    ), p.stdout
    assert f"the newest readable checkpoint is {out}/checkpoint-last.pth (resume at epoch 1, step 0)" in p.stdout
    assert "Traceback" not in p.stdout and "training done" not in p.stdout
    assert ckpt_util.load_checkpoint(str(out / "checkpoint-last.pth"))[0].start == {"epoch": 1, "step": 0}
    assert not [f for f in os.listdir(out) if ".tmp-" in f]
    records = read_metrics(out)  # whole JSON lines only (a cut line would not parse), each step's until the disk filled
    expected = [(e, s) for e in range(3) for s in range(1, 7)]  # --log_freq 1, 6 steps per epoch
    assert records and [(r["kind"], r["epoch"], r["step"]) for r in records] == [
        ("train", *k) for k in expected[: len(records)]
    ]


@pytest.mark.slow
def test_truncated_checkpoint_is_a_clear_error_and_a_folder_falls_back(data, tmp_path):
    out = tmp_path / "out"
    assert main_jit_here(*TINY, "--epochs", "2", "--save_last_freq", "1", "--data_path", data, "--output_dir", out) == 0
    last = out / "checkpoint-last.pth"
    older = out / "checkpoint-1.pth"
    os.rename(last, older)
    os.utime(older, (1, 1))  # make it the older one
    assert main_jit_here(*TINY, "--epochs", "3", "--data_path", data, "--output_dir", out, "--resume", out) == 0
    blob = last.read_bytes()
    last.write_bytes(blob[: len(blob) // 2])
    p = run_script(
        "main_jit.py", *TINY, "--epochs", "3", "--data_path", data, "--output_dir", out, "--resume", last, check=False
    )
    assert p.returncode == 2 and f"cannot read checkpoint {last}" in p.stdout and "Traceback" not in p.stdout
    p = run_script(
        "main_jit.py", *TINY, "--epochs", "3", "--data_path", data, "--output_dir", out, "--resume", out, "--dry_run"
    )
    assert f"cannot read checkpoint {last}" in p.stdout
    assert f"resuming from the older checkpoint {older}" in p.stdout and "epoch 2, step 0" in p.stdout


@pytest.mark.slow
def test_unreadable_images_are_replaced_and_reported(tmp_path):
    data = make_image_folder(str(tmp_path / "data"))
    (tmp_path / "data" / "train" / "c0" / "empty.jpg").write_bytes(b"")
    (tmp_path / "data" / "train" / "c1" / "notes.png").write_text("not an image")
    out = tmp_path / "out"
    p = run_script(
        "main_jit.py",
        *TINY,
        "--epochs",
        "1",
        "--batch_size",
        "2",
        "--max_bad_frac",
        "0.2",
        "--data_path",
        data,
        "--output_dir",
        out,
    )
    assert "empty.jpg" in p.stdout and "notes.png" in p.stdout
    assert "2 unreadable images were replaced" in p.stdout
    assert (out / "checkpoint-last.pth").exists()
    p = run_script(
        "main_jit.py",
        *TINY,
        "--epochs",
        "1",
        "--batch_size",
        "2",
        "--data_path",
        data,
        "--output_dir",
        tmp_path / "o2",
        check=False,
    )
    assert p.returncode == 1 and "unreadable images in epoch 0" in p.stdout and "--max_bad_frac" in p.stdout


def tiny_training_objects():
    torch.manual_seed(0)
    d = Denoiser(JiT_models["JiT-XS/4"](input_size=16, num_classes=3), num_classes=3)
    opt = build_optimizer(d, 1e-3, 0.0)
    return d, opt, [EMA(d, 0.9), EMA(d, 0.5)]


def test_a_nan_loss_is_skipped_and_leaves_weights_optimizer_and_emas_finite():
    d, opt, emas = tiny_training_objects()
    cpu = torch.device("cpu")
    x, y = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8), torch.tensor([0, 1, 2, 0])
    parts = StepParts(d, d, opt, emas, cpu)
    train_step(parts, [(x, y)])  # one good step
    before = {k: v.clone() for k, v in d.state_dict().items()}
    opt_before = {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()}
    real_forward = d.net.forward
    d.net.forward = lambda z, t, y_: real_forward(z, t, y_) * float("nan")  # inject a NaN loss
    loss, skipped = train_step(parts, [(x, y)])
    assert math.isnan(loss.item()) and skipped.item() == 1.0
    for k, v in d.state_dict().items():
        assert torch.equal(v, before[k]), k
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            assert torch.equal(v, opt_before[i][k]), (i, k)
    assert all(torch.isfinite(p).all() for e in emas for p in e.module.parameters())
    d.net.forward = real_forward
    _, skipped = train_step(parts, [(x, y)])
    assert skipped.item() == 0.0 and float(next(iter(opt.state.values()))["step"]) == 2.0


def test_a_run_of_non_finite_steps_stops_without_saving(data, tmp_path, capsys):
    args = main_jit.parse_args(
        [*TINY, "--epochs", "2", "--max_nonfinite_steps", "3", "--data_path", data, "--output_dir", str(tmp_path)]
    )
    run = main_jit.setup(args)
    real_forward = run.parts.denoiser.net.forward
    run.parts.denoiser.net.forward = lambda z, t, y: real_forward(z, t, y) * float("nan")
    try:
        assert main_jit.train(run) == 1
    finally:
        run.close()
    out = capsys.readouterr().out
    assert "not finite for 3 steps in a row" in out
    assert not (tmp_path / "checkpoint-last.pth").exists()


@pytest.mark.slow
def test_resume_with_another_world_size_works_and_says_so(data, tmp_path):
    out = tmp_path / "out"
    assert main_jit_here(*TINY, "--epochs", "1", "--data_path", data, "--output_dir", out) == 0
    p = run_script(
        "main_jit.py", *TINY, "--epochs", "2", "--data_path", data, "--output_dir", out, "--resume", out, nproc=2
    )
    assert "written by 1 processes, this run has 2" in p.stdout and "not bit-exactly" in p.stdout
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["epoch"] == 1
