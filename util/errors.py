"""The exit-code convention of every script in this repo.

    2  bad input caught before any work starts: one line `error: ...` on stderr, no traceback
    1  a run that failed: a file that could not be written (a full disk), no final checkpoint
    a real bug (any other exception) keeps its traceback (Python exits with 1)

Checks raise `BadInput` (or its ValueError / FileNotFoundError kinds; one-line message); the scripts'
entry points call `exit_code`.
"""

import sys

from util.files import WriteError


class BadInput(Exception):
    """Input that cannot work (a wrong path, flag or file), found before any expensive work."""


class BadValue(BadInput, ValueError):
    """A flag or file whose value cannot work."""


class MissingFile(BadInput, FileNotFoundError):
    """A file or folder the run needs does not exist."""


class RunFailed(Exception):
    """A run that started and could not finish (one-line message: what is left and what to do)."""


def exit_code(main, *args) -> int:
    """main(*args) as a process exit status: its return value if an int (anything else: 0), 2 for BadInput and 1 for
    RunFailed or a WriteError, each with its one-line message on stderr. Other exceptions propagate."""
    try:
        code = main(*args)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except (RunFailed, WriteError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return code if isinstance(code, int) else 0
