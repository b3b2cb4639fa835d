"""Reference data for evaluation: the ADM center-cropped training set as PNGs, its Inception
statistics (FID), its Inception pool features (precision / recall) and its DINOv2 statistics (FD-DINOv2).

    # the reference's job: a folder of center-cropped PNGs (for torch-fidelity or the ADM suite)
    python prepare_ref.py --data_path ./data/imagenet --img_size 256 --png_dir ./data/imagenet-train-256
    # the statistics file evaluation reads, computed directly (any number of GPUs)
    torchrun --nproc_per_node=8 prepare_ref.py --data_path ./data/imagenet --img_size 256 \
        --stats fid_stats/jit_in256_stats.npz
    # precision / recall features of 50,000 random images, and FD-DINOv2 statistics (docs/evaluation.md)
    torchrun --nproc_per_node=8 prepare_ref.py --data_path ./data/imagenet --img_size 256 \
        --ref_features fid_stats/jit_in256_features50k.npz --ref_features_num 50000 \
        --dinov2_stats fid_stats/jit_in256_dinov2_stats.npz --dinov2_weights dinov2_vitl14_pretrain.pth

Images are read from {data_path}/train (an ImageFolder tree) in its sorted order, center-cropped
like training (or from an image store made by prepare_data.py, which holds those crops), and either
written as {index}.png or fed in memory to torch-fidelity's Inception (and DINOv2); the statistics
equal torch-fidelity's on the PNG folder. Rank 0 holds all features (ImageNet: 1.28M × 2048 float32
= 10.5 GB of pool features, ~32 GB peak while computing the covariance; DINOv2 adds 1.28M × 1024).
With --ref_features and a subset alone (no --stats, --dinov2_stats or --png_dir), only the subset's
images are read.
"""

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from util import distributed, fid, prc
from util.config import RunConfig, parse
from util.data import open_dataset
from util.dinov2 import DINOv2
from util.errors import BadValue, exit_code
from util.evaluation import gather_rows
from util.files import atomic_write


def get_args_parser():
    parser = argparse.ArgumentParser("Prepare FID reference images / statistics", add_help=True)
    parser.add_argument(
        "--data_path",
        default="./data/imagenet",
        type=str,
        help="folder with an ImageFolder tree under train/, or an image store (prepare_data.py)",
    )
    parser.add_argument("--img_size", default=256, type=int)
    parser.add_argument("--png_dir", default=None, type=str, help="write the center-cropped images here as PNGs")
    parser.add_argument("--stats", default=None, type=str, help="write Inception statistics (mu, sigma) to this .npz")
    parser.add_argument(
        "--inception_weights",
        default=None,
        type=str,
        help="local Inception-v3 weights (torch-fidelity's file); downloaded if omitted",
    )
    parser.add_argument(
        "--ref_features",
        default=None,
        type=str,
        help="write the Inception pool features (precision / recall) to this .npz (ImageNet: 10.5 GB; see "
        "--ref_features_num)",
    )
    parser.add_argument(
        "--ref_features_num",
        default=None,
        type=int,
        help="--ref_features of this many images drawn at random (--seed) instead of all (50000: 410 MB)",
    )
    parser.add_argument("--seed", default=0, type=int, help="draws the --ref_features_num images")
    parser.add_argument(
        "--dinov2_stats", default=None, type=str, help="write DINOv2 statistics (FD-DINOv2) to this .npz"
    )
    parser.add_argument(
        "--dinov2_weights",
        default=None,
        type=str,
        help="local DINOv2 ViT-L/14 weights for --dinov2_stats (dinov2_vitl14_pretrain.pth or timm's)",
    )
    parser.add_argument("--batch_size", default=128, type=int, help="images per Inception batch, per process")
    parser.add_argument("--num_workers", default=8, type=int)
    parser.add_argument("--device", default="cuda", type=str)
    parser.add_argument("--dist_on_itp", action="store_true")
    parser.add_argument("--dist_url", default="env://")
    return parser


def parse_args(argv=None) -> RunConfig:
    """The flags as given (util.config.RunConfig; `given`: the flags typed)."""
    return parse(get_args_parser(), argv)


def check_ref_args(args):
    """BadValue for a command that cannot work, before any work."""
    if not (args.png_dir or args.stats or args.ref_features or args.dinov2_stats):
        raise BadValue("nothing to do: give --png_dir, --stats, --ref_features and/or --dinov2_stats")
    if bool(args.dinov2_stats) != bool(args.dinov2_weights):
        raise BadValue("--dinov2_stats and --dinov2_weights go together (the statistics of that network's features)")
    if args.ref_features_num is not None and not args.ref_features:
        raise BadValue("--ref_features_num chooses the images of --ref_features: add --ref_features PATH")
    if args.ref_features_num is not None and args.ref_features_num <= prc.K:
        raise BadValue(f"--ref_features_num must be more than k = {prc.K}, got {args.ref_features_num}")
    if args.batch_size < 1 or args.img_size < 1:
        raise BadValue(f"--batch_size and --img_size must be at least 1, got {args.batch_size} and {args.img_size}")
    if args.seed < 0:
        raise BadValue(f"--seed must be non-negative (it seeds numpy's generator), got {args.seed}")


