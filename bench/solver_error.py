"""How accurate the samplers are at a given number of network evaluations (NFE), how much they amplify
an error in the network's prediction, and how well they invert (docs/sampling.md has the tables).

    python bench/solver_error.py --problem mixture --json mixture.json         # seconds, no model
    python bench/digits_data.py --out data/digits16 --size 16 --train data/xs16  # the digits model (CPU)
    python bench/solver_error.py --resume data/xs16/checkpoint-last.pth --json digits.json

Problems: --problem mixture is bench/mixture.py's 8-mode 2-D mixture with its exact x-prediction
(--num_images points, float64, errors in data units); --resume samples a trained model (a checkpoint
or exported folder; errors in uint8 levels between the quantised images, as FID sees them). Same
noise and labels (class-balanced) for every sampler; CFG --cfg on (--interval_min, --interval_max).

1. Solver error: every (method, schedule) at the most steps whose NFE is at most each of --nfe,
   against the converged solution of the sampler's ODE (--ref_method with --ref_steps steps; its
   distance to the same method at half the steps is printed first). NFE: sequential network
   evaluations per image, a guided one (a doubled batch) counts once; net passes count it twice.
   --extra METHOD:SCHEDULE:STEPS adds points (Heun at 10, 20, 50 steps: the goals).
2. Noise amplification (--amplification): a bf16-sized error (N(0, δ²), δ = 2^-8, drawn anew at
   every evaluation) added to the prediction x̂; amplification = RMS change of the output / δ.
3. Inversion (--inversion METHOD:SCHEDULE ...): at each of --inversion_steps, the samples of those
   settings are inverted (sampling.invert) and generated again: RMSE of the recovered noise against
   the noise they came from, and of the images generated from it against the samples.
4. Census (--census, nothing else runs): every method × CENSUS's schedules, step counts and guidance
   intervals, at t_eps 0.05 and 0, on the mixture: settings refused when made, sampled, non-finite.
5. Fréchet distance against NFE (--fd, a model only): for METHOD:SCHEDULE:STEPS settings, on
   --fd_images images per seed and each of --fd_seeds, the Fréchet distance between the generated
   images and the training images of --data_path (an ImageFolder tree), both as grey 8×8 pixels in
   [0, 1] (no Inception weights offline: it compares pixel statistics). Its floor, --fd_images
   training images against all of them, is printed first.
"""

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sampling import METHODS, SamplerSettings, invert, sample  # noqa: E402
from util.errors import BadValue, exit_code  # noqa: E402
from util.evaluation import initial_noise, quantize  # noqa: E402

BF16 = 2.0**-8  # the spacing of bf16 numbers just above 1: its relative rounding error is up to half of it


class MixtureProblem:
    """bench/mixture.py's mixture: `num` points, exact x̂, float64; errors in data units."""

    units = "data units"

    def __init__(self, num: int, seed: int):
        from mixture import CLASSES, Mixture

        self.net, self.null = Mixture(), CLASSES
        self.z0, self.labels = self.net.noise(num, seed)

    def run(self, settings, net=None, noise=None):
        z = self.z0 if noise is None else noise
        return sample(net or self.net, z, self.labels, settings, null_label=self.null, t_eps=0.05)

    def invert(self, settings, x):
        return invert(self.net, x, self.labels, settings, null_label=self.null, t_eps=0.05)

    def error(self, a, b) -> float:
        return math.sqrt(((a - b) ** 2).mean().item())


class ModelProblem:
    """A trained model (Denoiser), `num` images of seed `seed` in batches; errors in uint8 levels."""

    units = "uint8 levels"

    def __init__(self, model, num: int, seed: int, batch: int):
        self.model, self.batch = model, batch
        size, classes = model.net.input_size, model.num_classes
        self.z0 = initial_noise(seed, range(num), (model.net.in_channels, size, size), model.noise_scale)
        self.labels = torch.arange(num) % classes

    def batches(self):
        return [slice(lo, lo + self.batch) for lo in range(0, len(self.labels), self.batch)]

    def run(self, settings, net=None, noise=None):
        z = self.z0 if noise is None else noise
        return torch.cat([self.model.generate(self.labels[b], settings, noise=z[b], net=net) for b in self.batches()])

    def invert(self, settings, x):
        m = self.model
        kw = dict(null_label=m.num_classes, t_eps=m.t_eps, pred=m.pred)
        return torch.cat([invert(m.net, x[b], self.labels[b], settings, **kw) for b in self.batches()])

    def error(self, a, b) -> float:
        return math.sqrt(((quantize(a).double() - quantize(b).double()) ** 2).mean().item())


