"""What watching a run costs (issue 27): the loss by noise level and the gradient norm / update ratio
(engine_jit.StepMonitor as the training step's probe) and one sample grid (util.grid), on this device,
as seconds per epoch and percent of training; and the same worked out from throughput figures.

    python bench/monitor_cost.py --per_class 3         # the demo's settings (JiT-T/4, 32 px, batch 32, 4 × 3 grid)
    python bench/monitor_cost.py --model JiT-B/16 --img_size 256 --batch_size 128 --class_num 1000 \
        --sample_steps 50 --cfg 2.9 --images_per_epoch 1281167 --world_size 8 --sample_every 5
    python bench/monitor_cost.py --from_figures --train_img_per_s 1958 --sample_img_per_s 32.3   # B/16, 8 GPUs

Training steps with and without the probe alternate (the machine's load drifts alike for both); the
measured step (every --log_freq) is timed apart. One grid is timed after one untimed warm-up grid.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import sync  # noqa: E402  (bench/bench.py: this folder is on sys.path)
from denoiser import Denoiser  # noqa: E402
from engine_jit import StepMonitor, StepParts, build_optimizer, t_bin_edges, train_step  # noqa: E402
from model_jit import JiT_models  # noqa: E402
from sampling import SamplerSettings  # noqa: E402
from util import grid  # noqa: E402
from util.cli import HelpFormatter
from util.config import RunConfig, parse  # noqa: E402
from util.ema import EMA  # noqa: E402
from util.errors import BadValue, exit_code  # noqa: E402
from util.files import write_json  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser("JiT monitoring cost", formatter_class=HelpFormatter)
    a = p.add_argument
    a("--model", default="JiT-T/4")
    a("--img_size", default=32, type=int)
    a("--class_num", default=4, type=int)
    a("--batch_size", default=32, type=int, help="per process")
    a("--steps", default=6, type=int, help="timed steps of each kind")
    a("--log_freq", default=8, type=int, help="a measured step (grad norm, update ratio) every N steps")
    a("--images_per_epoch", default=1024, type=int, help="the dataset (the demo: 1024; ImageNet: 1281167)")
    a("--world_size", default=1, type=int, help="processes sharing an epoch and a grid")
    a("--sample_every", default=12, type=int, help="epochs between grids (the demo's default: 12)")
    a(
        "--per_class",
        default=None,
        type=int,
        help="images per class in the grid (default: training's, 32 / classes: ImageNet 4; the demo: 3)",
    )
    a("--sample_steps", default=20, type=int)
    a("--cfg", default=2.0, type=float)
    a("--interval_min", default=0.1, type=float)
    a(
        "--from_figures",
        action="store_true",
        help="no measurement: work out the grid's cost from --train_img_per_s and --sample_img_per_s",
    )
    a("--train_img_per_s", default=None, type=float, help="training images/s per process (SPEC: B/16 on an H200, 1958)")
    a(
        "--sample_img_per_s",
        default=None,
        type=float,
        help="sampling images/s at a full batch (SPEC: B/16 50-step Heun + CFG, 32.3)",
    )
    a(
        "--probe_only",
        action="store_true",
        help="time the probe's own operations alone (steady on a loaded machine), no steps or grid",
    )
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--json", default=None)
    return p


def parse_args(argv=None) -> RunConfig:
    """The flags as given (util.config.RunConfig), as every script's."""
    return parse(get_args_parser(), argv)


def timed_steps(parts, batch, n, device, monitor=None, measure=False) -> float:
    """Seconds per step of n steps (with the probe `monitor`, every step measured if `measure`)."""
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        if monitor is not None:
            monitor.measure_next = measure
        train_step(parts if monitor is None else StepParts(**{**vars(parts), "probe": monitor}), [batch])
    sync(device)
    return (time.perf_counter() - t) / n


def per_class(args) -> int:
    return args.per_class or grid.default_per_class(len(grid.default_classes(args.class_num)))


def from_figures(args) -> dict:
    """The grid's cost from throughput figures: an epoch takes images / (world × train img/s); a grid of n
    images on `world` ranks takes between n / world and n images / sample img/s (a full batch's speed:
    a small batch is slower per image, at most as slow as one rank sampling them all)."""
    spec_n = len(grid.default_classes(args.class_num)) * per_class(args)
    epoch_s = args.images_per_epoch / (args.world_size * args.train_img_per_s)
    low, high = spec_n / args.world_size / args.sample_img_per_s, spec_n / args.sample_img_per_s
    return {
        "grid_images": spec_n,
        "epoch_s": epoch_s,
        "grid_s": [low, high],
        "grid_pct_of_training": [100 * low / (epoch_s * args.sample_every), 100 * high / (epoch_s * args.sample_every)],
    }


