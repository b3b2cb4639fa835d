"""Sample a grid from a checkpoint: one row per class, EMA-1 weights by default; CPU works.

    python sample.py --resume output_dir/checkpoint-last.pth --classes 207 360 387 974 --per_class 8 \
        --cfg 2.9 --interval_min 0.1 --num_sampling_steps 50 --seed 0 --output samples.png

Model settings (--model, --img_size, --class_num, --noise_scale, --t_eps) default to the
checkpoint's own `args`. Image (row r, column j) starts from the noise of index r·per_class + j
with the evaluation's seeding, so a grid is reproducible on any device.
"""
import argparse

import torch

from denoiser import Denoiser
from model_jit import JiT_models
from util import checkpoint, distributed
from util.evaluation import initial_noise, quantize
from util.viz import save_grid

MODEL_DEFAULTS = dict(model="JiT-B/16", img_size=256, class_num=1000, noise_scale=1.0, t_eps=0.05)


def get_args_parser():
    parser = argparse.ArgumentParser("JiT sample grid", add_help=True)
    parser.add_argument("--resume", required=True, type=str, help="checkpoint file, or a folder holding checkpoint-*.pth")
    parser.add_argument("--weights", default="ema1", choices=["ema1", "ema2", "model"], help="which weights to sample with")
    parser.add_argument("--classes", default=[207, 360, 387, 974, 88, 979, 417, 279], type=int, nargs="+", help="one grid row per class")
    parser.add_argument("--per_class", default=8, type=int, help="images per row")
    parser.add_argument("--num_sampling_steps", default=50, type=int)
    parser.add_argument("--sampling_method", default="heun", choices=["heun", "euler"])
    parser.add_argument("--cfg", default=1.0, type=float)
    parser.add_argument("--interval_min", default=0.0, type=float)
    parser.add_argument("--interval_max", default=1.0, type=float)
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--output", default="samples.png", type=str, help="grid PNG to write")
    parser.add_argument("--device", default=None, type=str, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--model", default=None, choices=list(JiT_models), help="default: the checkpoint's")
    parser.add_argument("--img_size", default=None, type=int, help="default: the checkpoint's")
    parser.add_argument("--class_num", default=None, type=int, help="default: the checkpoint's")
    parser.add_argument("--noise_scale", default=None, type=float, help="default: the checkpoint's")
    parser.add_argument("--t_eps", default=None, type=float, help="default: the checkpoint's")
    return parser


def main(args):
    device = distributed.init(args.device)
    try:
        ckpt, path = checkpoint.load_for_resume(args.resume, log=lambda msg: None)
    except checkpoint.CheckpointError as e:
        distributed.fail(str(e))
    if ckpt is None:
        distributed.fail(f"--resume {args.resume}: no checkpoint found")
    saved = ckpt.get("args") or {}
    cfg = {k: getattr(args, k) if getattr(args, k) is not None else saved.get(k, v) for k, v in MODEL_DEFAULTS.items()}
    bad = [c for c in args.classes if not 0 <= c < cfg["class_num"]]
    if bad:
        distributed.fail(f"--classes {bad} outside [0, {cfg['class_num']})")
    net = JiT_models[cfg["model"]](input_size=cfg["img_size"], num_classes=cfg["class_num"])
    model = Denoiser(net, cfg["class_num"], noise_scale=cfg["noise_scale"], t_eps=cfg["t_eps"])
    key = {"ema1": "model_ema1", "ema2": "model_ema2", "model": "model"}[args.weights]
    model.load_state_dict(ckpt[key])
    model.to(device).eval()

    n = len(args.classes) * args.per_class
    labels = torch.tensor(args.classes).repeat_interleave(args.per_class).to(device)  # (n,) row-major
    noise = initial_noise(args.seed, range(n), (3, cfg["img_size"], cfg["img_size"]), cfg["noise_scale"]).to(device)
    with distributed.autocast(device):
        x = model.generate(labels, noise=noise, steps=args.num_sampling_steps, method=args.sampling_method,
                           cfg=args.cfg, interval_min=args.interval_min, interval_max=args.interval_max)
    save_grid(quantize(x), args.per_class, args.output)
    print(f"wrote {len(args.classes)}×{args.per_class} grid from {path} ({args.weights}, epoch {ckpt.get('epoch')}) to {args.output}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
