"""Train and evaluate JiT (arXiv 2511.13720). Same flags, defaults and meaning as the reference.

    python main_jit.py --demo                                    # built-in CPU/GPU demo, no data needed
    torchrun --nproc_per_node=8 main_jit.py --model JiT-B/16 ... # the reference's ImageNet commands

This file parses the flags and wires the pieces: data (util.data), network and diffusion
(model_jit, denoiser), checkpoints (util.checkpoint.Checkpointer), the loops (engine_jit).
"""
import argparse
import functools
import inspect
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from denoiser import CONVERSIONS, EMA, Denoiser
from engine_jit import (Evaluation, LoopConfig, PostHocSamplers, RunIO, Samplers, StepParts, StopRun, StopSignal, build_optimizer,
                        compile_fsdp_blocks, evaluate, train_one_epoch)
from model_jit import ARCH_KNOBS, ATTN_IMPLS, JiT_models, preset_patch_size
from util import distributed as D
from util import phema, runlock, sharding, sweep
from util import weights as W
from util.checkpoint import EMA_KEYS, Checkpointer, CheckpointError, Start, remove_stale_temporaries
from util.data import Data, ResumableSampler, make_loader, open_dataset
from util.demo import make_shapes_dataset, write_demo_outputs
from util.errors import BadValue, exit_code
from util.evaluation import GenerationSpec, Scorer
from util.logger import RunLog, hms

DEMO_DEFAULTS = dict(
    model="JiT-T/4", img_size=32, class_num=4, epochs=24, warmup_epochs=1, batch_size=32, lr=1e-3,
    ema_decay1=0.995, ema_decay2=0.99, num_workers=1, save_last_freq=8, print_freq=8, log_freq=8,
    num_sampling_steps=20, cfg=2.0, interval_min=0.1, output_dir="./output_dir/demo",
)


