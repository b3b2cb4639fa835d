"""ODE inversion: the noise z₀ from which the sampler (the same settings, the same guidance) generates
given images, by integrating the sampler's ODE from t = 1 back to t = 0 (sampling.invert); CPU works.

    python invert.py --resume output_dir/checkpoint-last.pth --images photos --class_label 207 \
        --sampling_method unipc2 --num_sampling_steps 20 --cfg 1.0 --output inverted
    python invert.py --resume exported/jit-b16 --images val_tree --roundtrip --output inverted

--images is a folder of image files (all of class --class_label) or an ImageFolder tree
(FOLDER/<class>/<image>, the class index by the sorted folder names as in training; --class_label
overrides it). Each image is ADM-center-cropped to the weights' resolution, as in training. Writes
OUTPUT/noise.pt: {"noise": (N, 3, H, W) float32, "labels": (N,), "files": the images in order,
"sampler": the settings, "t_eps", "noise_scale"}. --roundtrip then generates from the recovered
noise with the same sampler, writes the images to OUTPUT/roundtrip/ and prints the RMSE against
the input in uint8 levels: the inversion's error (it falls as the steps grow). The weights and
sampler flags are sample.py's (an exported folder brings its recommended sampler).
"""

import argparse
import os
import sys
from dataclasses import asdict

import numpy as np
import torch

import sample as sample_script
from model_jit import JiT_models
from sampling import invert
from util import distributed
from util.cli import HelpFormatter
from util.config import RunConfig, parse
from util.data import load_center_crop
from util.errors import BadValue, MissingFile, exit_code
from util.evaluation import quantize, save_pngs
from util.files import atomic_write
from util.sweep import add_sampler_args, check_denoiser_flags, sampler_settings

# torchvision's IMG_EXTENSIONS: the files training's ImageFolder reads (any case)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def get_args_parser():
    parser = argparse.ArgumentParser("JiT ODE inversion", add_help=True, formatter_class=HelpFormatter)
    a = parser.add_argument
    a("--resume", required=True, help="checkpoint file, a folder holding checkpoint-*.pth, or an exported folder")
    a("--ema", default=1, type=int, choices=(1, 2, 3), help="which EMA's weights")
    a("--weights", default=None, choices=["ema1", "ema2", "ema3", "model"], help="which weights (overrides --ema)")
    a("--images", required=True, help="folder of images, or an ImageFolder tree (FOLDER/<class>/<image>)")
    a("--class_label", default=None, type=int, help="the class of every image (required for a flat folder)")
    add_sampler_args(parser)
    a("--batch", default=32, type=int, help="images per inversion call")
    a("--roundtrip", action="store_true", help="also generate from the recovered noise and report the error")
    a("--output", default="inverted", help="folder to write noise.pt (and roundtrip/) into")
    a("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    a("--model", default=None, choices=list(JiT_models), help="default: the weights'")
    a("--img_size", default=None, type=int, help="default: the weights'")
    a("--class_num", default=None, type=int, help="default: the weights'")
    a("--noise_scale", default=None, type=float, help="default: the weights'")
    a("--t_eps", default=None, type=float, help="default: the weights' (must be > 0 to invert)")
    return parser


def parse_args(argv=None) -> RunConfig:
    """The flags as given (util.config.RunConfig; `given`: the flags typed)."""
    return parse(get_args_parser(), argv)


def list_images(folder: str, class_label: int | None) -> tuple[list[str], list[int | None]]:
    """(files, labels) of a flat folder (labels: class_label) or of an ImageFolder tree (labels: the
    sorted position of the class folder, unless class_label is given). MissingFile / BadValue (one
    line) for a folder that holds no image or a flat folder without --class_label."""
    if not os.path.isdir(folder):
        raise MissingFile(f"--images {folder}: no such folder")
    entries = sorted(os.listdir(folder))
    classes = [e for e in entries if os.path.isdir(os.path.join(folder, e))]
    if classes:
        pairs = [
            (os.path.join(folder, c, f), k)
            for k, c in enumerate(classes)
            for f in sorted(os.listdir(os.path.join(folder, c)))
            if f.lower().endswith(EXTENSIONS)
        ]
    else:
        pairs = [(os.path.join(folder, f), None) for f in entries if f.lower().endswith(EXTENSIONS)]
    if not pairs:
        raise MissingFile(f"--images {folder} holds no image file ({', '.join(EXTENSIONS)})")
    if not classes and class_label is None:
        raise BadValue(f"--images {folder} is a flat folder: give the images' class with --class_label")
    files, labels = zip(*pairs)
    return list(files), [class_label if class_label is not None else k for k in labels]


def read_images(files: list[str], size: int) -> torch.Tensor:
    """(N, 3, size, size) in [-1, 1], each file ADM-center-cropped; BadValue for an unreadable one."""
    out = []
    for path in files:
        try:
            arr = load_center_crop(path, size)
        except Exception as e:  # PIL raises several types for bad files
            raise BadValue(f"cannot read image {path}: {type(e).__name__}: {e}") from None
        out.append(torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))))
    return torch.stack(out).float() / 127.5 - 1


