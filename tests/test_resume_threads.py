"""Bit-exact resume and the CPU's intra-op thread count. CPU kernels split their sums (matrix products,
the batch sums of weight gradients) between threads, so one training step at 1 and at 2 threads differs in
the last bits, and a run continued at another count drifts from the original. Two things follow: every
run of the test process uses one count, module- and session-scoped fixtures included (conftest.THREADS;
with OMP_NUM_THREADS=1 a module fixture once ran at 1 thread and the tests at 2, and the SIGTERM resume
of test_phema_train.py failed), and a CPU run resumed at another count says that it is not exact."""

import pytest
import torch
from helpers import tiny_denoiser

from engine_jit import build_optimizer
from util import checkpointer
from util.ema import EMA


@pytest.fixture(scope="module")
def module_threads() -> int:
    return torch.get_num_threads()


@pytest.fixture(scope="session")
def session_threads() -> int:
    return torch.get_num_threads()


def test_fixtures_of_every_scope_run_at_the_tests_thread_count(module_threads, session_threads):
    assert module_threads == session_threads == torch.get_num_threads()


def new_checkpointer(folder) -> checkpointer.Checkpointer:
    denoiser = tiny_denoiser().train()
    emas = [EMA(denoiser, 0.99), EMA(denoiser, 0.9)]
    optimizer = build_optimizer(denoiser, 1e-3, 0.0)
    return checkpointer.Checkpointer(str(folder), torch.device("cpu"), denoiser, emas, optimizer, {"model": "tiny"})


def test_a_cpu_resume_at_another_thread_count_says_it_is_not_bit_exact(tmp_path, capsys):
    torch.set_num_threads(1)
    assert new_checkpointer(tmp_path).save(0, 3, 6)
    path = str(tmp_path / "checkpoint-last.pth")
    expected = torch.randn(4)  # the draw that follows the saved RNG state
    capsys.readouterr()

    for threads, noted in ((1, False), (2, True)):
        torch.set_num_threads(threads)
        loader = new_checkpointer(tmp_path / "new")
        start = loader.restore(*loader.load(path))
        out = capsys.readouterr().out
        assert (start.epoch, start.step) == (0, 3) and torch.equal(torch.randn(4), expected)  # RNG restored either way
        note = f"note: {path} was written by processes of 1 CPU threads, this run has {threads}"
        assert (note in out) == noted and ("not bit-exactly" in out) == noted, out

    state, _ = loader.load(path)
    del state.rng[0]["threads"]  # a file written before the count was stored: nothing to compare
    assert checkpointer.thread_note(state.rng[0], torch.device("cpu"), path) is None
    state.rng[0]["threads"] = 1
    assert (
        checkpointer.thread_note(state.rng[0], torch.device("cuda"), path) is None
    )  # the GPU's sums do not depend on it
