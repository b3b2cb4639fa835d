"""Class-balanced generation and FID / Inception Score, on all ranks at once, without PNG files.

Image i (0 <= i < num_images) has class i // (num_images / class_num) and its own initial noise,
drawn on the CPU by numpy's PCG64 seeded with the pair (seed, i). Images are generated in global batches
[k·gen_bsz, (k+1)·gen_bsz); rank r takes a contiguous run of those batches. So the set, its order
and every batch's content depend on (weights, seed, gen_bsz, sampler), not on the number of
processes. A different gen_bsz changes only the float rounding of the network's batched kernels
(CPU or GPU matrix products are not batch-invariant), which may move a few uint8 values by one.

Each batch is quantised to uint8 and fed to torch-fidelity's Inception (and DINOv2, for FD-DINOv2)
in memory; the features are gathered on rank 0 in image order, which computes FID and IS (and
precision / recall, FD-DINOv2) and shares the numbers with every rank. What is generated is a
`GenerationSpec`; how it is scored, a `Scorer` (util/scorer.py, built once per run). Logging the
results is engine_eval.evaluate's job. `check_eval_flags` and `eval_notes` are the evaluation flags' checks
and warnings for main_jit.py.
"""

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from sampling import SamplerSettings
from util.distributed import (
    all_gather_object,
    autocast,
    barrier,
    get_rank,
    get_world_size,
    host_all_reduce_sum,
    is_dist,
    is_main_process,
    print0,
    print_all,
)
from util.errors import BadValue
from util.files import atomic_write
from util.scorer import Scorer
from util.stop import GenerationStopped


@dataclass(frozen=True)
class GenerationSpec:
    """What an evaluation generates: `num_images` class-balanced images of `img_size` px over
    `class_num` classes, sampled with `sampler` in global batches of `gen_bsz`, image i from the
    noise of (seed, i). BadValue unless num_images is a positive multiple of class_num."""

    num_images: int
    class_num: int
    img_size: int
    sampler: SamplerSettings
    gen_bsz: int = 256
    seed: int = 0

    def __post_init__(self):
        if self.class_num < 1 or self.num_images < 1 or self.num_images % self.class_num:
            raise BadValue(
                f"the number of images ({self.num_images}) must be a positive multiple of --class_num "
                f"({self.class_num}) for class-balanced generation"
            )


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


def generate_batches(denoiser, spec: GenerationSpec, device: torch.device, net=None, should_stop=None):
    """Yield (start, uint8 images (B, 3, img_size, img_size) on device) for this rank's batches of
    `spec`, in index order. net: a stand-in for denoiser.net with its weights (e.g. compiled).
    should_stop: a collective callable (util.stop.requested_anywhere), asked before each batch and as
    often on every rank (a rank with a batch fewer asks once more at the end); True raises
    util.stop.GenerationStopped there."""
    batches = rank_batches(spec.num_images, spec.gen_bsz, get_rank(), get_world_size())
    rounds = math.ceil(math.ceil(spec.num_images / spec.gen_bsz) / get_world_size())  # the most any rank has

    def draw(k):
        return initial_noise(spec.seed, range(*batches[k]), (3, spec.img_size, spec.img_size), denoiser.noise_scale)

    def check():
        if should_stop is not None and should_stop():
            raise GenerationStopped("stop requested (signal) between two generation batches")

    with ThreadPoolExecutor(max_workers=1) as pool:  # draws the next batch's noise while this one samples
        pending = pool.submit(draw, 0) if batches else None
        for k, (start, stop) in enumerate(batches):
            check()
            noise = pending.result().to(device)
            if k + 1 < len(batches):
                pending = pool.submit(draw, k + 1)
            labels = class_labels(torch.arange(start, stop), spec.num_images, spec.class_num).to(device)
            with autocast(device):
                x = denoiser.generate(labels, spec.sampler, noise=noise, net=net)
            yield start, quantize(x)
    for _ in range(len(batches), rounds):
        check()


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
    interval = f"{s.interval_min}-{s.interval_max}"
    return f"{s.method}-steps{s.steps}-cfg{s.cfg}-interval{interval}-image{num_images}-res{img_size}"


