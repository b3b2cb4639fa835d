"""Train and evaluate JiT (arXiv 2511.13720). Same flags, defaults and meaning as the reference.

    python main_jit.py --demo                                    # built-in CPU/GPU demo, no data needed
    torchrun --nproc_per_node=8 main_jit.py --model JiT-B/16 ... # the reference's ImageNet commands
"""
import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from denoiser import EMA, Denoiser
from engine_jit import StopRun, evaluate, train_one_epoch
from model_jit import ATTN_IMPLS, JiT_models
from util import checkpoint as ckpt_util
from util import distributed as D
from util.data import CenterCropFolder, ResumableSampler
from util.demo import write_demo_outputs
from util.demo_data import make_shapes_dataset
from util.evaluation import check_eval_inputs
from util.metrics_log import MetricsLog

DEMO_DEFAULTS = dict(
    model="JiT-T/4", img_size=32, class_num=4, epochs=24, warmup_epochs=1, batch_size=32, lr=1e-3,
    ema_decay1=0.995, ema_decay2=0.99, num_workers=1, save_last_freq=8, print_freq=8, log_freq=8,
    num_sampling_steps=20, cfg=2.0, interval_min=0.1, output_dir="./output_dir/demo",
)


def get_args_parser():
    p = argparse.ArgumentParser("JiT training and evaluation", add_help=True)
    a = p.add_argument
    # model
    a("--model", default="JiT-B/16", type=str, choices=sorted(JiT_models), metavar="MODEL", help=f"one of {', '.join(JiT_models)}")
    a("--img_size", default=256, type=int, help="image size (pixels)")
    a("--attn_dropout", default=0.0, type=float)
    a("--proj_dropout", default=0.0, type=float)
    a("--attn_impl", default="sdpa", choices=ATTN_IMPLS, help="sdpa (fused kernels) or reference (float32 logits, N×N)")
    # training
    a("--epochs", default=200, type=int)
    a("--warmup_epochs", default=5, type=int)
    a("--batch_size", default=128, type=int, help="per-GPU batch size; global = batch_size × GPUs × accum_iter")
    a("--accum_iter", default=1, type=int, help="gradient accumulation steps per optimiser step")
    a("--lr", default=None, type=float, help="absolute learning rate (default: blr × global batch / 256)")
    a("--blr", default=5e-5, type=float, help="base learning rate")
    a("--min_lr", default=0.0, type=float)
    a("--lr_schedule", default="constant", choices=("constant", "cosine"))
    a("--weight_decay", default=0.0, type=float)
    a("--ema_decay1", default=0.9999, type=float)
    a("--ema_decay2", default=0.9996, type=float)
    a("--P_mean", default=-0.8, type=float)
    a("--P_std", default=0.8, type=float)
    a("--noise_scale", default=1.0, type=float)
    a("--t_eps", default=5e-2, type=float)
    a("--label_drop_prob", default=0.1, type=float)
    a("--seed", default=0, type=int)
    a("--start_epoch", default=0, type=int)
    a("--num_workers", default=12, type=int)
    a("--pin_mem", action="store_true")
    a("--no_pin_mem", action="store_false", dest="pin_mem")
    p.set_defaults(pin_mem=True)
    a("--compile", dest="compile", action="store_true", default=None, help="torch.compile the network (default: on for CUDA)")
    a("--no_compile", dest="compile", action="store_false")
    # sampling
    a("--sampling_method", default="heun", choices=("heun", "euler"))
    a("--num_sampling_steps", default=50, type=int)
    a("--cfg", default=1.0, type=float)
    a("--interval_min", default=0.0, type=float)
    a("--interval_max", default=1.0, type=float)
    a("--num_images", default=50000, type=int)
    a("--eval_freq", default=40, type=int, help="online evaluation every N epochs")
    a("--online_eval", action="store_true")
    a("--evaluate_gen", action="store_true")
    a("--gen_bsz", default=256, type=int, help="per-GPU generation batch size")
    a("--fid_stats", default=None, help="reference statistics (npz with mu, sigma); default fid_stats/jit_in{img_size}_stats.npz")
    a("--inception_weights", default=None, help="local Inception-v3 weights for torch-fidelity (no download)")
    a("--save_images", action="store_true", help="also keep the generated PNGs")
    # data, output, logging
    a("--data_path", default="./data/imagenet", type=str, help="holds an ImageFolder tree under train/")
    a("--class_num", default=1000, type=int)
    a("--output_dir", default="./output_dir")
    a("--resume", default="", help="checkpoint file, or folder to resume from (newest readable checkpoint)")
    a("--save_last_freq", type=int, default=5, help="checkpoint-last.pth every N epochs")
    a("--save_every_steps", type=int, default=0, help="also checkpoint-last.pth every N optimiser steps (0: off)")
    a("--log_freq", default=100, type=int, help="TensorBoard / metrics.jsonl every N iterations")
    a("--print_freq", default=20, type=int, help="console progress every N iterations")
    a("--max_bad_frac", default=0.001, type=float, help="stop if more than this fraction of an epoch's images is unreadable")
    a("--max_nonfinite_steps", default=10, type=int, help="stop after this many non-finite steps in a row")
    a("--demo", action="store_true", help="train a tiny JiT on generated shapes (no data needed); other flags still apply")
    a("--dry_run", action="store_true", help="check the arguments, data and checkpoint, build everything, then exit")
    # distributed
    a("--device", default=None, help="cuda or cpu (default: cuda when available)")
    a("--world_size", default=1, type=int, help="number of distributed processes (set by the launcher)")
    a("--local_rank", default=-1, type=int)
    a("--dist_on_itp", action="store_true")
    a("--dist_url", default="env://", help="url used to set up distributed training")
    return p


def parse_args(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.demo:  # demo values replace the defaults, not what was given on the command line
        parser.set_defaults(**DEMO_DEFAULTS)
        args = parser.parse_args(argv)
    return args


def check_args(args):
    """Fail fast, before any expensive work, on inputs that cannot work."""
    patch = int(args.model.split("/")[-1])
    if args.img_size % patch:
        raise ValueError(f"--img_size {args.img_size} is not divisible by the patch size {patch} of {args.model}")
    for name in ("batch_size", "accum_iter", "gen_bsz", "epochs", "num_sampling_steps", "print_freq", "log_freq", "save_last_freq", "class_num"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.evaluate_gen and not args.resume:
        raise ValueError("--evaluate_gen needs trained weights: pass --resume CHECKPOINT_OR_FOLDER")
    if args.resume and not os.path.exists(args.resume) and os.path.abspath(args.resume) != os.path.abspath(args.output_dir):
        raise FileNotFoundError(f"--resume {args.resume}: no such file or folder")
    if not args.evaluate_gen and not args.demo and not os.path.isdir(os.path.join(args.data_path, "train")):
        raise FileNotFoundError(f"--data_path {args.data_path}: no folder {os.path.join(args.data_path, 'train')} (an ImageFolder tree of training images)")
    if args.fid_stats is None:
        args.fid_stats = os.path.join("fid_stats", f"jit_in{args.img_size}_stats.npz")
    if args.evaluate_gen or args.online_eval:
        check_eval_inputs(args.fid_stats, args.inception_weights, args.num_images, args.class_num)


class StopSignal:
    """Records SIGTERM / SIGUSR1 (what schedulers send before a kill); the loop saves and exits."""

    def __init__(self):
        self.requested = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = signum


def build_optimizer(denoiser, lr, weight_decay):
    """AdamW (0.9, 0.95); no weight decay on biases and 1-D parameters (the reference's groups and
    order, so its optimizer state loads). Fused: it also skips non-finite steps on the device."""
    decay, no_decay = [], []
    for name, p in denoiser.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)


def make_loader(dataset, sampler, args, device):
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        pin_memory=args.pin_mem and device.type == "cuda",
        drop_last=True,
        persistent_workers=args.num_workers > 0,
        generator=torch.Generator().manual_seed(args.seed),  # keeps the global RNG untouched
    )


def ckpt_args_summary(ckpt) -> str:
    a = ckpt.get("args") or {}
    return ", ".join(f"--{k} {a[k]}" for k in ("model", "img_size", "class_num") if k in a) or "unknown flags"


def restore(ckpt, path, denoiser, emas, optimizer, device):
    """Load a checkpoint into the live objects (optimizer None: weights only). Returns the
    (epoch, step) to continue from."""
    try:
        denoiser.load_state_dict(ckpt["model"])
        for ema, key in zip(emas, ("model_ema1", "model_ema2")):
            ema.load_state_dict(ckpt.get(key, ckpt["model"]))
    except RuntimeError as e:  # missing / unexpected keys, shape mismatches
        first = str(e).strip().splitlines()
        raise ckpt_util.CheckpointError(f"{path} does not fit this model (check --model, --img_size, --class_num; "
                                        f"the checkpoint was made with {ckpt_args_summary(ckpt)}): "
                                        f"{' '.join(first[:2])[:300]}") from None
    if optimizer is not None and "optimizer" in ckpt and "epoch" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:  # a reference checkpoint stores fused=None
            group.update(fused=True, foreach=None)
    resume = ckpt.get("resume", {"epoch": ckpt.get("epoch", -1) + 1, "step": 0})
    rng = ckpt.get("rng")
    if rng is not None and ckpt.get("world_size") == D.get_world_size():
        ckpt_util.restore_rng(rng[D.get_rank()], device)
    elif rng is not None:
        D.print0(f"note: {path} was written by {ckpt.get('world_size')} processes, this run has "
                 f"{D.get_world_size()}: training continues, but not bit-exactly as the original run would")
    D.print0(f"resumed from {path}: epoch {resume['epoch']}, step {resume['step']}")
    return resume["epoch"], resume["step"]


