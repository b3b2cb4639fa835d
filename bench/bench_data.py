"""Throughput of the training data pipeline: JPEG decode + ADM center crop, or the preprocessed store.

    python bench/bench_data.py --workers 0 1 2 4 8                    # synthetic ImageNet-like JPEGs
    python bench/bench_data.py --workers 0 1 2 --img_size 256 512 --store   # JPEGs vs the store, same run
    python bench/bench_data.py --data_path ./data/imagenet --workers 8 12 16
    python bench/bench_data.py --data_path ./data/imagenet-256 --workers 0 1 2   # a store

Runs the training dataset (util.data.open_dataset) with ResumableSampler through util.data.make_loader
(the training loader: pinned memory on CUDA, persistent workers), and reports images/s for each
worker count and how many workers one GPU needs to be fed `--target` images/s. With --workers 0 the
main process loads alone (one process). `--store` also converts the folder into a store with
prepare_data.py in one process (its images/s are the conversion's per process) and measures that
store at the same settings. Files are read through the page cache: a dataset larger than memory
also waits on the disk, which this does not measure unless run on that dataset.
"""

import argparse
import math
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from torch.utils.data import Sampler  # noqa: E402

import prepare_data  # noqa: E402
from util.config import RunConfig, parse  # noqa: E402
from util.data import ResumableSampler, make_loader, open_dataset  # noqa: E402
from util.errors import BadValue, exit_code  # noqa: E402
from util.files import write_json  # noqa: E402
from util.store import is_store  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser("JiT data pipeline benchmark", add_help=True)
    a = p.add_argument
    a(
        "--data_path",
        default=None,
        help="an ImageFolder tree under train/, or a store (default: synthetic JPEGs in a temporary folder)",
    )
    a("--num_images", default=256, type=int, help="synthetic images to write")
    a("--img_size", default=[256], type=int, nargs="+", help="image sizes to measure (pixels)")
    a("--store", action="store_true", help="also convert the folder into a store (prepare_data.py) and measure it")
    a("--batch_size", default=128, type=int)
    a("--workers", default=[0, 1, 2], type=int, nargs="+", help="DataLoader num_workers values to measure")
    a("--batches", default=8, type=int, help="timed batches per setting (rounded up to a multiple of the workers)")
    a("--target", default=2600.0, type=float, help="images/s one GPU consumes")
    a("--device", default=None, help="pin memory for this device, as training does (default: cuda when available)")
    a("--seed", default=0, type=int)
    a("--json", default=None, metavar="PATH")
    return p


