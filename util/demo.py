"""The built-in demo: its data (one coloured shape per class, made on the spot) and what it leaves in
its output folder (its last class-by-row sample grid as samples.png, and a loss curve)."""

import json
import os

import numpy as np
from PIL import Image, ImageDraw

from util.distributed import print0
from util.files import atomic_write
from util.grid import list_grids

CLASSES = ("0_red_circle", "1_green_square", "2_blue_triangle", "3_yellow_cross")
_COLOURS = ((220, 40, 40), (40, 180, 60), (50, 80, 230), (235, 200, 30))


def _draw(kind: int, size: int, rng: np.random.Generator) -> Image.Image:
    bg = tuple(int(v) for v in rng.integers(150, 256, 3) // 2 + 20)  # muted background
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = size * rng.uniform(0.22, 0.36)
    cx, cy = size / 2 + rng.uniform(-0.12, 0.12, 2) * size
    colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in _COLOURS[kind])
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == 0:
        d.ellipse(box, fill=colour)
    elif kind == 1:
        d.rectangle(box, fill=colour)
    elif kind == 2:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        w = r / 2.5
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    return img


def make_shapes_dataset(root: str, image_size: int = 32, per_class: int = 256, seed: int = 0) -> str:
    """Write `per_class` images of each class to root/train/<class>/<i>.png (if not already there):
    an ImageFolder tree of PNGs, so that the demo runs the real loading path. Returns root."""
    done = os.path.join(root, "train", ".complete")
    if os.path.exists(done):
        return root
    rng = np.random.default_rng(seed)
    for kind, name in enumerate(CLASSES):
        folder = os.path.join(root, "train", name)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            _draw(kind, image_size, rng).save(os.path.join(folder, f"{i:05d}.png"))
    open(done, "w").close()
    return root


def write_demo_outputs(output_dir: str):
    """Write samples.png (the run's last sample grid, util.grid: one row per class) and loss_curve.png
    to output_dir."""
    grids = list_grids(output_dir)
    if grids:
        epoch, source = grids[-1]
        with open(source, "rb") as f:
            data = f.read()
        path = os.path.join(output_dir, "samples.png")
        atomic_write(path, lambda f: f.write(data))
        print0(f"wrote {path} (the sample grid of epoch {epoch}: one row per class)")
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
