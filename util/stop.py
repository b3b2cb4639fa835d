"""Ending a run cleanly: `StopSignal` records the signals schedulers send before a kill (SIGTERM,
SIGUSR1), which the loops poll; `StopRun` ends training with an exit status."""

import signal


class StopRun(Exception):
    """Raised to end training cleanly; `code` is the process exit status."""

    def __init__(self, message: str, code: int = 0):
        super().__init__(message)
        self.code = code


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
        for sig, handler in zip(self.SIGNALS, self.previous):
            signal.signal(sig, handler)
