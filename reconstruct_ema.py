"""Post-hoc EMA: reconstruct, after training, the EMA of any length from the power-function EMA
snapshots a run wrote with --phema_stds (EDM2 §3; the math is in util/phema.py).

    python reconstruct_ema.py --snapshots ${OUTPUT_DIR}/phema --std 0.004 0.0067 0.01 --decay 0.99985

Each target (a relative standard deviation --std, or a classic per-step EMA decay --decay) is
reconstructed at the step --at (default: the newest snapshot) from the snapshots at or before it
(of one run: a folder holding snapshots of several runs is refused with a list of them, until
--run names one), and written as a checkpoint (`model` and `model_ema1` hold the weights; `phema` records the target,
the snapshots and their weights) that `main_jit.py --evaluate_gen --resume FILE` and
`sample.py --resume FILE` read. Bad input exits with status 2 and one line on stderr, a failed
write with status 1.
"""

import argparse
import os
import sys

from util import checkpoint, phema, phema_files
from util.cli import HelpFormatter
from util.config import RunConfig, parse
from util.errors import BadValue, exit_code

ACCUM = ("float64", "float32")  # names in util.checkpoint.DTYPES


def get_args_parser():
    parser = argparse.ArgumentParser("JiT post-hoc EMA reconstruction", formatter_class=HelpFormatter)
    a = parser.add_argument
    a("--snapshots", required=True, help="folder of phema-*.pth snapshots (a run's output_dir/phema)")
    a("--std", default=[], type=float, nargs="+", help="target relative standard deviations σ_rel, each in (0, 0.2887)")
    a("--decay", default=[], type=float, nargs="+", help="target classic EMA decays per optimiser step, each in (0, 1)")
    a("--at", default=None, type=int, help="global optimiser step to reconstruct at (default: the newest snapshot's)")
    a(
        "--run",
        default=None,
        help="the run whose snapshots to use (its name or a unique prefix) when the folder holds several runs",
    )
    a("--output_dir", default=None, help="where the checkpoints go (default: SNAPSHOTS/reconstructed)")
    a(
        "--accum",
        default="float64",
        choices=ACCUM,
        help="precision of the weighted sums (the weights are solved in float64)",
    )
    return parser


def parse_args(argv=None) -> RunConfig:
    """The flags as given (util.config.RunConfig; `given`: the flags typed)."""
    return parse(get_args_parser(), argv)


def targets(stds, decays) -> list[tuple[str, float]]:
    """[('std', σ_rel) ..., ('decay', d) ...], validated (BadValue)."""
    if not stds and not decays:
        raise BadValue("give at least one target: --std and/or --decay")
    for s in stds:
        if not 0 < s < phema.SIGMA_REL_MAX:
            raise BadValue(f"--std {s}: σ_rel must be in (0, {phema.SIGMA_REL_MAX:.4f})")
    for d in decays:
        if not 0 < d < 1:
            raise BadValue(f"--decay {d}: a decay must be in (0, 1)")
    return [("std", s) for s in stds] + [("decay", d) for d in decays]


def output_name(target: tuple[str, float], step: int) -> str:
    kind, value = target
    return f"ema-{kind}{value:g}-step{step:010d}.pth"


def write(
    path: str, weights: dict, target, fit_: phema.Fit, snapshots, at_step: int, end_images: int, accum: str, run: dict
):
    """A checkpoint holding the reconstruction as `model` and `model_ema1` (weights only), the run's
    args, and a `phema` record of how it was made."""
    kind, value = target
    newest = snapshots[-1]
    state = checkpoint.TrainState.weights_only(weights, epoch=newest.epoch, args=run)
    record = {
        "target": kind,
        "sigma_rel": value if kind == "std" else None,
        "decay": value if kind == "decay" else None,
        "step": at_step,
        "images_seen": end_images,
        "snapshots": [os.path.basename(s.path) for s in snapshots],
        "snapshot_sigma_rel": [s.sigma_rel for s in snapshots],
        "weights": fit_.weights.tolist(),
        "cond": fit_.cond,
        "gain": fit_.gain,
        "fit_error": fit_.fit_error,
        "accum": accum,
        "snapshot_dtypes": sorted({s.dtype for s in snapshots}),
    }
    checkpoint.save_atomic({**checkpoint.to_dict(state), "phema": record}, path)


def main(args):
    """Reconstruct and write the targets; BadInput for bad input, WriteError for a failed write (see cli)."""
    wanted = targets(args.std, args.decay)
    snapshots = phema_files.usable_snapshots(args.snapshots, args.at, args.run, flag="--run")
    at_step, end_images, batch = phema_files.reconstruction_point(snapshots, args.at, need_batch=bool(args.decay))
    out_dir = args.output_dir or os.path.join(args.snapshots, "reconstructed")
    os.makedirs(out_dir, exist_ok=True)
    profiles = sorted({s.sigma_rel for s in snapshots})
    print(
        f"{len(snapshots)} snapshots up to step {snapshots[-1].step} (σ_rel {', '.join(f'{s:g}' for s in profiles)}; "
        f"{', '.join(sorted({s.dtype for s in snapshots}))}); reconstructing at step {at_step} "
        f"({end_images} images), sums in {args.accum}"
    )
    fits, results = phema_files.reconstruct(snapshots, wanted, end_images, batch, checkpoint.DTYPES[args.accum])
    run = phema_files.read_snapshot(snapshots[-1].path)[1]["args"]
    for target, fit_, state in zip(wanted, fits, results):
        path = os.path.join(out_dir, output_name(target, at_step))
        write(path, state, target, fit_, snapshots, at_step, end_images, args.accum, run)
        summary, *warning = phema.fit_report(target, fit_)
        print(f"{summary} -> {path}", *warning, sep="\n")


def cli(argv=None) -> int:
    """Exit status as util.errors: 2 for bad input (one line on stderr), 1 for a failed write."""
    return exit_code(main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
