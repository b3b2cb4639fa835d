"""Writing files safely: atomically (a temporary file next to the target, fsync, rename), with one
clear error when the disk is full or the write fails otherwise, and nothing half-written left behind."""

import errno
import json
import os
import shutil

# What torch.save's zip writer says when the stream under it fails (it raises RuntimeError, with the
# OSError, e.g. "No space left on device", only as the context).
_TORCH_WRITER_MARKERS = ("inline_container", "PytorchStreamWriter", "iostream error", "file write failed")


class WriteError(OSError):
    """A file could not be written. The message names the file, why, the bytes it needed (when known)
    and the bytes free on its filesystem."""


def human_bytes(n: float) -> str:
    """Bytes in decimal units: 123 B, 4.6 kB, 7.8 MB, 252.1 GB, 1.0 TB."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def write_json(path: str, obj, indent: int | None = 1):
    """`obj` as JSON in `path`, written atomically (atomic_write); its folder is made if missing."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=indent).encode()))


def free_bytes(path: str) -> int:
    """Free bytes (for this user) on the filesystem that holds `path` or, if it does not exist yet,
    its nearest existing parent folder."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def is_write_failure(e: BaseException) -> bool:
    """True for an I/O failure: an OSError, or the RuntimeError torch.save raises when its stream fails."""
    if isinstance(e, OSError):
        return True
    if isinstance(e, RuntimeError) and any(m in str(e) for m in _TORCH_WRITER_MARKERS):
        return True
    context = e.__cause__ or e.__context__
    return context is not None and isinstance(context, OSError)


def _reason(e: BaseException) -> str:
    """The most specific message of an exception chain (the OSError under torch's RuntimeError)."""
    while not isinstance(e, OSError) and (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


def write_error(path: str, e: BaseException, needed: int | None = None) -> WriteError:
    need = f"needs about {human_bytes(needed)}, " if needed else ""
    return WriteError(f"could not write {path}: {_reason(e)} ({need}{human_bytes(free_bytes(path))} free)")


def atomic_write(path: str, write, *, needed: int | None = None):
    """Call write(f) on a binary file that becomes `path` only once complete: a temporary file in the
    same folder is flushed, fsynced and renamed over `path`, then the folder is fsynced, so that a
    crash at any moment leaves the old file (if any) intact. On an I/O failure the temporary file is
    removed and WriteError raised (`needed`: the expected size, for the message); other errors
    propagate after the same clean-up."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, Exception) and is_write_failure(e):
            raise write_error(path, e, needed) from e
        raise


def append_line(path: str, line: str):
    """Append one line to a text file in a single write; if it fails, the file is cut back to its
    previous length (no partial line) and WriteError raised. After a last line cut short (a process
    killed while writing it) the line starts on a line of its own, not glued to it."""
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        if start and os.pread(fd, 1, start - 1) != b"\n":
            data = b"\n" + data
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write")
        except OSError as e:
            os.ftruncate(fd, start)
            raise write_error(path, e) from e
    finally:
        os.close(fd)
