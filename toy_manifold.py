"""The paper's toy experiment (Li & He, arXiv 2511.13720, Sec. 3, Fig. 2): x-, e- and v-prediction
when 2-D data lie in a D-dimensional space.

Data: a noisy 2-D spiral s (our choice; the paper does not name its distribution), embedded as
x = P·s by a fixed random column-orthogonal P (D, 2), PᵀP = I. Network: a 5-layer ReLU MLP with
256 hidden units on [z, t]. Each cell (prediction target, D) trains the repo's Denoiser with the
v-loss and samples with the repo's sampler (Heun), projects the samples back with Pᵀ and scores
them by the sliced Wasserstein-1 distance to fresh data. The paper: x-prediction works at every D,
e- and v-prediction degrade at D = 16 and fail at D = 512.

    python toy_manifold.py --output_dir output_dir/toy   # about 4 CPU-minutes (one thread)
"""

import argparse
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from denoiser import Denoiser
from sampling import SamplerSettings

PREDS = ("x", "eps", "v")
DIMS = (2, 8, 16, 512)


@dataclass(frozen=True)
class ToyConfig:
    """One cell's training and sampling. P_mean, P_std: logit-normal training times, wider than the
    images' (-0.8, 0.8), which almost never train t > 0.9, where a thin spiral takes its shape."""

    steps: int = 2000
    batch_size: int = 256
    lr: float = 2e-3
    P_mean: float = 0.0
    P_std: float = 1.6
    num_samples: int = 4000
    sampling_steps: int = 50
    seed: int = 0


def spiral(n: int, generator) -> torch.Tensor:
    """(n, 2) points of a 1.5-turn spiral, radius 0.25 to 1, plus N(0, 0.04²) noise."""
    s = torch.rand(n, generator=generator)
    angle, radius = 3 * math.pi * s, 0.25 + 0.75 * s
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1) + 0.04 * torch.randn(
        n, 2, generator=generator
    )


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


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    """Sliced Wasserstein-1 distance of two equal-size point sets a, b (n, 2) over unit directions
    (2, K): the mean over directions of the 1-D W1 distance of the projections (data units)."""
    pa, pb = (a @ directions).sort(dim=0).values, (b @ directions).sort(dim=0).values  # (n, K)
    return (pa - pb).abs().mean().item()


def train_cell(pred: str, P: torch.Tensor, cfg: ToyConfig) -> Denoiser:
    """A Denoiser of a fresh ToyMLP predicting `pred`, trained with the v-loss on spiral data
    embedded by P (D, 2): Adam, cosine learning-rate decay to 0. Seeded by cfg.seed."""
    torch.manual_seed(cfg.seed)  # the net's init and the Denoiser's t and noise
    data = torch.Generator().manual_seed(cfg.seed)
    denoiser = Denoiser(
        ToyMLP(P.shape[0]), num_classes=1, P_mean=cfg.P_mean, P_std=cfg.P_std, label_drop_prob=0.0, pred=pred, loss="v"
    )
    opt = torch.optim.Adam(denoiser.parameters(), lr=cfg.lr)
    labels = torch.zeros(cfg.batch_size, dtype=torch.long)
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        loss = denoiser(spiral(cfg.batch_size, data) @ P.T, labels)  # x: (B, D)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return denoiser.eval()


def sample_cell(denoiser: Denoiser, P: torch.Tensor, cfg: ToyConfig) -> torch.Tensor:
    """cfg.num_samples samples of the trained denoiser, projected back to 2-D with Pᵀ: (n, 2)."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    noise = torch.randn(cfg.num_samples, P.shape[0], generator=g)  # noise_scale 1
    labels = torch.zeros(cfg.num_samples, dtype=torch.long)
    return denoiser.generate(labels, SamplerSettings(steps=cfg.sampling_steps), noise=noise) @ P


def run(preds, dims, cfg: ToyConfig, log=print):
    """Train, sample and score every (pred, D). Returns (samples {(pred, D): (n, 2)},
    scores {(pred, D): sliced W1}, data (n, 2), floor: the sliced W1 of two data sets of size n)."""
    g = torch.Generator().manual_seed(cfg.seed + 2)
    data, other = spiral(cfg.num_samples, g), spiral(cfg.num_samples, g)
    directions = torch.randn(2, 256, generator=g)
    directions /= directions.norm(dim=0)  # (2, 256)
    samples, scores = {}, {}
    for D in dims:
        P = embedding(D, torch.Generator().manual_seed(cfg.seed + D))
        for pred in preds:
            start = time.time()
            samples[pred, D] = sample_cell(train_cell(pred, P, cfg), P, cfg)
            scores[pred, D] = sliced_wasserstein(samples[pred, D], data, directions)
            log(f"{pred}-pred, D = {D}: sliced W1 {scores[pred, D]:.4f} ({time.time() - start:.0f} s)")
    return samples, scores, data, sliced_wasserstein(other, data, directions)


def table(scores: dict, floor: float) -> str:
    """A Markdown table of the scores, rows prediction targets, columns D."""
    preds = list(dict.fromkeys(p for p, _ in scores))
    dims = list(dict.fromkeys(D for _, D in scores))
    lines = ["| sliced W1 ↓ | " + " | ".join(f"D = {D}" for D in dims) + " |", "|---" * (len(dims) + 1) + "|"]
    lines += [f"| {p}-pred | " + " | ".join(f"{scores[p, D]:.3f}" for D in dims) + " |" for p in preds]
    lines.append("| data vs data | " + " | ".join(f"{floor:.3f}" for _ in dims) + " |")
    return "\n".join(lines)


def plot(samples: dict, scores: dict, data: torch.Tensor, path: str):
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(
        "JiT toy experiment (paper Fig. 2)", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--output_dir", default="output_dir/toy", help="writes toy_manifold.png and toy_manifold.md here")
    p.add_argument("--preds", default=list(PREDS), nargs="+", choices=PREDS, help="prediction targets (figure rows)")
    p.add_argument("--dims", default=list(DIMS), nargs="+", type=int, help="ambient dimensions D >= 2 (figure columns)")
    p.add_argument("--steps", default=ToyConfig.steps, type=int, help="training steps per cell")
    p.add_argument("--seed", default=ToyConfig.seed, type=int, help="seeds the data, P, the nets and the sampler noise")
    p.add_argument(
        "--threads",
        default=1,
        type=int,
        help="CPU threads (the matrices are small: more threads gain little and lose much on a busy machine)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = ToyConfig(steps=args.steps, seed=args.seed)
    start = time.time()
    samples, scores, data, floor = run(args.preds, args.dims, cfg)
    os.makedirs(args.output_dir, exist_ok=True)
    plot(samples, scores, data, os.path.join(args.output_dir, "toy_manifold.png"))
    text = table(scores, floor)
    with open(os.path.join(args.output_dir, "toy_manifold.md"), "w") as f:
        f.write(text + "\n")
    print(f"{text}\nwrote {args.output_dir}/toy_manifold.png and toy_manifold.md ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
