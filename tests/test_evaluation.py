"""Generation for evaluation: quantisation, class balance, per-image seeds, the batch / process split,
and the command-line paths (main_jit.py --evaluate_gen on a reference checkpoint, sample.py, no network)."""

import os
import re

import numpy as np
import pytest
import torch
from helpers import (
    TINY_MODEL,
    PerSample,
    free_port,
    generated,
    make_image_folder,
    read_metrics,
    run_script,
    save_reference_checkpoint,
    tiny_denoiser,
)
from PIL import Image

from sampling import SamplerSettings
from util.evaluation import (
    GenerationSpec,
    class_labels,
    generate_batches,
    image_folder_name,
    initial_noise,
    quantize,
    rank_batches,
)

SAMPLER = SamplerSettings(steps=2, cfg=2.0, interval_min=0.1)
CPU = torch.device("cpu")


def reference_quantize(x: torch.Tensor) -> np.ndarray:
    """SPEC: imgs = (x + 1) / 2 as a float32 tensor, then np.round(np.clip(img * 255, 0, 255)).astype(np.uint8)."""
    imgs = (x + 1) / 2
    return np.round(np.clip(imgs.numpy() * 255, 0, 255)).astype(np.uint8)


def test_quantize_matches_reference():
    x = torch.cat(
        [
            torch.randn(10000) * 0.7,
            torch.linspace(-1.2, 1.2, 4097),
            (torch.arange(256) + 0.5) / 255 * 2 - 1,  # values near the rounding boundaries (ties go to even)
            torch.tensor([-1.0, 1.0, 0.0, -5.0, 5.0]),
        ]
    ).float()
    assert np.array_equal(quantize(x).numpy(), reference_quantize(x))
    assert quantize(x).dtype == torch.uint8


def test_class_labels_are_balanced_in_reference_layout():
    labels = class_labels(torch.arange(12), num_images=12, class_num=3)
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_rank_batches_cover_every_index_once_in_order(world_size):
    ranges = [r for rank in range(world_size) for r in rank_batches(23, 4, rank, world_size)]
    assert [i for a, b in ranges for i in range(a, b)] == list(range(23))
    assert all(b - a == 4 for a, b in ranges[:-1])  # the global batches do not depend on world_size


def test_initial_noise_is_per_image():
    full = initial_noise(7, range(6), (3, 4, 4), noise_scale=2.0)
    assert torch.equal(initial_noise(7, [3, 4], (3, 4, 4), noise_scale=2.0), full[3:5])
    assert not torch.equal(initial_noise(8, range(6), (3, 4, 4), noise_scale=2.0), full)
    assert torch.equal(
        full[2], 2.0 * torch.from_numpy(np.random.default_rng([7, 2]).standard_normal((3, 4, 4), dtype=np.float32))
    )
    with pytest.raises(ValueError):
        initial_noise(-1, [0], (3, 4, 4), 1.0)


class RecordingDenoiser:
    """Records what generation asks for; returns tanh(noise) as the 'image'."""

    noise_scale = 1.0

    def __init__(self):
        self.labels, self.calls = [], []

    def generate(self, labels, sampler, *, noise, net=None):
        self.labels.append(labels)
        self.calls.append(sampler)
        return torch.tanh(noise)


def test_generated_set_is_class_balanced():
    d = RecordingDenoiser()
    out = list(
        generate_batches(d, GenerationSpec(num_images=12, class_num=3, img_size=8, sampler=SAMPLER, gen_bsz=5), CPU)
    )
    labels = torch.cat(d.labels)
    assert torch.bincount(labels).tolist() == [4, 4, 4] and labels.tolist() == sorted(labels.tolist())
    assert [s for s, _ in out] == [0, 5, 10] and all(c == SAMPLER for c in d.calls)
    noise = initial_noise(0, range(12), (3, 8, 8), 1.0)
    assert torch.equal(torch.cat([x for _, x in out]), quantize(torch.tanh(noise)))


