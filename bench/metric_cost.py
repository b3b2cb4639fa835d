"""What the metrics beside FID / IS cost per evaluation of 50,000 images (issue 36).

    python bench/metric_cost.py --device cpu --threads 2 --json metric_cost.json
    python bench/metric_cost.py --device cuda --dinov2_images 512 --batch 128 --prc_sizes 10000 20000 50000

1. Network passes per image, at the evaluation's 256 px uint8 input: torch-fidelity's Inception-v3
   (what FID / IS already pay; precision / recall reuse its pool features) and DINOv2 ViT-L/14
   (FD-DINOv2's extra pass: util.dinov2 with random weights; the weights do not change the cost),
   float32 as evaluation runs them, after one untimed warm-up batch; scaled to 50,000 images.
2. Precision / recall (util.prc: torch-fidelity's computation, k = 3) of n generated against n
   reference 2048-d features, for each of --prc_sizes; its cost grows as n², and the figure for
   50,000 against 50,000 is measured when listed, else scaled from the largest size by (50,000 / n)².
3. The Fréchet distance of 1024-d DINOv2 statistics (the matrix square root), once per evaluation.
With --eval_seeds N, all of it is paid N times. Timings depend on the machine and its load.
"""

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench import sync  # noqa: E402  (bench/bench.py: this folder is on sys.path)
from util import dinov2, fid, prc  # noqa: E402

IMAGES = 50_000


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def random_inception(device: torch.device):
    """torch-fidelity's Inception-v3 extractor with random weights (no download)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Untrained(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    with tempfile.NamedTemporaryFile(suffix=".pth") as f:
        torch.save({}, f.name)
        net = Untrained("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=f.name)
    return net.to(device).eval()


def random_dinov2_large(device: torch.device):
    """util.dinov2's ViT-L/14 (DINOv2's release shape: 518 px position grid) with random weights."""
    from timm.models.vision_transformer import VisionTransformer

    shape = dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16, init_values=1.0)
    state = VisionTransformer(img_size=518, num_classes=0, **shape).state_dict()
    return dinov2.build_dinov2(state, "random ViT-L/14").to(device)


def flops_per_image(fn, images: torch.Tensor) -> float:
    """Floating-point operations of fn on one image (torch's FlopCounterMode: matrix products and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn(images[:1])
    return counter.get_total_flops()


def per_image(name: str, fn, images: torch.Tensor, batch: int, device: torch.device) -> dict:
    """Seconds and FLOPs per image of fn(uint8 batch) over `images`, after one untimed batch."""
    with torch.no_grad():
        fn(images[:batch])
        seconds = sum(timed(lambda b=b: fn(images[b : b + batch]), device) for b in range(0, len(images), batch))
    s, flops = seconds / len(images), flops_per_image(fn, images)
    print(
        f"{name}: {flops / 1e9:.1f} GFLOP and {s * 1e3:.1f} ms per image ({len(images)} images, batch {batch}); "
        f"{s * IMAGES / 3600:.2f} h per 50K"
    )
    return {"what": name, "gflop_per_image": flops / 1e9, "s_per_image": s, "s_per_50k": s * IMAGES}


def prc_cost(sizes: list[int], device: torch.device) -> list[dict]:
    """Precision / recall seconds for n against n random 2048-d features, each n of `sizes`."""
    pairs = (2 * IMAGES) ** 2  # torch-fidelity's k-NN radii of both sets and both cross distances: (n + n)² pairs
    print(f"precision / recall, 50K vs 50K: {pairs:.1e} distances of 2048-d features, ~{2 * 2048 * pairs:.1e} FLOP")
    rows = []
    for n in sizes:
        gen, ref = torch.randn(n, fid.FEATURE_DIM), torch.randn(n, fid.FEATURE_DIM)
        s = timed(lambda gen=gen, ref=ref: prc.precision_recall(gen, ref, device), device)
        print(f"precision / recall, {n} vs {n}: {s:.1f} s; scaled to 50K vs 50K: {s * (IMAGES / n) ** 2 / 60:.1f} min")
        rows.append({"what": f"precision/recall {n} vs {n}", "s": s, "s_per_50k": s * (IMAGES / n) ** 2})
    return rows


def get_args_parser():
    p = argparse.ArgumentParser("cost of precision / recall and FD-DINOv2 per 50K images")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", default=None, type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--inception_images", default=16, type=int)
    p.add_argument("--dinov2_images", default=8, type=int)
    p.add_argument("--batch", default=8, type=int)
    p.add_argument("--img_size", default=256, type=int)
    p.add_argument("--prc_sizes", default=[1000, 2000, 4000], type=int, nargs="+")
    p.add_argument("--json", default=None)
    return p


def main():
    args = get_args_parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    n = max(args.inception_images, args.dinov2_images)
    images = torch.randint(0, 256, (n, 3, args.img_size, args.img_size), dtype=torch.uint8).to(device)
    inception, vit = random_inception(device), random_dinov2_large(device)
    rows = [
        per_image("Inception-v3 (FID / IS; precision / recall reuse it)", inception, images[: args.inception_images],
                  args.batch, device),
        per_image("DINOv2 ViT-L/14 (FD-DINOv2)", lambda x: vit(dinov2.preprocess(x)), images[: args.dinov2_images],
                  args.batch, device),
    ]  # fmt: skip
    rows += prc_cost(args.prc_sizes, device)
    feats = torch.randn(4000, 1024)
    stats = fid.statistics(feats)
    s = timed(lambda: fid.frechet_distance(stats, fid.statistics(feats + 0.1)), device)
    print(f"FD-DINOv2 from 1024-d features (statistics + matrix square root): {s:.1f} s per evaluation")
    rows.append({"what": "FD-DINOv2 statistics and distance", "s": s})
    env = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
