"""Sample a grid from a checkpoint or an exported folder: one row per class, EMA-1 weights by default
(--ema 2 or 3); CPU works.

    python sample.py --resume output_dir/checkpoint-last.pth --classes 207 360 387 974 --per_class 8 \
        --cfg 2.9 --interval_min 0.1 --num_sampling_steps 50 --seed 0 --output samples.png
    python sample.py --resume exported/jit-b16 --classes 207 360          # its config.json's sampler

The network's settings (--model, --img_size, --class_num, --noise_scale, --t_eps and the knobs,
prediction target and loss it was trained with) come from the weights (the checkpoint's `args`, or
config.json) unless a flag is given. An exported folder also brings its recommended sampler. Image
(row r, column j) starts from the noise of index r·per_class + j with the evaluation's seeding, so a
grid is reproducible on any device; it is util.grid's, the same code as training's sample grids
(output_dir/samples: the same classes, per_class, sampler and --seed give the same picture).
"""

import argparse
import os
import sys

import run_sources
import weights
from model_jit import JiT_models
from util import distributed, grid
from util.cli import HelpFormatter
from util.config import RunConfig, parse
from util.errors import BadValue, exit_code
from util.sweep import add_sampler_args, check_denoiser_flags, sampler_settings
from util.viz import save_grid


def get_args_parser():
    parser = argparse.ArgumentParser("JiT sample grid", add_help=True, formatter_class=HelpFormatter)
    a = parser.add_argument
    a(
        "--resume",
        required=True,
        type=str,
        help="checkpoint file, a folder holding checkpoint-*.pth, or an exported folder (export.py)",
    )
    a(
        "--ema",
        default=1,
        type=int,
        choices=(1, 2, 3),
        help="which EMA's weights sample (3: a checkpoint trained with --ema_decay3)",
    )
    a(
        "--weights",
        default=None,
        choices=["ema1", "ema2", "ema3", "model"],
        help="which weights to sample with (overrides --ema)",
    )
    a(
        "--classes",
        default=None,
        type=int,
        nargs="+",
        help="one grid row per class (default: util.grid.figure_classes of the weights' class count)",
    )
    a("--per_class", default=8, type=int, help="images per row")
    add_sampler_args(parser)
    a("--seed", default=0, type=int, help="image (r, j) starts from the noise of (seed, r·per_class + j)")
    a("--output", default="samples.png", type=str, help="grid PNG to write")
    a("--device", default=None, type=str, help="cuda, cpu, ... (default: cuda when available)")
    a("--model", default=None, choices=list(JiT_models), help="default: the weights'")
    a("--img_size", default=None, type=int, help="default: the weights'")
    a("--class_num", default=None, type=int, help="default: the weights'")
    a("--noise_scale", default=None, type=float, help="default: the weights'")
    a("--t_eps", default=None, type=float, help="default: the weights'")
    return parser


def parse_args(argv=None) -> RunConfig:
    """The flags as given (util.config.RunConfig; `given`: the flags typed)."""
    return parse(get_args_parser(), argv)


def load(args: RunConfig) -> weights.Loaded:
    """The denoiser --resume names with its weights, and the sampler: the flags typed (args.given,
    also a default typed out) override what the weights bring (weights.load_denoiser)."""
    overrides = {k: getattr(args, k) for k in args.given}
    if weights.is_exported(args.resume) and (args.weights or args.ema != 1):
        raise BadValue(f"{args.resume} is an exported folder holding one network: --ema / --weights do not apply")
    state, path, exported = run_sources.read_weights(args.resume, log=lambda msg: None)
    if exported is not None:
        return weights.load_denoiser((exported, state.model), overrides, where=os.path.join(path, weights.CONFIG))
    which = args.weights or f"ema{args.ema}"
    exported = weights.command_line_sampler(
        weights.export_config(state, which, dtype="float32", source=path, records=[]), args
    )
    return weights.load_denoiser((exported, state.weights(which)), overrides, where=f"{path} ({which})")


def main(args: RunConfig) -> int:
    """Sample the grid; BadInput for bad input (see cli)."""
    sampler_settings(args)  # BadValue before any work
    check_denoiser_flags(args)
    device = distributed.init(args.device)
    loaded = load(args)
    model = loaded.denoiser.to(device)
    for note in loaded.notes:
        print(f"note: {note}")
    classes = grid.figure_classes(model.num_classes) if args.classes is None else args.classes
    spec = grid.GridSpec(tuple(classes), args.per_class, loaded.sampler, args.seed)  # training's grids are these
    spec.check_classes(model.num_classes, "--classes")
    save_grid(grid.sample_images(model, spec, device), args.per_class, args.output)
    w = loaded.config.get("weights", {})
    print(
        f"wrote {len(classes)}×{args.per_class} grid from {args.resume} ({w.get('which')}, epoch {w.get('epoch')}) "
        f"to {args.output}"
    )
    return 0


def cli(argv=None) -> int:
    """Exit status as util.errors: 2 for bad input (one line), 1 for a grid that could not be written."""
    return exit_code(main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
