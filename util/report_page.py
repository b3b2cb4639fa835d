"""The run report's HTML (util/report.py reads the runs, this draws them): the loss curves, the loss by
noise level, gradient norm and update size, throughput, sample grids, FID / IS, sweeps, the config,
checkpoints and warnings. Self-contained: plots are inline SVG (util/svg_plot.py), images are the
runs' files referred to by relative paths."""

import html
import json
import math
import os
import time
from urllib.parse import quote

from util.files import human_bytes
from util.logger import hms
from util.svg_plot import number_text, smooth, svg_plot

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
CONFIG_KEYS = (
    *("model", "img_size", "class_num", "epochs", "batch_size", "accum_iter", "lr", "blr", "warmup_epochs"),
    *("lr_schedule", "ema_decay1", "ema_decay2", "P_mean", "P_std", "noise_scale", "pred", "loss"),
    *("label_drop_prob", "proj_dropout", "attn_dropout", "cfg", "interval_min", "interval_max"),
    *("num_sampling_steps", "sampling_method", "sample_every", "seed", "fsdp", "data_path"),
)
STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;padding:0 16px;color:#222}
h1{font-size:22px}h2{border-top:2px solid #ccc;padding-top:10px}h3{margin-top:26px}
svg text{font:11px sans-serif;fill:#333}table{border-collapse:collapse;margin:6px 0}
td,th{border:1px solid #ddd;padding:2px 8px;text-align:left;font-size:13px}th{background:#f4f4f4}
.grids{display:flex;flex-wrap:wrap;gap:10px}.grids figure{margin:0}.grids img{width:240px;image-rendering:pixelated}
figure.latest img{max-width:100%;min-width:480px;image-rendering:pixelated}figcaption{font-size:12px;color:#555}
pre{background:#f8f8f8;padding:8px;overflow-x:auto;font-size:12px}img.plot{max-width:100%}.status{font-weight:600}
.empty{color:#888}"""


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
        name = f"t in ({edges[k]:.3f}, {edges[k + 1]:.3f}]"
        xs, ys = [x for x, _ in rows], [y for _, y in rows]
        series.append({"name": name, "xs": xs, "ys": ys, "colour": COLOURS[k % len(COLOURS)]})
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
            xs, ys = [x for x, _ in pts], [y for _, y in pts]
            series.append({"name": label, "xs": xs, "ys": ys, "colour": COLOURS[k % len(COLOURS)], "dots": True})
            k += 1
    return series


def html_table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def cell(v) -> str:
    if isinstance(v, float):
        return number_text(v) if math.isfinite(v) else str(v)
    return "" if v is None else str(v)


def relative(path: str, page_dir: str) -> str:
    """A path as the page refers to it: relative to the page's folder, URL-quoted."""
    return quote(os.path.relpath(os.path.abspath(path), os.path.abspath(page_dir)).replace(os.sep, "/"))


def status_line(p: dict | None) -> str:
    """Where the run is (util.report.run_progress), or nothing before its first record."""
    if not p:
        return ""
    total = f" of {p['total_steps']}" if p["total_steps"] else ""
    eta = f", ETA {hms(p['eta_s'])}" if p["eta_s"] is not None else ""
    img_s = f"{p['img_per_s']:.0f} img/s" if p["img_per_s"] else "img/s unknown"
    done = p["total_steps"] and p["global_step"] >= p["total_steps"]
    return (
        f'<p class="status">epoch {p["epoch"]}, step {p["step"]} (optimiser step {p["global_step"]}{total}); '
        f"{img_s}{'; finished' if done else eta}</p>"
    )


def grids_section(run: dict, page_dir: str) -> str:
    if not run["grids"]:
        return "<h3>Sample grids</h3><p>none yet</p>"
    latest_epoch, latest = run["grids"][-1]
    figures = "".join(
        f'<figure><a href="{relative(path, page_dir)}"><img src="{relative(path, page_dir)}" alt="sample '
        f'grid after epoch {e}"></a><figcaption>epoch {e}</figcaption></figure>'
        for e, path in run["grids"]
    )
    return (
        f'<h3>Sample grids</h3><figure class="latest"><img src="{relative(latest, page_dir)}" alt="sample grid '
        f'after epoch {latest_epoch}"><figcaption>after epoch {latest_epoch} (EMA 1, the same noise and classes in '
        f'every grid)</figcaption></figure><div class="grids">{figures}</div>'
    )


def curve(rows: list[dict], key: str, name: str, colour: int) -> list[dict]:
    """One named series of `key` against the fractional epoch of the train records `rows`."""
    return [{"name": name, "xs": [r["x"] for r in rows], "ys": [r.get(key) for r in rows], "colour": COLOURS[colour]}]


def training_plots(run: dict) -> str:
    """The loss by noise level, gradient norm and update size, and throughput of one run."""
    parts = []
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
                curve(norms, "grad_norm", "global gradient norm", 0),
                xlabel="epoch",
                ylabel="gradient norm",
                log_y=True,
                height=220,
            )
            + svg_plot(
                curve(norms, "update_ratio", "‖Δw‖ / ‖w‖", 1),
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
            + svg_plot(curve(throughput, "img_per_s", "img/s", 2), xlabel="epoch", ylabel="images / s", height=220)
        )
    return "".join(parts)


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
            *(r.get("epoch"), r.get("ema"), r.get("cfg"), f"({r.get('interval_min')}, {r.get('interval_max')})"),
            *(r.get("num_sampling_steps", r.get("steps")), r.get("num_images"), r.get("eval_seeds", 1)),
            *[with_spread(r, k) for k, _ in scores],
        ]
        for r in evals
    ]
    header = ["epoch", "EMA", "cfg", "interval", "steps", "images", "seeds", *[name for _, name in scores]]
    return html_table(header, rows)


def evaluations_section(run: dict, page_dir: str) -> str:
    """The run's evaluation records and its sweeps (plot and table)."""
    parts = []
    if run["evals"]:
        parts.append("<h3>Evaluations</h3>" + evaluations_table(run["evals"]))
    for sw in run["sweeps"]:
        parts.append(f"<h3>Sweep {html.escape(sw['name'])}</h3>")
        if sw["png"]:
            parts.append(f'<img class="plot" src="{relative(sw["png"], page_dir)}" alt="{html.escape(sw["name"])}">')
        if sw["rows"]:
            header = list(sw["rows"][0])
            parts.append(html_table(header, [[r.get(k) for k in header] for r in sw["rows"]]))
    return "".join(parts)


def config_section(cfg: dict) -> str:
    if not cfg:
        return "<h3>Config</h3><p>no readable checkpoint yet</p>"
    rows = [[k, cfg[k]] for k in CONFIG_KEYS if k in cfg]
    everything = [[k, json.dumps(v, default=str)] for k, v in sorted(cfg.items())]
    return (
        "<h3>Config</h3>"
        + html_table(["setting", "value"], rows)
        + "<details><summary>all settings</summary>"
        + html_table(["setting", "value"], everything)
        + "</details>"
    )


def checkpoints_section(run: dict) -> str:
    ck = run["checkpoints"]
    when = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))  # noqa: E731
    rows = [[c["name"], human_bytes(c["bytes"]), when(c["mtime"])] for c in ck]
    return (
        "<h3>Checkpoints</h3>"
        + (html_table(["file", "size", "written"], rows) if ck else "<p>none yet</p>")
        + (f"<p>{run['snapshots']} post-hoc EMA snapshot files in phema/</p>" if run["snapshots"] else "")
    )


def warnings_section(run: dict) -> str:
    """What went wrong: skipped steps, cut lines of metrics.jsonl, unreadable checkpoints, log.txt's warnings."""
    warn = list(run["unreadable"])
    if run["skipped"]:
        warn.append(f"{run['skipped']} optimiser step(s) skipped for a non-finite loss or gradient")
    if run["bad_lines"]:
        warn.append(f"{run['bad_lines']} line(s) of metrics.jsonl not readable (cut by a kill)")
    items = "<ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in warn) + "</ul>" if warn else ""
    if run["warnings"]:
        return "<h3>Warnings</h3>" + items + "<pre>" + html.escape("\n".join(run["warnings"])) + "</pre>"
    return "<h3>Warnings</h3>" + (items or "<p>none</p>")


def run_section(run: dict, page_dir: str, several: bool) -> str:
    """The parts of the page that are per run."""
    name = html.escape(run["name"])
    parts = [
        f'<h2 id="run-{name}">{name}</h2>' if several else "",
        status_line(run["progress"]),
        grids_section(run, page_dir),
        training_plots(run),
        evaluations_section(run, page_dir),
        config_section(run["config"]),
        checkpoints_section(run),
        warnings_section(run),
    ]
    return "\n".join(p for p in parts if p)


def render(runs: list[dict], page_dir: str) -> str:
    """The page of `runs` (util.report.read_run), images referred to relative to `page_dir`."""
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
