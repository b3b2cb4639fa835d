"""A pixel-exact preprocessed image store: the ADM center crops of an ImageFolder tree, decoded once.

Written by prepare_data.py. A store folder holds
    shard_00000.npy ...   uint8 (n, 3, size, size): center_crop_arr of each readable source image,
                          transposed to channels-first; shard k covers source indices
                          [k·shard_size, (k+1)·shard_size), unreadable files left out
    labels.npy            int64 (N,): ImageFolder class index of each stored image
    source_index.npy      int64 (N,): its index in the ImageFolder listing (store index != source
                          index once unreadable files are left out)
    manifest.json         format version, settings, classes, per-file sizes and checksums, the
                          unreadable files with reasons; written last, so its presence means complete
    settings.json, shard_*.json   conversion settings and per-shard records (for resuming)

`StoreDataset` reads it with the same items as util.data.CenterCropFolder, plus batched access.
"""

import hashlib
import json
import math
import mmap
import os

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from util.errors import BadValue, MissingFile

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SAMPLE_BLOCK = 1 << 20  # bytes hashed at each end of a shard by sample_checksum
HUGE_PAGE_MIN = 2 << 20  # bytes from which batch_buffer maps a batch in transparent huge pages


def is_store(path: str) -> bool:
    """True if `path` is a folder holding a finished store (its manifest.json)."""
    return os.path.isfile(os.path.join(path, MANIFEST))


