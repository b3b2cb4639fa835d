"""Shared pieces of the evaluation tests: a stand-in Inception weights file, a tiny denoiser whose
samples differ from image to image, tiny reference-format checkpoints and subprocess launchers."""
import argparse
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from denoiser import Denoiser  # noqa: E402
from helpers import free_port  # noqa: E402
from model_jit import JiT_models  # noqa: E402

TINY = dict(model="JiT-XS/4", img_size=16, class_num=3)


class _UntrainedInception(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception left at its random initialisation (the weights file is ignored)."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


def make_standin_inception_weights(path: str, seed: int = 0):
    """Write a weights file in torch-fidelity's format from a randomly initialised Inception.

    Its BatchNorm running statistics are recalibrated on a few random images (one forward pass in
    training mode, cumulative averages), so eval-mode features have unit-order scale instead of
    vanishing through ~20 layers; the logit layer is scaled up so the Inception Score is not ~1.
    """
    torch.save({}, path)
    torch.manual_seed(seed)
    net = _UntrainedInception("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=path)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8))
        net.fc.weight.mul_(20)
    torch.save(net.state_dict(), path)


_weights = {}


def standin_weights(tmp_path_factory) -> str:
    """Path of the session's stand-in weights file (built once)."""
    if "path" not in _weights:
        path = str(tmp_path_factory.mktemp("inception") / "standin-inception.pth")
        make_standin_inception_weights(path)
        _weights["path"] = path
    return _weights["path"]


def tiny_denoiser(seed: int = 0) -> Denoiser:
    """JiT-XS/4 at 16 px with 3 classes, in eval mode. The zero-initialised layers (adaLN, final)
    get small random weights, so that samples depend on the noise and the class."""
    torch.manual_seed(seed)
    net = JiT_models[TINY["model"]](input_size=TINY["img_size"], num_classes=TINY["class_num"])
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().max() == 0:
                p.normal_(std=0.05)
    return Denoiser(net, TINY["class_num"]).eval()


class PerSample(torch.nn.Module):
    """Calls `net` one image at a time: a batch-invariant stand-in (every kernel sees batch size 1)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, z, t, y):
        return torch.cat([self.net(z[i : i + 1], t[i : i + 1], y[i : i + 1]) for i in range(z.shape[0])])


def save_reference_checkpoint(path: str, ema1: Denoiser, model: Denoiser | None = None, ema2: Denoiser | None = None, epoch: int = 7):
    """A checkpoint in the reference release's layout: `model`, `model_ema1`, `model_ema2` (default:
    ema1's weights), `optimizer` with the reference's two AdamW groups (no weight decay on biases and
    1-D parameters, then the rest), `epoch`, and `args` as an argparse.Namespace."""
    model, ema2 = model or ema1, ema2 or ema1
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in params if p.ndim == 1 or n.endswith(".bias")]
    decay = [p for n, p in params if not (p.ndim == 1 or n.endswith(".bias"))]
    opt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0}, {"params": decay}], lr=1e-4, betas=(0.9, 0.95))
    args = argparse.Namespace(**TINY, noise_scale=1.0, t_eps=0.05, P_mean=-0.8, P_std=0.8, epochs=10, seed=0)
    torch.save({"model": model.state_dict(), "model_ema1": ema1.state_dict(), "model_ema2": ema2.state_dict(),
                "optimizer": opt.state_dict(), "epoch": epoch, "args": args}, path)


def write_image_folder(root: str, per_class: int, classes=("a", "b"), seed: int = 0):
    """An ImageFolder tree root/<class>/<k>.jpg|png of random images with varied sizes."""
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for k in range(per_class):
            h, w = rng.integers(20, 60, size=2)
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(os.path.join(root, c, f"{k}.{'png' if k % 2 else 'jpg'}"))


def run_python(args: list, nproc: int | None = None, env: dict | None = None, timeout: float = 300, check: bool = True):
    """Run a Python script (under torchrun on CPU when nproc is given) from the repository root.
    Returns the CompletedProcess; with check, fails the test showing the output if it exits non-zero."""
    launcher = [sys.executable]
    if nproc is not None:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    full_env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(launcher + [str(a) for a in args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited with {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc
