"""The preprocessed image store: prepare_data.py conversion and util.store.StoreDataset reading."""

import gc
import json
import mmap
import os
import pickle
import shutil
import signal
import threading
from collections import namedtuple

import numpy as np
import pytest
import torch
from helpers import TINY, assert_same_state, load_last, read_until, run_script
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, default_collate

import prepare_data
from util import store as store_mod
from util.data import CenterCropFolder, ResumableSampler, center_crop_arr, make_loader, open_dataset
from util.store import StoreDataset, is_store

SIZE, SHARD = 16, 5
CLASSES = ("zebra", "Apple", "mango")  # ImageFolder order: Apple, mango, zebra
UNREADABLE = {"Apple/empty.jpg", "mango/zz_text.png"}


def make_source(root):
    """root/train/<class>/: 7 images per class of mixed sizes (upscaled, cropped, BOX-halved) and
    modes (RGB, L, RGBA, P; PNG and JPEG), plus a zero-byte JPEG and a text file named .png."""
    rng = np.random.default_rng(0)
    for c in CLASSES:
        folder = os.path.join(root, "train", c)
        os.makedirs(folder)
        for i in range(7):
            h, w = rng.integers(12, 48, 2)
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            img = img.convert(("RGB", "L", "RGBA", "P")[i % 4])
            img.save(os.path.join(folder, f"{i}.jpg" if i == 5 and img.mode in ("RGB", "L") else f"{i}.png"))
    open(os.path.join(root, "train", "Apple", "empty.jpg"), "wb").close()
    with open(os.path.join(root, "train", "mango", "zz_text.png"), "w") as f:
        f.write("not an image")
    return str(root)


def convert_args(data_path, out, *extra, size=SIZE, workers=0) -> list[str]:
    return [
        "--data_path",
        str(data_path),
        "--img_size",
        str(size),
        "--store",
        str(out),
        "--shard_size",
        str(SHARD),
        "--num_workers",
        str(workers),
        *map(str, extra),
    ]


def convert(*args, **kwargs):
    """prepare_data.py's main in this process (its errors raise); returns the store's path."""
    prepare_data.main(prepare_data.parse_args(convert_args(*args, **kwargs)))
    return str(args[1])


def convert_status(*args, **kwargs) -> int:
    """prepare_data.py's exit status in this process (its one-line errors on stderr)."""
    return prepare_data.cli(convert_args(*args, **kwargs))


def run_cli(*args):
    """`python prepare_data.py args...` -> (return code, stdout and stderr merged)."""
    p = run_script("prepare_data.py", *args, check=False, timeout=120)
    return p.returncode, p.stdout


def snapshot(folder):
    """{name: (bytes, inode, mtime_ns)} of every file in `folder`."""
    out = {}
    for name in sorted(os.listdir(folder)):
        path, st = os.path.join(folder, name), os.stat(os.path.join(folder, name))
        with open(path, "rb") as f:
            out[name] = (f.read(), st.st_ino, st.st_mtime_ns)
    return out


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def edit_manifest(path, **changes):
    file = os.path.join(path, "manifest.json")
    with open(file) as f:
        manifest = json.load(f)
    manifest.update(changes)
    with open(file, "w") as f:
        json.dump(manifest, f)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("source"))


@pytest.fixture(scope="module")
def store(source, tmp_path_factory):
    return convert(source, tmp_path_factory.mktemp("stores") / "store")


@pytest.fixture
def copy(store, tmp_path):
    """A private copy of the finished store, for tests that damage it."""
    return shutil.copytree(store, tmp_path / "store")


def test_images_are_the_center_crops_of_their_sources_in_imagefolder_order(source, store):
    folder = CenterCropFolder(os.path.join(source, "train"), SIZE)
    ds = StoreDataset(store, SIZE)
    src = np.load(os.path.join(store, "source_index.npy"))
    assert folder.classes == ds.classes == ["Apple", "mango", "zebra"]
    assert len(ds) == len(folder) - len(UNREADABLE) == 21
    for i in range(len(ds)):
        path, label = folder.samples[src[i]]
        with open(path, "rb") as f:
            expected = center_crop_arr(Image.open(f).convert("RGB"), SIZE)  # (H, W, 3)
        img, stored_label, bad = ds[(i, False)]
        assert torch.equal(img, torch.from_numpy(expected.transpose(2, 0, 1).copy()))
        assert stored_label == label == sorted(CLASSES).index(os.path.basename(os.path.dirname(path)))
        assert bad == 0


def test_unreadable_files_are_listed_with_reasons_and_left_out(source, store):
    with open(os.path.join(store, "manifest.json")) as f:
        manifest = json.load(f)
    assert {u["path"] for u in manifest["unreadable"]} == UNREADABLE
    assert all("UnidentifiedImageError" in u["reason"] for u in manifest["unreadable"])
    folder = CenterCropFolder(os.path.join(source, "train"), SIZE)
    kept = {
        os.path.relpath(folder.samples[i][0], os.path.join(source, "train"))
        for i in np.load(os.path.join(store, "source_index.npy"))
    }
    assert kept.isdisjoint(UNREADABLE) and len(kept) == manifest["images"] == 21
    assert [s["count"] for s in manifest["shards"]] == [5, 4, 5, 4, 3]  # shards 1 and 3 each lost one file
    assert manifest["source_images"] == 23 and manifest["img_size"] == SIZE and manifest["pillow"]


@pytest.mark.parametrize("huge_page_min", [store_mod.HUGE_PAGE_MIN, 1], ids=["plain", "huge_pages"])
def test_items_and_batches_equal_centercropfolder_collated(source, store, huge_page_min, monkeypatch):
    monkeypatch.setattr(store_mod, "HUGE_PAGE_MIN", huge_page_min)  # 1: every batch in a huge-page mapping
    folder = CenterCropFolder(os.path.join(source, "train"), SIZE)
    ds = StoreDataset(store, SIZE)
    src = np.load(os.path.join(store, "source_index.npy"))
    rng = np.random.default_rng(1)
    for i, flip in [(0, True), (20, False), (7, True)]:
        got, want = ds[(i, flip)], folder[(int(src[i]), flip)]
        assert torch.equal(got[0], want[0]) and got[1:] == want[1:] and type(got[1]) is int
    for _ in range(4):  # random keys with repeats, spanning all shards
        keys = [(int(i), bool(f)) for i, f in zip(rng.integers(0, len(ds), 12), rng.random(12) < 0.5)]
        got = ds[keys]
        want = default_collate([folder[(int(src[i]), f)] for i, f in keys])
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and torch.equal(g, w)
    assert ds[[]][0].shape == (0, 3, SIZE, SIZE)
    with pytest.raises(IndexError):
        ds[[(0, False), (len(ds), False)]]


def test_batch_buffer_large_batches_are_mapped_and_keep_their_values():
    shape = (3, 3, 512, 512)  # 2.25 MiB: above HUGE_PAGE_MIN
    a, b = store_mod.batch_buffer(shape), store_mod.batch_buffer(shape)
    assert a.shape == shape and a.dtype == torch.uint8 and a.is_contiguous()
    a.fill_(7)
    b.numpy()[:] = 9
    gc.collect()  # the tensors alone keep their mappings alive
    assert int(a.sum()) == 7 * a.numel() and int(b.sum()) == 9 * b.numel()
    mapped = hasattr(mmap, "MADV_HUGEPAGE")  # Linux: a fixed-size mapping, not torch's allocator
    assert a.untyped_storage().resizable() is not mapped
    assert store_mod.batch_buffer((2, 3, 16, 16)).untyped_storage().resizable()  # small: torch.empty


def test_dataset_pickles_without_arrays_and_open_dataset_picks_the_store(source, store):
    ds = StoreDataset(store, SIZE)
    ds[(0, False)]  # maps the shards in this process
    blob = pickle.dumps(ds)
    assert len(blob) < 4000 and pickle.loads(blob)._shards is None
    assert torch.equal(pickle.loads(blob)[[(3, True)]][0], ds[[(3, True)]][0])
    assert is_store(store) and not is_store(source)
    assert isinstance(open_dataset(store, SIZE), StoreDataset)
    assert isinstance(open_dataset(source, SIZE), CenterCropFolder)


def test_threaded_batches_follow_the_sampler_and_leave_no_thread(store):
    """make_loader gives the store ThreadedBatches: the batches of ds[keys] in the sampler's order,
    from its current position, with 0 or 2 threads; stopping early ends the threads."""
    ds = StoreDataset(store, SIZE)
    sampler = ResumableSampler(len(ds), seed=3)
    sampler.set_position(epoch=1, start=4)
    expected = [ds[keys] for keys in BatchSampler(sampler, 2, drop_last=True)]
    for threads in (0, 2):
        loader = make_loader(ds, sampler, batch_size=2, num_workers=threads, pin_memory=False, seed=0)
        batches = list(loader)
        assert len(batches) == len(loader) == len(expected) == (len(ds) - 4) // 2
        assert all(torch.equal(x, y) for a, b in zip(batches, expected) for x, y in zip(a, b))
    it = iter(make_loader(ds, sampler, batch_size=2, num_workers=2, pin_memory=False, seed=0))
    next(it)
    it.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("batches")]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*pin_memory.*no accelerator:UserWarning")  # pinning is a no-op on CPU
