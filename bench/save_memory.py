"""Host memory of saving and of resuming a sharded (FSDP) run: how much each rank's anonymous memory
(RssAnon) rises during its checkpoint save and during its resume, 2 processes on the CPU (gloo).

    python bench/save_memory.py                                 # JiT-B/16 at 32 px, this checkout
    python bench/save_memory.py --root /path/to/other/checkout  # the same with another version's code
    python bench/save_memory.py --model JiT-T/4 --img_size 16   # quick

Two torchrun launches of `main_jit.py --fsdp` from --root: one optimiser step on a few generated
images, ending with the save of checkpoint-last (measured), then `--resume --dry_run` of it (the
resume measured). Each worker runs main_jit.cli with Checkpointer.save and Checkpointer.load /
restore timed: a thread samples the process's own RssAnon (/proc/self/status) every --interval_ms,
and a phase's figure is its peak less the value when it began. Reported per rank and phase as a
multiple of the full training state (model, EMAs, power EMAs and AdamW's two moments, float32),
and the goal's measure: the largest rise of one rank beyond another's. Memory-mapped file pages
(the page cache) are not anonymous memory and do not count.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from resume_memory import free_port, make_images  # noqa: E402  (this folder is on sys.path)

PHASES = ("save", "resume")


def get_args_parser():
    p = argparse.ArgumentParser("host memory of FSDP saves and resumes", description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--model", default="JiT-B/16")
    a("--img_size", type=int, default=32, help="the parameter count hardly depends on it (position embedding)")
    a("--class_num", type=int, default=4, help="also the images: one per class, one step of 2 per process")
    a("--phema_stds", type=float, nargs="+", default=None, help="also track these power EMAs")
    a("--root", default=ROOT, help="the checkout whose main_jit.py runs (default: this one)")
    a("--interval_ms", type=float, default=20.0)
    a("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    a("--json", default=None, help="also write the results here")
    a("--worker", nargs=argparse.REMAINDER, default=None, help=argparse.SUPPRESS)  # internal: one torchrun worker
    return p


def parse_args(argv=None):
    return get_args_parser().parse_args(argv)


def run_worker(root: str, argv: list, interval: float, report: str):
    """One rank: main_jit.cli(argv) of `root` with its Checkpointer's save and load/restore measured;
    appends {"rank", "phase", "rise", "state"} lines to `report`."""
    import threading
    import time

    sys.path.insert(0, root)
    import main_jit
    from util import checkpoint

    owner = sys.modules["util.checkpointer"] if os.path.isfile(os.path.join(root, "util", "checkpointer.py")) else None
    cls = (owner or checkpoint).Checkpointer
    rank = int(os.environ["RANK"])
    current = {"phase": None, "start": 0, "peak": 0}

    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    def sample():
        while True:
            if current["phase"]:
                current["peak"] = max(current["peak"], rss())
            time.sleep(interval)

    threading.Thread(target=sample, daemon=True).start()

    def measured(name, phase, begins: bool, ends: bool):
        real = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            if begins:
                current.update(phase=phase, start=rss(), peak=rss())
            result = real(self, *args, **kwargs)
            if name == "load" and result[0] is None:  # nothing to resume: no phase
                current["phase"] = None
            if ends:
                current["peak"] = max(current["peak"], rss())
                state = checkpoint.estimated_size(self.denoiser, 1 + len(self.emas) + len(self.phemas))
                line = {"rank": rank, "phase": phase, "rise": current["peak"] - current["start"], "state": state}
                with open(report, "a") as f:
                    f.write(json.dumps(line) + "\n")
                current["phase"] = None
            return result

        setattr(cls, name, wrapper)

    measured("save", "save", begins=True, ends=True)
    measured("load", "resume", begins=True, ends=False)
    measured("restore", "resume", begins=False, ends=True)
    sys.exit(main_jit.cli(argv))


def launch(args, work: str, extra: list, report: str):
    """torchrun of 2 workers (this script's --worker mode) running main_jit.py of --root."""
    common = ["--model", args.model, "--img_size", args.img_size, "--class_num", args.class_num, "--device", "cpu"]
    common += ["--num_workers", 0, "--no_compile", "--data_path", os.path.join(work, "data"), "--fsdp"]
    common += ["--batch_size", 2, "--epochs", 1, "--warmup_epochs", 1, "--lr", 1e-4, "--sample_every", 0]
    stds = args.phema_stds or []
    common += ["--output_dir", os.path.join(work, "run"), *(["--phema_stds", *stds] if stds else [])]
    worker = [os.path.abspath(__file__), "--worker", args.root, str(args.interval_ms / 1000), report]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={free_port()}", *worker, *map(str, common + extra)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": args.root}
    p = subprocess.run(cmd, cwd=args.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited with {p.returncode}:\n{p.stdout[-3000:]}")


def main(args) -> dict:
    """Run both launches; print and return {phase: {rank: rise as a multiple of the state}, ...}."""
    if args.worker is not None:
        root, interval, report, *argv = args.worker
        run_worker(root, argv, float(interval), report)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or tmp
        make_images(os.path.join(work, "data"), args.class_num, 1, args.img_size)  # one step of 2 × 2 images
        report = os.path.join(work, "memory.jsonl")
        if os.path.exists(report):
            os.remove(report)
        launch(args, work, [], report)
        launch(args, work, ["--resume", os.path.join(work, "run"), "--dry_run"], report)
        with open(report) as f:
            lines = [json.loads(line) for line in f]
    state = lines[0]["state"]
    result = {"model": args.model, "img_size": args.img_size, "phema_stds": args.phema_stds, "root": args.root}
    result["state_bytes"] = state
    print(f"{args.model} at {args.img_size}px, --root {args.root}: training state {state / 2**30:.3f} GiB, 2 processes")
    for phase in PHASES:
        rises = {r["rank"]: r["rise"] / state for r in lines if r["phase"] == phase}
        beyond = max(rises.values()) - min(rises.values())
        result[phase] = {"rise_over_state": rises, "beyond_another_rank": beyond}
        print(
            f"  {phase}: rise "
            + ", ".join(f"rank {r} {x:.2f}×" for r, x in sorted(rises.items()))
            + f"; one rank beyond another {beyond:.2f}× (goal: at most 0.25×)"
        )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def cli(argv=None) -> int:
    main(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
