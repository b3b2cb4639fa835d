"""Train and evaluate JiT (arXiv 2511.13720). Same flags, defaults and meaning as the reference.

    python main_jit.py --demo                                    # built-in CPU/GPU demo, no data needed
    torchrun --nproc_per_node=8 main_jit.py --model JiT-B/16 ... # the reference's ImageNet commands

This file parses the flags and wires the pieces, in two steps: `resolve` turns the flags into the run's complete,
frozen config and reads where its weights come from (run_sources.Source), once; `build` (run_build.py) makes the run
of them: data (util.data), network and diffusion (model_jit, denoiser), checkpoints (util.checkpointer.Checkpointer),
evaluation (engine_eval). `setup` does the side effects between the two (the process group, the output folder's lock);
`train` is the epoch loop over engine_jit.train_one_epoch.
"""

import argparse
import dataclasses
import os
import sys
import time

import torch

import run_sources
from denoiser import CONVERSIONS
from engine_eval import catch_up, evaluate
from engine_jit import LoopConfig, RunIO, train_one_epoch
from model_jit import ATTN_IMPLS, JiT_models, preset_patch_size
from run_build import Run, build, open_inputs
from util import distributed, grid, phema_files, phema_run, report, runlock, stop, sweep
from util.cli import HelpFormatter
from util.config import RunConfig, parse
from util.demo import write_demo_outputs
from util.errors import BadValue, exit_code
from util.evaluation import check_eval_flags
from util.logger import hms
from util.stop import GenerationStopped, StopRun
from weights import DENOISER_DEFAULTS

DEMO_DEFAULTS = dict(
    model="JiT-T/4",
    img_size=32,
    class_num=4,
    epochs=24,
    warmup_epochs=1,
    batch_size=32,
    lr=1e-3,
    ema_decay1=0.995,
    ema_decay2=0.99,
    num_workers=1,
    save_last_freq=8,
    print_freq=8,
    log_freq=8,
    num_sampling_steps=20,
    cfg=2.0,
    interval_min=0.1,
    output_dir="./output_dir/demo",
    sample_every=12,
    sample_per_class=3,
)


