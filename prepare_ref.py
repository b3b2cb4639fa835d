"""Reference data for FID: the ADM center-cropped ImageNet train set as PNGs and/or its statistics.

    # the reference's job: a folder of center-cropped PNGs (for torch-fidelity or the ADM suite)
    python prepare_ref.py --data_path ./data/imagenet --img_size 256 --png_dir ./data/imagenet-train-256
    # the statistics file evaluation reads, computed directly (any number of GPUs)
    torchrun --nproc_per_node=8 prepare_ref.py --data_path ./data/imagenet --img_size 256 \
        --stats fid_stats/jit_in256_stats.npz

Images are read from {data_path}/train (an ImageFolder tree) in its sorted order, center-cropped
like training (or from an image store made by prepare_data.py, which holds those crops), and either
written as {index}.png or fed in memory to torch-fidelity's Inception;
the statistics equal torch-fidelity's on the PNG folder. Rank 0 holds all pool features
(1.28M × 2048 float32 = 10.5 GB for ImageNet, ~32 GB peak while computing the covariance).
"""

import argparse
import os
import sys

import torch
from PIL import Image
from torch.utils.data import DataLoader

from util import distributed, fid
from util.config import RunConfig, parse
from util.data import open_dataset
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
    parser.add_argument("--batch_size", default=128, type=int, help="images per Inception batch, per process")
    parser.add_argument("--num_workers", default=8, type=int)
    parser.add_argument("--device", default="cuda", type=str)
    parser.add_argument("--dist_on_itp", action="store_true")
    parser.add_argument("--dist_url", default="env://")
    return parser


def parse_args(argv=None) -> RunConfig:
    """The flags as given (util.config.RunConfig; `given`: the flags typed)."""
    return parse(get_args_parser(), argv)


def main(args):
    """Write the PNGs and / or the statistics; BadInput for bad input, WriteError for a failed write (see cli)."""
    if not (args.png_dir or args.stats):
        raise BadValue("nothing to do: give --png_dir and/or --stats")
    device = distributed.init(args.device, args.dist_on_itp, args.dist_url)
    inception = fid.Inception(args.inception_weights, device) if args.stats else None
    dataset = open_dataset(args.data_path, args.img_size)
    n, rank, world = len(dataset), distributed.get_rank(), distributed.get_world_size()
    lo, hi = rank * n // world, (rank + 1) * n // world  # this rank's contiguous share, in dataset order
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=[(i, False) for i in range(lo, hi)],
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
    )
    if args.png_dir:
        os.makedirs(args.png_dir, exist_ok=True)
    width = max(5, len(str(n - 1)))
    features, index = [], lo
    for b, (images, _, _) in enumerate(loader):  # images: (B, 3, size, size) uint8
        if args.png_dir:
            for img in images:
                pil = Image.fromarray(img.permute(1, 2, 0).numpy())
                atomic_write(
                    os.path.join(args.png_dir, f"{index:0{width}d}.png"), lambda f, pil=pil: pil.save(f, format="PNG")
                )
                index += 1
        if inception is not None:
            features.append(inception.features(images)[:, : fid.FEATURE_DIM].contiguous())
        if b % 100 == 0:
            distributed.print0(f"rank 0: {b * args.batch_size}/{hi - lo} images")
    if inception is not None:
        share = torch.cat(features) if features else torch.empty((0, fid.FEATURE_DIM))
        pool = gather_rows(share, device)  # (n, 2048) on rank 0
        if distributed.is_main_process():
            fid.save_stats(args.stats, fid.statistics(pool))
            distributed.print0(f"wrote statistics of {pool.shape[0]} images to {args.stats}")
    distributed.barrier()
    if args.png_dir:
        distributed.print0(f"wrote {n} images to {args.png_dir}")


def cli(argv=None) -> int:
    """Exit status as util.errors: 2 for bad input (one line), 1 for a file that could not be written."""
    code = exit_code(main, parse_args(argv))
    distributed.shutdown()  # not after a bug: a rank that raised leaves at once, so that the launcher ends the others
    return code


if __name__ == "__main__":
    sys.exit(cli())
