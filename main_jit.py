"""Train and evaluate JiT (arXiv 2511.13720). Same flags, defaults and meaning as the reference.

    python main_jit.py --demo                                    # built-in CPU/GPU demo, no data needed
    torchrun --nproc_per_node=8 main_jit.py --model JiT-B/16 ... # the reference's ImageNet commands
"""
import argparse
import dataclasses
import functools
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from denoiser import CONVERSIONS, EMA, SAMPLERS, Denoiser, SamplerSettings
from engine_jit import LoopConfig, StopRun, evaluate, train_one_epoch
from model_jit import ARCH_KNOBS, ATTN_IMPLS, JiT_models, preset_patch_size
from util import checkpoint as ckpt_util
from util import distributed as D
from util import files, fid, lr_sched, sharding, sweep
from util.data import ResumableSampler, make_loader, open_dataset
from util.demo import write_demo_outputs
from util.demo_data import make_shapes_dataset
from util.evaluation import check_eval_inputs
from util.logger import RunLog, hms
from util.store import check_img_size, is_store, read_manifest

DEMO_DEFAULTS = dict(
    model="JiT-T/4", img_size=32, class_num=4, epochs=24, warmup_epochs=1, batch_size=32, lr=1e-3,
    ema_decay1=0.995, ema_decay2=0.99, num_workers=1, save_last_freq=8, print_freq=8, log_freq=8,
    num_sampling_steps=20, cfg=2.0, interval_min=0.1, output_dir="./output_dir/demo",
)


def add_sampler_args(group, sweep: bool = False):
    """The sampler's flags (shared by main_jit.py and sample.py). sweep: --cfg, --interval_min and
    --interval_max take several values (a sweep over all combinations)."""
    a = group.add_argument
    many = dict(nargs="+") if sweep else {}
    also = "; several values: a sweep" if sweep else ""
    a("--sampling_method", default="heun", choices=sorted(SAMPLERS), help="ODE integrator (Heun: 2nd order, Euler: 1st)")
    a("--num_sampling_steps", default=50, type=int, help="integration steps from t = 0 (noise) to t = 1 (image)")
    a("--cfg", default=1.0, type=float, **many, help=f"classifier-free guidance scale (>= 0; 1 = no guidance){also}")
    a("--interval_min", default=0.0, type=float, **many, help=f"guidance only for t > this, in [0, 1) (0: from t = 0 on){also}")
    a("--interval_max", default=1.0, type=float, **many, help=f"guidance only for t < this, in (0, 1]{also}")


def sampler_settings(args) -> SamplerSettings:
    """The sampler of single-valued flags (sample.py, the demo's grid)."""
    return SamplerSettings(method=args.sampling_method, steps=args.num_sampling_steps, cfg=args.cfg,
                           interval_min=args.interval_min, interval_max=args.interval_max)


def as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def eval_points(cfg, num_images: int) -> list:
    """The evaluation's points: every combination of --ema, --interval_min, --interval_max, --cfg."""
    return sweep.grid(emas=as_list(cfg.ema), interval_mins=as_list(cfg.interval_min), interval_maxs=as_list(cfg.interval_max),
                      cfgs=as_list(cfg.cfg), method=cfg.sampling_method, steps=cfg.num_sampling_steps, num_images=num_images)


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

    g = p.add_argument_group("sampling and evaluation")
    add_sampler_args(g, sweep=True)
    a = g.add_argument
    a("--ema", default=[1], type=int, nargs="+", choices=(1, 2, 3), help="which EMA's weights sample; several values: a sweep")
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
    a("--resume", default="", help="checkpoint file, or folder to resume from (newest readable checkpoint)")
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
    return p


