"""One HTML page per run (report.py, and training at each checkpoint): the config, the loss curve
(smoothed over the raw points), the loss by noise level, gradient norm and update size, the sample
grids over epochs (util.grid), FID / IS, sweeps, throughput and ETA, checkpoints and warnings.

The page is self-contained: plots are inline SVG drawn here (no JavaScript, no network), images are
files of the run referred to by relative paths. Several folders overlay their curves and FID
histories on one page. Reading a run (read_run) is apart from drawing it (render)."""

import argparse
import csv
import glob
import html
import json
import math
import os
import re
import time

from util.grid import list_grids

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
NAME = "report.html"
WARNING = re.compile(r"^(warning|error)\b|unreadable|could not be written|could not write|not finite|skipped \d+", re.I)
CONFIG_KEYS = (
    "model",
    "img_size",
    "class_num",
    "epochs",
    "batch_size",
    "accum_iter",
    "lr",
    "blr",
    "warmup_epochs",
    "lr_schedule",
    "ema_decay1",
    "ema_decay2",
    "P_mean",
    "P_std",
    "noise_scale",
    "pred",
    "loss",
    "label_drop_prob",
    "proj_dropout",
    "attn_dropout",
    "cfg",
    "interval_min",
    "interval_max",
    "num_sampling_steps",
    "sampling_method",
    "sample_every",
    "seed",
    "fsdp",
    "data_path",
)


# ---- reading a run ------------------------------------------------------------------------------


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


def read_config(folder: str) -> dict:
    """The run's settings: `args` of its newest checkpoint (read memory-mapped: its tensors are not
    loaded), or {} without a readable one."""
    import torch

    paths = sorted(glob.glob(os.path.join(folder, "checkpoint-*.pth")), key=os.path.getmtime, reverse=True)
    for path in paths:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            args = ckpt.get("args", {})
            return dict(vars(args) if isinstance(args, argparse.Namespace) else args)
        except Exception:
            continue
    return {}


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


def read_run(folder: str) -> dict:
    """Everything the page shows of one run folder."""
    records, bad_lines = read_records(folder)
    train = train_points(records)
    config = read_config(folder)
    return {
        "folder": folder,
        "name": os.path.basename(os.path.normpath(folder)) or folder,
        "config": config,
        "train": train,
        "evals": [r for r in records if r.get("kind") == "eval"],
        "bad_lines": bad_lines,
        "grids": list_grids(folder),
        "sweeps": read_sweeps(folder),
        "checkpoints": read_checkpoints(folder),
        "warnings": read_warnings(folder),
        "skipped": sum(r.get("skipped") or 0 for r in train),
        "snapshots": len(glob.glob(os.path.join(folder, "phema", "phema-*.pth"))),
    }


def progress(run: dict) -> dict | None:
    """Throughput and ETA from the last train record: {epoch, step, global_step, img_per_s, total_steps, eta_s}."""
    if not run["train"]:
        return None
    last = run["train"][-1]
    per_epoch = max(r["step"] for r in run["train"])
    epochs = run["config"].get("epochs")
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


# ---- drawing ------------------------------------------------------------------------------------


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential smoothing debiased at the start (TensorBoard's): s_k = Σ w^(k-i)(1-w) v_i / (1 - w^(k+1))."""
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        acc, norm = weight * acc + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(acc / norm)
    return out


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.4g}"


