"""Resume training on this machine's device from a checkpoint in the reference release's exact format.

    python bench/reference_resume.py output_dir/demo/checkpoint-last.pth ./ref_resume --demo

Rewrites CHECKPOINT as the reference writes its files (args an argparse.Namespace; AdamW param groups
with fused=None and `step` counters on the CPU; no resume point or RNG states), then runs main_jit.py
with the given flags for one more epoch from it, and checks that every AdamW step counter advanced
by the epoch's steps. On CUDA this is the path where fused AdamW refuses CPU step counters unless
loading moves them (a gpu_check.sh step). Exit status 0 when it worked.
"""

import argparse
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_reference_format(src: str, dst: str) -> dict:
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    for group in ckpt["optimizer"]["param_groups"]:
        group["fused"] = None
    ref = {k: ckpt[k] for k in ("model", "model_ema1", "model_ema2", "optimizer", "epoch")}
    torch.save({**ref, "args": argparse.Namespace(**ckpt["args"])}, dst)
    return ref


def main(argv):
    src, out, flags = argv[0], argv[1], argv[2:]
    os.makedirs(out, exist_ok=True)
    ref = write_reference_format(src, os.path.join(out, "reference-format.pth"))
    code = subprocess.call(
        [
            sys.executable,
            os.path.join(ROOT, "main_jit.py"),
            *flags,
            "--resume",
            os.path.join(out, "reference-format.pth"),
            "--output_dir",
            out,
            "--epochs",
            str(ref["epoch"] + 2),
        ]
    )
    if code != 0:
        return code
    new = torch.load(os.path.join(out, "checkpoint-last.pth"), map_location="cpu", weights_only=True)
    before = {float(s["step"]) for s in ref["optimizer"]["state"].values()}
    after = {float(s["step"]) for s in new["optimizer"]["state"].values()}
    print(f"AdamW steps {sorted(before)} -> {sorted(after)}; epoch {ref['epoch']} -> {new['epoch']}")
    return (
        0 if len(before) == len(after) == 1 and after.pop() > before.pop() and new["epoch"] == ref["epoch"] + 1 else 1
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
