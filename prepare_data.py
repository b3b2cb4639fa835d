"""Decode and center-crop an ImageFolder tree once into a pixel-exact image store (util/store.py).

    python prepare_data.py --data_path ./data/imagenet --img_size 256 --store ./data/imagenet-256 --num_workers 32
    python prepare_data.py ... --verify    # also check every checksum and re-decode a sample of images

Reads {data_path}/train in torchvision ImageFolder order, applies util.data.center_crop_arr exactly
as CenterCropFolder does, and writes uint8 shards of `--shard_size` source images, in parallel.
Unreadable files are left out and listed in the manifest. Each shard is written atomically with a
record beside it; a killed conversion rerun with the same command keeps the finished shards and
does the rest. Needs images × size × size × 3 bytes (ImageNet-1k: ~252 GB at 256 px, ~1 TB at 512).
"""

import argparse
import glob
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import time

import numpy as np
import PIL

from util.config import RunConfig, parse
from util.data import CenterCropFolder, load_center_crop
from util.distributed import print0
from util.errors import BadInput, BadValue, RunFailed, exit_code
from util.files import atomic_write, free_bytes, human_bytes, write_json
from util.logger import hms
from util.store import FORMAT_VERSION, MANIFEST, StoreDataset, file_sha256, read_manifest, sample_checksum

SETTINGS = "settings.json"


def get_args_parser():
    p = argparse.ArgumentParser("Build a preprocessed image store", add_help=True)
    a = p.add_argument
    a("--data_path", required=True, help="folder with an ImageFolder tree under train/")
    a("--img_size", default=256, type=int, help="image size (pixels)")
    a("--store", required=True, help="output folder (new or empty, or a store this script started)")
    a("--num_workers", default=os.cpu_count(), type=int, help="processes (0: the main process alone)")
    a("--shard_size", default=5000, type=int, help="source images per shard (one unit of work and of resuming)")
    a(
        "--verify",
        action="store_true",
        help="afterwards check counts and checksums and re-decode --verify_samples images",
    )
    a("--verify_samples", default=100, type=int)
    a("--seed", default=0, type=int, help="picks the images --verify re-decodes")
    return p


def parse_args(argv=None) -> RunConfig:
    """The flags as given (util.config.RunConfig; `given`: the flags typed)."""
    return parse(get_args_parser(), argv)


def load_crop(path: str, size: int) -> np.ndarray:
    """One source file -> uint8 (3, size, size), exactly CenterCropFolder's decode before its flip."""
    return np.ascontiguousarray(load_center_crop(path, size).transpose(2, 0, 1))


def list_source(data_path: str):
    """ImageFolder listing of data_path/train -> ([(path, relative path, label)], classes, listing hash).
    The hash covers relative paths and file sizes, in order."""
    root = os.path.join(data_path, "train")
    folder = CenterCropFolder(root, 1)
    h = hashlib.sha256()
    samples = []
    for path, label in folder.samples:
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        h.update(f"{rel}\t{os.path.getsize(path)}\n".encode())
        samples.append((path, rel, label))
    return samples, folder.classes, h.hexdigest()


def describe_difference(theirs: dict, ours: dict) -> str:
    names = {"source_hash": "source file list", "pillow": "Pillow version"}
    return ", ".join(
        f"{names.get(k, k)} {theirs.get(k)!s:.12} (now {ours[k]!s:.12})" for k in ours if theirs.get(k) != ours[k]
    )


def inspect_store(store: str, settings: dict) -> str:
    """'new', 'partial' or 'complete'; ValueError if `store` holds anything else."""
    if not os.path.exists(store):
        return "new"
    if not os.path.isdir(store):
        raise BadValue(f"--store {store} is a file, not a folder")
    if os.path.isfile(os.path.join(store, MANIFEST)):
        manifest = read_manifest(store)
        theirs = {k: manifest.get(k) for k in settings}
        if theirs != settings:
            raise BadValue(
                f"--store {store} holds a complete store made with other settings "
                f"({describe_difference(theirs, settings)}): use another --store folder"
            )
        return "complete"
    if os.path.isfile(os.path.join(store, SETTINGS)):
        with open(os.path.join(store, SETTINGS)) as f:
            theirs = json.load(f)
        if theirs != settings:
            raise BadValue(
                f"--store {store} holds a partial store made with other settings "
                f"({describe_difference(theirs, settings)}): use another --store folder, or delete it to start over"
            )
        return "partial"
    if os.listdir(store):
        names = sorted(os.listdir(store))
        raise BadValue(
            f"--store {store} holds other files ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): "
            f"give a new or empty folder"
        )
    return "new"


def shard_name(k: int) -> str:
    return f"shard_{k:05d}"


def write_images(f, task: dict) -> dict:
    """Stream the readable images of the task's sources into an open .npy file; returns the lists
    of labels, source indices and unreadable files."""
    size, n = task["img_size"], len(task["items"])
    header = {"descr": "|u1", "fortran_order": False, "shape": (n, 3, size, size)}
    np.lib.format.write_array_header_1_0(f, header)
    offset = f.tell()
    out = {"labels": [], "source_index": [], "unreadable": []}
    for j, (path, rel, label) in enumerate(task["items"]):
        try:
            img = load_crop(path, size)
        except Exception as e:  # PIL raises several types for bad files
            out["unreadable"].append({"path": rel, "reason": f"{type(e).__name__}: {e}"})
            continue
        f.write(img.data)
        out["labels"].append(label)
        out["source_index"].append(task["start"] + j)
    f.seek(0)
    np.lib.format.write_array_header_1_0(f, {**header, "shape": (len(out["labels"]), 3, size, size)})
    if f.tell() != offset:  # numpy pads the header so that the first axis can change in place
        raise RuntimeError("the .npy header changed length")
    f.truncate(offset + len(out["labels"]) * 3 * size * size)
    return out


def write_shard(task: dict) -> dict:
    """Decode one shard's source images and write shard_k.npy, then its record shard_k.json
    (both atomically). Returns the record."""
    name = shard_name(task["shard"])
    path = os.path.join(task["store"], name + ".npy")
    result = {}
    atomic_write(path, lambda f: result.update(write_images(f, task)))
    record = {
        "settings": task["settings"],
        "shard": task["shard"],
        "file": name + ".npy",
        "source_start": task["start"],
        "source_stop": task["start"] + len(task["items"]),
        "count": len(result["labels"]),
        "bytes": os.path.getsize(path),
        "sha256": file_sha256(path),
        "sample_sha256": sample_checksum(path),
        **result,
    }
    write_json(os.path.join(task["store"], name + ".json"), record, indent=None)
    return record