def probe_ops(monitor, params, device, batch: int, reps: int = 200) -> tuple[float, float]:
    """Seconds of the probe's own work per step (binning one batch's losses) and per measured step
    (gradient norm, weight copy, update norm), timed alone."""
    for p in params:
        p.grad = torch.zeros_like(p)
    losses, t, skipped = (
        torch.rand(batch, device=device),
        torch.rand(batch, device=device),
        torch.zeros((), device=device),
    )
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        monitor.add_samples(losses, t)
        monitor.end_step(skipped, params, None, sharded=False)
    sync(device)
    per_step = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for _ in range(reps // 10):
        monitor.end_step(skipped, params, monitor.before_step(params, sharded=False), sharded=False)
    sync(device)
    return per_step, (time.perf_counter() - t0) / (reps // 10)


def probe_cost(args: RunConfig, denoiser, device: torch.device) -> dict:
    """--probe_only: the probe's own operations, timed alone (probe_ops), per step and per epoch."""
    monitor = StepMonitor(device, t_bin_edges(-0.8, 0.8))
    params = [p for p in denoiser.parameters() if p.requires_grad]
    per_step, per_measure = probe_ops(monitor, params, device, args.batch_size)
    steps_per_epoch = args.images_per_epoch // (args.batch_size * args.world_size)
    return {
        "device": str(device),
        "model": args.model,
        "batch_size": args.batch_size,
        "probe_s_per_step": per_step,
        "probe_s_per_measured_step": per_measure,
        "steps_per_epoch": steps_per_epoch,
        "log_freq": args.log_freq,
        "per_t_loss_s_per_epoch": per_step * steps_per_epoch + per_measure * steps_per_epoch / args.log_freq,
    }


def step_cost(args: RunConfig, parts: StepParts, device: torch.device) -> dict:
    """Training steps without and with the probe, alternating (medians), and the measured step."""
    x = torch.randint(0, 256, (args.batch_size, 3, args.img_size, args.img_size), dtype=torch.uint8)
    batch = (x, torch.randint(0, args.class_num, (args.batch_size,)))
    monitor = StepMonitor(device, t_bin_edges(-0.8, 0.8))
    timed_steps(parts, batch, 2, device, monitor)  # warm-up
    plain, probed = [], []
    for _ in range(args.steps):
        plain.append(timed_steps(parts, batch, 1, device))
        probed.append(timed_steps(parts, batch, 1, device, monitor))
    measured = timed_steps(parts, batch, 2, device, monitor, measure=True)
    step_s, probe_s = sorted(plain)[len(plain) // 2], sorted(probed)[len(probed) // 2]
    steps_per_epoch = args.images_per_epoch // (args.batch_size * args.world_size)
    epoch_s = step_s * steps_per_epoch
    per_t = (probe_s - step_s) * steps_per_epoch + (measured - probe_s) * steps_per_epoch / args.log_freq
    return {
        "step_s": step_s,
        "step_with_probe_s": probe_s,
        "measured_step_s": measured,
        "epoch_s": epoch_s,
        "per_t_loss_s_per_epoch": per_t,
        "per_t_loss_pct": 100 * per_t / epoch_s,
    }


def grid_cost(args: RunConfig, ema, device: torch.device, epoch_s: float) -> dict:
    """One sample grid (this rank's share), timed after an untimed one."""
    classes = grid.default_classes(args.class_num)
    spec = grid.GridSpec(
        tuple(classes), per_class(args), SamplerSettings("heun", args.sample_steps, args.cfg, args.interval_min, 1.0)
    )
    rank_share = range(spec.size // args.world_size)
    grid.sample_images(ema, spec, device, rank_share)  # warm-up
    sync(device)
    t = time.perf_counter()
    grid.sample_images(ema, spec, device, rank_share)
    sync(device)
    grid_s = time.perf_counter() - t
    return {
        "grid": f"{len(classes)} × {spec.per_class}, {spec.sampler.method} {spec.sampler.steps} steps, cfg "
        f"{spec.sampler.cfg}",
        "grid_images_per_rank": len(rank_share),
        "grid_s": grid_s,
        "sample_every": args.sample_every,
        "grid_s_per_epoch": grid_s / args.sample_every,
        "grid_pct": 100 * grid_s / (epoch_s * args.sample_every),
        "grid_pct_of_one_epoch": 100 * grid_s / epoch_s,
    }


def main(args: RunConfig) -> dict:
    """Measure (or work out --from_figures) and print the costs as JSON; BadValue for settings that
    cannot work (see cli)."""
    for name in ("batch_size", "steps", "log_freq", "sample_every", "sample_steps", "world_size"):
        if getattr(args, name) < 1:
            raise BadValue(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.from_figures and (args.train_img_per_s is None or args.sample_img_per_s is None):
        raise BadValue("--from_figures needs --train_img_per_s and --sample_img_per_s")
    if args.from_figures:
        result = from_figures(args)
    else:
        device = torch.device(args.device)
        torch.manual_seed(0)
        net = JiT_models[args.model](input_size=args.img_size, num_classes=args.class_num)
        denoiser = Denoiser(net, args.class_num).to(device)
        if args.probe_only:
            result = probe_cost(args, denoiser, device)
        else:
            emas = [EMA(denoiser, 0.9999), EMA(denoiser, 0.9996)]
            parts = StepParts(denoiser, denoiser, build_optimizer(denoiser, 1e-4, 0.0), emas, device)
            steps = step_cost(args, parts, device)
            where = {"device": str(device), "model": args.model, "img_size": args.img_size}
            result = {**where, "batch_size": args.batch_size, **steps}
            result.update(grid_cost(args, emas[0].module, device, steps["epoch_s"]))
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)
    return result


def cli(argv=None) -> int:
    """Exit status as util.errors: 2 for bad input (one line on stderr)."""
    return exit_code(main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
