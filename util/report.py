"""One HTML page per run (report.py, and training at each checkpoint): the config, the loss curve
(smoothed over the raw points), the loss by noise level, gradient norm and update size, the sample
grids over epochs (util.grid), FID / IS, sweeps, throughput and ETA, checkpoints and warnings.

Several folders overlay their curves and FID histories on one page. This module reads a run
(read_run) and writes the page; drawing it is util/report_page.py (inline SVG: util/svg_plot.py).
Checkpoints are read by util.checkpoint's reader; one that cannot be read is a line on the page."""

import csv
import glob
import json
import os
import re

from util.checkpoint import CheckpointError, load_checkpoint
from util.distributed import is_main_process, print0
from util.files import atomic_write
from util.grid import list_grids
from util.report_page import render

NAME = "report.html"
WARNING = re.compile(r"^(warning|error)\b|unreadable|could not be written|could not write|not finite|skipped \d+", re.I)


def read_records(folder: str) -> tuple[list[dict], int]:
    """(records of metrics.jsonl in file order, lines that are not whole JSON: cut by a kill)."""
    path = os.path.join(folder, "metrics.jsonl")
    records, bad = [], 0
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    bad += 1
                    continue
                if isinstance(r, dict):
                    records.append(r)
    return records, bad


def train_points(records: list[dict]) -> list[dict]:
    """The train records by global step, the last one of each step (a resumed run writes the steps
    after its checkpoint again), each with `x`: the fractional epoch."""
    by_step = {r["global_step"]: r for r in records if r.get("kind") == "train" and "global_step" in r}
    per_epoch = max((r["step"] for r in by_step.values() if r.get("step")), default=1)
    return [{**by_step[s], "x": by_step[s]["epoch"] + by_step[s]["step"] / per_epoch} for s in sorted(by_step)]


def read_settings(folder: str) -> tuple[dict, list[str]]:
    """(the run's settings: `args` of its newest readable checkpoint, {} without one; one line for
    each newer checkpoint that could not be read). util.checkpoint.load_checkpoint reads it
    memory-mapped: its tensors are not loaded."""
    unreadable = []

    def note(message: str):  # "warning: cannot read checkpoint PATH: why; trying an older checkpoint", ...
        if "; trying an older" in message:
            unreadable.append(message.removeprefix("warning: ").split("; trying an older")[0].splitlines()[0][:240])

    try:
        state, _ = load_checkpoint(folder, log=note, required=False)
    except CheckpointError as e:  # none can be read: each is a line already
        return {}, unreadable or [str(e).splitlines()[0][:240]]
    return (dict(state.args) if state is not None else {}), unreadable


def read_warnings(folder: str, limit: int = 200) -> list[str]:
    """Lines of log.txt that warn: warnings and errors, unreadable images, failed writes, skipped steps."""
    path = os.path.join(folder, "log.txt")
    if not os.path.isfile(path):
        return []
    with open(path, errors="replace") as f:
        lines = [line.rstrip() for line in f if WARNING.search(line)]
    return lines[-limit:]


def read_sweeps(folder: str) -> list[dict]:
    """The sweeps of a run: [{name, rows (csv dicts), png (path or None)}], by file name."""
    sweeps = []
    for path in sorted(glob.glob(os.path.join(folder, "sweep*.csv"))):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        png = path[:-4] + ".png"
        sweeps.append({"name": os.path.basename(path)[:-4], "rows": rows, "png": png if os.path.isfile(png) else None})
    return sweeps


def read_checkpoints(folder: str) -> list[dict]:
    found = []
    for path in glob.glob(os.path.join(folder, "checkpoint-*.pth")):
        st = os.stat(path)
        found.append({"name": os.path.basename(path), "bytes": st.st_size, "mtime": st.st_mtime})
    return sorted(found, key=lambda c: c["mtime"])


def run_progress(train: list[dict], epochs: int | None) -> dict | None:
    """Throughput and ETA from the last train record: {epoch, step, global_step, img_per_s, total_steps, eta_s}."""
    if not train:
        return None
    last = train[-1]
    per_epoch = max(r["step"] for r in train)
    total = epochs * per_epoch if epochs else None
    eta = None
    if total and last.get("images_per_step") and last.get("img_per_s"):
        eta = max(0, total - last["global_step"]) * last["images_per_step"] / last["img_per_s"]
    return {
        "epoch": last["epoch"],
        "step": last["step"],
        "global_step": last["global_step"],
        "img_per_s": last.get("img_per_s"),
        "total_steps": total,
        "eta_s": eta,
    }


def read_run(folder: str) -> dict:
    """Everything the page shows of one run folder."""
    records, bad_lines = read_records(folder)
    train = train_points(records)
    config, unreadable = read_settings(folder)
    return {
        "folder": folder,
        "name": os.path.basename(os.path.normpath(folder)) or folder,
        "config": config,
        "unreadable": unreadable,
        "train": train,
        "progress": run_progress(train, config.get("epochs")),
        "evals": [r for r in records if r.get("kind") == "eval"],
        "bad_lines": bad_lines,
        "grids": list_grids(folder),
        "sweeps": read_sweeps(folder),
        "checkpoints": read_checkpoints(folder),
        "warnings": read_warnings(folder),
        "skipped": sum(r.get("skipped") or 0 for r in train),
        "snapshots": len(glob.glob(os.path.join(folder, "phema", "phema-*.pth"))),
    }


def write_report(folders: list[str], output: str | None = None) -> str:
    """Read the runs of `folders` and write their page to `output` (default: the first folder's
    report.html) atomically. Returns the page's path."""
    output = output or os.path.join(folders[0], NAME)
    data = render([read_run(f) for f in folders], os.path.dirname(os.path.abspath(output))).encode()
    atomic_write(output, lambda f: f.write(data))
    return output


def write_during_training(output_dir: str):
    """Rank 0 writes output_dir/report.html; any failure is a warning and training goes on."""
    if not is_main_process():
        return
    try:
        write_report([output_dir])
    except Exception as e:  # the page is a convenience: it never stops a run
        print0(
            f"warning: {os.path.join(output_dir, NAME)} could not be written ({type(e).__name__}: {e}); training "
            "goes on"
        )
