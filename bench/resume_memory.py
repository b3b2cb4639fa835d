"""Host memory of starting from a checkpoint: each rank's peak anonymous memory (RssAnon) during a
2-process `main_jit.py --dry_run`, with the checkpoint and without it.

    python bench/resume_memory.py                                # JiT-B/16 (2.4 GiB checkpoint): --resume, --init_from
    python bench/resume_memory.py --model JiT-T/4 --img_size 16  # quick (a 30 MB checkpoint)

Trains one optimiser step of --model on a few generated images in one process (the checkpoint:
model, two EMAs, AdamW's two moments; --phema_stds adds power EMAs), then starts the same
2-process CPU run (torchrun, gloo) three times with --dry_run: without a checkpoint, with
`--resume CHECKPOINT` and with `--init_from CHECKPOINT`. A thread samples every worker's RssAnon
(/proc/PID/status) every --interval_ms; a run's figure is each rank's peak. Reported per rank and
mode: the peak's rise over the run without a checkpoint, as a multiple of the checkpoint file's
size, and that rise less the AdamW moments a resumed run must hold (on a CPU run they live in host
memory; on CUDA in the GPU's). Memory-mapped file pages are not anonymous memory (they are the
page cache, one copy per node shared by its ranks), so they do not count.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("none", "resume", "init_from")


def make_images(root: str, classes: int, per_class: int, size: int):
    """root/train/c{k}/{i}.png: random RGB images."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = os.path.join(root, "train", f"c{c}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                os.path.join(folder, f"{i}.png")
            )


def rss_anon(pid: int) -> int | None:
    """Bytes of anonymous resident memory of a process (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def worker_ranks(launcher: int) -> dict:
    """{pid: rank} of the workers torchrun `launcher` started (its children with RANK set)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != launcher:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"RANK" in env:
            found[int(pid)] = int(env[b"RANK"])
    return found


def peak_rss_anon(cmd: list, env: dict, nproc: int, interval: float) -> tuple[list[int], str]:
    """Run `cmd` (a torchrun launch) and sample its workers' RssAnon; ([peak bytes of rank r], output)."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        peaks, ranks = [0] * nproc, {}
        while proc.poll() is None:
            if len(ranks) < nproc:
                ranks.update(worker_ranks(proc.pid))
            for pid, rank in ranks.items():
                peaks[rank] = max(peaks[rank], rss_anon(pid) or 0)
            time.sleep(interval)
        log.seek(0)
        out = log.read()
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited with {proc.returncode}:\n{out[-3000:]}")
    return peaks, out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adamw_bytes(path: str) -> int:
    """Bytes of the AdamW moments (exp_avg, exp_avg_sq) in a checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return sum(
        v.numel() * v.element_size()
        for s in ckpt["optimizer"]["state"].values()
        for k, v in s.items()
        if k in ("exp_avg", "exp_avg_sq")
    )


def get_args_parser():
    p = argparse.ArgumentParser("host memory of starting from a checkpoint", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="JiT-B/16")
    p.add_argument(
        "--img_size", type=int, default=32, help="the parameter count hardly depends on it (position embedding)"
    )
    p.add_argument("--class_num", type=int, default=4)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--phema_stds", type=float, nargs="+", default=None)
    p.add_argument("--modes", nargs="+", default=["resume", "init_from"], choices=MODES[1:])
    p.add_argument("--interval_ms", type=float, default=50.0)
    p.add_argument("--workdir", default=None, help="keep the checkpoint and runs here (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p


def parse_args(argv=None):
    return get_args_parser().parse_args(argv)


def measure_starts(args, work: str, env: dict) -> tuple[str, dict]:
    """Make the checkpoint (once per --workdir) and run the starts; (its path, {mode: [peak of rank r]})."""
    data = os.path.join(work, "data")
    batch = 2
    if not os.path.isdir(data):
        make_images(data, args.class_num, batch * args.nproc, args.img_size)
    common = ["--model", args.model, "--img_size", args.img_size, "--class_num", args.class_num, "--device", "cpu"]
    common += ["--num_workers", 0, "--no_compile", "--data_path", data, "--warmup_epochs", 1, "--lr", 1e-4]
    common += ["--phema_stds", *args.phema_stds] if args.phema_stds else []
    ckpt = os.path.join(work, "source", "checkpoint-last.pth")
    if not os.path.isfile(ckpt):  # one process, one step: every image in one batch
        cmd = [sys.executable, "main_jit.py", *common, "--batch_size", batch * args.nproc * args.class_num]
        cmd += ["--epochs", 1, "--output_dir", os.path.dirname(ckpt)]
        subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    results = {}
    for mode in ("none", *args.modes):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}"]
        cmd += ["--master_addr=127.0.0.1", f"--master_port={free_port()}", "main_jit.py", *common]
        cmd += ["--batch_size", batch, "--epochs", 2, "--dry_run"]
        cmd += ["--output_dir", os.path.join(work, f"run-{mode}"), *([] if mode == "none" else [f"--{mode}", ckpt])]
        results[mode] = peak_rss_anon([str(c) for c in cmd], env, args.nproc, args.interval_ms / 1000)[0]
    return ckpt, results


def main(args) -> dict:
    """Make the checkpoint, run the three starts; print and return the report."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, results = measure_starts(args, args.workdir or tmp, env)
        size, adamw = os.path.getsize(ckpt), adamw_bytes(ckpt)
    report = {
        "model": args.model,
        "img_size": args.img_size,
        "nproc": args.nproc,
        "phema_stds": args.phema_stds,
        "checkpoint_bytes": size,
        "adamw_bytes": adamw,
        "peak_rss_anon": results,
        "rise_over_checkpoint": {},
        "beyond_adamw_over_checkpoint": {},
    }
    print(
        f"{args.model} at {args.img_size}px: checkpoint {size / 2**30:.3f} GiB, AdamW moments {adamw / size:.2f}× of "
        f"it; {args.nproc} processes, peak RssAnon sampled every {args.interval_ms:g} ms"
    )
    print(
        "  without a checkpoint: " + ", ".join(f"rank {r} {b / 2**30:.3f} GiB" for r, b in enumerate(results["none"]))
    )
    for mode in args.modes:
        rise = [(a - b) / size for a, b in zip(results[mode], results["none"])]
        beyond = [r - (adamw / size if mode == "resume" else 0.0) for r in rise]
        report["rise_over_checkpoint"][mode], report["beyond_adamw_over_checkpoint"][mode] = rise, beyond
        print(
            f"  --{mode}: rise "
            + ", ".join(f"rank {r} {x:.2f}×" for r, x in enumerate(rise))
            + (
                "; beyond the AdamW moments " + ", ".join(f"rank {r} {x:.2f}×" for r, x in enumerate(beyond))
                if mode == "resume"
                else ""
            )
        )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


def cli(argv=None) -> int:
    main(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
