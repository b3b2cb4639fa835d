"""Shared helpers for the training tests: tiny image folders and running main_jit.py."""
import os
import socket
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "main_jit.py")

# A tiny configuration: 0.4M parameters, 16 px images, 3 classes, CPU.
TINY = ["--model", "JiT-XS/4", "--img_size", "16", "--class_num", "3", "--batch_size", "4", "--num_workers", "0",
        "--device", "cpu", "--print_freq", "1", "--log_freq", "1", "--warmup_epochs", "1", "--lr", "1e-3"]


def make_image_folder(root, classes=3, per_class=8, seed=0):
    """root/train/c{k}/{i}.png with random RGB images of mixed sizes (crop and resize paths)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = os.path.join(root, "train", f"c{c}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(16, 48, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return root


def env():
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


def run_main(*args, check=True, timeout=300):
    """Run `python main_jit.py args...`; returns the CompletedProcess (stdout and stderr merged)."""
    p = subprocess.run([sys.executable, MAIN, *map(str, args)], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"main_jit.py failed ({p.returncode}):\n{p.stdout}")
    return p


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *args, nproc=2, timeout=300, check=True):
    """Run `script` under torchrun with `nproc` CPU processes (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", script, *map(str, args)]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"torchrun failed ({p.returncode}):\n{p.stdout}")
    return p