@dataclass
class Run:
    """Everything a training or evaluation run holds, built once by `setup`."""

    args: argparse.Namespace
    device: torch.device
    denoiser: Denoiser
    emas: list
    optimizer: torch.optim.Optimizer
    model: torch.nn.Module  # what the training step calls: the denoiser, DDP-wrapped and/or compiled
    sample_net: object  # a compiled stand-in for emas[0].module.net, or None
    loader: DataLoader | None = None
    sampler: ResumableSampler | None = None
    steps_per_epoch: int = 0
    start_epoch: int = 0
    start_step: int = 0
    ckpt_epoch: int = -1  # last finished epoch of the weights held
    log_writer: object = None
    metrics: MetricsLog | None = None


def setup(args) -> Run:
    """Validate, join the process group, build data, model, EMAs and optimizer, and resume."""
    check_args(args)
    device = D.init(args.device, args.dist_on_itp, args.dist_url)
    rank, world_size = D.get_rank(), D.get_world_size()
    if D.is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
        ckpt_util.remove_stale_temporaries(args.output_dir)
    D.barrier()

    loader = sampler = None
    steps_per_epoch = 0
    if not args.evaluate_gen:
        if args.demo:
            args.data_path = os.path.join(args.output_dir, "demo_data")
            if D.is_main_process():
                make_shapes_dataset(args.data_path, image_size=args.img_size)
            D.barrier()
        dataset = CenterCropFolder(os.path.join(args.data_path, "train"), args.img_size)
        if len(dataset.classes) > args.class_num:
            raise ValueError(f"{args.data_path}/train has {len(dataset.classes)} classes but --class_num is {args.class_num}")
        sampler = ResumableSampler(len(dataset), rank, world_size, seed=args.seed)
        loader = make_loader(dataset, sampler, args, device)
        steps_per_epoch = sampler.num_samples // args.batch_size // args.accum_iter
        if steps_per_epoch < 1:
            raise ValueError(f"{len(dataset)} images make no full batch of {args.batch_size} × {args.accum_iter} per process")
        D.print0(f"data: {len(dataset)} images in {len(dataset.classes)} classes, {steps_per_epoch} steps per epoch")

    torch.manual_seed(args.seed)  # the same initial weights (and EMAs) on every rank
    net = JiT_models[args.model](input_size=args.img_size, num_classes=args.class_num, attn_drop=args.attn_dropout,
                                 proj_drop=args.proj_dropout, attn_impl=args.attn_impl)
    denoiser = Denoiser(net, args.class_num, P_mean=args.P_mean, P_std=args.P_std, noise_scale=args.noise_scale,
                        t_eps=args.t_eps, label_drop_prob=args.label_drop_prob).to(device)
    emas = [EMA(denoiser, args.ema_decay1), EMA(denoiser, args.ema_decay2)]
    eff_batch_size = args.batch_size * args.accum_iter * world_size
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    optimizer = build_optimizer(denoiser, args.lr, args.weight_decay)
    n_params = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    D.print0(f"{args.model} at {args.img_size}px: {n_params / 1e6:.2f}M trainable parameters; device {device}, "
             f"{world_size} process(es); global batch {eff_batch_size}, lr {args.lr:.3e}")

    torch.manual_seed(args.seed + rank)  # training randomness differs per rank
    np.random.seed(args.seed + rank)
    start_epoch, start_step, ckpt_epoch = args.start_epoch, 0, -1
    ckpt, path = ckpt_util.load_for_resume(args.resume, log=D.print0)
    if ckpt is not None:
        start_epoch, start_step = restore(ckpt, path, denoiser, emas, None if args.evaluate_gen else optimizer, device)
        ckpt_epoch = ckpt.get("epoch", -1)
        del ckpt
    elif args.evaluate_gen:
        raise FileNotFoundError(f"--evaluate_gen: no checkpoint found in {args.resume}")

    use_compile = device.type == "cuda" if args.compile is None else args.compile
    model = denoiser
    if world_size > 1 and not args.evaluate_gen:
        model = torch.nn.parallel.DistributedDataParallel(denoiser, device_ids=[device.index] if device.type == "cuda" else None)
    if use_compile:
        model = torch.compile(model)
    log_writer = None
    if D.is_main_process() and not args.dry_run:
        from torch.utils.tensorboard import SummaryWriter

        log_writer = SummaryWriter(log_dir=args.output_dir)
    return Run(args=args, device=device, denoiser=denoiser, emas=emas, optimizer=optimizer, model=model,
               sample_net=torch.compile(emas[0].module.net, dynamic=False) if use_compile else None, loader=loader, sampler=sampler,
               steps_per_epoch=steps_per_epoch, start_epoch=start_epoch, start_step=start_step, ckpt_epoch=ckpt_epoch,
               log_writer=log_writer, metrics=MetricsLog(args.output_dir))


