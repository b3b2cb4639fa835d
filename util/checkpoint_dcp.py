"""Sharded checkpoints: the folder form an FSDP run writes, every rank its own shards at once, through
torch.distributed.checkpoint (DCP). The layout of `checkpoint-NAME.dcp/`:

    .metadata, __R_0.distcp   DCP's: the tensors, each rank's shards in its own file. Parts (PART keys):
                              model, model_ema1 .. 3, model_phema/i (power EMA i), optimizer (the AdamW
                              moments exp_avg / exp_avg_sq by parameter name)
    train_state.pth           rank 0's torch.save of the rest (read with weights_only): epoch, args,
                              resume, rng, world_size, phema_stds, the AdamW param_groups (parameters
                              by name) and step counters, the parts held and the order of the keys

A checkpoint counts only once complete: it is written into a hidden temporary folder beside it and
renamed into place (`publish_folder`), so a crash at any moment leaves the previous one intact.

Reading: `read` gives the checkpoint as the dict of a single-file checkpoint (util.checkpoint.to_dict's
keys), each part a `Part` that reads its full tensors when first used (any process, no process
group), so that --evaluate_gen, export.py, sample.py, --init_from and a DDP or one-process resume read
this form as they read a file. `load_sharded` loads it into a sharded run: each rank reads only what
its shards need, at any world size (DCP reshards). DCP's .metadata is a pickle: it is read with an
unpickler that admits only DCP's own metadata classes (`SafeReader`).
"""

import contextlib
import io
import os
import pickle
import shutil
import time
import warnings
from collections.abc import Mapping

import torch

from util import distributed, files
from util.errors import BadInput

SUFFIX = ".dcp"
STATE_FILE = "train_state.pth"
METADATA = ".metadata"


def is_dcp(path: str) -> bool:
    """Whether `path` is a complete DCP checkpoint folder (its metadata and train state written)."""
    return all(os.path.isfile(os.path.join(path, f)) for f in (METADATA, STATE_FILE))


def dcp():
    """torch.distributed.checkpoint, imported at first use (runs that never shard do not pay for it)."""
    import torch.distributed.checkpoint as module

    return module


@contextlib.contextmanager
def one_process():
    """Silences DCP's warning that it "assumes the intent" to work in a single process: we mean it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: DCP's classes, torch.Size, dtypes, layouts and paths."""

    def find_class(self, module, name):
        if module.startswith("torch.distributed.checkpoint.") or (module, name) in (
            ("torch", "Size"),
            ("torch.serialization", "_get_layout"),
            ("pathlib", "PosixPath"),
            ("pathlib", "PurePosixPath"),
            ("collections", "OrderedDict"),
        ):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP checkpoint's metadata")


def safe_reader(folder: str):
    """A DCP FileSystemReader of `folder` whose metadata is read by _MetadataUnpickler."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(os.path.join(self.path, METADATA), "rb") as f:
                metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
            metadata.storage_meta = None
            return metadata

    return SafeReader(folder)


class UnreadableFolder(BadInput, OSError):
    """A sharded checkpoint whose files are missing, cut short or damaged (bad input: exit 2)."""


def read_metadata(folder: str):
    """The folder's DCP metadata, once every file it names is present and long enough (check_shard_files)."""
    metadata = safe_reader(folder).read_metadata()
    check_shard_files(folder, metadata)
    return metadata


def check_shard_files(folder: str, metadata):
    """UnreadableFolder naming the first shard file of `folder` that is missing or shorter than the
    metadata's byte ranges into it (a copy cut short, a file deleted): found by a stat of each file,
    before anything is read, so that a run folder's older checkpoint can be taken instead."""
    needed = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        try:
            have = os.path.getsize(os.path.join(folder, name))
        except OSError as e:
            raise UnreadableFolder(
                f"cannot read checkpoint {folder}: shard file {name} is missing ({e.strerror})"
            ) from None
        if have < size:
            raise UnreadableFolder(
                f"cannot read checkpoint {folder}: shard file {name} is cut short ({have} bytes, "
                f"its metadata needs {size})"
            )


