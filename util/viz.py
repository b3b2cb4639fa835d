"""Image grids written as PNG files (sample.py, the trainer's demo)."""
import os

import torch
from PIL import Image

from util.files import atomic_write


def save_grid(images: torch.Tensor, nrow: int, path: str, padding: int = 2):
    """Write uint8 images (N, 3, H, W) as one PNG, `nrow` images per row, white `padding` px between."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    from torchvision.utils import make_grid  # here: torchvision takes a second to import

    grid = make_grid(images.cpu(), nrow=nrow, padding=padding, pad_value=255)  # (3, H', W') uint8
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pil = Image.fromarray(grid.permute(1, 2, 0).numpy())
    atomic_write(path, lambda f: pil.save(f, format="PNG"))
