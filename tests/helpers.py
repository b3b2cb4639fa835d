"""Shared pieces of the tests: the tiny configuration, image folders, a tiny denoiser, reference-format
checkpoints, a stand-in Inception weights file, and one way to run the repo's scripts."""

import argparse
import json
import os
import socket
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from denoiser import Denoiser  # noqa: E402
from model_jit import JiT_models  # noqa: E402
from util.ema import EMA  # noqa: E402

# The keys of a checkpoint the reference release writes (and reads).
REF_KEYS = {"model", "model_ema1", "model_ema2", "optimizer", "epoch", "args"}

# The tiny configuration: JiT-XS/4 (0.4M parameters) on 16 px images of 3 classes, on the CPU; no sample
# grids (the tests of util.grid turn them on).
TINY_MODEL = dict(model="JiT-XS/4", img_size=16, class_num=3)
TINY = [
    "--model",
    "JiT-XS/4",
    "--img_size",
    "16",
    "--class_num",
    "3",
    "--batch_size",
    "4",
    "--num_workers",
    "0",
    "--device",
    "cpu",
    "--print_freq",
    "1",
    "--log_freq",
    "1",
    "--warmup_epochs",
    "1",
    "--sample_every",
    "0",
    "--lr",
    "1e-3",
]


def make_image_folder(root, classes=3, per_class=8, seed=0):
    """root/train/c{k}/{i}.png|jpg (alternating) with random RGB images of mixed sizes, so that
    the crop and resize paths and both decoders run. Returns root as a string."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = os.path.join(root, "train", f"c{c}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(16, 48, 2)
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            img.save(os.path.join(folder, f"{i}.{'jpg' if i % 2 else 'png'}"))
    return str(root)


def tiny_denoiser(seed: int = 0) -> Denoiser:
    """The tiny JiT in a Denoiser, in eval mode. The zero-initialised layers (adaLN, final) get small
    random weights, so that outputs, samples and gradients depend on every input."""
    torch.manual_seed(seed)
    net = JiT_models[TINY_MODEL["model"]](input_size=TINY_MODEL["img_size"], num_classes=TINY_MODEL["class_num"])
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().max() == 0:
                p.normal_(std=0.05)
    return Denoiser(net, TINY_MODEL["class_num"]).eval()


def save_reference_checkpoint(
    path, model: Denoiser, ema1: Denoiser | None = None, ema2: Denoiser | None = None, epoch: int = 7, steps: int = 0
):
    """A checkpoint exactly as the reference release writes it: `model`, `model_ema1`, `model_ema2`
    (default: model's weights), `optimizer` of a plain AdamW with the reference's two groups (no
    weight decay on biases and 1-D parameters, then the rest) after `steps` steps on random data,
    `epoch`, and `args` as an argparse.Namespace."""
    ema1 = model if ema1 is None else ema1
    ema2 = ema1 if ema2 is None else ema2
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in params if p.ndim == 1 or n.endswith(".bias")]
    decay = [p for n, p in params if not (p.ndim == 1 or n.endswith(".bias"))]
    opt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0}, {"params": decay}], lr=1e-4, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(epoch)
    size = TINY_MODEL["img_size"]
    for _ in range(steps):
        model(torch.rand(4, 3, size, size, generator=g) * 2 - 1, torch.arange(4) % TINY_MODEL["class_num"]).backward()
        opt.step()
        opt.zero_grad()
    args = argparse.Namespace(
        **TINY_MODEL, noise_scale=1.0, t_eps=0.05, P_mean=-0.8, P_std=0.8, epochs=10, seed=0, batch_size=4, lr=1e-4
    )
    torch.save(
        {
            "model": model.state_dict(),
            "model_ema1": ema1.state_dict(),
            "model_ema2": ema2.state_dict(),
            "optimizer": opt.state_dict(),
            "epoch": epoch,
            "args": args,
        },
        path,
    )


def generated(denoiser, spec, net=None) -> torch.Tensor:
    """This rank's images of `spec` (util.evaluation.GenerationSpec) as uint8 (n, 3, H, W) on the CPU,
    in index order; `gather_rows` of it is the whole set on rank 0."""
    from util.evaluation import generate_batches

    parts = [images.cpu() for _, images in generate_batches(denoiser, spec, torch.device("cpu"), net)]
    return torch.cat(parts) if parts else torch.empty((0, 3, spec.img_size, spec.img_size), dtype=torch.uint8)


def evaluation_of(denoiser, spec, scorer, log, output_dir, save_images: bool = False):
    """An engine_eval.Evaluation that scores `denoiser` (as EMA 1) at spec's sampler and image count."""
    from engine_eval import EMAWeights, Evaluation
    from util.sweep import Point

    samplers = EMAWeights([EMA(denoiser, 0.0)], torch.device("cpu"), make_denoiser=None, compile_net=False)
    return Evaluation(
        samplers, [Point(1, spec.sampler, spec.num_images)], spec, scorer, log, str(output_dir), save_images=save_images
    )


def make_standin_inception_weights(path: str, seed: int = 0):
    """Write a weights file in torch-fidelity's format from a randomly initialised Inception.

    Its BatchNorm running statistics are recalibrated on a few random images (one forward pass in
    training mode, cumulative averages), so eval-mode features have unit-order scale instead of
    vanishing through ~20 layers; the logit layer is scaled up so the Inception Score is not ~1.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Untrained(FeatureExtractorInceptionV3):  # ignores the (empty) weights file it is given
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    torch.save({}, path)
    torch.manual_seed(seed)
    net = Untrained("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=path)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8))
        net.fc.weight.mul_(20)
    torch.save(net.state_dict(), path)


class PerSample(torch.nn.Module):
    """Calls `net` one image at a time: a batch-invariant stand-in (every kernel sees batch size 1)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, z, t, y):
        return torch.cat([self.net(z[i : i + 1], t[i : i + 1], y[i : i + 1]) for i in range(z.shape[0])])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(script, *args, nproc: int | None = None, torchrun: list | None = None) -> list:
    """`python script args...`; under torchrun with `nproc` CPU processes (gloo) on a free port, or
    with the launcher flags `torchrun` as given."""
    launcher = [sys.executable]
    if nproc is not None:
        torchrun = [f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    if torchrun is not None:
        launcher += ["-m", "torch.distributed.run", *map(str, torchrun)]
    return [*launcher, str(script), *map(str, args)]


def child_env(extra: dict | None = None) -> dict:
    """The environment of a child process: unbuffered, one thread, the repository importable, and no
    launcher variables inherited from the test process."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID")
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("TORCHELASTIC_")}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **(extra or {})}


def main_jit_here(*argv) -> int:
    """main_jit.py's run of `argv` in this process, seconds cheaper than a process of its own (the
    command's own process behaviour, exit status and one-line errors, is tested with run_script)."""
    import main_jit

    return main_jit.main(main_jit.parse_args([str(a) for a in argv]))


def run_script(
    script, *args, nproc: int | None = None, env: dict | None = None, check: bool = True, timeout: float = 300
):
    """Run a script of the repository (path relative to the root) and wait. Returns the
    CompletedProcess with stdout and stderr merged in `stdout`; with check, a non-zero exit fails
    the test showing the output."""
    p = subprocess.run(
        command(script, *args, nproc=nproc),
        cwd=ROOT,
        env=child_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited with {p.returncode}:\n{p.stdout}")
    return p


def start_script(
    script,
    *args,
    nproc: int | None = None,
    torchrun: list | None = None,
    env: dict | None = None,
    argv: list | None = None,
) -> subprocess.Popen:
    """Start a script (under torchrun: see `command`; or the command line `argv` as given) in the
    background, stdout and stderr merged. Use it through the `start` fixture (conftest.py), which
    kills what is still running at teardown."""
    return subprocess.Popen(
        argv or command(script, *args, nproc=nproc, torchrun=torchrun),
        cwd=ROOT,
        env=child_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def read_until(proc: subprocess.Popen, marker: str) -> list[str]:
    """Read a started script's output line by line until a line contains `marker`; returns the lines."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"'{marker}' never printed:\n{''.join(lines)}")


def assert_same_state(a: dict, b: dict, atol: float = 0.0):
    """Two checkpoint dicts hold the same weights, EMAs and optimizer state: bit for bit (atol 0),
    or each tensor within `atol`."""

    def check(x, y, what):
        if atol == 0:
            assert torch.equal(x, y), what
        else:
            torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=str(what))

    assert a["model"].keys() == b["model"].keys()
    for key in ("model", "model_ema1", "model_ema2"):
        for name, t in a[key].items():
            check(t, b[key][name], (key, name))
    for i, s in a["optimizer"]["state"].items():
        for k, t in s.items():
            check(t, b["optimizer"]["state"][i][k], ("optimizer", i, k))


def load_last(out) -> dict:
    """The dict of out/checkpoint-last.pth."""
    return torch.load(os.path.join(out, "checkpoint-last.pth"), map_location="cpu", weights_only=True)


def read_metrics(out, kind: str | None = None) -> list[dict]:
    """The records of out/metrics.jsonl (of one kind: 'train' or 'eval'); every line must be whole JSON."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if kind is None or r["kind"] == kind]


def worker_pids(launcher: int) -> dict:
    """{rank: pid} of the worker processes a torchrun started (read from /proc)."""
    pids = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if ppid == launcher and b"RANK" in env:
            pids[int(env[b"RANK"])] = int(pid)
    return pids


def make_standin_dinov2_weights(path: str, dim: int = 128, depth: int = 2, grid: int = 37, seed: int = 0, **extra):
    """Write a small DINOv2-shaped ViT (patch 14, `dim` wide, `depth` blocks, a grid × grid position
    embedding: 37 is the 518 px of DINOv2's release) with random weights, in the release's format
    (Meta's key names with `mask_token`); `extra` tensors are added (e.g. register_tokens). LayerScale
    is set to order one, so that every block changes the features."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    net = VisionTransformer(
        img_size=14 * grid, patch_size=14, embed_dim=dim, depth=depth, num_heads=dim // 64, init_values=1.0
    )
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("head.")}
    for k in state:
        if k.endswith(".gamma") or k == "pos_embed" or k == "cls_token":
            state[k] = torch.randn_like(state[k]) * (0.5 if k.endswith(".gamma") else 0.02)
    torch.save({**state, "mask_token": torch.zeros(1, dim), **extra}, path)
    return path