@contextlib.contextmanager
def reading(folder: str):
    """Context: DCP's failure to read `folder` (a CheckpointException, which is a BaseException) as one
    line, UnreadableFolder."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        cause = next(iter(e.failures.values()))[0]
        first = " ".join(str(cause).strip().splitlines()[:1])[:300]
        raise UnreadableFolder(f"cannot read checkpoint {folder}: {type(cause).__name__}: {first}") from None


def read_state(folder: str) -> dict:
    """train_state.pth of a DCP folder (weights_only)."""
    return torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)


def shapes(metadata, part: tuple) -> dict:
    """{key: shape} of the tensors of a network's part (("model",), ("model_phema", "0"), ...) from the
    metadata."""
    n = len(part)
    return {
        path[n]: tuple(metadata.state_dict_metadata[fqn].size)
        for fqn, path in metadata.planner_data.items()
        if tuple(path[:n]) == part
    }


def version(folder: str) -> tuple[int, int]:
    """Which save the folder holds now: (modification time in ns, size) of its .metadata, written last."""
    st = os.stat(os.path.join(folder, METADATA))
    return st.st_mtime_ns, st.st_size


def read_full(folder: str, part: tuple, expected: tuple | None = None) -> dict:
    """The full tensors of one part, read into this process (no process group): {key: tensor} for a
    network's part; for ("optimizer",), {parameter name: {"exp_avg": t, "exp_avg_sq": t}}. `expected`:
    the folder's `version` when its other contents were read; UnreadableFolder if another save has
    replaced it since (a run saving there while this process reads: its parts would mix two saves)."""
    _check_version(folder, expected)
    metadata = read_metadata(folder)
    template, n = {}, len(part)
    for fqn, path in metadata.planner_data.items():
        if tuple(path[:n]) == part:
            md = metadata.state_dict_metadata[fqn]
            node = template
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = torch.empty(md.size, dtype=md.properties.dtype)
    with one_process(), reading(folder):
        dcp().load(template, storage_reader=safe_reader(folder), no_dist=True)
    _check_version(folder, expected)
    for key in part:
        template = template[key]
    return template


def _check_version(folder: str, expected: tuple | None):
    try:
        same = expected is None or version(folder) == expected
    except OSError:
        same = False
    if not same:
        raise UnreadableFolder(
            f"cannot read checkpoint {folder}: another save replaced it while this process read it (a run saving "
            "there): run the command again"
        )


class Part(Mapping):
    """The full tensors of one network part of a DCP checkpoint as a read-only state dict ({key:
    tensor}), read when first used and kept until `release`. Pickles as its address only."""

    def __init__(self, folder: str, part: tuple, order: list[str], expected: tuple | None = None):
        self.folder, self.part, self.order, self.expected = folder, part, order, expected
        self._data = None

    def data(self) -> dict:
        if self._data is None:
            found = read_full(self.folder, self.part, self.expected)
            self._data = {k: found[k] for k in self.order if k in found}
        return self._data

    def release(self):
        self._data = None

    def __getitem__(self, key):
        return self.data()[key]

    def __iter__(self):
        return iter(self.data())

    def __len__(self):
        return len(self.data())

    def __getstate__(self):
        return {**self.__dict__, "_data": None}


class OptimizerPart(Mapping):
    """The AdamW state of a DCP checkpoint as `torch.optim.AdamW.state_dict()` of an unsharded model:
    {"state": {index: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]}, parameters numbered
    group by group. The step counters come from train_state.pth; the moments are read (all at once)
    when one is first used."""

    def __init__(self, folder: str, groups: list[dict], steps: dict, expected: tuple | None = None):
        self.folder, self.groups, self.steps, self.expected = folder, groups, steps, expected
        self.names = [n for g in groups for n in g["params"]]
        self._moments = None

    def moments(self) -> dict:
        if self._moments is None:
            self._moments = read_full(self.folder, ("optimizer",), self.expected)
        return self._moments

    def release(self):
        self._moments = None

    def __getitem__(self, key):
        if key == "param_groups":
            index = {n: i for i, n in enumerate(self.names)}
            return [dict(g, params=[index[n] for n in g["params"]]) for g in self.groups]
        if key == "state":
            return {i: _ParamState(self, n) for i, n in enumerate(self.names) if n in self.steps}
        raise KeyError(key)

    def __iter__(self):
        return iter(("state", "param_groups"))

    def __len__(self):
        return 2

    def __getstate__(self):
        return {**self.__dict__, "_moments": None}


class _ParamState(Mapping):
    """One parameter's AdamW state in an OptimizerPart: its step counter without reading the moments."""

    KEYS = ("step", "exp_avg", "exp_avg_sq")

    def __init__(self, owner: OptimizerPart, name: str):
        self.owner, self.name = owner, name

    def __getitem__(self, key):
        if key == "step":
            return self.owner.steps[self.name]
        if key in self.KEYS:
            return self.owner.moments()[self.name][key]
        raise KeyError(key)

    def __iter__(self):
        return iter(self.KEYS)

    def __len__(self):
        return len(self.KEYS)


