"""How accurate the samplers are at a given number of network evaluations (issue 29, item 5).

    python bench/digits_data.py --out data/digits --size 16          # needs scikit-learn (bench only)
    python main_jit.py --model JiT-XS/4 --img_size 16 --class_num 10 --data_path data/digits ...
    python bench/solver_error.py --resume OUTPUT_DIR --data_path data/digits --json solver_error.json

1. Solver error: from the same noise and labels (class-balanced, image i has class i mod classes),
   every (method, schedule) at the largest step count whose NFE is at most each of --nfe, against
   the converged solution of the sampler's ODE (Heun with --ref_steps steps): the RMSE in uint8
   levels between the quantised images (util.evaluation.quantize, as FID sees them), and seconds per
   image. NFE: sequential network evaluations per image, a guided one (a doubled batch) counts once
   (SamplerSettings.nfe); net passes: forward passes per image, a guided evaluation counts twice.
2. Fréchet distance against NFE (--fd): for the given METHOD:SCHEDULE:STEPS settings, on --fd_images
   images per seed and each of --fd_seeds, the Fréchet distance between the generated images and the
   training images of --data_path (an ImageFolder tree), both as grey 8×8 pixels in [0, 1] (the
   digits' native resolution: 64 features, which the 1797 training images estimate well). It is not
   the Inception FID (its weights need a download): it compares the pixel statistics, so it says
   whether a fast solver moves the sample distribution, not how good the model is. The spread over
   the seeds is its noise; its floor, --fd_images training images against all of them, is printed
   first.
"""

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import run_sources  # noqa: E402
import weights  # noqa: E402
from sampling import METHODS, SamplerSettings  # noqa: E402
from util.errors import BadValue, exit_code  # noqa: E402
from util.evaluation import initial_noise, quantize  # noqa: E402


def load_denoiser(resume: str, ema: int):
    """The Denoiser of a checkpoint (file or run folder; EMA `ema`) or an exported folder."""
    if weights.is_exported(resume):
        return weights.load_denoiser(resume).denoiser
    state, path, _ = run_sources.read_weights(resume, log=lambda msg: None)
    which = f"ema{ema}"
    config = weights.export_config(state, which, dtype="float32", source=path, records=[])
    return weights.load_denoiser((config, state.weights(which)), {}, where=f"{path} ({which})").denoiser


def settings_at_most(method: str, schedule: str, nfe: int, **guidance) -> SamplerSettings | None:
    """The settings of the most steps whose NFE is at most `nfe` (None if even the fewest exceed it)."""
    best = None
    for steps in range(1, nfe + 1):
        try:
            s = SamplerSettings(method=method, steps=steps, schedule=schedule, **guidance)
        except ValueError:  # too few steps for the guidance interval
            continue
        if s.nfe() <= nfe:
            best = s
    return best


