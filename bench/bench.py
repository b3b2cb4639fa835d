"""Training and sampling throughput of JiT on one device, through the repo's own code paths.

    python bench/bench.py --model JiT-B/16 --json bench_b16.json       # a GPU: bf16 autocast, compiled
    python bench/bench.py --model JiT-XS/4 --img_size 16 --batch_size 4 --steps 2 --warmup 1 \\
        --sample_batch 4 --sample_steps 2 --parity                      # a CPU smoke run

Training times `engine_jit.train_step` (autocast, fused AdamW with the device-side non-finite skip,
two EMA updates) with `engine_jit.build_optimizer`, on one synthetic uint8 batch in (pinned) host
memory: the data pipeline is not included (see bench_data.py). Sampling times `Denoiser.generate`
(Heun with CFG on an interval) under the device's autocast, with a compiled network passed as
`net=` as evaluation does. Compilation happens in the untimed warmup.
"""

import argparse
import contextlib
import datetime
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from denoiser import Denoiser  # noqa: E402
from engine_eval import compile_sampling_net  # noqa: E402
from engine_jit import StepParts, build_optimizer, train_step  # noqa: E402
from model_jit import ATTN_IMPLS, JiT_models  # noqa: E402
from sampling import SamplerSettings  # noqa: E402
from util import distributed  # noqa: E402
from util.config import RunConfig, parse  # noqa: E402
from util.ema import EMA  # noqa: E402
from util.errors import BadValue, exit_code  # noqa: E402
from util.evaluation import quantize  # noqa: E402
from util.files import write_json  # noqa: E402

H100_CLASS_TFLOPS = 790.0  # dense bf16 peak assumed for H100 / H200 (SPEC's figure)


def get_args_parser():
    p = argparse.ArgumentParser("JiT throughput benchmark", add_help=True)
    a = p.add_argument
    a(
        "--model",
        default="JiT-B/16",
        choices=sorted(JiT_models),
        metavar="MODEL",
        help=f"one of {', '.join(JiT_models)}",
    )
    a("--img_size", default=256, type=int)
    a("--class_num", default=1000, type=int)
    a("--attn_impl", default="sdpa", choices=ATTN_IMPLS)
    a("--batch_size", default=128, type=int, help="training batch per device")
    a("--steps", default=50, type=int, help="timed training steps")
    a("--warmup", default=10, type=int, help="untimed training steps before timing (compilation happens here)")
    a("--device", default=None, help="cuda or cpu (default: cuda when available)")
    a(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="torch.compile (default: on for CUDA, off for CPU)",
    )
    a("--no_compile", dest="compile", action="store_false")
    a("--sample_batch", default=128, type=int, help="images per generate call (the reference's --gen_bsz)")
    a("--sample_steps", default=50, type=int, help="Heun steps")
    a("--cfg", default=2.9, type=float)
    a("--interval_min", default=0.1, type=float)
    a("--interval_max", default=1.0, type=float)
    a("--grad_checkpoint", action="store_true", help="recompute block activations in the backward pass (training)")
    a("--skip_train", action="store_true")
    a("--skip_sample", action="store_true")
    a("--parity", action="store_true", help="also report the drift of this path from float32 reference attention")
    a("--parity_steps", default=10, type=int, help="Heun steps of the parity samples")
    a(
        "--peak_tflops",
        default=None,
        type=float,
        help=f"device peak for MFU (default: {H100_CLASS_TFLOPS:g} on an H100/H200, else no MFU)",
    )
    a("--seed", default=0, type=int)
    a("--json", default=None, metavar="PATH", help="also write the results here")
    return p


def sync(device):
    """Wait for the device's queued work, so that the host clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device):
    """torch.cuda.max_memory_allocated since the last reset, in GB (1e9 bytes); None off CUDA."""
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@contextlib.contextmanager
def full_fp32():
    """Float32 matmuls and convolutions without TF32 (PyTorch allows it for cuDNN convolutions by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def git_commit():
    """HEAD of this checkout, '+dirty' when tracked files differ from it; None outside git."""

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def environment(device):
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
    }


def model_size(args):
    """(parameters, forward FLOPs per image) of the network, counted on the meta device (shapes only).
    FlopCounterMode counts matmuls and convolutions; attention (SDPA decomposes to two batched matmuls
    on meta) is included."""
    with torch.device("meta"):
        net = JiT_models[args.model](input_size=args.img_size, num_classes=args.class_num)
        x = torch.zeros(2, 3, args.img_size, args.img_size)
        t, y = torch.zeros(2), torch.zeros(2, dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, t, y)
    return sum(p.numel() for p in net.parameters()), counter.get_total_flops() / 2