def parse_args(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.demo:  # demo values replace the defaults, not what was given on the command line
        parser.set_defaults(**DEMO_DEFAULTS)
        args = parser.parse_args(argv)
    return args


def default_fid_stats(args) -> str:
    return args.fid_stats or os.path.join("fid_stats", f"jit_in{args.img_size}_stats.npz")


def check_data_path(data_path: str, img_size: int):
    """An ImageFolder tree under data_path/train, or an image store of img_size px (prepare_data.py)."""
    if is_store(data_path):
        check_img_size(data_path, read_manifest(data_path), img_size)
    elif not os.path.isdir(os.path.join(data_path, "train")):
        raise FileNotFoundError(f"--data_path {data_path}: no folder {os.path.join(data_path, 'train')} (an ImageFolder "
                                "tree of training images) and no image store (prepare_data.py)")


def check_args(args):
    """Fail fast, before any expensive work, on inputs that cannot work."""
    patch = preset_patch_size(args.model)
    if args.img_size % patch:
        raise ValueError(f"--img_size {args.img_size} is not divisible by the patch size {patch} of {args.model}")
    for name in ("batch_size", "accum_iter", "gen_bsz", "epochs", "num_sampling_steps", "print_freq", "log_freq", "save_last_freq", "class_num"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.evaluate_gen and not args.resume:
        raise ValueError("--evaluate_gen needs trained weights: pass --resume CHECKPOINT_OR_FOLDER")
    if args.resume and not os.path.exists(args.resume) and os.path.abspath(args.resume) != os.path.abspath(args.output_dir):
        raise FileNotFoundError(f"--resume {args.resume}: no such file or folder")
    if not args.evaluate_gen and not args.demo:
        check_data_path(args.data_path, args.img_size)
    eval_points(args, args.num_images)  # a negative CFG scale, an empty guidance interval
    if args.final_num_images is not None and (args.final_num_images < 1 or args.final_num_images % args.class_num):
        raise ValueError(f"--final_num_images ({args.final_num_images}) must be a positive multiple of --class_num ({args.class_num})")
    if not args.evaluate_gen and args.ema_decay3 is None and 3 in as_list(args.ema):
        raise ValueError("--ema 3 samples a third EMA: train with --ema_decay3 (e.g. 0.9998)")
    if args.evaluate_gen or args.online_eval:
        check_eval_inputs(default_fid_stats(args), args.inception_weights, args.num_images, args.class_num)


def resolve_config(args, world_size: int) -> argparse.Namespace:
    """The run's settings: the flags plus the values derived from them (`args` is left as given).

    lr: blr × global batch / 256 unless --lr is given; fid_stats: the default file for img_size;
    data_path: the generated shapes under output_dir for --demo; fsdp, grad_checkpoint: whether they
    apply (sharding needs several processes; evaluation has no backward pass). Single-valued sweep
    flags (--cfg, --interval_min, --interval_max, --ema) become plain numbers.
    """
    cfg = argparse.Namespace(**vars(args))
    for name in ("cfg", "interval_min", "interval_max", "ema"):  # one value: a plain number, as the reference's
        values = as_list(getattr(cfg, name))
        setattr(cfg, name, values[0] if len(values) == 1 else values)
    if cfg.lr is None:
        cfg.lr = cfg.blr * cfg.batch_size * cfg.accum_iter * world_size / 256
    cfg.fid_stats = default_fid_stats(args)
    if cfg.demo:
        cfg.data_path = os.path.join(cfg.output_dir, "demo_data")
    cfg.fsdp = args.fsdp and world_size > 1 and not args.evaluate_gen
    cfg.grad_checkpoint = args.grad_checkpoint and not args.evaluate_gen
    return cfg


def ignored_flags(args, world_size: int) -> list[str]:
    """Flags that have no effect in this run, with why."""
    notes = []
    if args.fsdp and args.evaluate_gen:
        notes.append("--fsdp is ignored by --evaluate_gen (every process samples with the full weights)")
    elif args.fsdp and world_size == 1:
        notes.append("--fsdp in a single process: nothing to shard, this is a plain run")
    if args.grad_checkpoint and args.evaluate_gen:
        notes.append("--grad_checkpoint is ignored by --evaluate_gen (no backward pass)")
    return notes


class StopSignal:
    """Records SIGTERM / SIGUSR1 (what schedulers send before a kill); the loop saves and exits.
    close() puts the previous handlers back."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = 0
        self.previous = [signal.signal(sig, self._handler) for sig in self.SIGNALS]

    def _handler(self, signum, frame):
        self.requested = signum

    def close(self):
        for sig, handler in zip(self.SIGNALS, self.previous):
            signal.signal(sig, handler)


def param_groups(denoiser, weight_decay: float) -> list[dict]:
    """The reference's two AdamW groups, in its order (so that its optimizer state loads): biases
    and 1-D parameters without weight decay, then the rest with `weight_decay`."""
    decay, no_decay = [], []
    for name, p in denoiser.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(denoiser, lr, weight_decay):
    """AdamW (0.9, 0.95) over param_groups. Fused: it also skips non-finite steps on the device."""
    return torch.optim.AdamW(param_groups(denoiser, weight_decay), lr=lr, betas=(0.9, 0.95), fused=True)


@dataclass
class Data:
    loader: DataLoader
    sampler: ResumableSampler
    steps_per_epoch: int


def build_data(cfg, device) -> Data:
    """The training images (the demo's are generated first; a folder or a store), this rank's sampler
    and the loader."""
    if cfg.demo:
        if D.is_main_process():
            make_shapes_dataset(cfg.data_path, image_size=cfg.img_size)
        D.barrier()
    dataset = open_dataset(cfg.data_path, cfg.img_size)
    if len(dataset.classes) > cfg.class_num:
        raise ValueError(f"{cfg.data_path} has {len(dataset.classes)} classes but --class_num is {cfg.class_num}")
    sampler = ResumableSampler(len(dataset), D.get_rank(), D.get_world_size(), seed=cfg.seed)
    loader = make_loader(dataset, sampler, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                         pin_memory=cfg.pin_mem and device.type == "cuda", seed=cfg.seed)
    steps_per_epoch = sampler.num_samples // cfg.batch_size // cfg.accum_iter
    if steps_per_epoch < 1:
        raise ValueError(f"{len(dataset)} images make no full batch of {cfg.batch_size} × {cfg.accum_iter} per process")
    D.print0(f"data: {len(dataset)} images in {len(dataset.classes)} classes, {steps_per_epoch} steps per epoch")
    return Data(loader, sampler, steps_per_epoch)


def build_denoiser(cfg, device) -> Denoiser:
    """A freshly initialised (global RNG) Denoiser of the configured network, on `device`."""
    knobs = {k: getattr(cfg, k) for k in ARCH_KNOBS if getattr(cfg, k) is not None}  # overrides of the preset's
    net = JiT_models[cfg.model](input_size=cfg.img_size, num_classes=cfg.class_num, attn_drop=cfg.attn_dropout,
                                proj_drop=cfg.proj_dropout, attn_impl=cfg.attn_impl, grad_checkpoint=cfg.grad_checkpoint, **knobs)
    return Denoiser(net, cfg.class_num, P_mean=cfg.P_mean, P_std=cfg.P_std, noise_scale=cfg.noise_scale,
                    t_eps=cfg.t_eps, label_drop_prob=cfg.label_drop_prob, pred=cfg.pred, loss=cfg.loss).to(device)


def build_model(cfg, device):
    """(denoiser, [EMA 1, EMA 2 (, EMA 3)], optimizer), freshly initialised from the global RNG; with
    cfg.fsdp the denoiser and the EMAs are sharded (one unit per block) before the optimizer is built."""
    denoiser = build_denoiser(cfg, device)
    decays = [d for d in (cfg.ema_decay1, cfg.ema_decay2, cfg.ema_decay3) if d is not None]
    if cfg.fsdp:
        emas = [sharding.ShardedEMA(denoiser, d, mixed_precision=False) for d in decays]
        sharding.shard(denoiser, mixed_precision=False)
    else:
        emas = [EMA(denoiser, d) for d in decays]
    optimizer = build_optimizer(denoiser, cfg.lr, cfg.weight_decay)
    n_params = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    D.print0(f"{cfg.model} at {cfg.img_size}px: {n_params / 1e6:.2f}M trainable parameters; device {device}, "
             f"{D.get_world_size()} process(es){' (FSDP)' if cfg.fsdp else ''}; global batch "
             f"{cfg.batch_size * cfg.accum_iter * D.get_world_size()}, lr {cfg.lr:.3e}")
    return denoiser, emas, optimizer


def describe(path: str, resume: dict) -> str:
    return f"{path} (resume at epoch {resume['epoch']}, step {resume['step']})"


@dataclass
class Resumed:
    """Where a run starts. epoch, step: to continue from; weights_epoch: the last finished epoch of
    the loaded weights (-1: none); path: the checkpoint file (None: none); newest: its description."""

    epoch: int
    step: int = 0
    weights_epoch: int = -1
    path: str | None = None
    newest: str | None = None


def load_checkpoint(cfg, sharded: bool):
    """(TrainState, path) of --resume, or (None, None). Sharded: rank 0 alone reads the file; the
    other ranks get the state without its tensors (rank 0 broadcasts them while loading)."""
    if not sharded:
        return ckpt_util.load_for_resume(cfg.resume, log=D.print0)
    state, path = ckpt_util.load_for_resume(cfg.resume, log=D.print0) if D.is_main_process() else (None, None)
    header = None if state is None else dataclasses.replace(state, model=None, emas=[None] * len(state.emas), optimizer=None)
    header, path = D.broadcast_object((header, path))
    return (state if D.is_main_process() else header), path


def load_state(state, path: str, denoiser, emas, optimizer):
    """The checkpoint's weights (and optimizer state, unless optimizer is None) into the live objects."""
    if not sharding.is_sharded(denoiser):
        ckpt_util.load_weights(state, path, denoiser, emas)
        if optimizer is not None and state.optimizer is not None:
            ckpt_util.load_optimizer(optimizer, state.optimizer)
        return
    ema_sds = None if state.model is None else state.ema_states(len(emas))  # None: not rank 0
    try:
        sharding.load_full_state(denoiser, emas, optimizer, state.model, ema_sds, state.optimizer)
    except RuntimeError as e:
        raise ckpt_util.does_not_fit(path, state.args, e) from None
    if optimizer is not None:
        ckpt_util.place_steps(optimizer)


def resume(cfg, denoiser, emas, optimizer, device) -> Resumed:
    """Load --resume into the live objects (the optimizer only when training; an EMA 3 the
    checkpoint holds is added for evaluation) and restore this rank's RNG states."""
    state, path = load_checkpoint(cfg, sharding.is_sharded(denoiser))
    if state is None:
        if cfg.evaluate_gen:
            raise FileNotFoundError(f"--evaluate_gen: no checkpoint found in {cfg.resume}")
        return Resumed(cfg.start_epoch)
    if cfg.evaluate_gen and len(state.emas) > len(emas):
        emas.append(EMA(denoiser, decay=cfg.ema_decay3 or 0.0))  # only sampled, never updated
    elif len(state.emas) != len(emas):
        D.print0(f"note: {path} holds {len(state.emas)} EMAs, this run keeps {len(emas)}: "
                 + ("EMA 3 starts from the loaded weights" if len(emas) > len(state.emas) else
                    "its EMA 3 is dropped (pass --ema_decay3 to keep it)"))
    if max(as_list(cfg.ema)) > len(emas):
        raise ckpt_util.CheckpointError(f"--ema {max(as_list(cfg.ema))}: {path} has no {ckpt_util.EMA_KEYS[len(emas)]} "
                                        "(a third EMA is kept when training with --ema_decay3)")
    load_state(state, path, denoiser, emas, None if cfg.evaluate_gen else optimizer)
    if state.rng is not None and state.world_size == D.get_world_size():
        ckpt_util.restore_rng(state.rng[D.get_rank()], device)
    elif state.rng is not None:
        D.print0(f"note: {path} was written by {state.world_size} processes, this run has "
                 f"{D.get_world_size()}: training continues, but not bit-exactly as the original run would")
    D.print0(f"resumed from {path}: epoch {state.resume['epoch']}, step {state.resume['step']}")
    return Resumed(state.resume["epoch"], state.resume["step"], state.epoch, os.path.abspath(path), describe(path, state.resume))


def check_free_space(output_dir: str, ckpt_bytes: int):
    """Say so before training when output_dir cannot hold a checkpoint and its temporary file."""
    free = files.free_bytes(output_dir)
    if free < 2 * ckpt_bytes:
        D.print0(f"warning: {output_dir} has {files.human_bytes(free)} free, but saving a checkpoint "
                 f"({files.human_bytes(ckpt_bytes)}) next to the previous one needs {files.human_bytes(2 * ckpt_bytes)}: "
                 "checkpoints may fail to be written")


def use_compile(cfg, device) -> bool:
    return device.type == "cuda" if cfg.compile is None else cfg.compile


def wrap_for_training(denoiser, cfg, device):
    """What the training step calls: the denoiser (sharded already with --fsdp, else DDP-wrapped
    when distributed), compiled when on."""
    model = denoiser
    if D.get_world_size() > 1 and not cfg.evaluate_gen and not cfg.fsdp:
        model = torch.nn.parallel.DistributedDataParallel(denoiser, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if use_compile(cfg, device) else model


class Samplers:
    """For each EMA, the denoiser that samples and a compiled stand-in of its net (or None). An
    unsharded EMA samples itself; a sharded one (FSDP) is gathered into a full copy on every rank,
    made at the first use and refreshed by `refresh` (collective), so that evaluation runs as in an
    unsharded run, each rank generating its share of the images."""

    def __init__(self, cfg, emas, device):
        self.cfg, self.emas, self.device = cfg, emas, device
        self.copies, self.nets = {}, {}

    def refresh(self, ks):
        """Gather the sharded EMAs `ks` (1-based) into their copies; nothing for unsharded ones. The
        global RNG streams are left as they were (building a copy initialises weights)."""
        for k in sorted(set(ks)):
            if sharding.is_sharded(self.emas[k - 1].module):
                if k not in self.copies:
                    with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                        self.copies[k] = build_denoiser(self.cfg, self.device).eval().requires_grad_(False)
                sharding.unshard_into(self.copies[k], self.emas[k - 1].module)

    def __call__(self, k: int):
        """(denoiser, net stand-in or None) that sample with EMA k."""
        denoiser = self.copies.get(k, self.emas[k - 1].module)
        if k not in self.nets:
            self.nets[k] = torch.compile(denoiser.net, dynamic=False) if use_compile(self.cfg, self.device) else None
        return denoiser, self.nets[k]


@dataclass
class SaveLog:
    """What the checkpoint writes of a run came to. newest: the newest readable checkpoint and what
    it holds; last_ok: whether the latest checkpoint-last.pth write succeeded; failed: writes that did not."""

    newest: str | None = None
    last_ok: bool = True
    failed: int = 0

    def note(self, name: str, written: str | None) -> bool:
        """Record the outcome of writing checkpoint-{name}.pth (`written`: its description, None if it
        failed); returns whether it was written."""
        self.failed += written is None
        if name == "last":
            self.last_ok = written is not None
        self.newest = written or self.newest
        return written is not None


@dataclass
class Run:
    """Everything a training or evaluation run holds, built once by `setup`."""

    config: argparse.Namespace  # the flags plus derived values (resolve_config)
    device: torch.device
    denoiser: Denoiser
    emas: list
    optimizer: torch.optim.Optimizer
    model: torch.nn.Module  # what the training step calls: the denoiser, DDP-wrapped and/or compiled
    samplers: Samplers  # what samples with each EMA
    log: RunLog
    stopper: "StopSignal"
    start: Resumed
    data: Data | None = None  # None for --evaluate_gen
    saves: SaveLog = dataclasses.field(default_factory=SaveLog)  # what its checkpoint writes came to

    def close(self):
        """Put the signal handlers back and close the log."""
        self.stopper.close()
        self.log.close()


def setup(args) -> Run:
    """Validate, join the process group, build data, model, EMAs and optimizer, and resume."""
    check_args(args)
    device = D.init(args.device, args.dist_on_itp, args.dist_url)
    cfg = resolve_config(args, D.get_world_size())
    if D.is_main_process():
        os.makedirs(cfg.output_dir, exist_ok=True)
        ckpt_util.remove_stale_temporaries(cfg.output_dir)
    D.barrier()
    log = RunLog(cfg.output_dir)
    for note in ignored_flags(args, D.get_world_size()):
        D.print0(f"note: {note}")
    data = None if cfg.evaluate_gen else build_data(cfg, device)
    rank = D.get_rank()
    # Seeding order: the same seed on every rank while the weights and EMAs are initialised, so that
    # all ranks start identical; then seed + rank for the training randomness (t, noise, label
    # dropout), which must differ between ranks. A resumed run then restores its saved RNG states.
    torch.manual_seed(cfg.seed)
    denoiser, emas, optimizer = build_model(cfg, device)
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    start = resume(cfg, denoiser, emas, optimizer, device)
    if not cfg.evaluate_gen:
        check_free_space(cfg.output_dir, ckpt_util.estimated_size(denoiser))
    return Run(config=cfg, device=device, denoiser=denoiser, emas=emas, optimizer=optimizer,
               model=wrap_for_training(denoiser, cfg, device), samplers=Samplers(cfg, emas, device), log=log,
               stopper=StopSignal(), start=start, data=data, saves=SaveLog(newest=start.newest))


def score(run: Run, point, *, epoch: int, weights_epoch: int, in_sweep: bool = False, extractor=None) -> dict:
    """FID / IS of one evaluation point; the global RNG streams are left as they were. Returns the
    result with the point's settings (a sweep's record)."""
    c = run.config
    extra = dict(ema=point.ema, checkpoint=run.start.path) if in_sweep else ({"ema": point.ema} if point.ema != 1 else {})
    suffix = (f"_ema{point.ema}" if point.ema != 1 else "") + (
        f"_interval{point.sampler.interval_min}-{point.sampler.interval_max}" if in_sweep else "")
    denoiser, net = run.samplers(point.ema)
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        result = evaluate(
            denoiser, net=net, device=run.device,
            num_images=point.num_images, class_num=c.class_num, gen_bsz=c.gen_bsz, seed=c.seed, sampler=point.sampler,
            img_size=c.img_size, fid_stats=c.fid_stats, inception_weights=c.inception_weights, output_dir=c.output_dir,
            save_images=c.save_images, epoch=epoch, checkpoint_epoch=weights_epoch, log=run.log, extractor=extractor,
            extra=extra, tag_suffix=suffix,
        )
    return {**result, **dataclasses.asdict(point.sampler), "ema": point.ema, "checkpoint_epoch": weights_epoch}


def run_eval(run: Run, epoch: int, weights_epoch: int) -> dict | None:
    """Evaluate the --ema / --cfg / --interval_* point, or sweep their combinations (then also
    --final_num_images). Returns the (best) point's result; None when a sweep was stopped."""
    c = run.config
    points = eval_points(c, c.num_images)
    run.samplers.refresh(p.ema for p in points)
    if len(points) == 1 and c.final_num_images is None:
        return score(run, points[0], epoch=epoch, weights_epoch=weights_epoch)
    return run_sweep(run, points, epoch=epoch, weights_epoch=weights_epoch)


def run_sweep(run: Run, points: list, *, epoch: int, weights_epoch: int) -> dict | None:
    """Score every point with one Inception network, skipping points finished before (metrics.jsonl);
    stop between points on SIGTERM / SIGUSR1. Writes sweep.csv and sweep.png (per epoch during
    training), prints the best point and evaluates it again with --final_num_images."""
    c = run.config
    done = sweep.finished_everywhere(run.log.metrics_path, dict(
        checkpoint=run.start.path, checkpoint_epoch=weights_epoch, seed=c.seed, gen_bsz=c.gen_bsz, class_num=c.class_num,
        img_size=c.img_size, fid_stats=c.fid_stats))
    if len(points) > 50:
        D.print0(sweep.cost_note(points))
    extractor = fid.build_inception(fid.resolve_inception_weights(c.inception_weights), run.device)

    def stop() -> bool:
        return D.host_all_reduce_sum([float(run.stopper.requested)])[0] > 0

    def score_point(p):
        return score(run, p, epoch=epoch, weights_epoch=weights_epoch, in_sweep=True, extractor=extractor)

    records, stopped = sweep.run(points, score_point, done=done, should_stop=stop)
    if stopped:
        D.print0(f"sweep stopped (signal) after {len(records)} of {len(points)} points; rerun the same command to continue")
        return None
    best = sweep.report(records, c.output_dir, "sweep" if c.evaluate_gen else f"sweep-epoch{epoch}", run.log)
    if c.final_num_images is None or best is None:
        return best
    best_point = next(p for p in points if p.key() == sweep.record_key(best))
    D.print0(f"final: the best point again with {c.final_num_images} images")
    records, stopped = sweep.run([dataclasses.replace(best_point, num_images=c.final_num_images)], score_point, done=done,
                                 should_stop=stop)
    return None if stopped else records[0]


def save(run: Run, epoch: int, next_step: int, name: str = "last") -> str | None:
    """Collective: every rank contributes its RNG state; rank 0 writes checkpoint-{name}.pth
    atomically. A failed write is reported on one line and the previous checkpoint kept. Returns, on
    every rank, a description of the file written (None if it could not be)."""
    rngs = D.all_gather_object(ckpt_util.capture_rng(run.device))
    if sharding.is_sharded(run.denoiser):  # collective: gathered to full state dicts on rank 0
        model, emas, optimizer = sharding.full_state(run.denoiser, run.emas, run.optimizer)
    elif D.is_main_process():
        model, emas, optimizer = run.denoiser.state_dict(), [e.state_dict() for e in run.emas], run.optimizer.state_dict()
    written = None
    if D.is_main_process():
        done = next_step >= run.data.steps_per_epoch
        state = ckpt_util.TrainState(
            model=model, emas=emas, optimizer=optimizer, epoch=epoch if done else epoch - 1, args=vars(run.config),
            resume={"epoch": epoch + 1, "step": 0} if done else {"epoch": epoch, "step": next_step},
            rng=rngs, world_size=D.get_world_size(),
        )
        path = os.path.join(run.config.output_dir, f"checkpoint-{name}.pth")
        try:
            ckpt_util.save(state, path)
        except files.WriteError as e:
            D.print0(f"error: {e}; the previous checkpoint is kept, training goes on")
        else:
            written = describe(path, state.resume)
            D.print0(f"saved {written}")
    return D.broadcast_object(written)


def unsaved_exit(run: Run) -> int:
    """The end of a run whose final checkpoint could not be written: say what is on disk; status 1."""
    D.print0("error: the final checkpoint of this run could not be written; "
             + (f"the newest readable checkpoint is {run.saves.newest}" if run.saves.newest
                else "no checkpoint of this run was written"))
    return 1


def loop_config(cfg) -> LoopConfig:
    return LoopConfig(batch_size=cfg.batch_size, epochs=cfg.epochs, accum_iter=cfg.accum_iter, print_freq=cfg.print_freq,
                      log_freq=cfg.log_freq, save_every_steps=cfg.save_every_steps, max_bad_frac=cfg.max_bad_frac,
                      max_nonfinite_steps=cfg.max_nonfinite_steps)


def train(run: Run) -> int:
    """The epoch loop: train, checkpoint, evaluate. Returns the exit status."""
    c = run.config
    loop = loop_config(c)
    lr_at = functools.partial(lr_sched.lr_at, lr=c.lr, warmup_epochs=c.warmup_epochs, schedule=c.lr_schedule,
                              epochs=c.epochs, min_lr=c.min_lr)
    start_step = run.start.step

    def checkpoint(epoch: int, next_step: int, name: str = "last") -> bool:
        return run.saves.note(name, save(run, epoch, next_step, name))

    D.print0(f"training epochs {run.start.epoch}..{c.epochs - 1}" + (f" from step {start_step}" if start_step else ""))
    t0 = time.time()
    try:
        for epoch in range(run.start.epoch, c.epochs):
            run.data.sampler.set_position(epoch, start_step * c.accum_iter * c.batch_size)
            saved_at_end = train_one_epoch(run.model, run.denoiser, run.optimizer, run.emas, run.data.loader, epoch=epoch,
                                           start_step=start_step, steps_per_epoch=run.data.steps_per_epoch,
                                           device=run.device, loop=loop, lr_at=lr_at, log=run.log, stopper=run.stopper,
                                           save_fn=checkpoint)
            start_step = 0
            last = epoch + 1 == c.epochs
            if (epoch % c.save_last_freq == 0 or last) and not saved_at_end:
                checkpoint(epoch, run.data.steps_per_epoch)
            if epoch % 100 == 0 and epoch > 0:
                checkpoint(epoch, run.data.steps_per_epoch, name=str(epoch))
            if c.online_eval and (epoch % c.eval_freq == 0 or last):
                if run.device.type == "cuda":
                    torch.cuda.empty_cache()
                run_eval(run, epoch, weights_epoch=epoch)
    except StopRun as e:
        D.print0(str(e))
        return e.code if run.saves.last_ok else unsaved_exit(run)
    finally:
        run.log.flush()
    if not run.saves.last_ok:
        return unsaved_exit(run)
    if run.saves.failed:
        D.print0(f"warning: {run.saves.failed} checkpoint(s) of this run could not be written (see above)")
    D.print0(f"training done in {hms(time.time() - t0)}")
    if c.demo:
        point = eval_points(c, c.num_images)[0]
        run.samplers.refresh([point.ema])
        if D.is_main_process():
            write_demo_outputs(run.samplers(point.ema)[0], output_dir=c.output_dir, class_num=c.class_num,
                               img_size=c.img_size, seed=c.seed, sampler=point.sampler, device=run.device)
    return 0


def main(args) -> int:
    run = setup(args)
    try:
        if args.dry_run:
            D.print0("dry run: arguments, data, model and checkpoint are ready; exiting before training")
            return 0
        if args.evaluate_gen:
            result = run_eval(run, run.start.weights_epoch, weights_epoch=run.start.weights_epoch)
            return 1 if run.log.failed or (result or {}).get("images_saved") is False else 0
        return train(run)
    finally:
        run.close()


def cli(argv=None):
    args = parse_args(argv)
    try:
        code = main(args)
    except (ValueError, OSError, ckpt_util.CheckpointError) as e:  # bad input, a full disk, ...
        print(f"error: {e}", file=sys.stderr)
        code = 2
    D.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(cli())
