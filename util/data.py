"""ImageNet-style training data: ADM center crop, a resumable sampler, and tolerant image loading.

All randomness of the data pipeline (order and horizontal flips) is drawn by the sampler from
(seed, epoch), so a run resumed at any step sees exactly the batches it would have seen.
"""

import collections
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from util.distributed import barrier, get_rank, get_world_size, is_main_process, print_all
from util.errors import BadValue, MissingFile


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM center crop: BOX-halve while the short side >= 2·size, BICUBIC-resize the short side to
    size, center crop. Returns (size, size, 3) uint8."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def load_center_crop(path: str, image_size: int) -> np.ndarray:
    """Decode an image file as RGB and ADM-center-crop it: (size, size, 3) uint8."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img = img.convert("RGB")
    return center_crop_arr(img, image_size)


class CenterCropFolder(Dataset):
    """ImageFolder tree -> (uint8 (3, size, size) image, label, number of unreadable files met).

    Indexed by (index, flip) pairs from `ResumableSampler`. An image that cannot be read is logged
    with its path and the reason, and replaced by the next readable one in index order.
    """

    def __init__(self, root: str, image_size: int):
        from torchvision.datasets import ImageFolder  # here: torchvision takes a second to import

        if not os.path.isdir(root):
            raise MissingFile(
                f"training data folder {root} does not exist (expected an ImageFolder tree: {root}/<class>/<image>)"
            )
        try:
            folder = ImageFolder(root)
        except FileNotFoundError as e:  # no class folder, or no image in them
            raise MissingFile(f"training data folder {root}: {e}") from None
        self.samples = folder.samples
        self.classes = folder.classes
        self.image_size = image_size

    def __len__(self):
        return len(self.samples)

    def _load(self, index: int) -> np.ndarray:
        return load_center_crop(self.samples[index][0], self.image_size)

    def __getitem__(self, key):
        index, flip = key
        bad = 0
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            try:
                arr = self._load(i)
                break
            except Exception as e:  # PIL raises several types for bad files
                bad += 1
                print_all(
                    f"warning: unreadable image {self.samples[i][0]} ({type(e).__name__}: {e}); using another sample"
                )
        else:
            raise RuntimeError("no readable image in the dataset")
        if flip:
            arr = arr[:, ::-1]
        img = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (3, H, W) uint8
        return img, self.samples[i][1], bad


class ResumableSampler(Sampler):
    """DistributedSampler-like shuffling that also draws the flips and can start mid-epoch.

    Per epoch: a permutation of the dataset (padded to a multiple of world_size) and one flip bit
    per position, both from a generator seeded with seed + epoch; rank r takes positions
    r, r + world_size, ... . `set_position(epoch, start)` skips the first `start` samples of this
    rank's share. Yields (index, flip) pairs.
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.n, self.rank, self.world_size, self.seed = n, rank, world_size, seed
        self.num_samples = math.ceil(n / world_size)
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int = 0):
        self.epoch, self.start = epoch, start

    def set_epoch(self, epoch: int):
        self.set_position(epoch, 0)

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g)
        total = self.num_samples * self.world_size
        order = order.repeat(math.ceil(total / self.n))[:total]  # pad like DistributedSampler
        flips = torch.rand(total, generator=g) < 0.5
        pos = torch.arange(self.rank, total, self.world_size)[self.start :]
        return iter(zip(order[pos].tolist(), flips[pos].tolist()))

    def __len__(self):
        return self.num_samples - self.start


def open_dataset(data_path: str, img_size: int):
    """The training set at `data_path`: a store made by prepare_data.py (util.store.StoreDataset,
    whose manifest, image size and files are checked here), else the ImageFolder tree
    data_path/train decoded on the fly (CenterCropFolder). Raises util.errors.BadInput kinds with
    what to do when neither is there or the store does not fit."""
    from util.store import StoreDataset, is_store

    if is_store(data_path):
        return StoreDataset(data_path, img_size)
    if not os.path.isdir(os.path.join(data_path, "train")):
        raise MissingFile(
            f"--data_path {data_path}: no folder {os.path.join(data_path, 'train')} (an ImageFolder "
            "tree of training images) and no image store (prepare_data.py)"
        )
    return CenterCropFolder(os.path.join(data_path, "train"), img_size)


