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
sys.path.insert(0, ROOT)

import main_jit  # noqa: E402
from util.config import RunConfig, parse  # noqa: E402
from util.errors import MissingFile, exit_code  # noqa: E402


def write_reference_format(src: str, dst: str) -> dict:
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    for group in ckpt["optimizer"]["param_groups"]:
        group["fused"] = None
    ref = {k: ckpt[k] for k in ("model", "model_ema1", "model_ema2", "optimizer", "epoch")}
    torch.save({**ref, "args": argparse.Namespace(**ckpt["args"])}, dst)
    return ref


def get_args_parser():
    p = argparse.ArgumentParser("Resume from a checkpoint in the reference's format")
    p.add_argument("checkpoint", help="a checkpoint of this repository (checkpoint-last.pth of a run)")
    p.add_argument("output", help="the folder main_jit.py resumes in (--output_dir)")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="main_jit.py's flags for the run (e.g. --demo)")
    return p


def parse_args(argv=None) -> RunConfig:
    """The flags as given (util.config.RunConfig), as every script's."""
    return parse(get_args_parser(), argv)


def main(args: RunConfig) -> int:
    """Rewrite, resume, check: 0 when every AdamW step counter advanced by the epoch's steps, 1 when
    not or main_jit.py failed; MissingFile / BadValue before any work (see cli)."""
    if not os.path.isfile(args.checkpoint):
        raise MissingFile(f"{args.checkpoint}: no such checkpoint file")
    main_jit.parse_args(args.flags)  # its flags, checked by its parser before any work
    out = args.output
    os.makedirs(out, exist_ok=True)
    ref = write_reference_format(args.checkpoint, os.path.join(out, "reference-format.pth"))
    code = subprocess.call(
        [
            sys.executable,
            os.path.join(ROOT, "main_jit.py"),
            *args.flags,
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


def cli(argv=None) -> int:
    """Exit status as util.errors: 2 for bad input (one line on stderr), else main's."""
    return exit_code(main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