def run_eval(run: Run, epoch: int):
    """FID / IS of the EMA-1 weights; the global RNG streams are left as they were."""
    a = run.args
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        return evaluate(
            run.emas[0].module, net=run.sample_net, device=run.device, num_images=a.num_images, class_num=a.class_num,
            gen_bsz=a.gen_bsz, seed=a.seed,
            sampler=dict(steps=a.num_sampling_steps, method=a.sampling_method, cfg=a.cfg,
                         interval_min=a.interval_min, interval_max=a.interval_max),
            img_size=a.img_size, fid_stats=a.fid_stats, inception_weights=a.inception_weights,
            output_dir=a.output_dir, save_images=a.save_images, epoch=epoch,
            checkpoint_epoch=run.ckpt_epoch, log_writer=run.log_writer,
        )


def save(run: Run, epoch: int, next_step: int, name: str = "last"):
    """Collective: every rank contributes its RNG state; rank 0 writes checkpoint-{name}.pth
    atomically. A failed write is reported and the previous checkpoint kept."""
    rngs = D.all_gather_object(ckpt_util.capture_rng(run.device))
    done = next_step >= run.steps_per_epoch
    resume = {"epoch": epoch + 1, "step": 0} if done else {"epoch": epoch, "step": next_step}
    run.ckpt_epoch = epoch if done else epoch - 1
    if D.is_main_process():
        state = {
            "model": run.denoiser.state_dict(), "model_ema1": run.emas[0].state_dict(),
            "model_ema2": run.emas[1].state_dict(), "optimizer": run.optimizer.state_dict(),
            "epoch": run.ckpt_epoch, "args": vars(run.args),
            "resume": resume, "rng": rngs, "world_size": D.get_world_size(),
        }
        path = os.path.join(run.args.output_dir, f"checkpoint-{name}.pth")
        try:
            ckpt_util.save_atomic(state, path)
        except OSError as e:
            D.print_all(f"error: could not write {path} ({e}); the previous checkpoint is kept, training goes on")
        else:
            D.print0(f"saved {path} (resume at epoch {resume['epoch']}, step {resume['step']})")
    D.barrier()


def train(run: Run) -> int:
    """The epoch loop: train, checkpoint, evaluate. Returns the exit status."""
    args = run.args
    stopper = StopSignal()
    start_step = run.start_step
    D.print0(f"training epochs {run.start_epoch}..{args.epochs - 1}" + (f" from step {start_step}" if start_step else ""))
    t0 = time.time()
    try:
        for epoch in range(run.start_epoch, args.epochs):
            run.sampler.set_position(epoch, start_step * args.accum_iter * args.batch_size)
            stats = train_one_epoch(run.model, run.denoiser, run.optimizer, run.emas, run.loader, epoch=epoch,
                                    start_step=start_step, steps_per_epoch=run.steps_per_epoch, device=run.device,
                                    args=args, log_writer=run.log_writer, metrics=run.metrics, stopper=stopper,
                                    save_fn=lambda e, s: save(run, e, s))
            start_step = 0
            last = epoch + 1 == args.epochs
            if (epoch % args.save_last_freq == 0 or last) and not stats["saved_at_end"]:
                save(run, epoch, run.steps_per_epoch)
            if epoch % 100 == 0 and epoch > 0:
                save(run, epoch, run.steps_per_epoch, name=str(epoch))
            if args.online_eval and (epoch % args.eval_freq == 0 or last):
                if run.device.type == "cuda":
                    torch.cuda.empty_cache()
                run_eval(run, epoch)
    except StopRun as e:
        D.print0(str(e))
        return e.code
    finally:
        if run.log_writer is not None:
            run.log_writer.flush()
    D.print0(f"training done in {time.strftime('%H:%M:%S', time.gmtime(time.time() - t0))}")
    if args.demo and D.is_main_process():
        write_demo_outputs(run.emas[0].module, args, run.device)
    return 0


def main(args) -> int:
    run = setup(args)
    try:
        if args.dry_run:
            D.print0("dry run: arguments, data, model and checkpoint are ready; exiting before training")
            return 0
        if args.evaluate_gen:
            run_eval(run, run.ckpt_epoch)
            return 0
        return train(run)
    finally:
        if run.log_writer is not None:
            run.log_writer.close()


def cli(argv=None):
    args = parse_args(argv)
    try:
        code = main(args)
    except (ValueError, FileNotFoundError, ckpt_util.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    D.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(cli())
