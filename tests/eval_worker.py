"""Run under torchrun (CPU, gloo) by test_evaluation.py: generate and evaluate with the tiny denoiser.

Writes to --out (rank 0): the gathered images of the real network at --gen_bsz, the gathered images
of its batch-invariant per-image wrapper at --gen_bsz_per_sample, and every rank's evaluate() result.
"""
import argparse

import torch

from eval_helpers import TINY, PerSample, tiny_denoiser
from util import distributed
from util.evaluation import evaluate, gather_rows, generate_images

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--num_images", type=int, required=True)
p.add_argument("--gen_bsz", type=int, required=True)
p.add_argument("--gen_bsz_per_sample", type=int, required=True)
p.add_argument("--fid_stats", required=True)
p.add_argument("--inception_weights", required=True)
p.add_argument("--output_dir", required=True)
args = p.parse_args()

device = distributed.init("cpu")
denoiser = tiny_denoiser()
common = dict(device=device, num_images=args.num_images, class_num=TINY["class_num"], seed=5, img_size=TINY["img_size"],
              sampler=dict(steps=2, method="heun", cfg=2.0, interval_min=0.1, interval_max=1.0))
images = gather_rows(generate_images(denoiser, gen_bsz=args.gen_bsz, **common), device)
per_sample = gather_rows(generate_images(denoiser, net=PerSample(denoiser.net), gen_bsz=args.gen_bsz_per_sample, **common), device)
result = evaluate(denoiser, gen_bsz=args.gen_bsz, fid_stats=args.fid_stats, inception_weights=args.inception_weights,
                  output_dir=args.output_dir, epoch=3, **common)
results = distributed.all_gather_object(result)
if distributed.is_main_process():
    torch.save({"images": images, "per_sample": per_sample, "results": results}, args.out)
distributed.shutdown()
