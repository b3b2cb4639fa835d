"""Post-hoc EMA in a run (the glue main_jit.py uses; the math is util/phema.py, the files
util/phema_files.py): the flags, the run's snapshot writer, the resume check, and the weights that
--evaluate_gen --phema builds and samples with.
"""

import os

from util import checkpoint, distributed, phema_files
from util.checkpoint import remove_stale_temporaries
from util.errors import BadValue
from util.phema import SIGMA_REL_MAX, fit_report, stds_text
from util.phema_files import read_snapshot, reconstruct, reconstruction_point, usable_snapshots
from util.sweep import as_list


def check_phema_flags(args):
    """The post-hoc EMA flags of main_jit.py: σ_rel in range and distinct, a schedule of whole steps,
    and --phema (with --ema_std) as the one source of weights of an --evaluate_gen (BadValue)."""
    for flag in ("phema_stds", "ema_std"):
        for value in getattr(args, flag) or []:
            if not 0 < value < SIGMA_REL_MAX:
                raise BadValue(f"--{flag} {value}: σ_rel must be in (0, {SIGMA_REL_MAX:.4f})")
    if args.phema_stds and len({f"{s:.6g}" for s in args.phema_stds}) < len(args.phema_stds):
        raise BadValue(
            f"--phema_stds {' '.join(map(str, args.phema_stds))}: the values must differ (in 6 digits: they name the "
            "snapshot files)"
        )
    for flag, least in (("phema_every", 1), ("phema_from", 0), ("phema_at", 1)):
        if getattr(args, flag) is not None and getattr(args, flag) < least:
            raise BadValue(f"--{flag} must be at least {least}, got {getattr(args, flag)}")
    if args.phema:
        if not args.evaluate_gen:
            raise BadValue("--phema evaluates post-hoc EMAs: add --evaluate_gen")
        if args.resume:
            raise BadValue("--phema and --resume both name the weights to evaluate: give one")
        if not args.ema_std:
            raise BadValue("--phema: give the σ_rel of the post-hoc EMAs to evaluate with --ema_std")
        if as_list(args.ema) != [1]:
            raise BadValue(
                "--ema chooses an EMA of a checkpoint; with --phema the weights are the post-hoc EMAs of --ema_std"
            )
    elif args.ema_std or args.phema_at is not None or args.phema_run is not None:
        flag = "ema_std" if args.ema_std else "phema_at" if args.phema_at is not None else "phema_run"
        raise BadValue(f"--{flag} needs --phema SNAPSHOT_FOLDER (and --evaluate_gen)")


def run_writer(config, steps_per_epoch: int, done: int, denoiser, phemas: list) -> phema_files.SnapshotWriter:
    """--phema_stds: what writes the run's snapshots to output_dir/phema, every --phema_every steps
    from --phema_from (defaults: default_schedule of the run's steps), `done` global steps into the
    run. Says what the run will write, warns when the disk is short, and removes what a killed
    write left."""
    total = config.epochs * steps_per_epoch
    every, first = phema_files.default_schedule(total)
    writer = phema_files.SnapshotWriter(
        os.path.join(config.output_dir, "phema"),
        phemas,
        every=config.phema_every or every,
        start=first if config.phema_from is None else config.phema_from,
        total=total,
        steps_per_epoch=steps_per_epoch,
        dtype=config.phema_dtype,
        args=config.as_dict(),
        keep=frozenset(phema_files.frozen_names(denoiser)),
    )
    if distributed.is_main_process() and os.path.isdir(writer.folder):
        remove_stale_temporaries(writer.folder, ".phema-")
    distributed.print0(*writer.plan(done=done), sep="\n")
    return writer


def check_resume_stds(state: checkpoint.TrainState, path: str, stds: list):
    """Training continues the power EMAs `state` holds, and only those: a power EMA's profile starts
    at step 0, so one cannot join a run midway, and one left out would end its snapshot series
    unnoticed. Other `stds` (--phema_stds, sorted) are a checkpoint.CheckpointError (exit 2)."""
    theirs = sorted(state.phema_stds)
    if theirs == stds:
        return
    fix = (
        f"resume with --phema_stds {stds_text(theirs)}"
        if theirs
        else "power EMAs start with a run, resume without --phema_stds"
    )
    raise checkpoint.CheckpointError(
        f"{path} tracks post-hoc EMAs of σ_rel {stds_text(theirs)}, this run --phema_stds {stds_text(stds)}: {fix}"
    )


def snapshot_state(folder: str, at: int | None, run: str | None = None) -> tuple[checkpoint.TrainState, int]:
    """(the newest snapshot at or before step `at` of `folder`'s run (`run`: --phema_run, needed when
    the folder holds several) as a weights-only TrainState, the step the EMAs are reconstructed at:
    `at`, default that snapshot's). Its run's args and tensors say what network to build
    (--evaluate_gen --phema); the weights sampled are reconstruct_at's."""
    snapshots = usable_snapshots(folder, at, run)
    step = reconstruction_point(snapshots, at)[0]
    newest, data = read_snapshot(snapshots[-1].path)
    state = checkpoint.TrainState.weights_only(data["state_dict"], epoch=newest.epoch, args=data["args"])
    return state, step


def reconstruct_at(folder: str, at: int, stds: list, log=print, run: str | None = None) -> dict:
    """{σ_rel: state dict} of the power EMAs `stds` at step `at`, from the snapshots of `folder`'s run
    (`run`: --phema_run) at or before it (reconstruct: float64 sums, one pass for all); the fits are
    reported through `log`."""
    snapshots = usable_snapshots(folder, at, run)
    at, end_images, batch = reconstruction_point(snapshots, at)
    log(
        f"post-hoc EMA: reconstructing σ_rel {stds_text(stds)} at step {at} ({end_images} images) "
        f"from {len(snapshots)} snapshots in {folder}"
    )
    targets = [("std", s) for s in stds]
    fits, states = reconstruct(snapshots, targets, end_images, batch)
    for target, fit in zip(targets, fits):
        log("\n".join(fit_report(target, fit)))
    return dict(zip(stds, states))
