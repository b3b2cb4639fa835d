"""Run under torchrun (CPU, gloo) by test_evaluation.py: generate and evaluate with the tiny denoiser.

Writes to --out (rank 0): the gathered images of the real network at --gen_bsz, the gathered images
of its batch-invariant per-image wrapper at --gen_bsz_per_sample, and every rank's engine_eval.evaluate() record.
Prints every rank's thread count before joining the process group and after leaving it.
"""

import argparse
import os
import time

import torch
from helpers import TINY_MODEL, PerSample, evaluation_of, generated, tiny_denoiser

from engine_eval import evaluate
from sampling import SamplerSettings
from util import distributed
from util.evaluation import GenerationSpec, Scorer, gather_rows
from util.logger import RunLog

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--num_images", type=int, required=True)
p.add_argument("--gen_bsz", type=int, required=True)
p.add_argument("--gen_bsz_per_sample", type=int, required=True)
p.add_argument("--fid_stats", required=True)
p.add_argument("--inception_weights", required=True)
p.add_argument("--output_dir", required=True)
args = p.parse_args()


def threads() -> list[str]:
    """The names of this process's threads (Linux)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # it ended while being listed
            pass
    return names


def threads_after(count: int, wait_s: float = 5.0) -> list[str]:
    """The threads once at most `count` remain, waiting up to wait_s: a joined thread can still be
    listed for a moment while the kernel finishes its exit; a leaked one stays."""
    deadline = time.time() + wait_s
    while len(names := threads()) > count and time.time() < deadline:
        time.sleep(0.05)
    return names


threads_before = len(threads())
device = distributed.init("cpu")
rank = distributed.get_rank()
denoiser = tiny_denoiser()
spec = GenerationSpec(
    num_images=args.num_images,
    class_num=TINY_MODEL["class_num"],
    img_size=TINY_MODEL["img_size"],
    sampler=SamplerSettings(steps=2, cfg=2.0, interval_min=0.1),
    gen_bsz=args.gen_bsz,
    seed=5,
)
images = gather_rows(generated(denoiser, spec), device)
per_sample = gather_rows(
    generated(
        denoiser, GenerationSpec(**{**vars(spec), "gen_bsz": args.gen_bsz_per_sample}), net=PerSample(denoiser.net)
    ),
    device,
)
log = RunLog(args.output_dir)
scorer = Scorer(args.fid_stats, args.inception_weights, device)
result = evaluate(evaluation_of(denoiser, spec, scorer, log, args.output_dir), epoch=3, weights_epoch=3)
log.close()
results = distributed.all_gather_object(result)
if distributed.is_main_process():
    torch.save({"images": images, "per_sample": per_sample, "results": results}, args.out)
distributed.shutdown()
left = threads_after(threads_before)
print(f"rank {rank}: {threads_before} threads before init, {len(left)} after shutdown ({', '.join(left)})", flush=True)
