"""Sample a grid from a checkpoint: one row per class, EMA-1 weights by default (--ema 2 or 3); CPU works.

    python sample.py --resume output_dir/checkpoint-last.pth --classes 207 360 387 974 --per_class 8 \
        --model_args 2.9 --interval_min 0.1 --num_sampling_steps 50 --seed 0 --output samples.png

Model settings (--model, --img_size, --class_num, --noise_scale, --t_eps) default to the
checkpoint's own `args`. Image (row r, column j) starts from the noise of index r·per_class + j
with the evaluation's seeding, so a grid is reproducible on any device.
"""
import argparse
import sys

import torch

from denoiser import Denoiser
from model_jit import JiT_models
from util import checkpoint, distributed
from util.errors import BadInput, BadValue, exit_code
from util.evaluation import initial_noise, quantize
from util.sweep import add_sampler_args, sampler_settings
from util.viz import save_grid

MODEL_DEFAULTS = dict(model="JiT-B/16", img_size=256, class_num=1000, noise_scale=1.0, t_eps=0.05)


def get_args_parser():
    parser = argparse.ArgumentParser("JiT sample grid", add_help=True, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = parser.add_argument
    a("--resume", required=True, type=str, help="checkpoint file, or a folder holding checkpoint-*.pth")
    a("--ema", default=1, type=int, choices=(1, 2, 3), help="which EMA's weights sample (3: a checkpoint trained with --ema_decay3)")
    a("--weights", default=None, choices=["ema1", "ema2", "ema3", "model"], help="which weights to sample with (overrides --ema)")
    a("--classes", default=[207, 360, 387, 974, 88, 979, 417, 279], type=int, nargs="+", help="one grid row per class")
    a("--per_class", default=8, type=int, help="images per row")
    add_sampler_args(parser)
    a("--seed", default=0, type=int, help="image (r, j) starts from the noise of (seed, r·per_class + j)")
    a("--output", default="samples.png", type=str, help="grid PNG to write")
    a("--device", default=None, type=str, help="cuda, cpu, ... (default: cuda when available)")
    a("--model", default=None, choices=list(JiT_models), help="default: the checkpoint's")
    a("--img_size", default=None, type=int, help="default: the checkpoint's")
    a("--class_num", default=None, type=int, help="default: the checkpoint's")
    a("--noise_scale", default=None, type=float, help="default: the checkpoint's")
    a("--t_eps", default=None, type=float, help="default: the checkpoint's")
    return parser


def main(args) -> int:
    """Exit status as util.errors: 2 for bad input (one line), 1 for a grid that could not be written."""
    settings = sampler_settings(args)
    device = distributed.init(args.device)
    state, path = checkpoint.find_checkpoint(args.resume, log=lambda msg: None)
    if state is None:
        raise BadInput(f"--resume {args.resume}: no checkpoint found")
    saved = state.args
    which = args.weights or f"ema{args.ema}"
    model_args = {k: getattr(args, k) if getattr(args, k) is not None else saved.get(k, v) for k, v in MODEL_DEFAULTS.items()}
    bad = [c for c in args.classes if not 0 <= c < model_args["class_num"]]
    if bad:
        raise BadValue(f"--classes {bad} outside [0, {model_args['class_num']})")
    net = JiT_models[model_args["model"]](input_size=model_args["img_size"], num_classes=model_args["class_num"])
    model = Denoiser(net, model_args["class_num"], noise_scale=model_args["noise_scale"], t_eps=model_args["t_eps"])
    checkpoint.load_module(model, state.weights(which), path, saved)
    model.to(device).eval()

    n = len(args.classes) * args.per_class
    labels = torch.tensor(args.classes).repeat_interleave(args.per_class).to(device)  # (n,) row-major
    noise = initial_noise(args.seed, range(n), (3, model_args["img_size"], model_args["img_size"]), model_args["noise_scale"]).to(device)
    with distributed.autocast(device):
        x = model.generate(labels, settings, noise=noise)
    save_grid(quantize(x), args.per_class, args.output)
    print(f"wrote {len(args.classes)}×{args.per_class} grid from {path} ({which}, epoch {state.epoch}) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_code(main, get_args_parser().parse_args()))