def images_to_read(args, n: int) -> np.ndarray:
    """The dataset indices to read: all of them, or only --ref_features_num random ones when nothing
    else needs the whole set. BadValue, before any image is read, when --ref_features would hold no more
    than k images (evaluation refuses such a file); a note when --ref_features_num asks for more than
    the dataset's n images (it then holds all of them)."""
    if args.ref_features and min(n, args.ref_features_num or n) <= prc.K:
        raise BadValue(
            f"--ref_features: precision and recall need more than k = {prc.K} reference images, {args.data_path} "
            f"has {n}"
        )
    if args.ref_features and (args.ref_features_num or 0) > n:
        distributed.print0(
            f"note: --ref_features_num {args.ref_features_num} is more than the {n} images of {args.data_path}: "
            "--ref_features holds all of them"
        )
    if args.png_dir or args.stats or args.dinov2_stats:
        return np.arange(n, dtype=np.int64)
    return prc.subset(n, args.ref_features_num, args.seed)


def read_features(args, dataset, wanted: np.ndarray, inception, dinov2, device) -> tuple:
    """Read this rank's contiguous share of the `wanted` images, write them as PNGs (--png_dir) and
    return its (Inception pool features or None, DINOv2 features or None), CPU float32."""
    rank, world = distributed.get_rank(), distributed.get_world_size()
    mine = wanted[rank * len(wanted) // world : (rank + 1) * len(wanted) // world]
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=[(int(i), False) for i in mine],
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
    )
    width = max(5, len(str(len(dataset) - 1)))
    pools, dinos, done = [], [], 0
    for b, (images, _, _) in enumerate(loader):  # images: (B, 3, size, size) uint8
        if args.png_dir:
            for j, img in enumerate(images):
                pil = Image.fromarray(img.permute(1, 2, 0).numpy())
                name = os.path.join(args.png_dir, f"{int(mine[done + j]):0{width}d}.png")
                atomic_write(name, lambda f, pil=pil: pil.save(f, format="PNG"))
        if inception is not None:
            pools.append(inception.features(images)[:, : fid.FEATURE_DIM].contiguous())
        if dinov2 is not None:
            dinos.append(dinov2.features(images))
        done += len(images)
        if b % 100 == 0:
            distributed.print0(f"rank 0: {done}/{len(mine)} images")
    pool = (torch.cat(pools) if pools else torch.empty((0, fid.FEATURE_DIM))) if inception else None
    dino = (torch.cat(dinos) if dinos else torch.empty((0, dinov2.dim))) if dinov2 else None
    return pool, dino


def write_outputs(args, pool, dino, wanted: np.ndarray, total: int):
    """Rank 0: the statistics and features files of all `wanted` images' features (in their order)."""
    if args.stats:
        fid.save_stats(args.stats, fid.statistics(pool), args.img_size)
        distributed.print0(f"wrote Inception statistics of {pool.shape[0]} images to {args.stats}")
    if args.ref_features:
        chosen = prc.subset(total, args.ref_features_num, args.seed)
        rows = torch.from_numpy(np.searchsorted(wanted, chosen))
        prc.save_features(args.ref_features, pool[rows], chosen, total, args.img_size)
        distributed.print0(f"wrote the pool features of {len(chosen)} of {total} images to {args.ref_features}")
    if args.dinov2_stats:
        fid.save_stats(args.dinov2_stats, fid.statistics(dino), args.img_size)
        distributed.print0(f"wrote DINOv2 statistics of {dino.shape[0]} images to {args.dinov2_stats}")


def main(args):
    """Write the PNGs, statistics and features; BadInput for bad input, WriteError for a failed write (see cli)."""
    check_ref_args(args)
    device = distributed.init(args.device, args.dist_on_itp, args.dist_url)
    inception = fid.Inception(args.inception_weights, device) if args.stats or args.ref_features else None
    dinov2 = DINOv2(args.dinov2_weights, device) if args.dinov2_stats else None
    dataset = open_dataset(args.data_path, args.img_size)
    wanted = images_to_read(args, len(dataset))
    if args.png_dir:
        os.makedirs(args.png_dir, exist_ok=True)
    pool, dino = read_features(args, dataset, wanted, inception, dinov2, device)
    pool = gather_rows(pool, device) if pool is not None else None  # (len(wanted), 2048) on rank 0
    dino = gather_rows(dino, device) if dino is not None else None
    if distributed.is_main_process():
        write_outputs(args, pool, dino, wanted, len(dataset))
    distributed.barrier()
    if args.png_dir:
        distributed.print0(f"wrote {len(dataset)} images to {args.png_dir}")


def cli(argv=None) -> int:
    """Exit status as util.errors: 2 for bad input (one line), 1 for a file that could not be written."""
    code = exit_code(main, parse_args(argv))
    distributed.shutdown()  # not after a bug: a rank that raised leaves at once, so that the launcher ends the others
    return code


if __name__ == "__main__":
    sys.exit(cli())