def get_args_parser():
    p = argparse.ArgumentParser("JiT training and evaluation", add_help=True, formatter_class=HelpFormatter)
    # fmt: off
    g = p.add_argument_group("model")
    a = g.add_argument
    a("--model", default="JiT-B/16", type=str, choices=sorted(JiT_models), metavar="MODEL",
      help=f"one of {', '.join(JiT_models)}")
    a("--img_size", default=256, type=int, help="image side (pixels); a multiple of the patch size")
    a("--attn_dropout", default=0.0, type=float, help="attention dropout in the middle half of the blocks, in [0, 1)")
    a("--proj_dropout", default=0.0, type=float,
      help="projection / MLP dropout in the middle half of the blocks, in [0, 1)")
    a("--attn_impl", default="sdpa", choices=ATTN_IMPLS, help="sdpa (fused kernels) or reference (float32 logits, N×N)")
    a("--bottleneck_dim", default=None, type=int,
      help="patch-embedding bottleneck width; 0: one plain linear patch embedding (paper Fig. 4); None: the preset's")
    a("--in_context_len", default=None, type=int,
      help="number of in-context class tokens; 0: none (paper Table 4); None: the preset's")
    a("--in_context_start", default=None, type=int,
      help="block where the in-context class tokens are prepended; None: the preset's")

    g = p.add_argument_group("training")  # the denoiser's defaults are Denoiser's own (weights.DENOISER_DEFAULTS)
    a = g.add_argument
    a("--epochs", default=200, type=int, help="epochs to train in all (a resumed run continues up to this)")
    a("--warmup_epochs", default=5, type=int, help="epochs of linear learning-rate warmup from 0")
    a("--batch_size", default=128, type=int, help="per-GPU batch size; global = batch_size × GPUs × accum_iter")
    a("--accum_iter", default=1, type=int, help="gradient accumulation steps per optimiser step")
    a("--lr", default=None, type=float, help="absolute learning rate (default: blr × global batch / 256)")
    a("--blr", default=5e-5, type=float, help="base learning rate, per 256 images of global batch")
    a("--min_lr", default=0.0, type=float, help="final learning rate of the cosine schedule")
    a("--lr_schedule", default="constant", choices=("constant", "cosine"),
      help="after warmup: constant or half-cycle cosine to --min_lr")
    a("--weight_decay", default=0.0, type=float, help="AdamW weight decay (not on biases and 1-D parameters)")
    a("--ema_decay1", default=0.9999, type=float, help="decay per step of EMA 1 (the weights evaluation samples with)")
    a("--ema_decay2", default=0.9996, type=float, help="decay per step of EMA 2")
    a("--ema_decay3", default=None, type=float,
      help="decay per step of an optional third EMA (the paper's sweep: 0.9998); off by default")
    a("--P_mean", default=DENOISER_DEFAULTS["P_mean"], type=float,
      help="mean of logit(t) for training times t = sigmoid(N(P_mean, P_std²))")
    a("--P_std", default=DENOISER_DEFAULTS["P_std"], type=float,
      help="standard deviation of logit(t) for training times")
    a("--noise_scale", default=DENOISER_DEFAULTS["noise_scale"], type=float,
      help="std of the noise e in z = t·x + (1 - t)·e, x in [-1, 1] (paper: 1 at 256 px, 2 at 512 px)")
    a("--t_eps", default=DENOISER_DEFAULTS["t_eps"], type=float,
      help="conversions divide by max(1 - t, t_eps) (the paper's) and, for --pred eps or v, by max(t, t_eps) (our "
      "choice)")
    a("--pred", default=DENOISER_DEFAULTS["pred"], choices=tuple(CONVERSIONS),
      help="what the network predicts: the clean image x (the paper's method), the noise eps, or the velocity v = "
      "x - eps (paper Table 2)")
    a("--loss", default=DENOISER_DEFAULTS["loss"], choices=tuple(CONVERSIONS),
      help="the space of the squared-error loss: x, eps, or v (the paper's; Table 2)")
    a("--label_drop_prob", default=DENOISER_DEFAULTS["label_drop_prob"], type=float,
      help="probability of replacing a label by 'no class' (trains CFG), in [0, 1]")
    a("--seed", default=0, type=int,
      help="random seed (process r uses seed + r; evaluation noise uses (seed, image index))")
    a("--start_epoch", default=0, type=int, help="first epoch when not resuming from a checkpoint")
    a("--compile", dest="compile", action="store_true", default=None,
      help="torch.compile the network (default: on for CUDA)")
    a("--no_compile", dest="compile", action="store_false", help="do not torch.compile")
    a("--max_nonfinite_steps", default=10, type=int, help="stop after this many non-finite steps in a row")
    a("--grad_checkpoint", action="store_true",
      help="recompute each block's activations in the backward pass (less memory, ~1/3 more compute)")
    a("--fsdp", action="store_true",
      help="shard weights, gradients, optimizer state and EMAs over the processes (FSDP2) instead of DDP")
    a("--phema_stds", default=None, type=float, nargs="+",
      help="post-hoc EMA (EDM2 §3): also track power-function EMAs of these relative standard deviations σ_rel, "
      "each in (0, 0.2887), e.g. 0.003 0.006 0.012, with snapshots in output_dir/phema; off by default")
    a("--phema_every", default=None, type=int,
      help="a post-hoc EMA snapshot every N optimiser steps (default: the run's steps / 300)")
    a("--phema_from", default=None, type=int,
      help="no post-hoc EMA snapshots before this optimiser step (default: the last tenth of the run); the run's "
      "last step always writes them")
    a("--phema_dtype", default="float32", choices=phema_files.SNAPSHOT_DTYPES,
      help="precision of the snapshots' weights (float16 halves the disk, frozen parameters stay exact)")

    g = p.add_argument_group("sampling and evaluation")
    sweep.add_sampler_args(g, sweep=True)
    a = g.add_argument
    a("--ema", default=[1], type=int, nargs="+", choices=(1, 2, 3),
      help="which EMA's weights sample; several values: a sweep")
    a("--phema", default=None,
      help="with --evaluate_gen, instead of --resume: evaluate post-hoc EMAs reconstructed from this folder of "
      "snapshots (a run's output_dir/phema)")
    a("--ema_std", default=None, type=float, nargs="+",
      help="with --phema: the relative standard deviations σ_rel of the post-hoc EMAs to evaluate; several values: "
      "a sweep")
    a("--phema_at", default=None, type=int,
      help="with --phema: reconstruct at this optimiser step, from the snapshots at or before it (default: the "
      "newest snapshot's step)")
    a("--final_num_images", default=None, type=int,
      help="after a sweep, evaluate its best point again with this many images")
    a("--num_images", default=50000, type=int, help="images to generate for FID / IS; a multiple of --class_num")
    a("--eval_freq", default=40, type=int, help="online evaluation every N epochs (and at the last)")
    a("--online_eval", action="store_true", help="evaluate FID / IS during training")
    a("--evaluate_gen", action="store_true", help="only evaluate the checkpoint given by --resume")
    a("--gen_bsz", default=256, type=int, help="per-GPU generation batch size (images)")
    a("--fid_stats", default=None,
      help="reference statistics (npz with mu, sigma); default fid_stats/jit_in{img_size}_stats.npz")
    a("--inception_weights", default=None,
      help="local Inception-v3 weights for torch-fidelity (default: download once to the torch hub cache)")
    a("--save_images", action="store_true", help="also keep the generated PNGs in output_dir")
    a("--eval_seeds", default=1, type=int,
      help="score each evaluation with N noise seeds (--seed, --seed + 1, ...): a record per seed and their mean ± std")
    a("--ref_features", default=None,
      help="reference Inception pool features (prepare_ref.py --ref_features): adds precision and recall (k = 3)")
    a("--dinov2_weights", default=None,
      help="local DINOv2 ViT-L/14 weights (dinov2_vitl14_pretrain.pth, or timm's vit_large_patch14_dinov2): "
      "adds FD-DINOv2")
    a("--dinov2_stats", default=None,
      help="DINOv2 reference statistics (prepare_ref.py --dinov2_stats); default "
      "fid_stats/jit_in{img_size}_dinov2_stats.npz")
    a("--phema_run", default=None,
      help="with --phema: the run whose snapshots to use when the folder holds snapshots of several runs")
    a("--sample_every", default=5, type=int,
      help="training: a sample grid (EMA 1, fixed noise and classes, the run's sampler) into output_dir/samples "
      "and TensorBoard after every N epochs and the last; 0: none")
    a("--sample_classes", default=None, type=int, nargs="+",
      help="the sample grid's classes, one row each (default: 8 spread over --class_num, or all when fewer)")
    a("--sample_per_class", default=None, type=int,
      help="images per row of the sample grid (default: 32 / number of classes)")

    g = p.add_argument_group("data and output")
    a = g.add_argument
    a("--data_path", default="./data/imagenet", type=str,
      help="holds an ImageFolder tree under train/, or is an image store made by prepare_data.py")
    a("--class_num", default=1000, type=int, help="number of classes (labels 0 .. class_num - 1)")
    a("--num_workers", default=12, type=int,
      help="loader workers per GPU: DataLoader processes, or threads with a --data_path store (0: the main process)")
    a("--pin_mem", action="store_true", help="pin host memory of batches (CUDA only; on by default)")
    a("--no_pin_mem", action="store_false", dest="pin_mem", help="do not pin host memory")
    p.set_defaults(pin_mem=True)
    a("--output_dir", default="./output_dir", help="checkpoints, log.txt, metrics.jsonl, TensorBoard events")
    a("--resume", default="",
      help="checkpoint file, or folder to resume from (newest readable checkpoint); with --evaluate_gen also an "
      "exported folder (export.py)")
    a("--init_from", default=None,
      help="start a new run from these weights (checkpoint file, run folder or exported folder): the model and "
      "every EMA, a fresh optimizer, epoch 0; another --class_num or --img_size adapts the label / position "
      "embeddings")
    a("--init_ema", default=1, type=int, choices=(0, 1, 2, 3),
      help="which weights of an --init_from checkpoint: EMA 1, 2, 3 or 0 (the raw model)")
    a("--save_last_freq", type=int, default=5, help="checkpoint-last.pth every N epochs (and at the last)")
    a("--save_every_steps", type=int, default=0, help="also checkpoint-last.pth every N optimiser steps (0: off)")
    a("--log_freq", default=100, type=int, help="TensorBoard / metrics.jsonl every N iterations")
    a("--print_freq", default=20, type=int, help="console progress every N iterations")
    a("--max_bad_frac", default=0.001, type=float,
      help="stop if more than this fraction of an epoch's images is unreadable")
    a("--demo", action="store_true",
      help="train a tiny JiT on generated shapes (no data needed); other flags still apply")
    a("--dry_run", action="store_true", help="check the arguments, data and checkpoint, build everything, then exit")

    g = p.add_argument_group("distributed")
    a = g.add_argument
    a("--device", default=None, help="cuda or cpu (default: cuda when available)")
    a("--world_size", default=1, type=int, help="number of processes: set by the launcher (read from its environment)")
    a("--local_rank", "--local-rank", default=-1, type=int,
      help="GPU of this process: set by the launcher (read from its environment)")
    a("--dist_on_itp", action="store_true", help="launched by OpenMPI (ranks from OMPI_COMM_WORLD_*)")
    a("--dist_url", default="env://", help="url used to set up distributed training")
    a("--dist_timeout", default=30.0, type=float,
      help="minutes a process waits in a collective (a barrier, or while rank 0 writes a checkpoint) before the "
      "run fails")
    # fmt: on
    return p