def test_gen_bsz_changes_only_kernel_rounding():
    """The same 9 images with batches of 4 and of 3: bit-identical through a batch-invariant net;
    with the real (batched) net at most one uint8 level apart (CPU GEMMs round per batch shape)."""
    d = tiny_denoiser()
    by4 = GenerationSpec(num_images=9, class_num=3, img_size=TINY_MODEL["img_size"], sampler=SAMPLER, gen_bsz=4, seed=1)
    by3 = GenerationSpec(**{**vars(by4), "gen_bsz": 3})
    a, b = generated(d, by4), generated(d, by3)
    assert a.shape == (9, 3, 16, 16) and a.float().std() > 10  # images differ from one another
    assert (a.int() - b.int()).abs().max() <= 1
    wrapped = PerSample(d.net)
    assert torch.equal(generated(d, by4, net=wrapped), generated(d, by3, net=wrapped))


def test_the_number_of_images_must_be_a_positive_multiple_of_the_classes():
    for n in (0, 10):
        with pytest.raises(ValueError, match="must be a positive multiple of --class_num"):
            GenerationSpec(num_images=n, class_num=3, img_size=16, sampler=SAMPLER)


@pytest.mark.slow
def test_one_and_two_processes_give_identical_images_and_metrics(tmp_path, inception_weights, fid_ref_stats):
    """12 images: 1 process vs 2 processes (gloo). Same gen_bsz: the real net's images are
    bit-identical (same global batches) and so are FID / IS on every rank; a different gen_bsz with
    a batch-invariant net: bit-identical too."""
    runs = {}
    for nproc, per_sample_bsz in ((1, 4), (2, 3)):
        out = tmp_path / f"run{nproc}.pt"
        p = run_script(
            os.path.join("tests", "eval_worker.py"),
            "--out",
            out,
            "--num_images",
            12,
            "--gen_bsz",
            4,
            "--gen_bsz_per_sample",
            per_sample_bsz,
            "--fid_stats",
            fid_ref_stats,
            "--inception_weights",
            inception_weights,
            "--output_dir",
            tmp_path / f"out{nproc}",
            nproc=nproc,
        )
        # gloo's threads are joined by shutdown(), not left to race with interpreter shutdown
        counts = re.findall(r"rank (\d): (\d+) threads before init, (\d+) after shutdown", p.stdout)
        assert len(counts) == nproc and all(before == after for _, before, after in counts), p.stdout
        runs[nproc] = torch.load(out, weights_only=True)
    one, two = runs[1], runs[2]
    assert one["images"].shape == (12, 3, 16, 16)
    assert torch.equal(one["images"], two["images"])
    assert torch.equal(one["per_sample"], two["per_sample"])
    assert len(two["results"]) == 2 and two["results"][0] == two["results"][1]
    for key in ("fid", "inception_score", "inception_score_std"):
        assert one["results"][0][key] == two["results"][0][key]
    (record,) = read_metrics(tmp_path / "out2")  # written by rank 0 only
    assert record["kind"] == "eval" and record["fid"] == two["results"][0]["fid"] and record["world_size"] == 2


@pytest.mark.slow
def test_reference_checkpoint_evaluates_end_to_end(tmp_path, inception_weights, fid_ref_stats):
    """main_jit.py --evaluate_gen on a reference-format checkpoint whose three weight sets differ:
    the saved images are the EMA-1 ones, and the metrics are logged with the checkpoint epoch."""
    ema1 = tiny_denoiser(seed=0)
    ckpt = tmp_path / "checkpoint-last.pth"
    save_reference_checkpoint(ckpt, tiny_denoiser(seed=1), ema1=ema1, ema2=tiny_denoiser(seed=2), epoch=7)
    out = tmp_path / "out"
    p = run_script(
        "main_jit.py",
        "--model",
        TINY_MODEL["model"],
        "--img_size",
        16,
        "--class_num",
        3,
        "--num_images",
        12,
        "--gen_bsz",
        4,
        "--num_sampling_steps",
        2,
        "--cfg",
        2.0,
        "--interval_min",
        0.1,
        "--seed",
        0,
        "--evaluate_gen",
        "--save_images",
        "--resume",
        ckpt,
        "--output_dir",
        out,
        "--device",
        "cpu",
        "--fid_stats",
        fid_ref_stats,
        "--inception_weights",
        inception_weights,
    )
    (line,) = read_metrics(out, "eval")
    assert line["checkpoint_epoch"] == 7 and line["num_images"] == 12 and line["steps"] == 2, p.stdout
    assert line["checkpoint"] == str(ckpt) and line["ema"] == 1
    assert np.isfinite(line["fid"]) and line["inception_score"] > 1
    assert "FID" in (out / "log.txt").read_text()  # the console also goes to log.txt
    expected = generated(ema1, GenerationSpec(num_images=12, class_num=3, img_size=16, sampler=SAMPLER, gen_bsz=4))
    folder = out / image_folder_name(SAMPLER, 12, 16)
    saved = torch.stack(
        [torch.from_numpy(np.array(Image.open(folder / f"{i:05d}.png"))).permute(2, 0, 1) for i in range(12)]
    )
    assert (saved.int() - expected.int()).abs().max() <= 1  # this process runs 2 threads, the child 1


@pytest.mark.slow
@pytest.mark.parametrize("script", ["main_jit.py", "prepare_ref.py"])
def test_no_network_and_no_weights_flag_fails_fast(tmp_path, fid_ref_stats, script):
    """Without --inception_weights and with HTTPS going to a closed local port (refused at once, like
    a machine without network, and never a real download): a one-line error naming the flag."""
    closed = f"http://127.0.0.1:{free_port()}"
    env = {
        "TORCH_HOME": str(tmp_path / "torch_home"),
        "https_proxy": closed,
        "HTTPS_PROXY": closed,
        "no_proxy": "",
        "NO_PROXY": "",
    }
    if script == "main_jit.py":
        ckpt = tmp_path / "checkpoint-last.pth"
        save_reference_checkpoint(ckpt, tiny_denoiser())
        args = [
            "--model",
            TINY_MODEL["model"],
            "--img_size",
            16,
            "--class_num",
            3,
            "--num_images",
            12,
            "--evaluate_gen",
            "--resume",
            ckpt,
            "--output_dir",
            tmp_path / "out",
            "--device",
            "cpu",
            "--fid_stats",
            fid_ref_stats,
        ]
    else:
        make_image_folder(tmp_path / "data", classes=1, per_class=2)
        args = [
            "--data_path",
            tmp_path / "data",
            "--img_size",
            16,
            "--stats",
            tmp_path / "s.npz",
            "--device",
            "cpu",
            "--num_workers",
            0,
        ]
    p = run_script(script, *args, env=env, timeout=120, check=False)
    assert p.returncode == 2
    assert "--inception_weights" in p.stdout and "Traceback" not in p.stdout, p.stdout


@pytest.mark.slow
def test_sample_grid_from_reference_checkpoint(tmp_path):
    d = tiny_denoiser()
    ckpt = tmp_path / "checkpoint-last.pth"
    save_reference_checkpoint(ckpt, d)
    grid = tmp_path / "grid.png"
    run_script(
        "sample.py",
        "--resume",
        ckpt,
        "--classes",
        2,
        0,
        1,
        "--per_class",
        2,
        "--num_sampling_steps",
        2,
        "--cfg",
        2.0,
        "--interval_min",
        0.1,
        "--seed",
        3,
        "--output",
        grid,
        "--device",
        "cpu",
    )
    img = torch.from_numpy(np.array(Image.open(grid))).permute(2, 0, 1)  # (3, H, W) uint8
    assert img.shape == (3, 3 * 16 + 4 * 2, 2 * 16 + 3 * 2)
    noise = initial_noise(3, range(6), (3, 16, 16), 1.0)
    x = quantize(d.generate(torch.tensor([2, 2, 0, 0, 1, 1]), SAMPLER, noise=noise))
    cell = img[:, 2 + 18 : 18 + 18, 2 + 18 : 18 + 18]  # row 1 (class 0), column 1 -> image 3
    assert (cell.int() - x[3].int()).abs().max() <= 1