def trained_denoiser(resume: str, ema: int):
    """The Denoiser of a checkpoint (file or run folder; EMA `ema`) or an exported folder."""
    import run_sources
    import weights

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
        except ValueError:  # too few steps for the guidance interval, or a grid float32 cannot hold
            continue
        if s.nfe() <= nfe:
            best = s
    return best


class Perturbed:
    """net + N(0, δ²) noise on its prediction at every call (a fixed generator: reproducible)."""

    def __init__(self, net, delta: float, seed: int = 0):
        self.net, self.delta, self.gen = net, delta, torch.Generator().manual_seed(seed)

    def __call__(self, z, t, y):
        out = self.net(z, t, y)
        return out + self.delta * torch.randn(out.shape, generator=self.gen, dtype=out.dtype).to(out.device)


def amplification(problem, settings, out) -> float:
    """RMS change of the output per unit of a prediction error of size BF16 (see Perturbed)."""
    net = problem.net if isinstance(problem, MixtureProblem) else problem.model.net
    perturbed = problem.run(settings, net=Perturbed(net, BF16))
    return math.sqrt(((perturbed.double() - out.double()) ** 2).mean().item()) / BF16


def reference(problem, args, guidance) -> tuple[torch.Tensor, dict]:
    ref_settings = SamplerSettings(method=args.ref_method, steps=args.ref_steps, **guidance)
    ref = problem.run(ref_settings)
    half = problem.run(SamplerSettings(method=args.ref_method, steps=args.ref_steps // 2, **guidance))
    info = dict(
        method=args.ref_method, steps=args.ref_steps, nfe=ref_settings.nfe(), half_steps=problem.error(half, ref)
    )
    print(
        f"reference: {args.ref_method} {args.ref_steps} steps ({info['nfe']} NFE); {args.ref_steps // 2} steps differ "
        f"by {info['half_steps']:.4g} {problem.units}",
        flush=True,
    )
    return ref, info


def error_rows(problem, ref, points, do_amplification: bool) -> list[dict]:
    rows = []
    for s in points:
        start = time.perf_counter()
        out = problem.run(s)
        sec = (time.perf_counter() - start) / len(problem.labels)
        row = dict(method=s.method, schedule=s.schedule, steps=s.steps, nfe=s.nfe(), net_passes=s.net_passes())
        row.update(rmse=problem.error(out, ref), seconds_per_image=sec)
        if do_amplification:
            row["amplification"] = amplification(problem, s, out)
        rows.append(row)
        amp = f", amplification {row['amplification']:.1f}" if do_amplification else ""
        print(
            f"{s.method:8s} {s.schedule:9s} steps {s.steps:3d} NFE {row['nfe']:3d}: RMSE {row['rmse']:.4g}{amp}",
            flush=True,
        )
    return rows


def inversion_rows(problem, specs: list, steps_list: list, guidance: dict) -> list[dict]:
    """Round trips: invert the samples of each METHOD:SCHEDULE at each step count, generate again."""
    rows = []
    for spec in specs:
        method, _, schedule = spec.partition(":")
        for steps in steps_list:
            s = parse_point(f"{method}:{schedule or 'uniform'}:{steps}", guidance)
            x = problem.run(s)
            z = problem.invert(s, x)
            back = problem.run(s, noise=z)
            noise_rmse = math.sqrt(((z.double() - problem.z0.double()) ** 2).mean().item())
            row = dict(method=method, schedule=s.schedule, steps=steps, noise_rmse=noise_rmse)
            row["image_rmse"] = problem.error(back, x)
            rows.append(row)
            print(
                f"inversion {method:8s} {s.schedule:9s} steps {steps:3d}: noise RMSE {noise_rmse:.4g}, images "
                f"RMSE {row['image_rmse']:.4g} {problem.units}",
                flush=True,
            )
    return rows


CENSUS = dict(
    schedules=["uniform", "shift", "shift:0.5", "logit", "logit:3", "power", "power:7", "karras", "karras:3"],
    steps=[1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 30, 50, 100],
    intervals=[(0.0, 1.0), (0.1, 1.0), (0.1, 0.9), (0.5, 0.50000001), (0.2, 1 - 1e-9)],
)


REASONS = [("steps for the interval", "steps"), ("guidance interval", "interval"), ("float32 time nodes", "grid")]


def census(cfg: float) -> dict:
    """Every method × CENSUS on 64 points of the mixture (float32, as a trained net runs) at t_eps
    0.05 and 0: how many settings are refused when made, how many sample, how many of those return a
    non-finite value (the property tests/test_sampling.py checks)."""
    from mixture import CLASSES, Mixture

    net = Mixture()
    z0, labels = net.noise(64, 0, dtype=torch.float32)
    counts = dict(settings=0, refused=0, sampled=0, non_finite=0)
    for method in METHODS:
        for schedule in CENSUS["schedules"]:
            for steps in CENSUS["steps"]:
                for lo, hi in CENSUS["intervals"]:
                    for t_eps in (0.05, 0.0):
                        counts["settings"] += 1
                        try:
                            s = SamplerSettings(method, steps, cfg, lo, hi, schedule)
                        except ValueError as e:
                            counts["refused"] += 1
                            why = next((w for k, w in REASONS if k in str(e)), "other")
                            counts[f"refused: {why}"] = counts.get(f"refused: {why}", 0) + 1
                            continue
                        counts["sampled"] += 1
                        out = sample(net, z0, labels, s, null_label=CLASSES, t_eps=t_eps)
                        counts["non_finite"] += not bool(torch.isfinite(out).all())
    print(f"census: {counts}", flush=True)
    return counts


def nfe_table(rows: list[dict], key: str, nfes: list) -> str:
    """A Markdown table: one row per (method, schedule), one column per NFE limit (Heun: its own NFE
    in brackets), the value `key` of the row with the most steps within the limit."""
    lines = ["| method | schedule | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|---|" + "---:|" * len(nfes)]
    for m, s in dict.fromkeys((r["method"], r["schedule"]) for r in rows):
        cells = []
        for n in nfes:
            fit = [r for r in rows if (r["method"], r["schedule"]) == (m, s) and r["nfe"] <= n]
            best = max(fit, key=lambda r: r["steps"], default=None)
            own = f" ({best['nfe']})" if best and best["nfe"] != n else ""
            cells.append(f"{best[key]:.3g}{own}" if best else "–")
        lines.append(f"| `{m}` | `{s}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def fd_rows(model, points: list, args) -> tuple[list, list[dict]]:
    """(floor per seed, a row per setting) of the Fréchet distance against the training images."""
    data = training_features(args.data_path, model.net.input_size)
    n = min(args.fd_images, len(data))
    floor = [
        frechet(data[np.random.default_rng(seed).choice(len(data), n, replace=False)], data) for seed in args.fd_seeds
    ]
    print(f"FD floor: {args.fd_images} training images against all of them: {', '.join(f'{x:.5f}' for x in floor)}")
    rows = []
    for s in points:
        fds = []
        for seed in args.fd_seeds:
            images = quantize(ModelProblem(model, args.fd_images, seed, args.batch).run(s))
            fds.append(frechet(grey8(images.numpy()), data))
        rows.append(
            dict(method=s.method, schedule=s.schedule, steps=s.steps, nfe=s.nfe(), fds=fds, fd=float(np.mean(fds)))
        )
        print(f"FD {s.method:8s} {s.schedule:9s} steps {s.steps:3d} NFE {s.nfe():3d}: {rows[-1]['fd']:.5f}", flush=True)
    return floor, rows


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--problem", default="model", choices=("model", "mixture"), help="a trained model (--resume) or the mixture")
    a("--resume", default=None, help="checkpoint file, run folder or exported folder (--problem model)")
    a("--ema", default=1, type=int, choices=(1, 2, 3))
    a("--num_images", default=200, type=int, help="images (or mixture points) per sampler")
    a("--batch", default=200, type=int, help="images per generate call")
    a("--seed", default=0, type=int)
    a("--cfg", default=2.0, type=float)
    a("--interval_min", default=0.1, type=float)
    a("--interval_max", default=1.0, type=float)
    a("--ref_method", default="unipc3", choices=METHODS, help="the converged solution's method")
    a("--ref_steps", default=400, type=int, help="the converged solution's steps")
    a("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    a("--schedules", nargs="+", default=["uniform", "logit:3", "karras"], help="name or name:parameter")
    a("--nfe", nargs="+", type=int, default=[6, 8, 10, 16, 20])
    a(
        "--extra",
        nargs="*",
        default=["heun:uniform:10", "heun:uniform:20", "heun:uniform:50"],
        help="METHOD:SCHEDULE:STEPS",
    )
    a("--amplification", action="store_true", help="also measure the noise amplification of every point")
    a("--inversion", nargs="*", default=[], help="METHOD:SCHEDULE settings to invert (round trip)")
    a("--inversion_steps", nargs="+", type=int, default=[10, 20, 50])
    a("--census", action="store_true", help="only count refused and non-finite settings over CENSUS (mixture)")
    a("--fd", nargs="*", default=[], help="METHOD:SCHEDULE:STEPS settings for the Fréchet distance (a model)")
    a("--fd_images", default=500, type=int)
    a("--fd_seeds", nargs="+", type=int, default=[1, 2])
    a("--data_path", default=None, help="ImageFolder tree (train/) for the Fréchet distance")
    a("--threads", default=None, type=int, help="torch CPU threads")
    a("--json", default=None, help="write the results here")
    return p


def parse_args(argv=None):
    return get_args_parser().parse_args(argv)


def parse_point(text: str, guidance: dict) -> SamplerSettings:
    """METHOD:SCHEDULE:STEPS (the schedule may hold a ':' of its own) as SamplerSettings; BadValue."""
    parts = text.split(":")
    try:
        return SamplerSettings(method=parts[0], schedule=":".join(parts[1:-1]), steps=int(parts[-1]), **guidance)
    except (ValueError, TypeError) as e:
        raise BadValue(f"{text!r}: want METHOD:SCHEDULE:STEPS ({e})") from None


def check_bench_args(args, guidance: dict) -> tuple[list, list]:
    """(extra points, Fréchet points); BadValue (one line) for anything that cannot run."""
    if args.problem == "model" and not args.resume:
        raise BadValue("--problem model needs --resume (a checkpoint or exported folder)")
    if args.fd and (args.problem != "model" or not args.data_path):
        raise BadValue("--fd needs a model (--resume) and --data_path (its training images)")
    positive = {"num_images": [args.num_images], "batch": [args.batch], "nfe": args.nfe, "fd_images": [args.fd_images]}
    for name, values in {**positive, "inversion_steps": args.inversion_steps, "threads": [args.threads or 1]}.items():
        if min(values) < 1:
            raise BadValue(f"--{name} must be at least 1, got {' '.join(map(str, values))}")
    try:
        SamplerSettings(method=args.ref_method, steps=args.ref_steps, **guidance)  # the reference
        for s in (*args.schedules, *(p.partition(":")[2] or "uniform" for p in args.inversion)):
            SamplerSettings(method="unipc2", schedule=s, **guidance)
    except ValueError as e:
        raise BadValue(str(e)) from None
    for spec in args.inversion:
        if spec.partition(":")[0] not in METHODS:
            raise BadValue(f"--inversion {spec!r}: want METHOD:SCHEDULE with METHOD one of {', '.join(METHODS)}")
        for steps in args.inversion_steps:
            parse_point(f"{spec.partition(':')[0]}:{spec.partition(':')[2] or 'uniform'}:{steps}", guidance)
    return [parse_point(p, guidance) for p in args.extra], [parse_point(p, guidance) for p in args.fd]


@torch.no_grad()
def main(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    guidance = dict(cfg=args.cfg, interval_min=args.interval_min, interval_max=args.interval_max)
    if args.census:
        counts = census(args.cfg)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"config": vars(args), "census": counts}, f, indent=1)
        return 0
    extra, fd_points = check_bench_args(args, guidance)
    if args.problem == "mixture":
        problem = MixtureProblem(args.num_images, args.seed)
    else:
        problem = ModelProblem(trained_denoiser(args.resume, args.ema), args.num_images, args.seed, args.batch)
    ref, ref_info = reference(problem, args, guidance)
    points = [settings_at_most(m, s, n, **guidance) for m in args.methods for s in args.schedules for n in args.nfe]
    points = list(dict.fromkeys(p for p in points if p is not None))
    rows = error_rows(problem, ref, points, args.amplification)
    extra_rows = error_rows(problem, ref, [p for p in extra if p not in points], args.amplification)
    results = {"config": vars(args), "units": problem.units, "reference": ref_info, "rows": rows, "extra": extra_rows}
    for key in ("rmse", "amplification") if args.amplification else ("rmse",):
        print(f"{key} ({problem.units if key == 'rmse' else 'output RMS per unit of prediction error'}):")
        print(nfe_table(rows, key, args.nfe))
        print(
            "; ".join(
                f"{r['method']} {r['schedule']} {r['steps']} steps ({r['nfe']} NFE) {r[key]:.3g}" for r in extra_rows
            )
        )
    results["inversion"] = inversion_rows(problem, args.inversion, args.inversion_steps, guidance)
    if fd_points:
        results["fd_floor"], results["fd"] = fd_rows(problem.model, fd_points, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def cli(argv=None) -> int:
    """Exit status as util.errors: 2 for bad input (one line)."""
    return exit_code(main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
