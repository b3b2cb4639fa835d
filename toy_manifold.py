"""The paper's toy experiment (Li & He, arXiv 2511.13720, Sec. 3, Fig. 2): x-, ε- and v-prediction
when 2-D data lie in a D-dimensional space. docs/toy.md has the results and what they show.

Data: a noisy 2-D spiral s (our choice; the paper does not name its distribution), embedded as
x = P·s by a fixed random column-orthogonal P (D, 2), PᵀP = I. Network: a 5-layer ReLU MLP with
256 hidden units on [z, t]. Each cell (prediction target, D) trains the repo's Denoiser (by default
with the v-loss, as the paper) and samples with the repo's sampler (Heun), projects the samples back
with Pᵀ and scores them by the sliced Wasserstein-1 distance to fresh data. The paper: x-prediction
works at every D, ε- and v-prediction degrade at D = 16 and fail at D = 512.

    python toy_manifold.py --output_dir output_dir/toy                 # the 12 cells of Fig. 2
    python toy_manifold.py --dims 2 --preds x eps --steps 2000         # one column, shorter training

It writes toy_manifold.png (the figure), toy_manifold.md (the table) and cells/ (each cell's samples,
reused by a later run with the same settings). Exit status: 0 done, 2 bad input (one line on
stderr, before any training), 1 a file could not be written.
"""

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from denoiser import CONVERSIONS, Denoiser
from sampling import SamplerSettings
from util import files
from util.cli import HelpFormatter
from util.config import RunConfig, parse
from util.errors import BadValue, exit_code

PREDS = tuple(CONVERSIONS)  # x, eps, v
DIMS = (2, 8, 16, 512)
MAX_DIM = 16384  # the cell's memory grows with D (num_samples × D floats, a D × 256 layer)


def memory_needed(batch_size: int, num_samples: int, D: int) -> int:
    """A generous bound on a cell's bytes: about 16 float32 (B, max(D, 256)) tensors alive at once, B
    the larger of the training batch and the sample count (the sampler takes all samples at once)."""
    return 16 * 4 * max(batch_size, num_samples) * max(D, 256)


@dataclass(frozen=True)
class ToyConfig:
    """One cell's training and sampling. P_mean, P_std: logit-normal training times, wider than the
    images' (-0.8, 0.8), which almost never train t > 0.9, where a thin spiral takes its shape.
    beta2: Adam's second-moment decay (the repo's recipe: 0.95). t_eps: the Denoiser's clip of the
    divisions by 1 - t (and by t, for ε-prediction)."""

    steps: int = 8000
    batch_size: int = 256
    lr: float = 2e-3
    beta2: float = 0.95
    P_mean: float = 0.0
    P_std: float = 1.6
    t_eps: float = 0.05
    loss: str = "v"
    num_samples: int = 4000
    sampling_steps: int = 50
    seed: int = 0
    exact: bool = False


NOISE = 0.04  # the spiral's thickness: the standard deviation of the noise added to its curve


def spiral_curve(s: torch.Tensor) -> torch.Tensor:
    """The spiral's curve at s in [0, 1]: (len(s), 2), 1.5 turns, radius 0.25 to 1."""
    angle, radius = 3 * math.pi * s, 0.25 + 0.75 * s
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)


def spiral(n: int, generator) -> torch.Tensor:
    """(n, 2) points of the curve at s ~ U(0, 1), plus N(0, NOISE²) noise."""
    s = torch.rand(n, generator=generator)
    return spiral_curve(s) + NOISE * torch.randn(n, 2, generator=generator)


def embedding(D: int, generator) -> torch.Tensor:
    """A random (D, 2) matrix with orthonormal columns (PᵀP = I): the Q of a Gaussian matrix."""
    return torch.linalg.qr(torch.randn(D, 2, generator=generator)).Q


