"""Image grids as arrays and PNG files (sample grids of training, sample.py, the demo and the report)."""

import io
import os

import numpy as np
import torch
from PIL import Image

from util.files import atomic_write


def grid_array(images: torch.Tensor, nrow: int, padding: int = 2) -> np.ndarray:
    """uint8 images (N, 3, H, W) as one (H', W', 3) uint8 array, `nrow` images per row, white `padding`
    px around and between them (torchvision's make_grid layout with pad_value 255)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected uint8 images (N, 3, H, W), N > 0, got {images.dtype} {tuple(images.shape)}")
    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = -(-n // cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), 255, dtype=np.uint8)
    pixels = images.cpu().permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    for i in range(n):
        y, x = (i // cols) * (h + padding) + padding, (i % cols) * (w + padding) + padding
        grid[y : y + h, x : x + w] = pixels[i]
    return grid


def png_bytes(array: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 array as PNG bytes (deterministic: the same array gives the same bytes)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: str, array: np.ndarray):
    """Write an (H, W, 3) uint8 array as a PNG file atomically (util.files.atomic_write: WriteError on failure)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = png_bytes(array)
    atomic_write(path, lambda f: f.write(data), needed=len(data))


def save_grid(images: torch.Tensor, nrow: int, path: str, padding: int = 2):
    """Write uint8 images (N, 3, H, W) as one PNG, `nrow` images per row, white `padding` px between."""
    write_png(path, grid_array(images, nrow, padding))