def generate(model, settings: SamplerSettings, seed: int, num_images: int, batch: int):
    """(uint8 images (N, 3, H, W), seconds) from the noise of images 0..N-1 of `seed`."""
    size, classes = model.net.input_size, model.num_classes
    out, start = [], time.perf_counter()
    for lo in range(0, num_images, batch):
        idx = range(lo, min(lo + batch, num_images))
        noise = initial_noise(seed, idx, (model.net.in_channels, size, size), model.noise_scale)
        labels = torch.tensor([i % classes for i in idx])
        out.append(quantize(model.generate(labels, settings, noise=noise)))
    return torch.cat(out), time.perf_counter() - start


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root mean square difference of two uint8 image batches, in uint8 levels."""
    return math.sqrt(((a.double() - b.double()) ** 2).mean().item())


def grey8(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 3, H, W) -> (N, 64) grey 8×8 in [0, 1] (area average; H, W multiples of 8)."""
    x = images.astype(np.float64).mean(axis=1) / 255.0
    n, h, w = x.shape
    return x.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4)).reshape(n, 64)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D)."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def training_features(data_path: str, size: int) -> np.ndarray:
    from PIL import Image

    root = os.path.join(data_path, "train")
    files = [
        os.path.join(root, c, f) for c in sorted(os.listdir(root)) for f in sorted(os.listdir(os.path.join(root, c)))
    ]
    imgs = np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size))).transpose(2, 0, 1) for f in files])
    return grey8(imgs)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--resume", required=True, help="checkpoint file, run folder or exported folder")
    a("--ema", default=1, type=int, choices=(1, 2, 3))
    a("--num_images", default=200, type=int, help="images for the solver error")
    a("--batch", default=200, type=int, help="images per generate call")
    a("--seed", default=0, type=int)
    a("--cfg", default=2.0, type=float)
    a("--interval_min", default=0.1, type=float)
    a("--interval_max", default=1.0, type=float)
    a("--ref_steps", default=200, type=int, help="Heun steps of the converged solution")
    a("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    a("--schedules", nargs="+", default=["uniform"], help="schedules (denoiser.SCHEDULES, name or name:parameter)")
    a("--nfe", nargs="+", type=int, default=[6, 10, 16, 20, 30, 50])
    a(
        "--extra",
        nargs="*",
        default=[],
        help="more METHOD:SCHEDULE:STEPS points for the error table (e.g. heun:uniform:50)",
    )
    a("--fd", nargs="*", default=[], help="METHOD:SCHEDULE:STEPS settings for the Fréchet distance")
    a("--fd_images", default=500, type=int)
    a("--fd_seeds", nargs="+", type=int, default=[1, 2])
    a("--data_path", default=None, help="ImageFolder tree (train/) for the Fréchet distance")
    a("--threads", default=None, type=int, help="torch CPU threads")
    a("--json", default=None, help="write the results here")
    return p


def parse_point(text: str, guidance: dict) -> SamplerSettings:
    parts = text.split(":")
    try:
        return SamplerSettings(method=parts[0], schedule=":".join(parts[1:-1]), steps=int(parts[-1]), **guidance)
    except (ValueError, TypeError) as e:
        raise BadValue(f"{text!r}: want METHOD:SCHEDULE:STEPS ({e})") from None


def main(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    guidance = dict(cfg=args.cfg, interval_min=args.interval_min, interval_max=args.interval_max)
    try:
        for s in args.schedules:
            SamplerSettings(schedule=s)
    except ValueError as e:
        raise BadValue(str(e)) from None
    extra = [parse_point(p, guidance) for p in args.extra]
    fd_points = [parse_point(p, guidance) for p in args.fd]
    if fd_points and not args.data_path:
        raise BadValue("--fd needs --data_path (the training images)")
    model = load_denoiser(args.resume, args.ema)
    torch.set_grad_enabled(False)
    results = {"config": vars(args), "rows": [], "fd": []}
    ref_settings = SamplerSettings(method="heun", steps=args.ref_steps, **guidance)
    ref, sec = generate(model, ref_settings, args.seed, args.num_images, args.batch)
    half, _ = generate(
        model,
        SamplerSettings(method="heun", steps=args.ref_steps // 2, **guidance),
        args.seed,
        args.num_images,
        args.batch,
    )
    results["reference"] = {
        "steps": args.ref_steps,
        "nfe": ref_settings.nfe(),
        "seconds_per_image": sec / args.num_images,
        "rmse_of_half_the_steps": rmse(half, ref),
    }
    print(
        f"reference: heun {args.ref_steps} steps ({ref_settings.nfe()} NFE); heun {args.ref_steps // 2} steps "
        "differs by "
        f"{results['reference']['rmse_of_half_the_steps']:.3f} levels",
        flush=True,
    )
    points = [settings_at_most(m, s, n, **guidance) for m in args.methods for s in args.schedules for n in args.nfe]
    seen = set()
    for s in [p for p in points if p is not None] + extra:
        if s in seen:
            continue
        seen.add(s)
        images, sec = generate(model, s, args.seed, args.num_images, args.batch)
        row = dict(
            method=s.method,
            schedule=s.schedule,
            steps=s.steps,
            nfe=s.nfe(),
            net_passes=s.net_passes(),
            rmse=rmse(images, ref),
            seconds_per_image=sec / args.num_images,
        )
        results["rows"].append(row)
        print(
            f"{row['method']:8s} {row['schedule']:9s} steps {row['steps']:3d} NFE {row['nfe']:3d}: RMSE "
            f"{row['rmse']:6.3f} levels, "
            f"{row['seconds_per_image'] * 1e3:.1f} ms/image",
            flush=True,
        )
    if fd_points:
        data = training_features(args.data_path, model.net.input_size)
        floor = [
            frechet(
                data[np.random.default_rng(seed).choice(len(data), min(args.fd_images, len(data)), replace=False)], data
            )
            for seed in args.fd_seeds
        ]
        results["fd_floor"] = floor
        print(
            f"FD floor: {args.fd_images} training images against all of them: {', '.join(f'{x:.5f}' for x in floor)}",
            flush=True,
        )
        for s in fd_points:
            fds, secs = [], []
            for seed in args.fd_seeds:
                images, sec = generate(model, s, seed, args.fd_images, args.batch)
                fds.append(frechet(grey8(images.numpy()), data))
                secs.append(sec / args.fd_images)
            row = dict(
                method=s.method,
                schedule=s.schedule,
                steps=s.steps,
                nfe=s.nfe(),
                fd=float(np.mean(fds)),
                fd_std=float(np.std(fds, ddof=1)) if len(fds) > 1 else None,
                fds=fds,
                seconds_per_image=float(np.mean(secs)),
            )
            results["fd"].append(row)
            print(
                f"FD {row['method']:8s} {row['schedule']:9s} steps {row['steps']:3d} NFE {row['nfe']:3d}: "
                f"{row['fd']:.5f} "
                f"(seeds {', '.join(f'{x:.5f}' for x in fds)})",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(exit_code(main, get_args_parser().parse_args()))