def file_sha256(path: str, chunk: int = 1 << 24) -> str:
    """sha256 hex digest of a whole file (what `sha256sum` prints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sample_checksum(path: str) -> str:
    """Cheap fingerprint of a file: sha256 of its size (8 bytes), first and last SAMPLE_BLOCK bytes."""
    size = os.path.getsize(path)
    h = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE_BLOCK))
        f.seek(max(size - SAMPLE_BLOCK, 0))
        h.update(f.read(SAMPLE_BLOCK))
    return h.hexdigest()


def read_manifest(path: str) -> dict:
    """The manifest of the store at `path`; raises FileNotFoundError / ValueError with a one-line reason."""
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise MissingFile(
            f"{path} is not a finished image store (no {MANIFEST}): build it with "
            f"prepare_data.py, or rerun the interrupted conversion with the same command"
        )
    try:
        with open(file) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise BadValue(f"{file} is unreadable ({e}): rebuild the store with prepare_data.py") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise BadValue(
            f"store {path} has format version {version}, this code reads version {FORMAT_VERSION}: "
            f"rebuild it with this prepare_data.py"
        )
    return manifest


def damaged(path: str, what: str) -> str:
    """The message for a store whose files do not match its manifest, saying how to repair it."""
    return (
        f"store {path} is damaged: {what}. Delete {os.path.join(path, MANIFEST)} and rerun the "
        f"prepare_data.py command that made it: damaged shards are redone, the others kept"
    )


def check_files(path: str, manifest: dict):
    """Every shard and index file is present with its recorded byte size and sample checksum."""
    entries = manifest["shards"] + [manifest["labels"], manifest["source_index"]]
    for e in entries:
        file = os.path.join(path, e["file"])
        if not os.path.isfile(file):
            raise MissingFile(damaged(path, f"{e['file']} is missing"))
        size = os.path.getsize(file)
        if size != e["bytes"]:
            raise BadValue(damaged(path, f"{e['file']} has {size} bytes, the manifest records {e['bytes']}"))
        if sample_checksum(file) != e["sample_sha256"]:
            raise BadValue(damaged(path, f"{e['file']} does not match its sample checksum"))


def batch_buffer(shape: tuple, pin_memory: bool = False) -> torch.Tensor:
    """An uninitialised uint8 tensor of `shape` for one batch (contiguous, writable).

    Pinned on request, and a plain tensor in a DataLoader worker (sent on in shared memory). Otherwise,
    from HUGE_PAGE_MIN bytes and where Linux offers it, a private anonymous mapping advised to use
    transparent huge pages: filling a fresh 100 MB batch (128 images at 512 px) takes 25,600 page
    faults in 4 KiB pages and 50 in 2 MiB ones (about 2x the store's img/s at 512 px in
    bench/bench_data.py, bench/README.md). The tensor keeps the mapping alive; it is unmapped with it.
    """
    nbytes = math.prod(shape)
    if pin_memory or nbytes < HUGE_PAGE_MIN or not hasattr(mmap, "MADV_HUGEPAGE") or get_worker_info() is not None:
        return torch.empty(shape, dtype=torch.uint8, pin_memory=pin_memory)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buf, dtype=torch.uint8).view(shape)


def check_img_size(path: str, manifest: dict, img_size: int):
    """ValueError (what to do) unless the store at `path` holds img_size px images."""
    if manifest["img_size"] != img_size:
        raise BadValue(
            f"store {path} holds {manifest['img_size']} px images but --img_size is {img_size}: "
            f"use --img_size {manifest['img_size']} or build a {img_size} px store with prepare_data.py"
        )


class StoreDataset(Dataset):
    """A finished store -> the items of util.data.CenterCropFolder, without decoding.

    `dataset[(index, flip)]` -> (uint8 (3, size, size), int label, 0), as CenterCropFolder.
    `dataset[[(i0, f0), (i1, f1), ...]]` (or `batch(keys)`) -> the collated batch (uint8 (B, 3,
    size, size), int64 labels (B,), int64 zeros (B,)), equal to default_collate of the single items.
    `batched` tells util.data.make_loader to gather whole batches (ThreadedBatches); a DataLoader
    works too, with sampler=BatchSampler(sampler, B, drop_last=True) and batch_size=None. Shards are
    memory-mapped lazily in each process (all share the page cache); pickling carries only the manifest.
    """

    batched = True

    def __init__(self, path: str, img_size: int):
        manifest = read_manifest(path)
        check_img_size(path, manifest, img_size)
        check_files(path, manifest)
        self.path, self.image_size = path, img_size
        self.classes = manifest["classes"]
        self.files = [s["file"] for s in manifest["shards"]]
        counts = np.array([s["count"] for s in manifest["shards"]], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # (shards + 1,) first store index of each shard
        self.n = int(self.starts[-1])
        if self.n != manifest["images"]:
            raise BadValue(damaged(path, f"its shards hold {self.n} images, the manifest records {manifest['images']}"))
        self._shards, self._labels = None, None

    def __len__(self):
        return self.n

    def __getstate__(self):
        return {**self.__dict__, "_shards": None, "_labels": None}  # each process maps the files itself

    def _open(self):
        """Map the shards and labels read-only (idempotent: threads racing here map the same files)."""
        if self._shards is None:
            arrays = [np.load(os.path.join(self.path, f), mmap_mode="r") for f in self.files]
            self._labels = np.load(os.path.join(self.path, "labels.npy"), mmap_mode="r")
            bad = [
                f
                for f, a, c in zip(self.files, arrays, np.diff(self.starts))
                if a.shape != (c, 3, self.image_size, self.image_size) or a.dtype != np.uint8
            ]
            if bad or self._labels.shape != (self.n,):
                raise BadValue(damaged(self.path, f"{(bad or ['labels.npy'])[0]} has the wrong shape"))
            self._shards = arrays  # (count, 3, H, W) uint8 each

    def _locate(self, index: np.ndarray) -> tuple[list, list]:
        """Store indices (B,) -> (shard number, index within the shard) of each; IndexError outside [0, len)."""
        if index.size and (index.min() < 0 or index.max() >= self.n):
            raise IndexError(f"store index out of range [0, {self.n})")
        shard = np.searchsorted(self.starts, index, side="right") - 1
        return shard.tolist(), (index - self.starts[shard]).tolist()

    def __getitem__(self, key):
        if isinstance(key, list):
            return self.batch(key)
        images, labels, bad = self.batch([key])
        return images[0], int(labels[0]), 0

    def batch(self, keys: list, pin_memory: bool = False):
        """The collated batch of [(index, flip), ...]; pin_memory: the images in pinned memory.

        One numpy copy per image, from the mapping straight into the batch (flipped ones read
        backwards): faster than fancy indexing per shard, as a random batch touches about as many
        shards as images, and unlike torch's copy it starts no intra-op threads, which on a loader
        thread fight the training thread's (5x slower at 256 px, measured).
        """
        self._open()
        index = np.fromiter((k[0] for k in keys), dtype=np.int64, count=len(keys))  # (B,)
        images = batch_buffer((len(keys), 3, self.image_size, self.image_size), pin_memory)
        if get_worker_info() is not None:
            images.share_memory_()  # in a DataLoader worker: sent to the main process without another copy
        for out, s, i, (_, flip) in zip(images.numpy(), *self._locate(index), keys):
            src = self._shards[s][i]  # (3, H, W) view of the mapping
            np.copyto(out, src[:, :, ::-1] if flip else src)
        labels = torch.from_numpy(self._labels[index])  # (B,) int64, a copy
        return images, labels, torch.zeros(len(keys), dtype=torch.int64)