class ToyMLP(nn.Module):
    """net(z, t, y) for z (B, D), t (B,): five Linear layers (D + 1 -> 256 -> ... -> D) with ReLU
    between them, on [z, t]. Unconditional: y is ignored."""

    def __init__(self, D: int, width: int = 256, depth: int = 5):
        super().__init__()
        sizes = [D + 1] + [width] * (depth - 1) + [D]
        layers = [nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])]
        self.layers = nn.Sequential(*[m for layer in layers[:-1] for m in (layer, nn.ReLU())], layers[-1])

    def forward(self, z, t, y):
        return self.layers(torch.cat([z, t[:, None]], dim=1))


class ExactNet(nn.Module):
    """The exact `pred` network of the embedded spiral: x̂ = E[x | z, t] by quadrature over the curve
    (x = P·(c(s) + NOISE·n), so Pᵀz | s ~ N(t·c(s), (t²·NOISE² + (1 - t)²)·I) in the plane and the
    rest of z is noise), converted to ε̂ = (z - t·x̂)/(1 - t) or v̂ = (x̂ - z)/(1 - t); float64 inside.
    net(z, t, y) for z (B, D), t (B,) holding one time < 1 (as the sampler calls it); rows in chunks of
    `chunk`, so that its memory does not grow with B."""

    def __init__(self, P: torch.Tensor, pred: str, grid: int = 1500, chunk: int = 512):
        super().__init__()
        self.P, self.pred, self.chunk = P.double(), pred, chunk
        self.c = spiral_curve((torch.arange(grid, dtype=torch.float64) + 0.5) / grid)  # (M, 2)

    def posterior_mean(self, u: torch.Tensor, t: float) -> torch.Tensor:
        """E[c(s) + NOISE·n | u] for plane coordinates u (B, 2): Gaussian in n given s, mixed over s."""
        var = t * t * NOISE**2 + (1 - t) ** 2
        d = u[:, None, :] - t * self.c  # (B, M, 2)
        w = torch.softmax(-(d**2).sum(-1) / (2 * var), dim=1)  # (B, M): p(s | u)
        return (w[..., None] * (self.c + (t * NOISE**2 / var) * d)).sum(1)

    def forward(self, z, t, y):
        tt, zd = float(t[0]), z.double()
        u = zd @ self.P  # (B, 2)
        x = torch.cat([self.posterior_mean(part, tt) for part in u.split(self.chunk)]) @ self.P.T  # (B, D)
        out = {"x": x, "eps": (zd - tt * x) / (1 - tt), "v": (x - zd) / (1 - tt)}[self.pred]
        return out.to(z.dtype)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    """Sliced Wasserstein-1 distance of two equal-size point sets a, b (n, 2) over unit directions
    (2, K): the mean over directions of the 1-D W1 distance of the projections (data units)."""
    pa, pb = (a @ directions).sort(dim=0).values, (b @ directions).sort(dim=0).values  # (n, K)
    return (pa - pb).abs().mean().item()


def train_cell(pred: str, P: torch.Tensor, cfg: ToyConfig) -> Denoiser:
    """A Denoiser of a fresh ToyMLP predicting `pred`, trained with the cfg.loss on spiral data
    embedded by P (D, 2): Adam, cosine learning-rate decay to 0. Seeded by cfg.seed."""
    torch.manual_seed(cfg.seed)  # the net's init and the Denoiser's t and noise
    data = torch.Generator().manual_seed(cfg.seed)
    denoiser = Denoiser(
        ToyMLP(P.shape[0]),
        num_classes=1,
        P_mean=cfg.P_mean,
        P_std=cfg.P_std,
        t_eps=cfg.t_eps,
        label_drop_prob=0.0,
        pred=pred,
        loss=cfg.loss,
    )
    opt = torch.optim.Adam(denoiser.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2))
    labels = torch.zeros(cfg.batch_size, dtype=torch.long)
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        loss = denoiser(spiral(cfg.batch_size, data) @ P.T, labels)  # x: (B, D)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return denoiser.eval()


def exact_denoiser(pred: str, P: torch.Tensor, cfg: ToyConfig) -> Denoiser:
    """A Denoiser of the ExactNet of `pred` (no training), with the toy's t_eps."""
    return Denoiser(ExactNet(P, pred), num_classes=1, t_eps=cfg.t_eps, label_drop_prob=0.0, pred=pred).eval()


def sample_cell(denoiser: Denoiser, P: torch.Tensor, cfg: ToyConfig) -> torch.Tensor:
    """cfg.num_samples samples of the trained denoiser, projected back to 2-D with Pᵀ: (n, 2)."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    noise = torch.randn(cfg.num_samples, P.shape[0], generator=g)  # noise_scale 1
    labels = torch.zeros(cfg.num_samples, dtype=torch.long)
    return denoiser.generate(labels, SamplerSettings(steps=cfg.sampling_steps), noise=noise) @ P


def cell_name(pred: str, D: int, cfg: ToyConfig) -> str:
    """The file name of a cell's samples: its pred and D, and a digest of every setting that made it."""
    settings = json.dumps({**dataclasses.asdict(cfg), "pred": pred, "D": D}, sort_keys=True)
    return f"{pred}-D{D}-{hashlib.sha256(settings.encode()).hexdigest()[:12]}.pt"


def cached_cell(pred: str, D: int, cfg: ToyConfig, cache_dir: str | None) -> tuple[torch.Tensor, bool]:
    """(the cell's samples (n, 2), whether they were read from cache_dir) after training and sampling
    the cell if cache_dir (None: no cache) holds no readable file of it; a new one is written there."""
    path = os.path.join(cache_dir, cell_name(pred, D, cfg)) if cache_dir else None
    if path and os.path.isfile(path):
        try:
            samples = torch.load(path, weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
            samples = None  # a damaged file: the cell is made again below
        if isinstance(samples, torch.Tensor) and samples.shape == (cfg.num_samples, 2):
            return samples, True
    P = embedding(D, torch.Generator().manual_seed(cfg.seed + D))
    samples = sample_cell(exact_denoiser(pred, P, cfg) if cfg.exact else train_cell(pred, P, cfg), P, cfg)
    if path:
        buffer = io.BytesIO()
        torch.save(samples, buffer)
        files.atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return samples, False


def run_cells(preds, dims, cfg: ToyConfig, log=print, cache_dir: str | None = None):
    """Train, sample and score every (pred, D). Returns (samples {(pred, D): (n, 2)},
    scores {(pred, D): sliced W1}, data (n, 2), floor: the sliced W1 of two data sets of size n)."""
    g = torch.Generator().manual_seed(cfg.seed + 2)
    data, other = spiral(cfg.num_samples, g), spiral(cfg.num_samples, g)
    directions = torch.randn(2, 256, generator=g)
    directions /= directions.norm(dim=0)  # (2, 256)
    samples, scores = {}, {}
    for D in dims:
        for pred in preds:
            start = time.time()
            samples[pred, D], cached = cached_cell(pred, D, cfg, cache_dir)
            scores[pred, D] = sliced_wasserstein(samples[pred, D], data, directions)
            how = "cached" if cached else f"{time.time() - start:.0f} s"
            log(f"{pred}-pred, D = {D}: sliced W1 {scores[pred, D]:.4f} ({how})")
    return samples, scores, data, sliced_wasserstein(other, data, directions)


def table(scores: dict, floor: float) -> str:
    """A Markdown table of the scores, rows prediction targets, columns D."""
    preds = list(dict.fromkeys(p for p, _ in scores))
    dims = list(dict.fromkeys(D for _, D in scores))
    lines = ["| sliced W1 ↓ | " + " | ".join(f"D = {D}" for D in dims) + " |", "|---" * (len(dims) + 1) + "|"]
    lines += [f"| {p}-pred | " + " | ".join(f"{scores[p, D]:.3f}" for D in dims) + " |" for p in preds]
    lines.append("| data vs data | " + " | ".join(f"{floor:.3f}" for _ in dims) + " |")
    return "\n".join(lines)


def plot_cells(samples: dict, scores: dict, data: torch.Tensor, path: str, dpi: int = 120):
    """One panel per cell (rows: prediction target, columns: D): the samples over the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    preds = list(dict.fromkeys(p for p, _ in samples))
    dims = list(dict.fromkeys(D for _, D in samples))
    fig, axes = plt.subplots(len(preds), len(dims), figsize=(2.6 * len(dims), 2.6 * len(preds)), squeeze=False)
    for (i, pred), (j, D) in ((r, c) for r in enumerate(preds) for c in enumerate(dims)):
        ax = axes[i][j]
        ax.scatter(*data.T, s=1, c="0.75", linewidths=0)
        ax.scatter(*samples[pred, D].T, s=1, c="C0", linewidths=0)
        ax.set(xlim=(-1.5, 1.5), ylim=(-1.5, 1.5), xticks=[], yticks=[], aspect="equal")
        ax.set_title(f"D = {D}: {scores[pred, D]:.3f}", fontsize=9)
        if j == 0:
            ax.set_ylabel(f"{pred}-prediction")
    fig.suptitle("samples (blue) projected back with Pᵀ over the data (grey); sliced W1", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    files.atomic_write(path, lambda f: f.write(buffer.getvalue()))


def get_args_parser():
    p = argparse.ArgumentParser("JiT toy experiment (paper Fig. 2)", formatter_class=HelpFormatter)
    a = p.add_argument
    a("--output_dir", default="output_dir/toy", help="writes toy_manifold.png, toy_manifold.md and cells/ here")
    a("--preds", default=list(PREDS), nargs="+", choices=PREDS, help="prediction targets (figure rows)")
    a("--dims", default=list(DIMS), nargs="+", type=int, help=f"ambient dimensions D, 2 to {MAX_DIM} (figure columns)")
    a("--loss", default=ToyConfig.loss, choices=tuple(CONVERSIONS), help="the loss space (the paper's toy: v)")
    a(
        "--steps",
        default=ToyConfig.steps,
        type=int,
        help="Adam steps per cell (with 2000, ε and v stay blurred at D = 2-16: docs/toy.md)",
    )
    a("--batch_size", default=ToyConfig.batch_size, type=int, help="training batch")
    a("--lr", default=ToyConfig.lr, type=float, help="Adam's peak learning rate (cosine decay to 0)")
    a(
        "--beta2",
        default=ToyConfig.beta2,
        type=float,
        help="Adam's second-moment decay, in [0, 1) (the repo's recipe; the paper gives none for the toy)",
    )
    a("--P_mean", default=ToyConfig.P_mean, type=float, help="training times t = sigmoid(N(P_mean, P_std²))")
    a("--P_std", default=ToyConfig.P_std, type=float, help="see --P_mean")
    a("--t_eps", default=ToyConfig.t_eps, type=float, help="the clip of the divisions by 1 - t and t, in (0, 0.5]")
    a("--num_samples", default=ToyConfig.num_samples, type=int, help="samples per cell, and data points to compare")
    a("--sampling_steps", default=ToyConfig.sampling_steps, type=int, help="Heun steps")
    a("--seed", default=ToyConfig.seed, type=int, help="seeds the data, P, the nets and the sampler noise")
    a(
        "--exact",
        action="store_true",
        help="sample the exact denoiser of each target (no training): what the conversions and the sampler give",
    )
    a("--dpi", default=120, type=int, help="resolution of toy_manifold.png, 20 to 600")
    a("--no_cache", action="store_true", help="train every cell anew (and write no cells/)")
    a(
        "--threads",
        default=1,
        type=int,
        help="CPU threads (the matrices are small: more threads gain little and lose much on a busy machine)",
    )
    return p


def parse_args(argv=None) -> RunConfig:
    """The flags as given (util.config.RunConfig), as every script's."""
    return parse(get_args_parser(), argv)


def host_memory() -> int:
    """Bytes of physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def toy_config(args) -> ToyConfig:
    """The checked ToyConfig of the flags; BadValue (one line) for a value that cannot work."""
    finite = all(math.isfinite(v) for v in (args.lr, args.beta2, args.P_mean, args.P_std, args.t_eps))
    checks = (
        (finite, "--lr, --beta2, --P_mean, --P_std and --t_eps must be finite numbers"),
        (all(2 <= D <= MAX_DIM for D in args.dims), f"--dims must lie in 2 to {MAX_DIM}, got {args.dims}"),
        (min(args.steps, args.batch_size, args.num_samples, args.sampling_steps, args.threads) >= 1,
         "--steps, --batch_size, --num_samples, --sampling_steps and --threads must be at least 1"),
        (args.lr > 0, f"--lr must be positive, got {args.lr}"),
        (0 <= args.beta2 < 1, f"--beta2 must lie in [0, 1), got {args.beta2}"),
        (args.P_std > 0, f"--P_std must be positive, got {args.P_std}"),
        (0 < args.t_eps <= 0.5, f"--t_eps must lie in (0, 0.5], got {args.t_eps}"),
        (0 <= args.seed < 2**62, f"--seed must lie in 0 to 2^62, got {args.seed}"),
        (20 <= args.dpi <= 600, f"--dpi must lie in 20 to 600, got {args.dpi}"),
    )  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise BadValue(message)
    need, have = memory_needed(args.batch_size, args.num_samples, max(args.dims)), host_memory()
    if need > have / 2:
        raise BadValue(
            f"--batch_size {args.batch_size} / --num_samples {args.num_samples} at D = {max(args.dims)} need about "
            f"{files.human_bytes(need)}, more than half of this machine's {files.human_bytes(have)}"
        )
    names = [f.name for f in dataclasses.fields(ToyConfig)]
    return ToyConfig(**{name: getattr(args, name) for name in names})


def prepare_toy_output(folder: str, cache: bool):
    """Create the output folder (and cells/ in it) before any training; BadValue if it cannot be."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise BadValue(f"--output_dir {folder} is a file, not a folder")
    try:
        os.makedirs(os.path.join(folder, "cells") if cache else folder, exist_ok=True)
    except OSError as e:
        raise BadValue(f"--output_dir {folder}: cannot create it ({e.strerror or e})") from e


def main(args) -> int:
    """Run the cells, write the figure and the table; BadValue for bad flags (see cli)."""
    cfg = toy_config(args)
    prepare_toy_output(args.output_dir, cache=not args.no_cache)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        write_results(args, cfg)
    finally:
        torch.set_num_threads(threads)
    return 0


def write_results(args, cfg: ToyConfig):
    """Run the cells of args.preds × args.dims; write the figure and the table to args.output_dir."""
    start = time.time()
    cache_dir = None if args.no_cache else os.path.join(args.output_dir, "cells")
    samples, scores, data, floor = run_cells(
        list(dict.fromkeys(args.preds)), list(dict.fromkeys(args.dims)), cfg, cache_dir=cache_dir
    )
    plot_cells(samples, scores, data, os.path.join(args.output_dir, "toy_manifold.png"), dpi=args.dpi)
    text = table(scores, floor)
    files.atomic_write(os.path.join(args.output_dir, "toy_manifold.md"), lambda f: f.write((text + "\n").encode()))
    print(f"{text}\nwrote {args.output_dir}/toy_manifold.png and toy_manifold.md ({time.time() - start:.0f} s)")


def cli(argv=None) -> int:
    """Exit status as util.errors: 2 for bad input (one line on stderr), 1 for a failed write."""
    return exit_code(main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
