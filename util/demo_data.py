"""A small class-conditional image set made on the spot: one coloured shape per class.

Written as an ImageFolder tree of PNGs so that the demo runs the real loading path.
"""
import os

import numpy as np
from PIL import Image, ImageDraw

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
    """Write `per_class` images of each class to root/train/<class>/<i>.png (if not already there).
    Returns root."""
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