def svg_plot(
    series: list[dict], *, xlabel: str, ylabel: str, log_y: bool = False, width: int = 760, height: int = 300
) -> str:
    """An inline SVG plot. series: [{name, xs, ys, colour, dots (bool), faint (bool)}]; points with a
    None or non-finite y (or y <= 0 on a log axis) are left out. A legend lists the named series."""

    def usable(y):
        return y is not None and math.isfinite(y) and (y > 0 or not log_y)

    pts = [[(x, y) for x, y in zip(s["xs"], s["ys"]) if usable(y)] for s in series]
    xs = [x for p in pts for x, _ in p]
    ys = [y for p in pts for _, y in p]
    if not xs:
        return '<p class="empty">no data yet</p>'
    left, right, top, bottom = 64, 12, 12, 40
    w, h = width - left - right, height - top - bottom
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    ty = math.log10 if log_y else (lambda v: v)
    y0, y1 = ty(min(ys)), ty(max(ys))
    if y1 == y0:
        y0, y1 = y0 - (0.5 if log_y else abs(y0) * 0.1 or 0.5), y1 + (0.5 if log_y else abs(y1) * 0.1 or 0.5)
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    def px(x):
        return left + (x - x0) / (x1 - x0) * w

    def py(y):
        return top + (1 - (ty(y) - y0) / (y1 - y0)) * h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{html.escape(ylabel)} against {html.escape(xlabel)}">',
        f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="#fff" stroke="#999"/>',
    ]
    for t in nice_ticks(x0, x1):
        out.append(
            f'<line x1="{px(t):.1f}" y1="{top}" x2="{px(t):.1f}" y2="{top + h}" stroke="#eee"/>'
            f'<text x="{px(t):.1f}" y="{top + h + 14}" text-anchor="middle">{fmt(t)}</text>'
        )
    if log_y:
        mantissas = (1,) if y1 - y0 > 2.5 else (1, 2, 5) if y1 - y0 > 0.7 else range(1, 10)
        yticks = [m * 10.0**e for e in range(math.floor(y0) - 1, math.ceil(y1) + 1) for m in mantissas]
    else:
        yticks = nice_ticks(y0, y1)
    for t in yticks:
        if y0 <= ty(t) <= y1:
            out.append(
                f'<line x1="{left}" y1="{py(t):.1f}" x2="{left + w}" y2="{py(t):.1f}" stroke="#eee"/>'
                f'<text x="{left - 4}" y="{py(t) + 4:.1f}" text-anchor="end">{fmt(t)}</text>'
            )
    for s, p in zip(series, pts):
        if not p:
            continue
        style = f'stroke="{s["colour"]}" stroke-width="{0.8 if s.get("faint") else 1.8}" fill="none"' + (
            ' stroke-opacity="0.35"' if s.get("faint") else ""
        )
        if len(p) > 1:
            out.append(f'<polyline {style} points="' + " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in p) + '"/>')
        if s.get("dots") or len(p) == 1:
            out.extend(
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="{1.6 if s.get("faint") else 3}" fill="{s["colour"]}"'
                + (' fill-opacity="0.45"' if s.get("faint") else "")
                + "/>"
                for x, y in p[:2000]
            )
    out.append(f'<text x="{left + w / 2:.0f}" y="{height - 6}" text-anchor="middle">{html.escape(xlabel)}</text>')
    out.append(
        f'<text transform="translate(14 {top + h / 2:.0f}) rotate(-90)" '
        f'text-anchor="middle">{html.escape(ylabel)}</text>'
    )
    named = [s for s in series if s.get("name")]
    for i, s in enumerate(named):
        y = top + 14 + 15 * i
        out.append(
            f'<rect x="{left + w - 180}" y="{y - 9}" width="10" height="10" fill="{s["colour"]}"/>'
            f'<text x="{left + w - 165}" y="{y}">{html.escape(s["name"])}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def loss_series(runs: list[dict]) -> list[dict]:
    series = []
    for i, run in enumerate(runs):
        pts = [(r["x"], r["loss"]) for r in run["train"] if r.get("loss") is not None]
        xs, ys = [x for x, _ in pts], [y for _, y in pts]
        colour = COLOURS[i % len(COLOURS)]
        series.append({"xs": xs, "ys": ys, "colour": colour, "faint": True, "dots": True})
        weight = min(0.95, max(0.0, 1 - 10 / max(len(ys), 1)))  # about a tenth of the points, at most ~20 of them
        series.append({"name": run["name"] + " (smoothed)", "xs": xs, "ys": smooth(ys, weight), "colour": colour})
    return series


def noise_level_series(run: dict) -> list[dict]:
    """One series per t bin: the mean loss of the bin at each logged step."""
    with_bins = [r for r in run["train"] if r.get("loss_by_t")]
    if not with_bins:
        return []
    edges = with_bins[-1]["t_edges"]
    series = []
    for k in range(len(edges) - 1):
        rows = [(r["x"], r["loss_by_t"][k]) for r in with_bins if r.get("t_edges") == edges]
        series.append(
            {
                "name": f"t in ({edges[k]:.3f}, {edges[k + 1]:.3f}]",
                "xs": [x for x, _ in rows],
                "ys": [y for _, y in rows],
                "colour": COLOURS[k % len(COLOURS)],
            }
        )
    return series


def fid_series(runs: list[dict], key: str = "fid") -> list[dict]:
    """FID (or IS) against epoch, one series per run and (EMA, cfg, interval, images) setting."""
    series, k = [], 0
    for run in runs:
        groups = {}
        for r in run["evals"]:
            label = (
                f"{run['name']} ema{r.get('ema', 1)} cfg{r.get('cfg')} ({r.get('interval_min')}, "
                f"{r.get('interval_max')}) {r.get('num_images')} img"
            )
            groups.setdefault(label, []).append((r["epoch"], r.get(key)))
        for label, pts in groups.items():
            series.append(
                {
                    "name": label,
                    "xs": [x for x, _ in pts],
                    "ys": [y for _, y in pts],
                    "colour": COLOURS[k % len(COLOURS)],
                    "dots": True,
                }
            )
            k += 1
    return series


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def cell(v) -> str:
    if isinstance(v, float):
        return fmt(v) if math.isfinite(v) else str(v)
    return "" if v is None else str(v)


EXTRA_SCORES = (("precision", "precision"), ("recall", "recall"), ("fd_dinov2", "FD-DINOv2"))  # key, column


def with_spread(r: dict, key: str):
    """A score, or 'mean ± std' over the seeds of an --eval_seeds record."""
    spread = r.get(f"{key}_seed_std")
    value = r.get(key)
    if spread is None or value is None:
        return value
    return f"{cell(value)} ± {cell(spread)}"


def evaluations_table(evals: list[dict]) -> str:
    """The eval records as a table: the point, the images and seeds, FID and IS (mean ± std over the
    seeds of an --eval_seeds record), and precision, recall and FD-DINOv2 where a record has them."""
    scores = [("fid", "FID"), ("inception_score", "IS"), *[s for s in EXTRA_SCORES if any(s[0] in r for r in evals)]]
    rows = [
        [
            r.get("epoch"),
            r.get("ema"),
            r.get("cfg"),
            f"({r.get('interval_min')}, {r.get('interval_max')})",
            r.get("num_sampling_steps", r.get("steps")),
            r.get("num_images"),
            r.get("eval_seeds", 1),
            *[with_spread(r, k) for k, _ in scores],
        ]
        for r in evals
    ]
    header = ["epoch", "EMA", "cfg", "interval", "steps", "images", "seeds", *[name for _, name in scores]]
    return table(header, rows)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def relative(path: str, page_dir: str) -> str:
    """A path as the page refers to it: relative to the page's folder, URL-quoted."""
    from urllib.parse import quote

    return quote(os.path.relpath(os.path.abspath(path), os.path.abspath(page_dir)).replace(os.sep, "/"))


def run_section(run: dict, page_dir: str, several: bool) -> str:
    """The parts of the page that are per run."""
    parts = [f'<h2 id="run-{html.escape(run["name"])}">{html.escape(run["name"])}</h2>' if several else ""]
    p = progress(run)
    if p:
        total = f" of {p['total_steps']}" if p["total_steps"] else ""
        eta = f", ETA {hms(p['eta_s'])}" if p["eta_s"] is not None else ""
        img_s = f"{p['img_per_s']:.0f} img/s" if p["img_per_s"] else "img/s unknown"
        done = p["total_steps"] and p["global_step"] >= p["total_steps"]
        parts.append(
            f'<p class="status">epoch {p["epoch"]}, step {p["step"]} (optimiser step {p["global_step"]}{total}); '
            f"{img_s}{'; finished' if done else eta}</p>"
        )
    parts.append("<h3>Sample grids</h3>")
    if run["grids"]:
        latest_epoch, latest = run["grids"][-1]
        parts.append(
            f'<figure class="latest"><img src="{relative(latest, page_dir)}" alt="sample grid after epoch '
            f'{latest_epoch}">'
            f"<figcaption>after epoch {latest_epoch} (EMA 1, the same noise and classes in every "
            "grid)</figcaption></figure>"
        )
        parts.append(
            '<div class="grids">'
            + "".join(
                f'<figure><a href="{relative(path, page_dir)}"><img src="{relative(path, page_dir)}" alt="sample '
                f'grid after epoch {e}"></a>'
                f"<figcaption>epoch {e}</figcaption></figure>"
                for e, path in run["grids"]
            )
            + "</div>"
        )
    else:
        parts.append("<p>none yet</p>")
    bins = noise_level_series(run)
    if bins:
        parts.append(
            "<h3>Loss by noise level</h3><p>Mean training loss in bins of t (0: noise, 1: clean image; each bin "
            "holds 1/8 of the training times), over the steps between two records.</p>"
            + svg_plot(bins, xlabel="epoch", ylabel="loss", log_y=True)
        )
    norms = [r for r in run["train"] if r.get("grad_norm") is not None or r.get("update_ratio") is not None]
    if norms:
        parts.append(
            "<h3>Gradient norm and update size</h3>"
            + svg_plot(
                [
                    {
                        "name": "global gradient norm",
                        "xs": [r["x"] for r in norms],
                        "ys": [r.get("grad_norm") for r in norms],
                        "colour": COLOURS[0],
                    }
                ],
                xlabel="epoch",
                ylabel="gradient norm",
                log_y=True,
                height=220,
            )
            + svg_plot(
                [
                    {
                        "name": "‖Δw‖ / ‖w‖",
                        "xs": [r["x"] for r in norms],
                        "ys": [r.get("update_ratio") for r in norms],
                        "colour": COLOURS[1],
                    }
                ],
                xlabel="epoch",
                ylabel="update / weight",
                log_y=True,
                height=220,
            )
        )
    throughput = [r for r in run["train"] if r.get("img_per_s")]
    if throughput:
        parts.append(
            "<h3>Throughput</h3>"
            + svg_plot(
                [
                    {
                        "name": "img/s",
                        "xs": [r["x"] for r in throughput],
                        "ys": [r["img_per_s"] for r in throughput],
                        "colour": COLOURS[2],
                    }
                ],
                xlabel="epoch",
                ylabel="images / s",
                height=220,
            )
        )
    if run["evals"]:
        parts.append("<h3>Evaluations</h3>" + evaluations_table(run["evals"]))
    for sw in run["sweeps"]:
        parts.append(f"<h3>Sweep {html.escape(sw['name'])}</h3>")
        if sw["png"]:
            parts.append(f'<img class="plot" src="{relative(sw["png"], page_dir)}" alt="{html.escape(sw["name"])}">')
        if sw["rows"]:
            header = list(sw["rows"][0])
            parts.append(table(header, [[r.get(k) for k in header] for r in sw["rows"]]))
    cfg = run["config"]
    if cfg:
        rows = [[k, cfg[k]] for k in CONFIG_KEYS if k in cfg]
        everything = [[k, json.dumps(v, default=str)] for k, v in sorted(cfg.items())]
        parts.append(
            "<h3>Config</h3>"
            + table(["setting", "value"], rows)
            + "<details><summary>all settings</summary>"
            + table(["setting", "value"], everything)
            + "</details>"
        )
    else:
        parts.append("<h3>Config</h3><p>no readable checkpoint yet</p>")
    ck = run["checkpoints"]
    parts.append(
        "<h3>Checkpoints</h3>"
        + (
            table(
                ["file", "size", "written"],
                [
                    [c["name"], human_bytes(c["bytes"]), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["mtime"]))]
                    for c in ck
                ],
            )
            if ck
            else "<p>none yet</p>"
        )
        + (f"<p>{run['snapshots']} post-hoc EMA snapshot files in phema/</p>" if run["snapshots"] else "")
    )
    warn = []
    if run["skipped"]:
        warn.append(f"{run['skipped']} optimiser step(s) skipped for a non-finite loss or gradient")
    if run["bad_lines"]:
        warn.append(f"{run['bad_lines']} line(s) of metrics.jsonl not readable (cut by a kill)")
    parts.append(
        "<h3>Warnings</h3>"
        + ("<ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in warn) + "</ul>" if warn else "")
        + (
            "<pre>" + html.escape("\n".join(run["warnings"])) + "</pre>"
            if run["warnings"]
            else ""
            if warn
            else "<p>none</p>"
        )
    )
    return "\n".join(parts)


STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;padding:0 16px;color:#222}
h1{font-size:22px}h2{border-top:2px solid #ccc;padding-top:10px}h3{margin-top:26px}
svg text{font:11px sans-serif;fill:#333}table{border-collapse:collapse;margin:6px 0}
td,th{border:1px solid #ddd;padding:2px 8px;text-align:left;font-size:13px}th{background:#f4f4f4}
.grids{display:flex;flex-wrap:wrap;gap:10px}.grids figure{margin:0}.grids img{width:240px;image-rendering:pixelated}
figure.latest img{max-width:100%;min-width:480px;image-rendering:pixelated}figcaption{font-size:12px;color:#555}
pre{background:#f8f8f8;padding:8px;overflow-x:auto;font-size:12px}img.plot{max-width:100%}.status{font-weight:600}
.empty{color:#888}"""


def render(runs: list[dict], page_dir: str) -> str:
    """The page of `runs` (read_run), images referred to relative to `page_dir`."""
    several = len(runs) > 1
    title = "JiT run report: " + ", ".join(r["name"] for r in runs)
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>written {time.strftime('%Y-%m-%d %H:%M:%S')} from {', '.join(html.escape(r['folder']) for r in runs)}</p>",
        "<h2>Training loss</h2><p>Velocity-space MSE, the logged window means (faint points) and their smoothed curve, "
        "against epochs.</p>",
        svg_plot(loss_series(runs), xlabel="epoch", ylabel="training loss", log_y=True),
    ]
    fids = fid_series(runs)
    if any(s["xs"] for s in fids):
        body += [
            "<h2>FID and Inception Score</h2>",
            svg_plot(fids, xlabel="epoch", ylabel="FID", log_y=True),
            svg_plot(fid_series(runs, "inception_score"), xlabel="epoch", ylabel="Inception Score"),
        ]
    body += [run_section(run, page_dir, several) for run in runs]
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(folders: list[str], output: str | None = None) -> str:
    """Read the runs of `folders` and write their page to `output` (default: the first folder's
    report.html) atomically. Returns the page's path."""
    from util.files import atomic_write

    output = output or os.path.join(folders[0], NAME)
    page = render([read_run(f) for f in folders], os.path.dirname(os.path.abspath(output)))
    data = page.encode()
    atomic_write(output, lambda f: f.write(data))
    return output


def write_during_training(output_dir: str):
    """Rank 0 writes output_dir/report.html; any failure is a warning and training goes on."""
    from util.distributed import is_main_process, print0

    if not is_main_process():
        return
    try:
        write_report([output_dir])
    except Exception as e:  # the page is a convenience: it never stops a run
        print0(
            f"warning: {os.path.join(output_dir, NAME)} could not be written ({type(e).__name__}: {e}); training "
            "goes on"
        )