def test_dataloader_with_batch_sampler_same_batches_for_0_and_2_workers(store):
    ds = StoreDataset(store, SIZE)
    sampler = BatchSampler(ResumableSampler(len(ds), seed=3), 4, drop_last=True)
    runs = []
    for workers in (0, 2):
        loader = DataLoader(ds, sampler=sampler, batch_size=None, num_workers=workers, pin_memory=True)
        runs.append(list(loader))
    assert len(runs[0]) == len(ds) // 4
    for a, b, keys in zip(*runs, sampler):
        want = ds[keys]
        assert all(torch.equal(x, y) and torch.equal(x, w) for x, y, w in zip(a, b, want))
        assert a[0].shape == (4, 3, SIZE, SIZE) and a[1].dtype == torch.int64


@pytest.mark.slow
def test_multiprocess_conversion_is_byte_identical(source, store, tmp_path):
    old = signal.signal(signal.SIGTERM, lambda *a: None)  # as util.stop.StopSignal leaves it in this process
    try:
        out = convert(source, tmp_path / "mp", workers=2)  # the pool's workers must still end
    finally:
        signal.signal(signal.SIGTERM, old)
    names = sorted(f for f in os.listdir(store) if f.endswith(".npy"))
    assert names == sorted(f for f in os.listdir(out) if f.endswith(".npy")) and len(names) == 7
    for name in names:
        with open(os.path.join(store, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
            assert a.read() == b.read(), name


def test_resume_redoes_only_missing_and_damaged_shards(source, store, tmp_path, monkeypatch, capsys):
    out = tmp_path / "store"
    write_shard, calls = prepare_data.write_shard, []

    def killed_after_three(task):
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a killed conversion
        calls.append(task["shard"])
        return write_shard(task)

    monkeypatch.setattr(prepare_data, "write_shard", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        convert(source, out)
    monkeypatch.setattr(prepare_data, "write_shard", write_shard)
    assert not is_store(out) and calls == [0, 1, 2]
    flip_byte(out / "shard_00001.npy", 200)  # a finished shard damaged since: redone too
    (out / ".shard_00003.npy.tmp-999").write_bytes(b"left by a kill")
    before = snapshot(out)
    capsys.readouterr()
    convert(source, out)
    assert "2 of 5 shards already done" in capsys.readouterr().out
    after = snapshot(out)
    for name in ("shard_00000.npy", "shard_00000.json", "shard_00002.npy", "shard_00002.json"):
        assert after[name] == before[name], name  # untouched: same bytes, inode, mtime
    assert after["shard_00001.npy"][1:] != before["shard_00001.npy"][1:]
    assert ".shard_00003.npy.tmp-999" not in after
    assert {n: v[0] for n, v in after.items() if n.endswith(".npy")} == {
        n: v[0] for n, v in snapshot(store).items() if n.endswith(".npy")
    }
    convert(source, out)
    assert "is complete; nothing to do" in capsys.readouterr().out
    assert snapshot(out) == after


def test_verify_passes_then_catches_a_flipped_byte_and_wrong_pixels(source, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(store_mod, "SAMPLE_BLOCK", 64)  # shards larger than the sampled blocks
    out = convert(source, tmp_path / "store", "--verify", "--verify_samples", 100)
    assert "passed" in capsys.readouterr().out
    flip_byte(os.path.join(out, "shard_00002.npy"), 1000)  # outside the sampled blocks
    assert convert_status(source, out, "--verify") == 1  # a check that found problems: the run failed
    assert "shard_00002.npy: sha256 differs from the manifest" in capsys.readouterr().out
    flip_byte(os.path.join(out, "shard_00002.npy"), 1000)
    img = np.load(os.path.join(out, "shard_00002.npy"))
    img[1, 0, 5, 5] ^= 1  # wrong pixels, recorded as right: only the re-decode can tell
    np.save(os.path.join(out, "shard_00002.npy"), img)
    edit_manifest(
        out,
        shards=[
            s
            if s["file"] != "shard_00002.npy"
            else {**s, **prepare_data.save_array(os.path.join(out, "shard_00002.npy"), img)}
            for s in json.load(open(os.path.join(out, "manifest.json")))["shards"]
        ],
    )
    assert convert_status(source, out, "--verify", "--verify_samples", 100) == 1
    captured = capsys.readouterr()
    assert "image 10 (mango/3.png) differs from a fresh decode" in captured.out
    assert "--verify found 1 problems" in captured.err


def test_open_rejects_bad_stores_with_clear_messages(copy):
    with pytest.raises(ValueError, match="holds 16 px images but --img_size is 32: use --img_size 16"):
        StoreDataset(copy, 32)
    os.rename(copy / "shard_00003.npy", copy / "moved.npy")
    with pytest.raises(FileNotFoundError, match="shard_00003.npy is missing"):
        StoreDataset(copy, SIZE)
    os.rename(copy / "moved.npy", copy / "shard_00003.npy")
    flip_byte(copy / "shard_00001.npy", 300)
    with pytest.raises(ValueError, match="shard_00001.npy does not match its sample checksum"):
        StoreDataset(copy, SIZE)
    flip_byte(copy / "shard_00001.npy", 300)
    os.truncate(copy / "shard_00004.npy", 1000)
    with pytest.raises(
        ValueError, match="shard_00004.npy has 1000 bytes, the manifest records 2432. Delete .*manifest.json and rerun"
    ):
        StoreDataset(copy, SIZE)
    edit_manifest(copy, format_version=99)
    with pytest.raises(ValueError, match="format version 99, this code reads version 1: rebuild it"):
        StoreDataset(copy, SIZE)
    os.remove(copy / "manifest.json")
    with pytest.raises(FileNotFoundError, match="not a finished image store"):
        StoreDataset(copy, SIZE)


def test_not_enough_disk_space_stops_before_writing(source, copy, tmp_path, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    assert convert_status(source, tmp_path / "new") == 2 and not os.path.exists(tmp_path / "new")
    assert "not enough disk space for --store" in capsys.readouterr().err
    os.remove(copy / "manifest.json")
    os.remove(copy / "shard_00004.npy")
    before = snapshot(copy)
    assert convert_status(source, copy) == 2
    err = capsys.readouterr().err
    assert "needs 2.7 kB more (3 images × 16×16×3 bytes + labels), 1.0 kB are free" in err
    assert snapshot(copy) == before


def test_bad_inputs_stop_with_one_line_errors_and_touch_nothing(source, store, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    partial = shutil.copytree(store, tmp_path / "partial")
    os.remove(partial / "manifest.json")
    cases = [
        (source, other, SIZE, "holds other files (notes.txt): give a new or empty folder"),
        (source, partial, 32, "partial store made with other settings (img_size 16 (now 32)): use another --store"),
        (source, store, 32, "complete store made with other settings (img_size 16 (now 32)): use another --store"),
        (tmp_path / "nothing", tmp_path / "new", SIZE, "nothing/train does not exist"),
    ]
    for data_path, out, size, message in cases:
        before = [snapshot(p) for p in (other, partial, store)]
        code = convert_status(data_path, out, size=size)
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1, err
        assert [snapshot(p) for p in (other, partial, store)] == before and not os.path.exists(tmp_path / "new")


@pytest.mark.slow
def test_cli_prints_errors_without_traceback(source, copy, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    os.truncate(copy / "shard_00000.npy", 500)
    base = ["--data_path", source, "--img_size", SIZE, "--shard_size", SHARD, "--num_workers", 0]
    for out, message in ((other, "holds other files (notes.txt)"), (copy, "shard_00000.npy has 500 bytes")):
        before = snapshot(out)
        code, output = run_cli(*base, "--store", out, "--verify")
        assert code == 2 and message in output and "Traceback" not in output, output
        assert output.strip().splitlines()[-1].startswith("error: ") and snapshot(out) == before, output


@pytest.mark.slow
def test_training_on_the_store_is_bit_identical_to_the_folder_also_after_a_resume(data48, tmp_path, start):
    """Same batches, same flips, same weights: the store holds exactly the pixels the folder decodes
    (all source images readable, so store and source indices agree). The store run is killed after
    a mid-epoch step checkpoint and rerun, with a DataLoader worker."""
    data = data48  # 12 steps per epoch
    store = convert(data, tmp_path / "store")
    run_script("main_jit.py", *TINY, "--epochs", 2, "--data_path", data, "--output_dir", tmp_path / "folder")
    out = tmp_path / "from_store"
    args = [
        *TINY,
        "--epochs",
        2,
        "--num_workers",
        1,
        "--data_path",
        store,
        "--output_dir",
        out,
        "--resume",
        out,
        "--save_every_steps",
        3,
    ]
    proc = start("main_jit.py", *args)
    read_until(proc, "(resume at epoch 0, step 6)")
    proc.kill()
    proc.wait()
    p = run_script("main_jit.py", *args)
    assert "resumed from" in p.stdout and "data: 48 images in 3 classes" in p.stdout
    assert_same_state(load_last(out), load_last(tmp_path / "folder"))