def save_pngs(images: torch.Tensor, start: int, folder: str, num_images: int):
    """Write uint8 images (B, 3, H, W) as {index}.png, zero-padded (≥ 5 digits) so names sort in index
    order; each file appears complete or not at all (util.files.atomic_write, WriteError on failure)."""
    width = max(5, len(str(num_images - 1)))
    for j, img in enumerate(images.cpu()):
        pil = Image.fromarray(img.permute(1, 2, 0).numpy())
        atomic_write(os.path.join(folder, f"{start + j:0{width}d}.png"), lambda f, pil=pil: pil.save(f, format="PNG"))


def score_images(
    denoiser, spec: GenerationSpec, scorer: Scorer, *, net=None, image_dir: str | None = None, should_stop=None
) -> dict:
    """Generate the images of `spec` with `denoiser` (an EMA) on every rank and score them.

    Call on every rank. net: a stand-in for denoiser.net (e.g. compiled); should_stop: see
    generate_batches (GenerationStopped between batches). Generation runs under the device's
    autocast; Inception (and DINOv2) in float32. image_dir: also keep the PNGs there (a full disk
    stops the writing, not the scoring; then `images_saved` is False). Returns, on every rank,
    scorer.scores' numbers ('fid', 'inception_score', 'inception_score_std', ...), 'num_images' and
    'seconds' (+ 'images_saved').
    """
    t0 = time.time()
    device = scorer.device
    if image_dir and is_main_process():
        os.makedirs(image_dir, exist_ok=True)
    barrier()
    num_batches = len(rank_batches(spec.num_images, spec.gen_bsz, get_rank(), get_world_size()))
    report_every = max(1, num_batches // 10)
    features, png_error = [], None
    for b, (start, images) in enumerate(generate_batches(denoiser, spec, device, net, should_stop), 1):
        if image_dir and png_error is None:
            try:
                save_pngs(images, start, image_dir, spec.num_images)
            except OSError as e:  # a full disk: stop writing, go on scoring
                png_error = e
                print_all(f"error: {e}; the remaining images of this process are not saved")
        features.append(scorer.features(images))
        if b % report_every == 0 or b == num_batches:
            print0(f"eval: rank 0 batch {b}/{num_batches}, {time.time() - t0:.0f}s")
    png_failures = round(host_all_reduce_sum([float(png_error is not None)])[0]) if image_dir else 0
    share = torch.cat(features) if features else torch.empty((0, scorer.feature_dim))
    everything = gather_rows(share, device)  # (num_images, scorer.feature_dim) on rank 0
    result = None
    if is_main_process():
        result = dict(**scorer.scores(everything), num_images=spec.num_images, seconds=time.time() - t0)
        if image_dir:
            result["images_saved"] = png_failures == 0
    return all_gather_object(result)[0]


def scoring(config, points: list, device) -> tuple[GenerationSpec, Scorer]:
    """What a run's evaluation (`config`: main_jit's; `points`: util.sweep.eval_points) generates and
    how it is scored; checks --num_images, --final_num_images and every file the scorer reads: the FID
    statistics, the Inception weights (downloaded now if not cached and not given), --ref_features,
    --dinov2_weights and --dinov2_stats (default fid_stats/jit_in{img_size}_dinov2_stats.npz); a
    reference file that says it is of images of another size than --img_size is refused."""
    spec = GenerationSpec(
        num_images=config.num_images,
        class_num=config.class_num,
        img_size=config.img_size,
        sampler=points[0].sampler,
        gen_bsz=config.gen_bsz,
        seed=config.seed,
    )
    if config.final_num_images is not None:
        GenerationSpec(**{**vars(spec), "num_images": config.final_num_images})
    return spec, Scorer(
        config.fid_stats,
        config.inception_weights,
        device,
        ref_features=config.ref_features,
        dinov2_weights=config.dinov2_weights,
        dinov2_stats=config.dinov2_stats or default_dinov2_stats(config.img_size),
        img_size=config.img_size,
    )


def default_dinov2_stats(img_size: int) -> str:
    return os.path.join("fid_stats", f"jit_in{img_size}_dinov2_stats.npz")


SEED_LIMIT = 2**32  # numpy's legacy seeds (np.random.seed, the training's per-process streams) are below this


def check_eval_flags(flags):
    """main_jit.py's evaluation flags that cannot work (BadValue), before any work: --eval_seeds at
    least 1, --seed in [0, 2**32) (numpy's seeds; evaluation noise needs it non-negative),
    --dinov2_stats only with --dinov2_weights."""
    if flags.eval_seeds < 1:
        raise BadValue(f"--eval_seeds must be at least 1, got {flags.eval_seeds}")
    if not 0 <= flags.seed < SEED_LIMIT:
        raise BadValue(f"--seed must be in [0, 2**32 - 1] (numpy's seeds), got {flags.seed}")
    if flags.dinov2_stats and not flags.dinov2_weights:
        raise BadValue("--dinov2_stats is read for FD-DINOv2: add --dinov2_weights (the DINOv2 ViT-L/14 weights file)")


def eval_notes(config, total_steps: int | None) -> list[str]:
    """Warnings about what the run's samples (grids, evaluation) will show, for the log before any
    work: flags of evaluation without an evaluation; guidance (a CFG scale other than 1) towards the
    'no class' label that --label_drop_prob 0 never trains; EMAs that, after the run's `total_steps`
    optimiser steps (None: unknown), still hold over 10% of the initial random weights (ema_notes)."""
    out = []
    evaluating = config.online_eval or config.evaluate_gen
    extra = [f"--{k}" for k in ("ref_features", "dinov2_weights", "eval_seeds") if getattr(config, k) not in (None, 1)]
    if extra and not evaluating:
        out.append(f"{', '.join(extra)} only apply to an evaluation (--online_eval or --evaluate_gen)")
    cfgs = [c for c in (config.cfg if isinstance(config.cfg, list) else [config.cfg]) if c != 1]
    if cfgs and config.label_drop_prob == 0:
        out.append(
            f"--cfg {cfgs[0]} guides away from the 'no class' label, which --label_drop_prob 0 never trains (its "
            "embedding stays at its random initialisation): guided samples are off; sample with --cfg 1.0, or "
            "train with --label_drop_prob > 0 (the paper's 0.1)"
        )
    if total_steps and not config.evaluate_gen:
        out += ema_notes(config, total_steps)
    return out


def ema_notes(config, total_steps: int) -> list[str]:
    """A note when EMAs still hold over 10% of the initial random weights (decay^steps) at the end of
    a run of `total_steps` optimiser steps (EMA 1 is what grids and evaluation sample)."""
    decays = [(k, getattr(config, f"ema_decay{k}")) for k in (1, 2, 3)]
    held = [(k, d, d**total_steps) for k, d in decays if d is not None and d**total_steps > 0.1]
    if not held:
        return []
    one = len(held) == 1
    which = ", ".join(f"EMA {k} (--ema_decay{k} {d})" for k, d, _ in held)
    shares = ", ".join(f"{share:.0%}" for _, _, share in held)
    return [
        f"{which} still hold{'s' if one else ''} {shares} of the initial random weights after this run's "
        f"{total_steps} optimiser steps (decay^steps): {'its' if one else 'their'} sample grids and evaluations "
        f"show mostly the initialisation, not the trained weights; for a short run or a small dataset lower the "
        f"decay ({smaller_decay(total_steps)} keeps under 1%)"
    ]


def smaller_decay(steps: int) -> str:
    """The largest of 0.9999, 0.9998, 0.9995, 0.999, ..., 0.9, 0.8, 0.5 whose decay^steps is below 1%:
    what --ema_decay1 a run of `steps` steps can afford; "0.0" (the EMA is the trained weights) for a
    run too short for any of them (under 7 steps)."""
    for digits in range(4, 0, -1):
        for lead in (1, 2, 5):
            d = 1 - lead * 10.0**-digits
            if d**steps < 0.01:
                return f"{d:.{digits}f}"
    return "0.0"