def finished_record(task: dict):
    """The record of a shard written earlier with the same settings whose file still matches its
    full checksum, or None."""
    name = os.path.join(task["store"], shard_name(task["shard"]))
    try:
        with open(name + ".json") as f:
            record = json.load(f)
        ok = (
            record["settings"] == task["settings"]
            and record["source_start"] == task["start"]
            and os.path.getsize(name + ".npy") == record["bytes"]
            and file_sha256(name + ".npy") == record["sha256"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if ok else None


def default_sigterm():
    """Pool worker start: SIGTERM ends it, whatever handler the parent had (else terminate() can hang)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def pool_map(fn, tasks: list, workers: int, ordered: bool = False):
    """Yield fn(task) for each task from `workers` processes (0: in this process); in task order
    if `ordered`, else as they finish."""
    if workers == 0:
        yield from map(fn, tasks)
        return
    with multiprocessing.Pool(min(workers, max(len(tasks), 1)), initializer=default_sigterm) as pool:
        yield from (pool.imap if ordered else pool.imap_unordered)(fn, tasks)
        pool.close()  # all done: let the workers exit on their own
        pool.join()


def check_disk(store: str, images: int, total: int, size: int):
    """Stop before writing if `images` more images (and the index files of `total`) do not fit."""
    need = images * 3 * size * size + total * 16
    free = free_bytes(store)
    if need > free:
        raise BadInput(
            f"not enough disk space for --store {store}: it needs {human_bytes(need)} more ({images} images × "
            f"{size}×{size}×3 bytes + labels), {human_bytes(free)} are free"
        )


def progress(done: int, total: int, ran: int, start: float, workers: int) -> str:
    rate = ran / max(time.perf_counter() - start, 1e-9)
    return (
        f"{done}/{total} images ({100 * done / max(total, 1):.1f}%), {rate:.0f} img/s "
        f"({rate / max(workers, 1):.0f} per process), ETA {hms((total - done) / rate if rate > 0 else 0)}"
    )


def save_array(path: str, arr: np.ndarray) -> dict:
    atomic_write(path, lambda f: np.save(f, arr))
    return {
        "file": os.path.basename(path),
        "bytes": os.path.getsize(path),
        "sha256": file_sha256(path),
        "sample_sha256": sample_checksum(path),
    }


def write_manifest(store: str, settings: dict, classes: list, records: list) -> dict:
    """labels.npy, source_index.npy, then manifest.json (last: its presence marks a finished store)."""
    records = sorted(records, key=lambda r: r["shard"])
    keys = ("file", "count", "source_start", "source_stop", "bytes", "sha256", "sample_sha256")
    manifest = {
        **settings,
        "layout": "uint8 (n, 3, img_size, img_size) per shard, channels first",
        "images": sum(r["count"] for r in records),
        "classes": classes,
        "shards": [{k: r[k] for k in keys} for r in records],
        "labels": save_array(
            os.path.join(store, "labels.npy"), np.array([x for r in records for x in r["labels"]], dtype=np.int64)
        ),
        "source_index": save_array(
            os.path.join(store, "source_index.npy"),
            np.array([x for r in records for x in r["source_index"]], dtype=np.int64),
        ),
        "unreadable": [u for r in records for u in r["unreadable"]],
        "numpy": np.__version__,
    }
    write_json(os.path.join(store, MANIFEST), manifest)
    return manifest


def convert(args, samples: list, classes: list, settings: dict, state: str):
    """Write the shards not finished yet, then the manifest."""
    k = args.shard_size
    tasks = [
        {
            "store": args.store,
            "shard": s,
            "start": s * k,
            "items": samples[s * k : (s + 1) * k],
            "img_size": args.img_size,
            "settings": settings,
        }
        for s in range((len(samples) + k - 1) // k)
    ]
    records = []
    if state == "partial":
        for tmp in glob.glob(os.path.join(args.store, ".*.tmp-*")):  # left by a killed run
            os.remove(tmp)
        records = [r for r in pool_map(finished_record, tasks, args.num_workers) if r is not None]
        print0(f"{len(records)} of {len(tasks)} shards already done (checksums match); doing the rest")
    done_ids = {r["shard"] for r in records}
    todo = [t for t in tasks if t["shard"] not in done_ids]
    check_disk(args.store, sum(len(t["items"]) for t in todo), len(samples), args.img_size)
    os.makedirs(args.store, exist_ok=True)
    if state == "new":
        write_json(os.path.join(args.store, SETTINGS), settings)
    done, ran, start = sum(r["source_stop"] - r["source_start"] for r in records), 0, time.perf_counter()
    for r in pool_map(write_shard, todo, args.num_workers):
        records.append(r)
        n = r["source_stop"] - r["source_start"]
        done, ran = done + n, ran + n
        print0(f"{r['file']} done: {progress(done, len(samples), ran, start, args.num_workers)}")
    manifest = write_manifest(args.store, settings, classes, records)
    print0(
        f"wrote {manifest['images']} images in {len(records)} shards to {args.store} "
        f"({human_bytes(sum(s['bytes'] for s in manifest['shards']))})"
    )
    print0(
        f"{len(manifest['unreadable'])} unreadable files left out"
        + (f" (listed with reasons in {os.path.join(args.store, MANIFEST)})" if manifest["unreadable"] else "")
    )


def decode(item: tuple):
    """(path, size) -> uint8 (3, size, size), or the error as a string."""
    try:
        return load_crop(*item)
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def verify(args, samples: list) -> list:
    """Re-read the store: counts, full checksums, indices and labels against the source listing, and
    `--verify_samples` images against fresh decodes. Returns the problems found (strings)."""
    dataset = StoreDataset(args.store, args.img_size)  # sizes and sample checksums
    manifest = read_manifest(args.store)
    entries = manifest["shards"] + [manifest["labels"], manifest["source_index"]]
    paths = [os.path.join(args.store, e["file"]) for e in entries]
    sums = list(pool_map(file_sha256, paths, args.num_workers, ordered=True))
    problems = [f"{e['file']}: sha256 differs from the manifest" for e, s in zip(entries, sums) if s != e["sha256"]]
    for e, p in zip(manifest["shards"], paths):
        if np.load(p, mmap_mode="r").shape[0] != e["count"]:
            problems.append(f"{e['file']}: holds another number of images than the manifest records")
    labels, source = (np.load(os.path.join(args.store, f)) for f in ("labels.npy", "source_index.npy"))
    problems += check_indices(labels, source, manifest, samples)
    if problems:
        return problems
    rng = np.random.default_rng(args.seed)
    picks = np.sort(rng.choice(len(dataset), min(args.verify_samples, len(dataset)), replace=False))
    fresh = list(
        pool_map(decode, [(samples[source[i]][0], args.img_size) for i in picks], args.num_workers, ordered=True)
    )
    for i, img in zip(picks, fresh):
        if isinstance(img, str) or not np.array_equal(dataset[(int(i), False)][0].numpy(), img):
            problems.append(
                f"image {i} ({samples[source[i]][1]}) differs from a fresh decode of its source"
                + (f" ({img})" if isinstance(img, str) else "")
            )
    print0(f"compared {len(picks)} stored images with fresh decodes of their sources")
    return problems


def check_indices(labels: np.ndarray, source: np.ndarray, manifest: dict, samples: list) -> list:
    """Source indices increasing and in range, labels those of the sources, unreadable = the rest."""
    if len(labels) != manifest["images"] or len(source) != manifest["images"]:
        return ["labels.npy or source_index.npy does not hold one entry per image"]
    if len(source) and (np.any(np.diff(source) <= 0) or source[0] < 0 or source[-1] >= len(samples)):
        return ["source_index.npy is not an increasing list of source indices"]
    problems = []
    if not np.array_equal(labels, np.array([samples[i][2] for i in source], dtype=np.int64)):
        problems.append("labels.npy differs from the ImageFolder labels of the source files")
    missing = set(range(len(samples))) - set(source.tolist())
    if {samples[i][1] for i in missing} != {u["path"] for u in manifest["unreadable"]}:
        problems.append("the source files left out differ from the manifest's unreadable list")
    return problems


def main(args):
    """Convert (and verify); BadInput for bad input, RunFailed for a conversion that failed (see cli)."""
    for name, low in (("img_size", 1), ("shard_size", 1), ("num_workers", 0), ("verify_samples", 0)):
        if getattr(args, name) < low:
            raise BadValue(f"--{name} must be at least {low}, got {getattr(args, name)}")
    try:
        samples, classes, source_hash = list_source(args.data_path)
    except (OSError, ValueError, RuntimeError) as e:  # no folder, no images, unreadable listing
        raise BadInput(str(e)) from None
    settings = {
        "format_version": FORMAT_VERSION,
        "img_size": args.img_size,
        "shard_size": args.shard_size,
        "source_images": len(samples),
        "source_hash": source_hash,
        "pillow": PIL.__version__,
    }
    print0(f"{args.data_path}/train: {len(samples)} files in {len(classes)} classes")
    try:
        state = inspect_store(args.store, settings)
        if state == "complete":
            StoreDataset(args.store, args.img_size)  # sizes and sample checksums
            print0(f"store {args.store} is complete; nothing to do")
        else:
            convert(args, samples, classes, settings, state)
        problems = verify(args, samples) if args.verify else []
    except BadInput:
        raise
    except OSError as e:  # e.g. the disk filled up: finished shards are kept
        raise RunFailed(f"{e}; rerun the same command to continue") from None
    if problems:
        for p in problems[:20]:
            print0(f"verify: {p}")
        raise RunFailed(f"--verify found {len(problems)} problems in {args.store}")
    if args.verify:
        print0(f"verify: {args.store} passed")


def cli(argv=None) -> int:
    """Exit status as util.errors: 2 for bad input (one line on stderr), 1 for a failed conversion."""
    return exit_code(main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
