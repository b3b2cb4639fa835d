"""Class-balanced generation and FID / Inception Score, on all ranks at once, without PNG files.

Image i (0 <= i < num_images) has class i // (num_images / class_num) and its own initial noise,
drawn on the CPU by numpy's PCG64 seeded with the pair (seed, i). Images are generated in global batches
[k·gen_bsz, (k+1)·gen_bsz); rank r takes a contiguous run of those batches. So the set, its order
and every batch's content depend on (weights, seed, gen_bsz, sampler), not on the number of
processes. A different gen_bsz changes only the float rounding of the network's batched kernels
(CPU or GPU matrix products are not batch-invariant), which may move a few uint8 values by one.

Each batch is quantised to uint8 and fed to torch-fidelity's Inception in memory; the features
are gathered on rank 0 in image order, which computes FID and IS with torch-fidelity's functions
and shares the numbers with every rank.
"""
import dataclasses
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from denoiser import SamplerSettings
from util import fid
from util.distributed import (all_gather_object, autocast, barrier, get_rank, get_world_size, host_all_reduce_sum, is_dist,
                              is_main_process, print0, print_all)
from util.files import atomic_write


def check_eval_inputs(fid_stats: str, inception_weights: str | None, num_images: int, class_num: int) -> str:
    """Fail fast, before any expensive work. Returns the local Inception weights path to use.

    Raises ValueError if num_images is not a positive multiple of class_num or the statistics file
    is malformed, FileNotFoundError if the statistics or weights file is missing or the weights
    cannot be downloaded (the message names --inception_weights). Without `inception_weights` the
    weights are fetched into the torch hub cache now, as torch-fidelity's first use would.
    """
    if class_num <= 0 or num_images <= 0 or num_images % class_num:
        raise ValueError(f"--num_images ({num_images}) must be a positive multiple of --class_num ({class_num}) for class-balanced generation")
    fid.load_stats(fid_stats)
    return fid.resolve_inception_weights(inception_weights)


def class_labels(indices: torch.Tensor, num_images: int, class_num: int) -> torch.Tensor:
    """Labels of image indices (B,) int64: image i has class i // (num_images / class_num)."""
    return indices // (num_images // class_num)