def bench_sampler(args, steps: int) -> SamplerSettings:
    """Heun with `steps` steps and the benchmark's guidance settings."""
    return SamplerSettings(
        method="heun", steps=steps, cfg=args.cfg, interval_min=args.interval_min, interval_max=args.interval_max
    )


def bench_denoiser(args, device, attn_impl):
    torch.manual_seed(args.seed)
    net = JiT_models[args.model](
        input_size=args.img_size, num_classes=args.class_num, attn_impl=attn_impl, grad_checkpoint=args.grad_checkpoint
    )
    return Denoiser(net, args.class_num).to(device)


def utilisation(flops_per_s, args):
    return {"tflops": flops_per_s / 1e12, "mfu": flops_per_s / (args.peak_tflops * 1e12) if args.peak_tflops else None}


def bench_train(args, device, fwd_flops):
    """Steady-state training throughput: `steps` timed optimiser steps after `warmup` untimed ones."""
    denoiser = bench_denoiser(args, device, args.attn_impl)
    emas = [EMA(denoiser, 0.9999), EMA(denoiser, 0.9996)]
    optimizer = build_optimizer(denoiser, lr=5e-5 * args.batch_size / 256, weight_decay=0.0)
    model = torch.compile(denoiser) if args.compile else denoiser
    model.train()
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, 256, (args.batch_size, 3, args.img_size, args.img_size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, args.class_num, (args.batch_size,), generator=g)
    if device.type == "cuda":  # as the DataLoader delivers them (pin_memory)
        x, labels = x.pin_memory(), labels.pin_memory()
    batch = [(x, labels)]
    parts = StepParts(model, denoiser, optimizer, emas, device)

    reset_peak_memory(device)
    for _ in range(args.warmup):
        train_step(parts, batch)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss, _ = train_step(parts, batch)
    sync(device)
    elapsed = time.perf_counter() - start
    img_s = args.steps * args.batch_size / elapsed
    return {
        "img_per_s": img_s,
        "step_ms": 1e3 * elapsed / args.steps,
        "peak_mem_gb": peak_memory_gb(device),
        "loss": loss.item(),
        **utilisation(img_s * 3 * fwd_flops, args),
    }


def bench_sample(args, device, fwd_flops):
    """Throughput of one timed generate call of `sample_batch` images, after one untimed call."""
    denoiser = bench_denoiser(args, device, args.attn_impl).eval().requires_grad_(False)  # as the EMA copy sampled
    net = compile_sampling_net(denoiser.net) if args.compile else None  # as evaluation compiles it
    labels = torch.arange(args.sample_batch, device=device) % args.class_num
    sampler = bench_sampler(args, args.sample_steps)

    def generate():
        with distributed.autocast(device):
            return denoiser.generate(labels, sampler, net=net)

    reset_peak_memory(device)
    generate()
    sync(device)
    start = time.perf_counter()
    generate()
    sync(device)
    elapsed = time.perf_counter() - start
    img_s = args.sample_batch / elapsed
    passes = bench_sampler(args, args.sample_steps).net_passes()
    return {
        "img_per_s": img_s,
        "batch_s": elapsed,
        "peak_mem_gb": peak_memory_gb(device),
        "net_passes_per_image": passes,
        **utilisation(img_s * passes * fwd_flops, args),
    }


def bench_parity(args, device, n=8):
    """Drift of the benchmarked path (args.attn_impl, the device's autocast, compiled when on) from the
    reference attention in float32 without autocast or TF32: the loss on a fixed batch with fixed t and
    noise, and `n` samples of `parity_steps` Heun steps from fixed noise, with the same weights (all
    perturbed by N(0, 0.02²), so that the zero-initialised layers act)."""
    g = torch.Generator().manual_seed(args.seed)
    fast = bench_denoiser(args, device, args.attn_impl).eval()
    with torch.no_grad():
        for p in fast.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=g).to(device))
    ref = bench_denoiser(args, device, "reference").eval()
    ref.load_state_dict(fast.state_dict())
    if args.compile:
        fast = Denoiser(compile_sampling_net(fast.net), args.class_num).eval()

    shape = (n, 3, args.img_size, args.img_size)
    x = (torch.rand(shape, generator=g) * 2 - 1).to(device)
    t = torch.sigmoid(torch.randn(n, generator=g) * 0.8 - 0.8).to(device)  # the training distribution
    noise = torch.randn(shape, generator=g).to(device)
    z0 = torch.randn(shape, generator=g).to(device)
    labels = (torch.arange(n) % args.class_num).to(device)
    sampler = bench_sampler(args, args.parity_steps)
    with torch.no_grad(), distributed.autocast(device):
        loss = fast(x, labels, t=t, noise=noise).item()
        img = fast.generate(labels, sampler, noise=z0).float()
    with torch.no_grad(), full_fp32():
        loss_ref = ref(x, labels, t=t, noise=noise).item()
        img_ref = ref.generate(labels, sampler, noise=z0)
    diff = (img - img_ref).abs()
    diff_u8 = (quantize(img).int() - quantize(img_ref).int()).abs()
    return {
        "images": n,
        "steps": args.parity_steps,
        "loss": loss,
        "loss_ref": loss_ref,
        "loss_abs_diff": abs(loss - loss_ref),
        "loss_rel_diff": abs(loss - loss_ref) / abs(loss_ref),
        "sample_max_abs_diff": diff.max().item(),
        "sample_mean_abs_diff": diff.mean().item(),
        "sample_rel_l2": ((img - img_ref).norm() / img_ref.norm()).item(),
        "uint8_frac_changed": (diff_u8 > 0).float().mean().item(),
        "uint8_max_diff": diff_u8.max().item(),
    }


