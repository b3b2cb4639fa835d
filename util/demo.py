"""What the built-in demo leaves in its output folder: a class-by-row sample grid and a loss curve."""
import json
import os

import torch

from denoiser import SamplerSettings
from util.distributed import autocast, print0
from util.evaluation import quantize
from util.files import atomic_write
from util.viz import save_grid


@torch.no_grad()
def write_demo_outputs(denoiser, *, output_dir: str, class_num: int, img_size: int, seed: int, sampler: SamplerSettings,
                       device: torch.device, per_class: int = 8):
    """Write samples.png (one row per class, `per_class` images each) and loss_curve.png to output_dir."""
    labels = torch.arange(class_num, device=device).repeat_interleave(per_class)
    g = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn(len(labels), 3, img_size, img_size, generator=g, device=device) * denoiser.noise_scale
    with autocast(device):
        images = denoiser.generate(labels, sampler, noise=noise)
    path = os.path.join(output_dir, "samples.png")
    save_grid(quantize(images).cpu(), nrow=per_class, path=path)
    print0(f"wrote {path} (one row per class, cfg {sampler.cfg}, {sampler.steps} {sampler.method} steps)")
    curve = plot_loss_curve(os.path.join(output_dir, "metrics.jsonl"), os.path.join(output_dir, "loss_curve.png"))
    if curve:
        print0(f"wrote {curve}")


def plot_loss_curve(metrics_path: str, out_path: str):
    """Plot training loss against optimiser steps from metrics.jsonl; returns out_path or None."""
    if not os.path.exists(metrics_path):
        return None
    points = {}
    with open(metrics_path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("kind") == "train" and rec["loss"] is not None:  # None: only skipped steps
                points[rec["global_step"]] = rec["loss"]  # a resumed run overwrites replayed steps
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(points)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, [points[s] for s in steps])
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss (velocity MSE)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    atomic_write(out_path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return out_path