def parse_args(argv=None) -> RunConfig:
    """The flags as given (a frozen util.config.RunConfig; `given`: the flags typed; --demo's values as defaults)."""
    config = parse(get_args_parser(), argv)
    return parse(get_args_parser(), argv, DEMO_DEFAULTS) if config.demo else config


def check_args(args):
    """Fail fast, before any work, on flag values that cannot work (BadValue). Files are checked where they are
    opened, before the expensive work too: the weights by resolve, the rest by run_build.open_inputs."""
    patch = preset_patch_size(args.model)
    if args.img_size % patch:
        raise BadValue(f"--img_size {args.img_size} is not divisible by the patch size {patch} of {args.model}")
    positive = ("batch_size", "accum_iter", "gen_bsz", "epochs", "num_sampling_steps", "print_freq", "log_freq")
    for name in (*positive, "save_last_freq", "class_num", "img_size"):
        if min(sweep.as_list(getattr(args, name))) < 1:
            raise BadValue(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.evaluate_gen and not args.resume and not args.phema:
        raise BadValue(
            "--evaluate_gen needs trained weights: pass --resume CHECKPOINT_OR_FOLDER (or --phema SNAPSHOT_FOLDER)"
        )
    if not args.evaluate_gen and args.ema_decay3 is None and 3 in sweep.as_list(args.ema):
        raise BadValue("--ema 3 samples a third EMA: train with --ema_decay3 (e.g. 0.9998)")
    phema_run.check_phema_flags(args)
    sweep.check_denoiser_flags(args)
    check_eval_flags(args)
    if not args.evaluate_gen:
        grid.check_grid_flags(args)


def derived_values(args: RunConfig, world_size: int) -> dict:
    """What follows from the flags alone. lr: blr × global batch / 256 unless --lr is given; data_path: the
    demo's shapes under output_dir; fsdp, grad_checkpoint: whether they apply (several processes; a backward
    pass); single-valued sweep flags (--cfg, --interval_min, --interval_max, --ema) as plain numbers;
    phema_stds: the power EMAs training keeps, ascending (none for --evaluate_gen)."""
    derived = {}
    for name in ("cfg", "interval_min", "interval_max", "ema"):  # one value: a plain number, as the reference's
        values = sweep.as_list(getattr(args, name))
        derived[name] = values[0] if len(values) == 1 else values
    if args.lr is None:
        derived["lr"] = args.blr * args.batch_size * args.accum_iter * world_size / 256
    if args.demo:
        derived["data_path"] = os.path.join(args.output_dir, "demo_data")
    derived["fsdp"] = args.fsdp and world_size > 1 and not args.evaluate_gen
    derived["grad_checkpoint"] = args.grad_checkpoint and not args.evaluate_gen
    derived["phema_stds"] = [] if args.evaluate_gen else sorted(args.phema_stds or [])  # as checkpoints keep them
    return derived


def ignored_flags(args, world_size: int) -> list[str]:
    """Flags that have no effect in this run, with why."""
    notes = []
    if args.fsdp and args.evaluate_gen:
        notes.append("--fsdp is ignored by --evaluate_gen (every process samples with the full weights)")
    elif args.fsdp and world_size == 1:
        notes.append("--fsdp in a single process: nothing to shard, this is a plain run")
    if args.grad_checkpoint and args.evaluate_gen:
        notes.append("--grad_checkpoint is ignored by --evaluate_gen (no backward pass)")
    if args.init_from and args.evaluate_gen:
        notes.append("--init_from is ignored by --evaluate_gen (it evaluates the weights --resume names)")
    if args.phema_stds and args.evaluate_gen:
        notes.append("--phema_stds is ignored by --evaluate_gen (it tracks power EMAs while training)")
    return notes


def resolve(args: RunConfig, world_size: int) -> tuple[RunConfig, run_sources.Source]:
    """The run's complete settings, once, and where its weights come from.

    args: the flags as given (parse_args), checked (check_args); world_size: the run's processes.
    The config is `args` with derived_values, the settings the weights bring for the flags not
    typed (--evaluate_gen), the default --fid_stats, and the run's identity: init_origin and run_id,
    the resumed checkpoint's, else new. Reads the weights once (run_sources.read_source; under FSDP
    rank 0 alone reads a checkpoint and broadcasts what it holds but its tensors: a collective) and
    checks them against the flags (BadValue, CheckpointError); writes nothing and prints nothing but
    what it found before an error: its notes are source.notes, for the run's log."""
    notes = [f"note: {note}" for note in ignored_flags(args, world_size)]
    try:
        config, source = run_sources.read_source(args.replace(**derived_values(args, world_size)), log=notes.append)
    except BaseException:  # what reading found before the error
        for note in notes:
            distributed.print0(note)
        raise
    config = config.replace(
        fid_stats=config.fid_stats or os.path.join("fid_stats", f"jit_in{config.img_size}_stats.npz")
    )
    if not config.evaluate_gen and source.state is None:  # a new run: its identity, from its settings
        config = config.replace(run_id=phema_files.run_identity(config.as_dict()))
    return config, dataclasses.replace(source, notes=tuple(notes))


def setup(args: RunConfig) -> Run:
    """A run, ready to train or evaluate: check the flags, join the process group (distributed.init
    picks the device), resolve, open the inputs (run_build.open_inputs: the data, FID statistics and
    Inception weights, checked before anything is written), take the output folder (util.runlock),
    then build. The lock is released if building fails."""
    check_args(args)
    device = distributed.init(args.device, args.dist_on_itp, args.dist_url, args.dist_timeout)
    config, source = resolve(args, distributed.get_world_size())
    sweep.check_denoiser_flags(config)  # what the weights brought (--evaluate_gen), before the inputs are read
    inputs = open_inputs(config, device)
    lock = runlock.take(config.output_dir, "eval" if config.evaluate_gen else "train")
    try:
        return build(config, source, inputs, device=device, lock=lock)
    except BaseException:  # a bad checkpoint, an interrupt, ...: the next run finds the folder free
        runlock.release(lock)
        raise


def eval_due(config: RunConfig, epoch: int) -> bool:
    """Whether training evaluates after `epoch` (every --eval_freq epochs and after the last)."""
    return epoch % config.eval_freq == 0 or epoch + 1 == config.epochs


def end_epoch(run: Run, epoch: int, save, saved_at_end: bool):
    """After `epoch`: its sample grid, checkpoints (`save`; not if the loop saved at its end), evaluation, as due."""
    config, spe = run.config, run.data.steps_per_epoch
    last, keep = epoch + 1 == config.epochs, epoch % 100 == 0 and epoch > 0  # keep: checkpoint-{epoch} is due
    try:
        if run.grids and run.grids.due(epoch):
            run.grids(epoch, run.weights)
        if (epoch % config.save_last_freq == 0 or last) and not saved_at_end:
            save(epoch, spe)
        if keep:
            keep = False
            save(epoch, spe, name=str(epoch))
        if run.evaluation and eval_due(config, epoch):
            if run.parts.device.type == "cuda":
                torch.cuda.empty_cache()
            evaluate(run.evaluation, epoch=epoch, weights_epoch=epoch)
    except GenerationStopped as e:  # a stop between two generation batches: save what is due, raise StopRun
        if run.checkpoints.is_saved(epoch, spe, spe) or save(epoch, spe):
            if keep:  # not written before the stop, and the rerun starts after this epoch
                save(epoch, spe, name=str(epoch))
            raise StopRun(f"{e} after epoch {epoch}: checkpoint saved; rerun the same command") from e
        raise


def train(run: Run) -> int:
    """The epoch loop: train, checkpoint, evaluate. Returns the exit status."""
    config, data, saves = run.config, run.data, run.checkpoints.log
    loop = LoopConfig.from_flags(config)

    def save(epoch: int, next_step: int, name: str = "last") -> bool:
        saved = run.checkpoints.save(epoch, next_step, data.steps_per_epoch, name)
        report.write_during_training(config.output_dir)
        return saved

    io = RunIO(log=run.log, stopper=run.stopper, save=save, snapshot=run.snapshots)
    start_step = run.start.step
    distributed.print0(
        f"training epochs {run.start.epoch}..{config.epochs - 1}" + (f" from step {start_step}" if start_step else "")
    )
    t0 = time.time()
    try:
        stop.raise_if_requested_at_set_up(run.stopper, run.start.path)
        if run.grids:
            run.grids.begin(
                run.start,
                run.weights,
                data.steps_per_epoch * config.batch_size * config.accum_iter * distributed.get_world_size(),
            )
        before = run.start.epoch - 1  # its evaluation, if the run stopped after its checkpoint but before it ended
        if run.evaluation and run.start.step == 0 and before >= 0 and eval_due(config, before):
            catch_up(run.evaluation, before)
        for epoch in range(run.start.epoch, config.epochs):
            data.sampler.set_position(epoch, start_step * config.accum_iter * config.batch_size)
            saved_at_end = train_one_epoch(run.parts, data, loop, io, epoch=epoch, start_step=start_step)
            start_step = 0
            end_epoch(run, epoch, save, saved_at_end)
    except StopRun as e:
        distributed.print0(str(e))
        return e.code if saves.last_ok else run.checkpoints.unsaved_exit(stopped=e.code == 0)
    finally:
        run.log.flush()
    if not saves.last_ok:
        return run.checkpoints.unsaved_exit()
    if saves.failed:
        distributed.print0(f"warning: {saves.failed} checkpoint(s) of this run could not be written (see above)")
    if run.snapshots and run.snapshots.failed:
        distributed.print0(
            f"warning: {run.snapshots.failed} post-hoc EMA snapshot(s) of this run could not be written (see above)"
        )
    distributed.print0(f"training done in {hms(time.time() - t0)}")
    if config.demo and distributed.is_main_process():
        write_demo_outputs(config.output_dir)
    report.write_during_training(config.output_dir)
    return 0


def main(args: RunConfig) -> int:
    run = setup(args)
    try:
        if run.config.dry_run:
            distributed.print0("dry run: arguments, data, model and checkpoint are ready; exiting before training")
            return 0
        if run.config.evaluate_gen:
            s = run.start
            result = evaluate(run.evaluation, epoch=s.weights_epoch, weights_epoch=s.weights_epoch, checkpoint=s.path)
            return 1 if run.log.failed or (result or {}).get("images_saved") is False else 0
        return train(run)
    finally:
        run.close()


def cli(argv=None) -> int:
    """The command line: exit status 2 for bad input (one line, no traceback), 1 for a run that
    failed, 0 when done (util.errors); a bug keeps its traceback."""
    stop.install()  # first: SIGTERM / SIGUSR1 during the set-up are recorded, not lost (the run stops after it)
    args = parse_args(argv)
    try:
        code = exit_code(main, args)
    except RuntimeError as e:
        if not distributed.is_collective_failure(e):
            raise
        print(
            f"error: rank {distributed.get_rank()}: {str(e).splitlines()[0][:300]} (another process is stuck or gone; "
            f"--dist_timeout is {args.dist_timeout} min); rerun the same command to continue from the newest "
            "checkpoint",
            file=sys.stderr,
            flush=True,
        )
        return 1  # the group is broken: leave without shutdown
    distributed.shutdown()  # not after a bug: a rank that raised leaves at once, so that the launcher ends the others
    return code


if __name__ == "__main__":
    sys.exit(cli())
