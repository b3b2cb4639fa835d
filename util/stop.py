"""Ending a run cleanly: `StopSignal` records the signals schedulers send before a kill (SIGTERM,
SIGUSR1), which the loops poll; `StopRun` ends training with an exit status; `GenerationStopped`
ends a sample grid or an evaluation between two batches.

An entry point calls `install()` first thing, so that a signal that arrives while the run is set up
(reading data, building the model, loading a checkpoint) is recorded too: the workers of
scripts/slurm/train.sbatch start with SIGUSR1 ignored, and until a handler is installed it is lost.
"""

import signal

from util import distributed


class StopRun(Exception):
    """Raised to end training cleanly; `code` is the process exit status (0: a stop by signal)."""

    def __init__(self, message: str, code: int = 0):
        super().__init__(message)
        self.code = code


class GenerationStopped(StopRun):
    """A stop by signal seen between two generation batches of a sample grid or an evaluation."""


class StopSignal:
    """Records SIGTERM / SIGUSR1 (what schedulers send before a kill); the loop saves and exits.
    close() puts the previous handlers back."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = 0
        self.previous = [signal.signal(sig, self._handler) for sig in self.SIGNALS]

    def _handler(self, signum, frame):
        self.requested = signum

    def close(self):
        global _installed
        for sig, handler in zip(self.SIGNALS, self.previous):
            signal.signal(sig, handler)
        if _installed is self:
            _installed = None


_installed: StopSignal | None = None


def install(factory=StopSignal) -> StopSignal:
    """This process's StopSignal, made by `factory` at the first call (until its close())."""
    global _installed
    if _installed is None:
        _installed = factory()
    return _installed


def requested_anywhere(stopper: StopSignal | None) -> bool:
    """Collective (one host all-reduce): whether a stop was requested on any rank (None: never)."""
    return distributed.host_all_reduce_sum([float(stopper.requested if stopper else 0)])[0] > 0


def raise_if_requested(stopper: StopSignal | None, when: str):
    """Collective: raise GenerationStopped when a stop was requested on any rank (`when`: where it is
    seen, for the message: 'stop requested (signal) {when}')."""
    if stopper is not None and requested_anywhere(stopper):
        raise GenerationStopped(f"stop requested (signal) {when}")


def raise_if_requested_at_set_up(stopper: StopSignal | None, checkpoint: str | None):
    """Collective: raise_if_requested before the first step, the message saying what a rerun starts from
    (`checkpoint`: the one resumed, None: none, and none was written)."""
    since = "since the checkpoint" if checkpoint else "and no checkpoint exists yet (a rerun starts afresh)"
    raise_if_requested(stopper, f"during the set-up: nothing was trained {since}, exiting")
