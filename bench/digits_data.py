"""scikit-learn's bundled handwritten digits (1797 images, 8×8, 10 classes; no download) written as
an ImageFolder tree `OUT/train/{class}/{i}.png`, upscaled to --size px (bicubic), grey as RGB; with
--train FOLDER also a JiT-XS/4 trained on them (the model of bench/solver_error.py).

    pip install scikit-learn      # bench-only dependency
    python bench/digits_data.py --out data/digits16 --size 16 --train data/xs16

--train runs main_jit.py with TRAIN_FLAGS (40 epochs of batch 32, 2240 steps; about 4 minutes on a
shared 2-core CPU, niced, one thread) into FOLDER, unless FOLDER/checkpoint-last.pth exists already
(delete the folder to train again). data/ is ignored by git.
"""

import argparse
import os
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from util.errors import BadInput, BadValue, RunFailed, exit_code  # noqa: E402

TRAIN_FLAGS = [
    *("--model", "JiT-XS/4", "--class_num", "10", "--epochs", "40", "--warmup_epochs", "1"),
    *("--batch_size", "32", "--lr", "1e-3", "--ema_decay1", "0.999", "--ema_decay2", "0.9995"),
    *("--num_workers", "0", "--device", "cpu", "--save_last_freq", "5"),
]


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


def train_digits(data: str, size: int, folder: str) -> str:
    """Train the digits model into `folder` (see TRAIN_FLAGS) unless its checkpoint exists; returns
    the checkpoint's path. RunFailed if training fails."""
    checkpoint = os.path.join(folder, "checkpoint-last.pth")
    if os.path.isfile(checkpoint):
        print(f"{checkpoint} exists: not training again (delete {folder} to retrain)")
        return checkpoint
    cmd = ["nice", "-n", "10", sys.executable, os.path.join(ROOT, "main_jit.py"), *TRAIN_FLAGS]
    cmd += ["--img_size", str(size), "--data_path", data, "--output_dir", folder]
    print("training:", " ".join(cmd[3:]), flush=True)
    if subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode != 0:
        raise RunFailed(f"training the digits model into {folder} failed (see its output above)")
    return checkpoint


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write (an ImageFolder tree under train/)")
    p.add_argument("--size", default=16, type=int, help="image side in pixels (>= 8)")
    p.add_argument("--train", default=None, help="also train the digits model into this folder (see TRAIN_FLAGS)")
    return p


def parse_args(argv=None):
    return get_args_parser().parse_args(argv)


def main(args) -> int:
    if args.size < 8:
        raise BadValue(f"--size must be >= 8, got {args.size}")
    n = write_digits(args.out, args.size)
    print(f"wrote {n} images of {args.size}x{args.size} px to {os.path.join(args.out, 'train')}")
    if args.train:
        print(f"checkpoint: {train_digits(args.out, args.size, args.train)}")
    return 0


def cli(argv=None) -> int:
    """Exit status as util.errors: 2 for bad input (one line), 1 for a failed training."""
    return exit_code(main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