def get_args_parser():
    p = argparse.ArgumentParser("JiT training and evaluation", add_help=True,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    a = g.add_argument
    a("--model", default="JiT-B/16", type=str, choices=sorted(JiT_models), metavar="MODEL", help=f"one of {', '.join(JiT_models)}")
    a("--img_size", default=256, type=int, help="image side (pixels); a multiple of the patch size")
    a("--attn_dropout", default=0.0, type=float, help="attention dropout in the middle half of the blocks, in [0, 1)")
    a("--proj_dropout", default=0.0, type=float, help="projection / MLP dropout in the middle half of the blocks, in [0, 1)")
    a("--attn_impl", default="sdpa", choices=ATTN_IMPLS, help="sdpa (fused kernels) or reference (float32 logits, N×N)")
    a("--bottleneck_dim", default=None, type=int, help="patch-embedding bottleneck width; 0: one plain linear patch embedding (paper Fig. 4); None: the preset's")
    a("--in_context_len", default=None, type=int, help="number of in-context class tokens; 0: none (paper Table 4); None: the preset's")
    a("--in_context_start", default=None, type=int, help="block where the in-context class tokens are prepended; None: the preset's")

    g = p.add_argument_group("training")
    a = g.add_argument
    a("--epochs", default=200, type=int, help="epochs to train in all (a resumed run continues up to this)")
    a("--warmup_epochs", default=5, type=int, help="epochs of linear learning-rate warmup from 0")
    a("--batch_size", default=128, type=int, help="per-GPU batch size; global = batch_size × GPUs × accum_iter")
    a("--accum_iter", default=1, type=int, help="gradient accumulation steps per optimiser step")
    a("--lr", default=None, type=float, help="absolute learning rate (default: blr × global batch / 256)")
    a("--blr", default=5e-5, type=float, help="base learning rate, per 256 images of global batch")
    a("--min_lr", default=0.0, type=float, help="final learning rate of the cosine schedule")
    a("--lr_schedule", default="constant", choices=("constant", "cosine"), help="after warmup: constant or half-cycle cosine to --min_lr")
    a("--weight_decay", default=0.0, type=float, help="AdamW weight decay (not on biases and 1-D parameters)")
    a("--ema_decay1", default=0.9999, type=float, help="decay per step of EMA 1 (the weights evaluation samples with)")
    a("--ema_decay2", default=0.9996, type=float, help="decay per step of EMA 2")
    a("--ema_decay3", default=None, type=float, help="decay per step of an optional third EMA (the paper's sweep: 0.9998); off by default")
    a("--P_mean", default=-0.8, type=float, help="mean of logit(t) for training times t = sigmoid(N(P_mean, P_std²))")
    a("--P_std", default=0.8, type=float, help="standard deviation of logit(t) for training times")
    a("--noise_scale", default=1.0, type=float, help="std of the noise e in z = t·x + (1 - t)·e, x in [-1, 1] (paper: 1 at 256 px, 2 at 512 px)")
    a("--t_eps", default=5e-2, type=float, help="conversions divide by max(1 - t, t_eps) (the paper's) and, for --pred eps or v, by max(t, t_eps) (our choice)")
    a("--pred", default="x", choices=tuple(CONVERSIONS), help="what the network predicts: the clean image x (the paper's method), the noise eps, or the velocity v = x - eps (paper Table 2)")
    a("--loss", default="v", choices=tuple(CONVERSIONS), help="the space of the squared-error loss: x, eps, or v (the paper's; Table 2)")
    a("--label_drop_prob", default=0.1, type=float, help="probability of replacing a label by 'no class' (trains CFG), in [0, 1]")
    a("--seed", default=0, type=int, help="random seed (process r uses seed + r; evaluation noise uses (seed, image index))")
    a("--start_epoch", default=0, type=int, help="first epoch when not resuming from a checkpoint")
    a("--compile", dest="compile", action="store_true", default=None, help="torch.compile the network (default: on for CUDA)")
    a("--no_compile", dest="compile", action="store_false", help="do not torch.compile")
    a("--max_nonfinite_steps", default=10, type=int, help="stop after this many non-finite steps in a row")
    a("--grad_checkpoint", action="store_true", help="recompute each block's activations in the backward pass (less memory, ~1/3 more compute)")
    a("--fsdp", action="store_true", help="shard weights, gradients, optimizer state and EMAs over the processes (FSDP2) instead of DDP")
    a("--phema_stds", default=None, type=float, nargs="+", help="post-hoc EMA (EDM2 §3): also track power-function EMAs of these relative standard deviations σ_rel, each in (0, 0.2887), e.g. 0.003 0.006 0.012, with snapshots in output_dir/phema; off by default")
    a("--phema_every", default=None, type=int, help="a post-hoc EMA snapshot every N optimiser steps (default: the run's steps / 300)")
    a("--phema_from", default=None, type=int, help="no post-hoc EMA snapshots before this optimiser step (default: the last tenth of the run); the run's last step always writes them")
    a("--phema_dtype", default="float32", choices=tuple(phema.DTYPES), help="precision of the snapshots' weights (float16 halves the disk, frozen parameters stay exact)")

    g = p.add_argument_group("sampling and evaluation")
    sweep.add_sampler_args(g, sweep=True)
    a = g.add_argument
    a("--ema", default=[1], type=int, nargs="+", choices=(1, 2, 3), help="which EMA's weights sample; several values: a sweep")
    a("--phema", default=None, help="with --evaluate_gen, instead of --resume: evaluate post-hoc EMAs reconstructed from this folder of snapshots (a run's output_dir/phema)")
    a("--ema_std", default=None, type=float, nargs="+", help="with --phema: the relative standard deviations σ_rel of the post-hoc EMAs to evaluate; several values: a sweep")
    a("--phema_at", default=None, type=int, help="with --phema: reconstruct at this optimiser step, from the snapshots at or before it (default: the newest snapshot's step)")
    a("--final_num_images", default=None, type=int, help="after a sweep, evaluate its best point again with this many images")
    a("--num_images", default=50000, type=int, help="images to generate for FID / IS; a multiple of --class_num")
    a("--eval_freq", default=40, type=int, help="online evaluation every N epochs (and at the last)")
    a("--online_eval", action="store_true", help="evaluate FID / IS during training")
    a("--evaluate_gen", action="store_true", help="only evaluate the checkpoint given by --resume")
    a("--gen_bsz", default=256, type=int, help="per-GPU generation batch size (images)")
    a("--fid_stats", default=None, help="reference statistics (npz with mu, sigma); default fid_stats/jit_in{img_size}_stats.npz")
    a("--inception_weights", default=None, help="local Inception-v3 weights for torch-fidelity (default: download once to the torch hub cache)")
    a("--save_images", action="store_true", help="also keep the generated PNGs in output_dir")

    g = p.add_argument_group("data and output")
    a = g.add_argument
    a("--data_path", default="./data/imagenet", type=str, help="holds an ImageFolder tree under train/, or is an image store made by prepare_data.py")
    a("--class_num", default=1000, type=int, help="number of classes (labels 0 .. class_num - 1)")
    a("--num_workers", default=12, type=int, help="DataLoader worker processes per GPU (0: load in the main process)")
    a("--pin_mem", action="store_true", help="pin host memory of batches (CUDA only)")
    a("--no_pin_mem", action="store_false", dest="pin_mem", help="do not pin host memory")
    p.set_defaults(pin_mem=True)
    a("--output_dir", default="./output_dir", help="checkpoints, log.txt, metrics.jsonl, TensorBoard events")
    a("--resume", default="", help="checkpoint file, or folder to resume from (newest readable checkpoint); with --evaluate_gen also an exported folder (export.py)")
    a("--init_from", default=None, help="start a new run from these weights (checkpoint file, run folder or exported folder): the model and every EMA, a fresh optimizer, epoch 0; another --class_num or --img_size adapts the label / position embeddings")
    a("--init_ema", default=1, type=int, choices=(0, 1, 2, 3), help="which weights of an --init_from checkpoint: EMA 1, 2, 3 or 0 (the raw model)")
    a("--save_last_freq", type=int, default=5, help="checkpoint-last.pth every N epochs (and at the last)")
    a("--save_every_steps", type=int, default=0, help="also checkpoint-last.pth every N optimiser steps (0: off)")
    a("--log_freq", default=100, type=int, help="TensorBoard / metrics.jsonl every N iterations")
    a("--print_freq", default=20, type=int, help="console progress every N iterations")
    a("--max_bad_frac", default=0.001, type=float, help="stop if more than this fraction of an epoch's images is unreadable")
    a("--demo", action="store_true", help="train a tiny JiT on generated shapes (no data needed); other flags still apply")
    a("--dry_run", action="store_true", help="check the arguments, data and checkpoint, build everything, then exit")

    g = p.add_argument_group("distributed")
    a = g.add_argument
    a("--device", default=None, help="cuda or cpu (default: cuda when available)")
    a("--world_size", default=1, type=int, help="number of processes: set by the launcher (read from its environment)")
    a("--local_rank", "--local-rank", default=-1, type=int, help="GPU of this process: set by the launcher (read from its environment)")
    a("--dist_on_itp", action="store_true", help="launched by OpenMPI (ranks from OMPI_COMM_WORLD_*)")
    a("--dist_url", default="env://", help="url used to set up distributed training")
    a("--dist_timeout", default=30.0, type=float, help="minutes a process waits in a collective (a barrier, or while rank 0 writes a checkpoint) before the run fails")
    return p


def parse_args(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.demo:  # demo values replace the defaults, not what was given on the command line
        parser.set_defaults(**DEMO_DEFAULTS)
        args = parser.parse_args(argv)
    return args


def check_args(args):
    """Fail fast, before any work, on flag values that cannot work (BadValue). Files are checked
    where they are opened, before the expensive work too: the data by open_dataset, the checkpoint
    by Checkpointer.load, the FID statistics and Inception weights by Scorer."""
    patch = preset_patch_size(args.model)
    if args.img_size % patch:
        raise BadValue(f"--img_size {args.img_size} is not divisible by the patch size {patch} of {args.model}")
    for name in ("batch_size", "accum_iter", "gen_bsz", "epochs", "num_sampling_steps", "print_freq", "log_freq", "save_last_freq", "class_num"):
        if min(sweep.as_list(getattr(args, name))) < 1:
            raise BadValue(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.evaluate_gen and not args.resume and not args.phema:
        raise BadValue("--evaluate_gen needs trained weights: pass --resume CHECKPOINT_OR_FOLDER (or --phema SNAPSHOT_FOLDER)")
    if not args.evaluate_gen and args.ema_decay3 is None and 3 in sweep.as_list(args.ema):
        raise BadValue("--ema 3 samples a third EMA: train with --ema_decay3 (e.g. 0.9998)")
    check_phema_args(args)


def check_phema_args(args):
    """The post-hoc EMA flags: σ_rel in range and distinct, a schedule of whole steps, and --phema
    (with --ema_std) as the one source of weights of an --evaluate_gen (BadValue)."""
    for flag in ("phema_stds", "ema_std"):
        for value in getattr(args, flag) or []:
            if not 0 < value < phema.SIGMA_REL_MAX:
                raise BadValue(f"--{flag} {value}: σ_rel must be in (0, {phema.SIGMA_REL_MAX:.4f})")
    if args.phema_stds and len({f"{s:.6g}" for s in args.phema_stds}) < len(args.phema_stds):
        raise BadValue(f"--phema_stds {' '.join(map(str, args.phema_stds))}: the values must differ (in 6 digits: they name the snapshot files)")
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
        if sweep.as_list(args.ema) != [1]:
            raise BadValue("--ema chooses an EMA of a checkpoint; with --phema the weights are the post-hoc EMAs of --ema_std")
    elif args.ema_std or args.phema_at is not None:
        raise BadValue(f"--{'ema_std' if args.ema_std else 'phema_at'} needs --phema SNAPSHOT_FOLDER (and --evaluate_gen)")


def resolve_config(args, world_size: int) -> argparse.Namespace:
    """The run's settings: the flags plus the values derived from them (`args` is left as given).

    lr: blr × global batch / 256 unless --lr is given; data_path: the generated shapes under output_dir for --demo; fsdp, grad_checkpoint: whether they
    apply (sharding needs several processes; evaluation has no backward pass). Single-valued sweep
    flags (--cfg, --interval_min, --interval_max, --ema) become plain numbers; phema_stds: the
    power EMAs training keeps, ascending (none for --evaluate_gen). The default
    --fid_stats is set by `setup`, once --evaluate_gen has taken --img_size from the weights.
    """
    config = argparse.Namespace(**vars(args))
    for name in ("cfg", "interval_min", "interval_max", "ema"):  # one value: a plain number, as the reference's
        values = sweep.as_list(getattr(config, name))
        setattr(config, name, values[0] if len(values) == 1 else values)
    if config.lr is None:
        config.lr = config.blr * config.batch_size * config.accum_iter * world_size / 256
    if config.demo:
        config.data_path = os.path.join(config.output_dir, "demo_data")
    config.fsdp = args.fsdp and world_size > 1 and not args.evaluate_gen
    config.grad_checkpoint = args.grad_checkpoint and not args.evaluate_gen
    config.phema_stds = [] if args.evaluate_gen else sorted(args.phema_stds or [])  # ascending, as checkpoints keep them
    return config


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


def scoring(config, points: list, device) -> tuple[GenerationSpec, Scorer]:
    """What evaluation generates and how it is scored; checks --num_images, --final_num_images, the
    FID statistics and the Inception weights (downloaded now if not cached and not given)."""
    spec = GenerationSpec(num_images=config.num_images, class_num=config.class_num, img_size=config.img_size,
                          sampler=points[0].sampler, gen_bsz=config.gen_bsz, seed=config.seed)
    if config.final_num_images is not None:
        GenerationSpec(**{**vars(spec), "num_images": config.final_num_images})
    return spec, Scorer(config.fid_stats, config.inception_weights, device)


def build_data(config, device) -> Data:
    """The training images (the demo's are generated first; a folder or a store), this rank's sampler
    and the loader."""
    if config.demo:
        if D.is_main_process():
            make_shapes_dataset(config.data_path, image_size=config.img_size)
        D.barrier()
    dataset = open_dataset(config.data_path, config.img_size)
    if len(dataset.classes) > config.class_num:
        raise BadValue(f"{config.data_path} has {len(dataset.classes)} classes but --class_num is {config.class_num}")
    sampler = ResumableSampler(len(dataset), D.get_rank(), D.get_world_size(), seed=config.seed)
    loader = make_loader(dataset, sampler, batch_size=config.batch_size, num_workers=config.num_workers,
                         pin_memory=config.pin_mem and device.type == "cuda", seed=config.seed)
    steps_per_epoch = sampler.num_samples // config.batch_size // config.accum_iter
    if steps_per_epoch < 1:
        raise BadValue(f"{len(dataset)} images make no full batch of {config.batch_size} × {config.accum_iter} per process")
    return Data(loader, sampler, steps_per_epoch, len(dataset), len(dataset.classes))


def build_denoiser(config, device) -> Denoiser:
    """A freshly initialised (global RNG) Denoiser of the configured network, on `device`."""
    knobs = {k: getattr(config, k) for k in ARCH_KNOBS if getattr(config, k) is not None}  # overrides of the preset's
    net = JiT_models[config.model](input_size=config.img_size, num_classes=config.class_num, attn_drop=config.attn_dropout,
                                   proj_drop=config.proj_dropout, attn_impl=config.attn_impl,
                                   grad_checkpoint=config.grad_checkpoint, **knobs)
    return Denoiser(net, config.class_num, P_mean=config.P_mean, P_std=config.P_std, noise_scale=config.noise_scale,
                    t_eps=config.t_eps, label_drop_prob=config.label_drop_prob, pred=config.pred, loss=config.loss).to(device)


def build_model(config, device):
    """(denoiser, [EMA 1, EMA 2 (, EMA 3)], [power EMA of each config.phema_stds], optimizer), freshly
    initialised from the global RNG; with config.fsdp the denoiser and all EMAs are sharded (one unit
    per block) before the optimizer is built."""
    denoiser = build_denoiser(config, device)
    decays = [d for d in (config.ema_decay1, config.ema_decay2, config.ema_decay3) if d is not None]
    phemas = [phema.PowerEMA(denoiser, s) for s in config.phema_stds]
    if config.fsdp:
        emas = [sharding.ShardedEMA(denoiser, d, mixed_precision=False) for d in decays]
        for ema in phemas:  # copies of the unsharded denoiser, sharded with its plan (as ShardedEMA)
            sharding.shard(ema.module, mixed_precision=False)
        sharding.shard(denoiser, mixed_precision=False)
    else:
        emas = [EMA(denoiser, d) for d in decays]
    optimizer = build_optimizer(denoiser, config.lr, config.weight_decay)
    n_params = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    D.print0(f"{config.model} at {config.img_size}px: {n_params / 1e6:.2f}M trainable parameters; device {device}, "
             f"{D.get_world_size()} process(es){' (FSDP)' if config.fsdp else ''}; global batch "
             f"{config.batch_size * config.accum_iter * D.get_world_size()}, lr {config.lr:.3e}")
    return denoiser, emas, phemas, optimizer


def match_emas(config, state, path: str, denoiser, emas: list):
    """The third EMA's policy when the checkpoint and the run disagree: evaluation samples the
    checkpoint's EMA 3 (added here, never updated); training starts a new EMA 3 from the loaded
    weights, or drops the checkpoint's (--ema_decay3 not given). CheckpointError for an --ema the
    checkpoint does not hold."""
    if config.evaluate_gen and len(state.emas) > len(emas):
        emas.append(EMA(denoiser, decay=config.ema_decay3 or 0.0))
    elif not config.evaluate_gen and len(state.emas) != len(emas):
        D.print0(f"note: {path} holds {len(state.emas)} EMAs, this run keeps {len(emas)}: "
                 + ("EMA 3 starts from the loaded weights" if len(emas) > len(state.emas) else
                    "its EMA 3 is dropped (pass --ema_decay3 to keep it)"))
    if max(sweep.as_list(config.ema)) > len(emas):
        raise CheckpointError(f"--ema {max(sweep.as_list(config.ema))}: {path} has no {EMA_KEYS[len(emas)]} "
                              "(a third EMA is kept when training with --ema_decay3)")


def post_hoc_samplers(config, denoiser, device) -> PostHocSamplers:
    """--phema: `denoiser` samples with each σ_rel's weights, reconstructed at step config.phema_at."""
    reconstruct = functools.partial(phema.reconstruct_at, config.phema, config.phema_at, log=D.print0)
    return PostHocSamplers(denoiser, reconstruct, device, use_compile(config, device))


def snapshot_writer(config, data: Data, denoiser, phemas: list, start: Start) -> phema.SnapshotWriter:
    """--phema_stds: what writes the run's snapshots to output_dir/phema, every --phema_every steps
    from --phema_from (defaults: util.phema.default_schedule of the run's steps). Says what the run
    will write, warns when the disk is short, and removes what a killed write left."""
    total = config.epochs * data.steps_per_epoch
    every, first = phema.default_schedule(total)
    writer = phema.SnapshotWriter(
        os.path.join(config.output_dir, "phema"), phemas, every=config.phema_every or every,
        start=first if config.phema_from is None else config.phema_from, total=total, steps_per_epoch=data.steps_per_epoch,
        dtype=config.phema_dtype, args=vars(config), keep=frozenset(phema.frozen_names(denoiser)))
    if D.is_main_process() and os.path.isdir(writer.folder):
        remove_stale_temporaries(writer.folder, ".phema-")
    D.print0(*writer.plan(done=start.epoch * data.steps_per_epoch + start.step), sep="\n")
    return writer


def use_compile(config, device) -> bool:
    return device.type == "cuda" if config.compile is None else config.compile


def wrap_for_training(denoiser, config, device):
    """What the training step calls: the denoiser (sharded already with --fsdp, else DDP-wrapped
    when distributed), compiled when on: whole, or under --fsdp block by block with the root and
    FSDP's hooks eager (engine_jit.compile_fsdp_blocks: 2 graphs and no break instead of 9 and one)."""
    if config.fsdp:
        return compile_fsdp_blocks(denoiser) if use_compile(config, device) else denoiser
    model = denoiser
    if D.get_world_size() > 1 and not config.evaluate_gen:
        ddp = torch.nn.parallel.DistributedDataParallel
        # No buffer broadcast before each forward: the only buffers are the RoPE tables, constants
        # built alike on every rank (torch 2.14 renamed the flag to forward_sync_buffers).
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                   else {"broadcast_buffers": False})
        model = ddp(denoiser, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)
    return torch.compile(model) if use_compile(config, device) else model


@dataclass
class Run:
    """Everything a training or evaluation run holds, built once by `setup`."""

    config: argparse.Namespace  # the flags plus derived values (resolve_config)
    parts: StepParts  # the step's model, denoiser, optimizer, EMAs and device
    checkpoints: Checkpointer
    start: Start  # where the run starts (its checkpoint, epoch and step)
    samplers: Samplers  # what samples with each EMA
    log: RunLog
    stopper: StopSignal
    evaluation: Evaluation | None = None  # None: the run does not evaluate
    data: Data | None = None  # None for --evaluate_gen
    lock: str | None = None  # the output folder's lock file (rank 0)
    snapshots: phema.SnapshotWriter | None = None  # None: no post-hoc EMA tracked

    def close(self):
        """Put the signal handlers back, close the log and release the output folder."""
        self.stopper.close()
        self.log.close()
        runlock.release(self.lock)


def setup(args) -> Run:
    """Validate, join the process group, build data, model, EMAs and optimizer, and resume."""
    check_args(args)
    device = D.init(args.device, args.dist_on_itp, args.dist_url, args.dist_timeout)
    config = resolve_config(args, D.get_world_size())
    source = W.evaluation_source(config, W.changed_flags(get_args_parser(), args), log=D.print0) if config.evaluate_gen else None
    config.fid_stats = config.fid_stats or os.path.join("fid_stats", f"jit_in{config.img_size}_stats.npz")
    points = sweep.eval_points(config, config.num_images)  # BadValue: a negative CFG scale, an empty interval
    scores = scoring(config, points, device) if config.evaluate_gen or config.online_eval else None
    data = None if config.evaluate_gen or config.demo else build_data(config, device)  # reads only: before the lock
    lock = runlock.take(config.output_dir, "eval" if config.evaluate_gen else "train")
    try:
        return build_run(args, config, device, lock=lock, data=data, source=source, points=points, scores=scores)
    except BaseException:  # a bad checkpoint, an interrupt, ...: the next run finds the folder free
        runlock.release(lock)
        raise


def build_run(args, config, device, *, lock: str | None, data: Data | None, source, points: list, scores) -> Run:
    """setup's second half, once the output folder is this run's (lock): log, demo data, model,
    EMAs, optimizer, the checkpoint (`source` for --evaluate_gen) or initial weights, evaluation of
    `points` with `scores` ((GenerationSpec, Scorer) or None)."""
    if D.is_main_process():
        remove_stale_temporaries(config.output_dir)
    log = RunLog(config.output_dir)
    for note in ignored_flags(args, D.get_world_size()):
        D.print0(f"note: {note}")
    if (attempt := D.elastic_attempt()) and attempt[0] > 0:
        D.print0(f"torchelastic restart {attempt[0]} of at most {attempt[1]}: resuming from the newest checkpoint")
    if config.demo:
        data = build_data(config, device)  # generates its shapes first
    if data:
        D.print0(f"data: {data}")
    # Seeding order: the same seed on every rank while the weights and EMAs are initialised, so that
    # all ranks start identical; then seed + rank for the training randomness (t, noise, label
    # dropout), which must differ between ranks. A resumed run then restores its saved RNG states.
    torch.manual_seed(config.seed)
    denoiser, emas, phemas, optimizer = build_model(config, device)
    torch.manual_seed(config.seed + D.get_rank())
    np.random.seed(config.seed + D.get_rank())
    checkpoints = Checkpointer(config.output_dir, device, denoiser, emas, None if config.evaluate_gen else optimizer, vars(config),
                               phemas)
    state, path = source or checkpoints.load(config.resume)
    if state is not None and config.init_from:
        D.print0(f"note: --resume found {path}: it continues that run, --init_from {config.init_from} is not used")
    if state is not None:
        match_emas(config, state, path, denoiser, emas)
        if not config.evaluate_gen:
            phema.check_resume_stds(state, path, config.phema_stds)
        start = checkpoints.restore(state, path)
    else:
        if config.init_from:
            state, config.init_origin = W.initial_state(config.init_from, config.init_ema, denoiser, log=D.print0)
            checkpoints.initialise(state, config.init_from)
        start = Start(config.start_epoch)
    if not config.evaluate_gen:
        checkpoints.check_free_space()
    stopper = StopSignal()
    samplers = post_hoc_samplers(config, denoiser, device) if config.phema else Samplers(
        emas, device, functools.partial(build_denoiser, config, device), use_compile(config, device))
    evaluation = None if scores is None else Evaluation(
        samplers, points, *scores, log=log, output_dir=config.output_dir, save_images=config.save_images,
        final_num_images=config.final_num_images, stopper=stopper, during_training=not config.evaluate_gen,
        weights_context={"phema_step": config.phema_at} if config.phema else {})
    parts = StepParts(wrap_for_training(denoiser, config, device), denoiser, optimizer, emas, device, phemas)
    snapshots = snapshot_writer(config, data, denoiser, phemas, start) if phemas else None
    return Run(config, parts, checkpoints, start, samplers, log, stopper, evaluation, data, lock, snapshots)


def train(run: Run) -> int:
    """The epoch loop: train, checkpoint, evaluate. Returns the exit status."""
    config, data, saves = run.config, run.data, run.checkpoints.log
    loop = LoopConfig.from_flags(config)

    def save(epoch: int, next_step: int, name: str = "last") -> bool:
        return run.checkpoints.save(epoch, next_step, data.steps_per_epoch, name)

    io = RunIO(log=run.log, stopper=run.stopper, save=save, snapshot=run.snapshots)
    start_step = run.start.step
    D.print0(f"training epochs {run.start.epoch}..{config.epochs - 1}" + (f" from step {start_step}" if start_step else ""))
    t0 = time.time()
    try:
        for epoch in range(run.start.epoch, config.epochs):
            data.sampler.set_position(epoch, start_step * config.accum_iter * config.batch_size)
            saved_at_end = train_one_epoch(run.parts, data, loop, io, epoch=epoch, start_step=start_step)
            start_step = 0
            last = epoch + 1 == config.epochs
            if (epoch % config.save_last_freq == 0 or last) and not saved_at_end:
                save(epoch, data.steps_per_epoch)
            if epoch % 100 == 0 and epoch > 0:
                save(epoch, data.steps_per_epoch, name=str(epoch))
            if run.evaluation and (epoch % config.eval_freq == 0 or last):
                if run.parts.device.type == "cuda":
                    torch.cuda.empty_cache()
                evaluate(run.evaluation, epoch=epoch, weights_epoch=epoch)
    except StopRun as e:
        D.print0(str(e))
        return e.code if saves.last_ok else run.checkpoints.unsaved_exit()
    finally:
        run.log.flush()
    if not saves.last_ok:
        return run.checkpoints.unsaved_exit()
    if saves.failed:
        D.print0(f"warning: {saves.failed} checkpoint(s) of this run could not be written (see above)")
    if run.snapshots and run.snapshots.failed:
        D.print0(f"warning: {run.snapshots.failed} post-hoc EMA snapshot(s) of this run could not be written (see above)")
    D.print0(f"training done in {hms(time.time() - t0)}")
    if config.demo:
        point = sweep.eval_points(config, config.num_images)[0]
        run.samplers.refresh([point.ema])
        if D.is_main_process():
            write_demo_outputs(run.samplers(point.ema)[0], config.output_dir, point.sampler, config.seed)
    return 0


def main(args) -> int:
    run = setup(args)
    try:
        if args.dry_run:
            D.print0("dry run: arguments, data, model and checkpoint are ready; exiting before training")
            return 0
        if args.evaluate_gen:
            s = run.start
            result = evaluate(run.evaluation, epoch=s.weights_epoch, weights_epoch=s.weights_epoch, checkpoint=s.path)
            return 1 if run.log.failed or (result or {}).get("images_saved") is False else 0
        return train(run)
    finally:
        run.close()


def cli(argv=None) -> int:
    """The command line: exit status 2 for bad input (one line, no traceback), 1 for a run that
    failed, 0 when done (util.errors); a bug keeps its traceback."""
    args = parse_args(argv)
    try:
        code = exit_code(main, args)
    except RuntimeError as e:
        if not D.is_collective_failure(e):
            raise
        print(f"error: rank {D.get_rank()}: {str(e).splitlines()[0][:300]} (another process is stuck or gone; "
              f"--dist_timeout is {args.dist_timeout} min); rerun the same command to continue from the newest checkpoint",
              file=sys.stderr, flush=True)
        return 1  # the group is broken: leave without shutdown
    D.shutdown()  # not after a bug: a rank that raised leaves at once, so that the launcher ends the others
    return code


if __name__ == "__main__":
    sys.exit(cli())