@dataclass
class Data:
    """A run's training data: the loader (batches from the sampler's position), this rank's
    ResumableSampler, the optimiser steps that make an epoch, and what the set holds."""

    loader: object
    sampler: "ResumableSampler"
    steps_per_epoch: int
    images: int
    classes: int

    def __str__(self):
        return f"{self.images} images in {self.classes} classes, {self.steps_per_epoch} steps per epoch"


class ThreadedBatches:
    """Batches of a dataset that gathers whole batches (`batched`: the preprocessed store), assembled
    by `threads` threads of this process, up to `threads + 1` batches ahead, in the sampler's order (0
    threads: in the calling thread, on demand). The copies release the GIL, so the threads overlap
    the training step; no worker processes, so no batch crosses a process boundary (a fresh shared
    memory segment per batch costs more than the gather itself). With pin_memory each batch is
    assembled in pinned memory directly. Each iteration starts at the sampler's current position."""

    def __init__(self, dataset, sampler, *, batch_size: int, threads: int, pin_memory: bool):
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size
        self.threads, self.pin_memory = threads, pin_memory

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def _get(self, keys):
        return self.dataset.batch(keys, pin_memory=self.pin_memory)

    def __iter__(self):
        keys = BatchSampler(self.sampler, self.batch_size, drop_last=True)
        if self.threads == 0:
            yield from map(self._get, keys)
            return
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="batches")
        try:
            pending = collections.deque()
            for k in keys:
                pending.append(pool.submit(self._get, k))
                if len(pending) > self.threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # also when the consumer stops early: no thread outlives the iteration
            pool.shutdown(wait=True, cancel_futures=True)


def make_loader(dataset, sampler, *, batch_size: int, num_workers: int, pin_memory: bool, seed: int):
    """The training loader: batches of `batch_size` in the sampler's order (the last partial one
    dropped). A dataset that gathers whole batches (`batched`: the store) gets ThreadedBatches with
    `num_workers` threads; any other a DataLoader with `num_workers` processes (persistent), which
    has its own generator, so that the global RNG stays untouched."""
    if getattr(dataset, "batched", False):
        return ThreadedBatches(dataset, sampler, batch_size=batch_size, threads=num_workers, pin_memory=pin_memory)
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


def build_data(config, device) -> Data:
    """The training images of a run (`config`: main_jit's; the demo's are generated first; a folder or a
    store), this rank's sampler and the loader. BadValue for data that cannot make a batch."""
    from util.demo import make_shapes_dataset  # the demo imports evaluation helpers: only when needed

    if config.demo:
        if is_main_process():
            make_shapes_dataset(config.data_path, image_size=config.img_size)
        barrier()
    dataset = open_dataset(config.data_path, config.img_size)
    if len(dataset.classes) > config.class_num:
        raise BadValue(
            f"{config.data_path} has {len(dataset.classes)} classes but --class_num is {config.class_num} (every "
            "sub-folder of train/ is a class, and a label >= --class_num has no row in the label embedding: the "
            "reference's device-side assert); pass --class_num "
            f"{len(dataset.classes)}, or for one class put all images in one sub-folder"
        )
    sampler = ResumableSampler(len(dataset), get_rank(), get_world_size(), seed=config.seed)
    loader = make_loader(
        dataset,
        sampler,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        pin_memory=config.pin_mem and device.type == "cuda",
        seed=config.seed,
    )
    steps_per_epoch = sampler.num_samples // config.batch_size // config.accum_iter
    if steps_per_epoch < 1:
        raise BadValue(
            f"{len(dataset)} images make no full batch of {config.batch_size} × {config.accum_iter} per process"
        )
    return Data(loader, sampler, steps_per_epoch, len(dataset), len(dataset.classes))
