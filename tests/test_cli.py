"""One exit-code convention in every script (util.errors): 2 for bad input caught before any work (one
line on stderr, no traceback), 1 for a run that failed, and a bug keeps its traceback."""

import os
import runpy
import sys

import pytest
from helpers import ROOT, TINY

import engine_jit
import main_jit
from util.errors import BadInput, BadValue, MissingFile, RunFailed, exit_code
from util.files import WriteError


def test_exit_code_maps_each_kind_of_failure(capsys):
    def raises(e):
        def main():
            raise e

        return main

    assert exit_code(lambda: None) == 0 and exit_code(lambda: 3) == 3 and exit_code(lambda: {"a": 1}) == 0
    for error, code in (
        (BadInput("a"), 2),
        (BadValue("b"), 2),
        (MissingFile("c"), 2),
        (RunFailed("d"), 1),
        (WriteError("e"), 1),
    ):
        assert exit_code(raises(error)) == code
        assert capsys.readouterr().err == f"error: {error}\n"
    for bug in (ValueError("a bug"), OSError("a bug"), KeyError("a bug")):  # not input errors: they propagate
        with pytest.raises(type(bug)):
            exit_code(raises(bug))
    assert isinstance(BadValue("x"), ValueError) and isinstance(MissingFile("x"), FileNotFoundError)


def run_as_script(script: str, *args, monkeypatch, capsys) -> tuple[int, str]:
    """Run a script's `if __name__ == "__main__":` in this process, its folder first on sys.path as
    Python puts it: (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    monkeypatch.syspath_prepend(os.path.dirname(os.path.join(ROOT, script)))
    monkeypatch.delitem(
        sys.modules, "bench", raising=False
    )  # bench/ as a namespace package would shadow bench/bench.py
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "script,args,message",
    [
        (
            "main_jit.py",
            [*TINY, "--img_size", 18, "--output_dir", "out"],
            "--img_size 18 is not divisible by the patch size 4",
        ),
        (
            "main_jit.py",
            [*TINY, "--data_path", "/nonexistent/imagenet", "--output_dir", "out"],
            "--data_path /nonexistent/imagenet: no folder",
        ),
        (
            "sample.py",
            ["--resume", "/nonexistent/ckpt.pth", "--device", "cpu"],
            "--resume /nonexistent/ckpt.pth: no such file",
        ),
        ("sample.py", ["--resume", "/nonexistent/ckpt.pth", "--cfg", -1], "the CFG scale must be >= 0"),
        ("prepare_ref.py", ["--device", "cpu"], "nothing to do: give --png_dir, --stats, --ref_features and/or"),
        ("prepare_data.py", ["--data_path", "d", "--store", "s", "--img_size", 0], "--img_size must be at least 1"),
        ("bench/bench.py", ["--steps", 0, "--device", "cpu"], "--steps must be at least 1"),
        ("bench/bench_data.py", ["--batches", 0], "--batches and --batch_size must be at least 1"),
    ],
)
def test_every_script_exits_2_with_one_line_on_bad_input(script, args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing may be written: the folder stays empty
    code, err = run_as_script(script, *args, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert os.listdir(tmp_path) == []


def test_a_bug_in_the_training_loop_keeps_its_traceback(data, tmp_path, monkeypatch, capsys):
    """A ValueError deep in training is a bug, not bad input: it propagates (Python prints the
    traceback and exits 1) instead of becoming a one-line exit 2."""

    def buggy(parts, micro_batches, images_seen, batch):
        raise ValueError("an injected bug")

    monkeypatch.setattr(engine_jit, "train_step", buggy)
    with pytest.raises(ValueError, match="an injected bug"):
        main_jit.cli([*TINY, "--epochs", "1", "--data_path", data, "--output_dir", str(tmp_path)])
    assert "error: an injected bug" not in capsys.readouterr().err
