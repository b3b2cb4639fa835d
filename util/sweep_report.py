"""The outputs of a sweep (util/sweep.py): sweep.csv (sorted by FID, with each point's NFE, and
precision, recall, FD-DINOv2 and the spread over --eval_seeds where the records have them) and
sweep.png (FID and IS against the CFG scale, one line per EMA and interval; with post-hoc EMAs
against σ_rel, one line per CFG scale and interval; with several samplers against NFE, one line per
method and schedule), and the best point."""

import csv
import io
import math
import os

from util.distributed import is_main_process, print0
from util.files import WriteError, atomic_write
from util.sweep import (
    STD_COLUMN,
    best,
    describe_record,
    ema_name,
    finite,
    has_sampler_axis,
    has_std_axis,
    nfe_of,
    record_sampler,
    sampler_name,
)

COLUMNS = (
    "fid",
    "inception_score",
    "inception_score_std",
    "ema",
    "cfg",
    "interval_min",
    "interval_max",
    "method",
    "steps",
    "schedule",
    "nfe",
    "num_images",
    "checkpoint_epoch",
)


def csv_columns(records: list[dict]) -> list[str]:
    """COLUMNS, with what some record has: `ema_std` after `ema` (post-hoc EMAs); precision, recall and
    fd_dinov2 after the IS; with several noise seeds, each score's `_seed_std` after it and
    `eval_seeds` last."""
    columns = list(COLUMNS)
    if has_std_axis(records):
        columns.insert(columns.index("ema") + 1, STD_COLUMN)
    extra = [k for k in ("precision", "recall", "fd_dinov2") if any(k in r for r in records)]
    at = columns.index("inception_score_std") + 1
    columns[at:at] = extra
    if any(r.get("eval_seeds", 1) > 1 for r in records):
        for key in ("fid", "inception_score", *extra):
            columns.insert(columns.index(key) + 1, f"{key}_seed_std")
        columns.append("eval_seeds")
    return columns


def write_csv(path: str, records: list[dict]):
    """The records as a table sorted by FID (best first; no finite FID last), columns csv_columns."""
    columns = csv_columns(records)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(
        sorted(
            ({**r, "schedule": record_sampler(r)["schedule"], "nfe": nfe_of(r)} for r in records),
            key=lambda r: r["fid"] if finite(r["fid"]) else math.inf,
        )
    )
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def plot_axes(records: list[dict]):
    """(x key, x label, log x, line key of a record, line label of a key) of plot(): against NFE with
    several samplers (a line per method and schedule, and per the other settings that vary), against
    σ_rel with post-hoc EMAs, else against the CFG scale."""
    if has_sampler_axis(records):
        parts = [
            ("method", lambda r: r["method"]),
            ("schedule", lambda r: r.get("schedule") or "uniform"),
            ("weights", ema_name),
            ("cfg", lambda r: f"cfg {r['cfg']}"),
            ("interval", lambda r: f"interval ({r['interval_min']}, {r['interval_max']})"),
        ]
        varying = [(n, f) for n, f in parts if n in ("method", "schedule") or len({f(r) for r in records}) > 1]
        return (
            "nfe",
            "network evaluations per image (NFE)",
            True,
            lambda r: tuple(f(r) for _, f in varying),
            lambda key: ", ".join(str(k) for k in key),
        )
    if has_std_axis(records):
        return (
            STD_COLUMN,
            "EMA length σ_rel",
            True,
            lambda r: (r["cfg"], r["interval_min"], r["interval_max"]),
            lambda key: f"cfg {key[0]}, interval ({key[1]}, {key[2]})",
        )
    return (
        "cfg",
        "CFG scale",
        False,
        lambda r: (r["ema"], r["interval_min"], r["interval_max"]),
        lambda key: f"EMA {key[0]}, interval ({key[1]}, {key[2]})",
    )


def plot(path: str, records: list[dict]):
    """FID and IS against the CFG scale, one line per (EMA, interval); for post-hoc EMAs against
    σ_rel (log scale), one line per (CFG scale, interval); with several samplers against NFE (log
    scale), one line per method and schedule (see plot_axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, x_label, log_x, line_of, label_of = plot_axes(records)
    records = [{**r, "nfe": nfe_of(r)} for r in records]
    lines = {}
    for r in sorted(records, key=lambda r: r[x]):
        lines.setdefault(line_of(r), []).append(r)
    fig, (ax_fid, ax_is) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for key, rs in sorted(lines.items(), key=lambda kv: str(kv[0])):
        xs = [r[x] for r in rs]
        ax_fid.plot(xs, [r["fid"] if finite(r["fid"]) else math.nan for r in rs], marker="o", label=label_of(key))
        ax_is.plot(
            xs,
            [r["inception_score"] if finite(r["inception_score"]) else math.nan for r in rs],
            marker="o",
            label=label_of(key),
        )
    for ax, name in ((ax_fid, "FID (lower is better)"), (ax_is, "Inception Score")):
        ax.set_xlabel(x_label)
        if log_x:
            ax.set_xscale("log")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    ax_fid.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def report(records: list[dict], output_dir: str, name: str, log) -> dict | None:
    """Print the best point; rank 0 writes {name}.csv and {name}.png (a failed write is reported
    through `log`, a RunLog). Returns the best record (None if no FID is finite)."""
    top = best(records)
    print0(
        f"best: {describe_record(top)}; sampler {sampler_name(top)}" if top else "best: none, no point has a finite FID"
    )
    if is_main_process():
        try:
            write_csv(os.path.join(output_dir, f"{name}.csv"), records)
            plot(os.path.join(output_dir, f"{name}.png"), records)
        except WriteError as e:
            log.give_up(f"{name}.csv / .png", e)
    return top