def read(folder: str) -> dict:
    """A DCP checkpoint as the dict of a single-file one (util.checkpoint.to_dict's keys), its parts
    read when first used (UnreadableFolder if another save has replaced the folder by then). OSError /
    RuntimeError / pickle errors for a damaged folder."""
    expected = version(folder)
    rest = read_state(folder)
    read_metadata(folder)  # fails now for a damaged folder, not at the first use
    _check_version(folder, expected)
    order = rest["order"]
    ckpt = {k: rest[k] for k in ("epoch", "args", "resume", "rng", "world_size")}
    for key in rest["parts"]:
        if key != "model_phema":
            ckpt[key] = Part(folder, (key,), order, expected)
    if rest["phema_stds"]:
        ckpt["model_phema"] = [
            Part(folder, ("model_phema", str(i)), order, expected) for i in range(len(rest["phema_stds"]))
        ]
        ckpt["phema_stds"] = rest["phema_stds"]
    if rest["param_groups"] is not None:
        ckpt["optimizer"] = OptimizerPart(folder, rest["param_groups"], rest["steps"], expected)
    return ckpt


def plain(obj):
    """A nest of dicts and lists with every Part / OptimizerPart read into plain dicts (what torch.save
    and torch.optim's load_state_dict take)."""
    if isinstance(obj, Mapping):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    return obj


def release_shards(obj):
    """Drop what a Part / OptimizerPart has read (the next use reads it again); others: nothing."""
    if isinstance(obj, (Part, OptimizerPart)):
        obj.release()


def temporary_name(path: str, token: str) -> str:
    """The hidden folder a checkpoint `path` is written into before `publish_folder`."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{token}")


def _fsync_folder(folder: str):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_folder(tmp: str, path: str):
    """Put the complete folder `tmp` in place as `path`, replacing an older one: the older is first
    renamed aside (.NAME.old-*), then `tmp` renamed to `path`, then the older deleted. A crash between
    the two renames leaves no `path`; `recover` puts the older back. A second rename that fails puts it
    back at once (the error is raised)."""
    old = None
    if os.path.exists(path):
        # unique per save: an older one that could not be deleted (NFS keeps a folder whose files another
        # process still has open) must not make every later save of this process fail
        old = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.old-{os.getpid()}-{time.time_ns()}")
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except OSError:
        if old:
            os.rename(old, path)
        raise
    _fsync_folder(os.path.dirname(os.path.abspath(path)))
    if old:
        shutil.rmtree(old, ignore_errors=True)


def recover(folder: str, prefix: str = ".checkpoint-"):
    """Clean up after saves that were killed: delete their temporary folders, and put back an older
    checkpoint set aside by `publish_folder` if its replacement never arrived (else delete it)."""
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if not (name.startswith(prefix) and SUFFIX in name):
            continue
        path = os.path.join(folder, name)
        stem, _, kind = name[1:].rpartition(".")
        target = os.path.join(folder, stem)
        if kind.startswith("old-") and not os.path.exists(target) and is_dcp(path):
            os.rename(path, target)
        elif kind.startswith(("old-", "tmp-")):
            shutil.rmtree(path, ignore_errors=True)


def write_folder(path: str, tensors: dict, rest: dict, *, needed: int, group=None):
    """Collective: write the DCP checkpoint `path` (a folder) and publish it once complete. tensors:
    the nest of this rank's tensors (sharded DTensors: each rank writes its shards); rest: what rank 0
    writes to train_state.pth; group: the process group DCP plans on (default: the control group).
    A failed write on any rank raises util.files.WriteError on every rank (one line: the folder, why,
    `needed` bytes and the bytes free); the temporary folder is then removed and the older checkpoint
    stays."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.api import CheckpointException

    tmp = temporary_name(path, distributed.broadcast_object(f"{os.getpid()}-{time.time_ns()}"))
    error = None
    if distributed.is_main_process():
        error = _attempt(path, needed, lambda: _write_state(tmp, rest))
    error = distributed.broadcast_object(error)
    if error is None:
        group, alone = group or distributed.control_group(), not distributed.is_dist()
        try:
            with one_process():
                dcp().save(tensors, storage_writer=FileSystemWriter(tmp), process_group=group, no_dist=alone)
        except CheckpointException as e:
            cause = next(iter(e.failures.values()))[0]
            if not files.is_write_failure(cause):
                raise
            error = str(files.write_error(path, cause, needed))
    if error is None and distributed.is_main_process():
        error = _attempt(path, needed, lambda: publish_folder(tmp, path))
    error = distributed.broadcast_object(error)
    if error is not None:
        if distributed.is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
        raise files.WriteError(error)


def _write_state(tmp: str, rest: dict):
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, STATE_FILE), "wb") as f:
        torch.save(rest, f)
        f.flush()
        os.fsync(f.fileno())


def _attempt(path: str, needed: int, step) -> str | None:
    """step(); the one-line message of an I/O failure (None: done)."""
    try:
        step()
    except Exception as e:
        if not files.is_write_failure(e):
            raise
        return str(files.write_error(path, e, needed))
    return None
