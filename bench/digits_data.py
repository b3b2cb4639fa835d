"""scikit-learn's bundled handwritten digits (1797 images, 8×8, 10 classes; no download) written as
an ImageFolder tree `OUT/train/{class}/{i}.png`, upscaled to --size px (bicubic), grey as RGB.

    pip install scikit-learn      # bench-only dependency
    python bench/digits_data.py --out data/digits --size 16

A real-image data set small enough to train a JiT on a CPU in minutes (bench/solver_error.py).
"""

import argparse
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from util.errors import BadInput, exit_code  # noqa: E402


def write_digits(out: str, size: int) -> int:
    """Writes the tree; returns the number of images."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise BadInput("bench/digits_data.py needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        grey = np.clip(np.round(img * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # values 0..16
        im = Image.fromarray(grey, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
        folder = os.path.join(out, "train", f"{label:02d}")
        os.makedirs(folder, exist_ok=True)
        im.save(os.path.join(folder, f"{i:04d}.png"))
    return len(digits.images)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write (an ImageFolder tree under train/)")
    p.add_argument("--size", default=16, type=int, help="image side in pixels (>= 8)")
    args = p.parse_args(argv)
    if args.size < 8:
        raise BadInput(f"--size must be >= 8, got {args.size}")
    n = write_digits(args.out, args.size)
    print(f"wrote {n} images of {args.size}x{args.size} px to {os.path.join(args.out, 'train')}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_code(main))