def figure(v, spec: str) -> str:
    """A measured figure in `spec`'s format, or n/a when not measured."""
    return "n/a" if v is None else format(v, spec)


def parse_args(argv=None) -> RunConfig:
    """The flags as given (util.config.RunConfig), as every script's."""
    return parse(get_args_parser(), argv)


def main(args: RunConfig) -> dict:
    """Measure; BadValue for a setting that cannot work (see cli). Returns what --json holds."""
    for name in ("batch_size", "steps", "sample_batch", "sample_steps", "parity_steps"):
        if getattr(args, name) < 1:
            raise BadValue(f"--{name} must be at least 1")
    device = distributed.init(args.device)
    h100_class = device.type == "cuda" and any(n in torch.cuda.get_device_name(device) for n in ("H100", "H200"))
    args = args.replace(
        compile=device.type == "cuda" if args.compile is None else args.compile,
        peak_tflops=H100_CLASS_TFLOPS if args.peak_tflops is None and h100_class else args.peak_tflops,
    )

    params, fwd_flops = model_size(args)
    out = {
        "env": environment(device),
        "config": args.as_dict(),
        "model": {
            "params_m": params / 1e6,
            "fwd_gflops_per_image": fwd_flops / 1e9,
            "train_gflops_per_image": 3 * fwd_flops / 1e9,
        },
        "train": None,
        "sample": None,
        "parity": None,
    }
    env = out["env"]
    print(
        f"{args.model} at {args.img_size}px: {params / 1e6:.1f}M parameters, {fwd_flops / 1e9:.2f} GFLOPs/image "
        "forward; "
        f"{env['gpu'] or env['device']}, torch {env['torch']}, compile {args.compile}, attention {args.attn_impl}",
        flush=True,
    )
    if not args.skip_train:
        r = out["train"] = bench_train(args, device, fwd_flops)
        print(
            f"train  (batch {args.batch_size}): {r['img_per_s']:.1f} img/s, {r['step_ms']:.1f} ms/step, "
            f"peak {figure(r['peak_mem_gb'], '.1f')} GB, {r['tflops']:.2f} TFLOP/s, MFU {figure(r['mfu'], '.1%')}",
            flush=True,
        )
    if not args.skip_sample:
        r = out["sample"] = bench_sample(args, device, fwd_flops)
        print(
            f"sample (batch {args.sample_batch}, {args.sample_steps}-step Heun, cfg {args.cfg}): "
            f"{r['img_per_s']:.2f} img/s, "
            f"{r['batch_s']:.2f} s/batch, peak {figure(r['peak_mem_gb'], '.1f')} GB, {r['net_passes_per_image']} net "
            "passes/image, "
            f"{r['tflops']:.2f} TFLOP/s, MFU {figure(r['mfu'], '.1%')}",
            flush=True,
        )
    if args.parity:
        r = out["parity"] = bench_parity(args, device)
        print(
            f"parity vs float32 reference attention: loss {r['loss']:.6f} vs {r['loss_ref']:.6f} (rel "
            f"{r['loss_rel_diff']:.2e}); "
            f"{r['images']} samples of {r['steps']} steps: max |diff| {r['sample_max_abs_diff']:.2e}, "
            f"rel L2 {r['sample_rel_l2']:.2e}, uint8 changed {r['uint8_frac_changed']:.2%} (max {r['uint8_max_diff']})",
            flush=True,
        )
    if args.json:
        write_json(args.json, out, indent=2)
    return out


def cli(argv=None) -> int:
    """Exit status as util.errors: 2 for bad input (one line on stderr)."""
    return exit_code(main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