def initial_noise(seed: int, indices, shape: tuple, noise_scale: float) -> torch.Tensor:
    """z₀ for the given image indices: (B, *shape) float32 on the CPU, noise_scale·N(0, I). Image i
    draws from its own numpy PCG64 seeded with (seed, i) (seed >= 0), so its noise is the same on any
    device, process count or batch split."""
    if seed < 0:
        raise ValueError(f"the evaluation seed must be non-negative, got {seed}")
    noise = [np.random.default_rng([seed, int(i)]).standard_normal(shape, dtype=np.float32) for i in indices]
    return torch.from_numpy(np.stack(noise)) * noise_scale


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Images in about [-1, 1] -> uint8, as the reference: round(clip(255·(x + 1)/2, 0, 255)) in float32,
    rounding half to even like np.round."""
    x = (x.float() + 1) / 2
    return (x * 255).clamp(0, 255).round().to(torch.uint8)


def rank_batches(num_images: int, gen_bsz: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """This rank's [start, stop) image ranges: a contiguous run of the global batches of gen_bsz."""
    num_batches = math.ceil(num_images / gen_bsz)
    ks = range(rank * num_batches // world_size, (rank + 1) * num_batches // world_size)
    return [(k * gen_bsz, min((k + 1) * gen_bsz, num_images)) for k in ks]


def generate_batches(denoiser, *, net=None, device, num_images, class_num, gen_bsz, seed, sampler: SamplerSettings, img_size):
    """Yield (start, uint8 images (B, 3, img_size, img_size) on device) for this rank's batches,
    in index order."""
    batches = rank_batches(num_images, gen_bsz, get_rank(), get_world_size())

    def draw(k):
        return initial_noise(seed, range(*batches[k]), (3, img_size, img_size), denoiser.noise_scale)

    with ThreadPoolExecutor(max_workers=1) as pool:  # draws the next batch's noise while this one samples
        pending = pool.submit(draw, 0) if batches else None
        for k, (start, stop) in enumerate(batches):
            noise = pending.result().to(device)
            if k + 1 < len(batches):
                pending = pool.submit(draw, k + 1)
            labels = class_labels(torch.arange(start, stop), num_images, class_num).to(device)
            with autocast(device):
                x = denoiser.generate(labels, sampler, noise=noise, net=net)
            yield start, quantize(x)


def generate_images(denoiser, **kwargs) -> torch.Tensor:
    """This rank's share of the set as uint8 (n_rank, 3, H, W) on the CPU, in index order (the rank's
    first index is that of its first batch). Arguments as `generate_batches`; `gather_rows` of the
    result is the whole set on rank 0."""
    size = kwargs["img_size"]
    parts = [images.cpu() for _, images in generate_batches(denoiser, **kwargs)]
    return torch.cat(parts) if parts else torch.empty((0, 3, size, size), dtype=torch.uint8)


def gather_rows(x: torch.Tensor, device: torch.device, chunk: int = 4096) -> torch.Tensor | None:
    """Concatenate every rank's rows (rank order) on rank 0; None elsewhere. Without a process group, x.

    x: (n_rank, ...) CPU tensor, the trailing shape equal on all ranks. The transfer goes in pieces
    of `chunk` rows through `device` (NCCL needs CUDA tensors), so device memory stays bounded.
    """
    if not is_dist():
        return x
    sizes = all_gather_object(x.shape[0])
    parts = [[] for _ in sizes]
    longest = max(sizes)
    for s in range(0, longest, chunk):
        piece = torch.zeros((min(chunk, longest - s), *x.shape[1:]), dtype=x.dtype, device=device)
        own = x[s : s + chunk]
        piece[: own.shape[0]] = own.to(device)
        received = [torch.empty_like(piece) for _ in sizes] if is_main_process() else None
        dist.gather(piece, received, dst=0)
        if received is not None:
            for r, t in enumerate(received):
                parts[r].append(t.cpu())
    if not is_main_process():
        return None
    return torch.cat([torch.cat(p)[:n] for p, n in zip(parts, sizes)])


def image_folder_name(sampler: SamplerSettings, num_images: int, img_size: int) -> str:
    """The reference's folder name for saved evaluation images."""
    s = sampler
    return f"{s.method}-steps{s.steps}-cfg{s.cfg}-interval{s.interval_min}-{s.interval_max}-image{num_images}-res{img_size}"


def save_pngs(images: torch.Tensor, start: int, folder: str, num_images: int):
    """Write uint8 images (B, 3, H, W) as {index}.png, zero-padded (≥ 5 digits) so names sort in index
    order; each file appears complete or not at all (util.files.atomic_write, WriteError on failure)."""
    width = max(5, len(str(num_images - 1)))
    for j, img in enumerate(images.cpu()):
        pil = Image.fromarray(img.permute(1, 2, 0).numpy())
        atomic_write(os.path.join(folder, f"{start + j:0{width}d}.png"), lambda f: pil.save(f, format="PNG"))


def evaluate(denoiser, *, net=None, device: torch.device, num_images: int, class_num: int, gen_bsz: int, seed: int,
             sampler: SamplerSettings, img_size: int, fid_stats: str, inception_weights: str | None, output_dir: str | None = None,
             save_images: bool = False, epoch: int = 0, checkpoint_epoch: int | None = None, log=None, extractor=None,
             extra: dict | None = None, tag_suffix: str = "") -> dict:
    """Generate `num_images` class-balanced images with `denoiser` (an EMA) and score them.

    Call on every rank. net: a stand-in for denoiser.net (e.g. compiled). extractor: the Inception
    network, when built already (a sweep builds it once). Generation runs under the device's
    autocast; Inception in float32. save_images keeps the PNGs in output_dir/<reference
    folder name>. `log` (a RunLog) gets the TensorBoard scalars `fid_cfg{cfg}_res{img_size}{tag_suffix}`
    and `is_cfg...` at x = epoch and a {"kind": "eval", ...} metrics.jsonl record, with `extra` added.
    Returns, on every rank, {'fid', 'inception_score', 'inception_score_std', 'num_images', 'seconds'}.
    """
    if class_num <= 0 or num_images % class_num:
        raise ValueError(f"num_images ({num_images}) must be a multiple of class_num ({class_num})")
    t0 = time.time()
    if extractor is None:
        extractor = fid.build_inception(fid.resolve_inception_weights(inception_weights), device)
    folder = None
    if save_images:
        folder = os.path.join(output_dir, image_folder_name(sampler, num_images, img_size))
        if is_main_process():
            os.makedirs(folder, exist_ok=True)
        barrier()
    batches = rank_batches(num_images, gen_bsz, get_rank(), get_world_size())
    report_every = max(1, len(batches) // 10)
    features, png_error = [], None
    gen = generate_batches(denoiser, net=net, device=device, num_images=num_images, class_num=class_num,
                           gen_bsz=gen_bsz, seed=seed, sampler=sampler, img_size=img_size)
    for b, (start, images) in enumerate(gen, 1):
        if folder and png_error is None:
            try:
                save_pngs(images, start, folder, num_images)
            except OSError as e:  # a full disk: stop writing, go on scoring
                png_error = e
                print_all(f"error: {e}; the remaining images of this process are not saved")
        features.append(fid.inception_features(extractor, images))
        if b % report_every == 0 or b == len(batches):
            print0(f"eval: rank 0 batch {b}/{len(batches)}, {time.time() - t0:.0f}s")
    png_failures = round(host_all_reduce_sum([float(png_error is not None)])[0]) if save_images else 0
    share = torch.cat(features) if features else torch.empty((0, fid.FEATURE_DIM + fid.LOGITS_DIM))
    everything = gather_rows(share, device)  # (num_images, 2048 + 1008) on rank 0
    result = None
    if is_main_process():
        pool, logits = everything[:, : fid.FEATURE_DIM], everything[:, fid.FEATURE_DIM :]
        fid_value = fid.frechet_distance(fid.statistics(pool), fid.load_stats(fid_stats))
        is_mean, is_std = fid.inception_score(logits)
        result = dict(fid=fid_value, inception_score=is_mean, inception_score_std=is_std,
                      num_images=num_images, seconds=time.time() - t0)
        if save_images:
            result["images_saved"] = png_failures == 0
        print0(f"eval ({num_images} images, cfg {sampler.cfg}): FID {fid_value:.4f}, IS {is_mean:.4f} ± {is_std:.4f}, "
               f"{result['seconds']:.0f}s")
        if log is not None:
            postfix = f"_cfg{sampler.cfg}_res{img_size}{tag_suffix}"
            log.scalars({f"fid{postfix}": fid_value, f"is{postfix}": is_mean}, epoch)
            log.flush()
            log.record(dict(kind="eval", epoch=epoch, checkpoint_epoch=checkpoint_epoch, **result, class_num=class_num,
                            img_size=img_size, seed=seed, gen_bsz=gen_bsz, world_size=get_world_size(),
                            **dataclasses.asdict(sampler), fid_stats=fid_stats, **(extra or {})))
    return all_gather_object(result)[0]