def check_invertible(t_eps: float | None):
    """BadValue for t_eps = 0 (None: not known yet): the velocity at t = 1, where inversion starts, is undefined."""
    if t_eps is not None and t_eps <= 0:
        raise BadValue("inversion needs t_eps > 0 (with t_eps = 0 the velocity at t = 1 is undefined)")


def run_batches(fn, x: torch.Tensor, labels: torch.Tensor, batch: int, device) -> torch.Tensor:
    """fn(x batch, labels batch) over batches on `device`, concatenated on the CPU."""
    out = []
    for lo in range(0, len(x), batch):
        out.append(fn(x[lo : lo + batch].to(device), labels[lo : lo + batch].to(device)).cpu())
    return torch.cat(out)


def main(args: RunConfig) -> int:
    """Invert the images (and regenerate them with --roundtrip); BadInput for bad input (see cli)."""
    settings = sampler_settings(args)  # BadValue before any work
    check_denoiser_flags(args)
    check_invertible(args.t_eps)
    if args.batch < 1:
        raise BadValue(f"--batch must be >= 1, got {args.batch}")
    files, labels = list_images(args.images, args.class_label)
    device = distributed.init(args.device)
    loaded = sample_script.load(args)
    model, settings = loaded.denoiser.to(device), loaded.sampler
    check_invertible(model.t_eps)
    if max(labels) >= model.num_classes or min(labels) < 0:
        raise BadValue(f"class labels must be in [0, {model.num_classes}), got {min(labels)}..{max(labels)}")
    for note in loaded.notes:
        print(f"note: {note}")
    x = read_images(files, model.net.input_size)
    y = torch.tensor(labels)
    kw = dict(null_label=model.num_classes, t_eps=model.t_eps, pred=model.pred)
    with torch.no_grad():
        noise = run_batches(lambda xb, yb: invert(model.net, xb, yb, settings, **kw), x, y, args.batch, device)
    os.makedirs(args.output, exist_ok=True)
    record = dict(noise=noise.float(), labels=y, files=files, sampler=asdict(settings), t_eps=model.t_eps)
    record["noise_scale"] = model.noise_scale
    atomic_write(os.path.join(args.output, "noise.pt"), lambda f: torch.save(record, f))
    print(
        f"inverted {len(files)} images with {settings.method} {settings.steps} steps "
        f"({len(settings.evaluations(reverse=True))} NFE) to "
        f"{os.path.join(args.output, 'noise.pt')}: noise std {noise.std().item():.4f} (noise_scale {model.noise_scale})"
    )
    if args.roundtrip:
        with torch.no_grad():
            back = run_batches(lambda zb, yb: model.generate(yb, settings, noise=zb), noise, y, args.batch, device)
        os.makedirs(os.path.join(args.output, "roundtrip"), exist_ok=True)
        images = quantize(back)
        save_pngs(images, 0, os.path.join(args.output, "roundtrip"), len(files))
        err = (images.double() - quantize(x).double()).pow(2).mean().sqrt().item()
        print(f"round trip: RMSE {err:.3f} uint8 levels between the input and the images generated from the noise")
    return 0


def cli(argv=None) -> int:
    """Exit status as util.errors: 2 for bad input (one line), 1 for a file that could not be written."""
    return exit_code(main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