def synthetic_image(rng: np.random.Generator) -> Image.Image:
    """An RGB image of ImageNet-like size (long side 500, 10% 600–1000; aspect 1–1.5) with
    a colour ramp, a few flat shapes and sensor-like noise, so that JPEG sizes resemble photos."""
    long_side = 500 if rng.random() < 0.9 else int(rng.integers(600, 1001))
    short_side = int(long_side / rng.uniform(1.0, 1.5))
    w, h = (long_side, short_side) if rng.random() < 0.7 else (short_side, long_side)
    yy, xx = np.ogrid[0:h, 0:w]
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / w + np.sin(angle) * yy / h).astype(np.float32)[..., None]  # (h, w, 1)
    lo, hi = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    img = Image.fromarray(np.clip(lo + (hi - lo) * ramp, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(5, 15)):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(10, min(w, h) / 3)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    arr = np.asarray(img, dtype=np.float32) + 20 * rng.standard_normal((h, w, 3), dtype=np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_synthetic_folder(root: str, num_images: int, seed: int = 0, classes: int = 10) -> str:
    """Write `num_images` JPEGs (quality 90) to root/train/c{k}/{i}.jpg. Returns root."""
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        folder = os.path.join(root, "train", f"c{i % classes}")
        os.makedirs(folder, exist_ok=True)
        synthetic_image(rng).save(os.path.join(folder, f"{i}.jpg"), quality=90)
    return root


class EpochStream(Sampler):
    """`total` items of the sampler's epochs 0, 1, ... back to back: one DataLoader pass never drains
    at an epoch end, however small the folder."""

    def __init__(self, sampler: ResumableSampler, total: int):
        self.sampler, self.total = sampler, total

    def __iter__(self):
        left, epoch = self.total, 0
        while left > 0:
            self.sampler.set_epoch(epoch)
            for item in self.sampler:
                if left == 0:
                    return
                yield item
                left -= 1
            epoch += 1

    def __len__(self):
        return self.total


def measure(dataset, workers: int, args, device) -> dict:
    """Images/s of the loader once running: the first round of batches (one per worker, which start
    together) is untimed, then `batches` (a multiple of the workers) are timed."""
    procs = max(workers, 1)
    timed = procs * math.ceil(args.batches / procs)
    stream = EpochStream(ResumableSampler(len(dataset), seed=args.seed), (procs + timed) * args.batch_size)
    loader = make_loader(
        dataset,
        stream,
        batch_size=args.batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        seed=args.seed,
    )
    it = iter(loader)
    for _ in range(procs):
        next(it)
    start = time.perf_counter()
    for _ in range(timed):
        next(it)
    elapsed = time.perf_counter() - start
    del it, loader  # stops the workers
    img_s = timed * args.batch_size / elapsed
    return {
        "workers": workers,
        "img_per_s": img_s,
        "img_per_s_per_process": img_s / procs,
        "workers_for_target": math.ceil(args.target / (img_s / procs)),
    }


def measure_all(dataset, args, device, label: str) -> dict:
    """measure() at every --workers value; the workers one GPU needs, from the largest count."""
    results = []
    for w in args.workers:
        r = measure(dataset, w, args, device)
        results.append(r)
        print(
            f"{label}: workers {w:3d}: {r['img_per_s']:8.1f} img/s, {r['img_per_s_per_process']:8.1f} per process "
            f"-> {r['workers_for_target']} workers for {args.target:g} img/s",
            flush=True,
        )
    busiest = max(results, key=lambda r: r["workers"])
    return {
        "results": results,
        "workers_needed": busiest["workers_for_target"],
        "workers_needed_from": busiest["workers"],
        "best_img_per_s": max(r["img_per_s"] for r in results),
    }


def timed_conversion(folder: str, store: str, size: int) -> float:
    """prepare_data.py in one process; returns its images/s."""
    n = len(open_dataset(folder, size))
    start = time.perf_counter()
    prepare_data.main(
        prepare_data.parse_args(
            ["--data_path", folder, "--img_size", str(size), "--store", store, "--num_workers", "0"]
        )
    )
    return n / (time.perf_counter() - start)


def bench_size(path: str, size: int, args, device, tmp: str) -> dict:
    """The folder (or store) at `path`, and with --store its conversion, at one image size."""
    out = {}
    if is_store(path):
        out["store"] = measure_all(open_dataset(path, size), args, device, f"store {size}px")
        return out
    out["jpeg"] = measure_all(open_dataset(path, size), args, device, f"JPEG {size}px")
    if args.store:
        store = os.path.join(tmp, f"store-{size}")
        out["conversion_img_per_s_per_process"] = timed_conversion(path, store, size)
        out["store"] = measure_all(open_dataset(store, size), args, device, f"store {size}px")
        out["store_vs_jpeg_per_process"] = {
            r["workers"]: s["img_per_s_per_process"] / r["img_per_s_per_process"]
            for r, s in zip(out["jpeg"]["results"], out["store"]["results"])
        }
        ratios = ", ".join(f"{x:.1f}× ({w} workers)" for w, x in out["store_vs_jpeg_per_process"].items())
        print(
            f"{size}px: conversion {out['conversion_img_per_s_per_process']:.1f} img/s per process; store per process "
            f"vs JPEG: {ratios}",
            flush=True,
        )
    return out


def parse_args(argv=None) -> RunConfig:
    """The flags as given (util.config.RunConfig), as every script's."""
    return parse(get_args_parser(), argv)


def main(args: RunConfig) -> dict:
    """Measure; BadValue for a setting that cannot work (see cli). Returns what --json holds."""
    if args.batches < 1 or args.batch_size < 1 or min(args.workers) < 0:
        raise BadValue("--batches and --batch_size must be at least 1, --workers at least 0")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        path = args.data_path or tmp
        if args.data_path is None:
            start = time.perf_counter()
            make_synthetic_folder(tmp, args.num_images, args.seed)
            print(f"wrote {args.num_images} synthetic JPEGs in {time.perf_counter() - start:.1f} s", flush=True)
        first = open_dataset(path, args.img_size[0])
        sizes = [os.path.getsize(p) for p, _ in getattr(first, "samples", [])]
        mean_kb = float(np.mean(sizes)) / 1e3 if sizes else None
        print(
            f"{len(first)} images"
            + (f", mean file {mean_kb:.0f} kB" if sizes else " (a store)")
            + f", batch {args.batch_size}, {os.cpu_count()} CPUs",
            flush=True,
        )
        by_size = {size: bench_size(path, size, args, device, tmp) for size in args.img_size}
    out = {
        "config": args.as_dict(),
        "cpus": os.cpu_count(),
        "images": len(first),
        "mean_file_kb": mean_kb,
        "sizes": by_size,
    }
    if args.json:
        write_json(args.json, out, indent=2)
    return out


def cli(argv=None) -> int:
    """Exit status as util.errors: 2 for bad input (one line on stderr)."""
    return exit_code(main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
