"""Sweeps of the sampling settings: every combination of EMA (a checkpoint's EMA 1, 2, 3, or
post-hoc EMAs of several lengths σ_rel), guidance interval and CFG scale, scored with the same
per-image seeds and one Inception network; the sampler (method, steps, schedule) is an axis too.
Finished points are found again in metrics.jsonl, so a stopped sweep continues where it was; the
results go to sweep.csv (sorted by FID, with each point's NFE, and precision, recall, FD-DINOv2 and
the spread over --eval_seeds where the records have them) and sweep.png (FID and IS against the
CFG scale, one line per EMA and interval; with post-hoc EMAs against σ_rel, one line per CFG scale
and interval; with several samplers FID against NFE, one line per method and schedule). The
sampler's command-line flags (shared by main_jit.py and sample.py) and the grid they give live here
too."""

import csv
import io
import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass

from sampling import METHODS, SCHEDULES, SamplerSettings, check_denoiser, upgrade_schedule
from util.distributed import broadcast_object, is_main_process, print0
from util.errors import BadValue
from util.files import WriteError, atomic_write
from util.logger import hms

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
STD_COLUMN = "ema_std"  # after "ema", in sweeps of post-hoc EMAs only


def add_sampler_args(group, sweep: bool = False):
    """The sampler's flags. sweep: every one takes several values (a sweep over all combinations)."""
    a = group.add_argument
    many = dict(nargs="+") if sweep else {}
    also = "; several values: a sweep" if sweep else ""
    a(
        "--sampling_method",
        default="heun",
        choices=METHODS,
        **many,
        help="ODE integrator: heun (2nd order, 2 evaluations a step), euler (1st), or a multistep solver, 1 evaluation "
        "a step: dpm++2m / dpm++3m (DPM-Solver++), unipc2 / unipc3 (UniPC-bh2), ab2 / ab3 (x̂ extrapolated in t); "
        f"see docs/sampling.md{also}",
    )
    a(
        "--num_sampling_steps",
        default=50,
        type=int,
        **many,
        help=f"integration steps from t = 0 (noise) to t = 1 (image), 1 to 1000{also}",
    )
    a(
        "--sampling_schedule",
        default="uniform",
        **many,
        help=f"where the steps go: {', '.join(SCHEDULES)} (name or name:parameter, e.g. logit:3, karras:7, power:2, "
        f"shift:0.5; sampling_grid.py, docs/sampling.md){also}",
    )
    a(
        "--cfg",
        default=1.0,
        type=float,
        **many,
        help=f"classifier-free guidance scale, in [0, 100] (1 = no guidance){also}",
    )
    a(
        "--interval_min",
        default=0.0,
        type=float,
        **many,
        help=f"guidance only for t > this, in [0, 1) (0: from t = 0 on){also}",
    )
    a("--interval_max", default=1.0, type=float, **many, help=f"guidance only for t < this, in (0, 1]{also}")


def sampler_settings(flags) -> SamplerSettings:
    """The sampler of single-valued flags (sample.py). BadValue for settings it rejects."""
    try:
        return SamplerSettings(
            method=flags.sampling_method,
            steps=flags.num_sampling_steps,
            cfg=flags.cfg,
            interval_min=flags.interval_min,
            interval_max=flags.interval_max,
            schedule=flags.sampling_schedule or "uniform",
        )
    except ValueError as e:
        raise BadValue(str(e)) from None


def check_denoiser_flags(flags):
    """BadValue (one line) for --noise_scale, --t_eps (with --pred) no sampler can run (sampling.check_denoiser),
    before any work; a flag that is None or absent (the weights' value) is checked when the weights are built."""
    try:
        check_denoiser(getattr(flags, "noise_scale", None), getattr(flags, "t_eps", None), getattr(flags, "pred", None))
    except ValueError as e:
        raise BadValue(str(e)) from None


def as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass(frozen=True)
class Point:
    """One evaluation: the weights, EMA `ema` (1, 2, 3) of a checkpoint or (ema None) the post-hoc EMA
    of relative standard deviation `ema_std`, sampled with `sampler`, scored on `num_images` images."""

    ema: int | None
    sampler: SamplerSettings
    num_images: int
    ema_std: float | None = None

    @property
    def weights(self) -> int | float:
        """What the run's samplers are asked for: the EMA number, or σ_rel of a post-hoc EMA."""
        return self.ema if self.ema_std is None else self.ema_std

    def key(self) -> tuple:
        return (self.ema, self.ema_std, self.num_images, *asdict(self.sampler).values())

    def label(self) -> str:
        s = self.sampler
        return (
            f"{ema_name(asdict(self))}, cfg {s.cfg}, interval ({s.interval_min}, {s.interval_max}), "
            f"{sampler_name(asdict(s))}, "
            f"{self.num_images} images"
        )


def sampler_name(record: dict) -> str:
    """'heun 50 steps (99 NFE)' (the schedule too if not uniform) of a record or a SamplerSettings as
    a dict."""
    schedule = record_sampler(record)["schedule"]
    nfe = nfe_of(record)
    return (
        f"{record['method']} {record['steps']} steps"
        + ("" if schedule == "uniform" else f" {schedule}")
        + f" ({nfe} NFE)"
    )


def ema_name(record: dict) -> str:
    """'EMA k', or 'σ_rel s' for a post-hoc EMA, of a record (or a Point as a dict)."""
    return f"EMA {record['ema']}" if record.get(STD_COLUMN) is None else f"σ_rel {record[STD_COLUMN]:g}"


def grid(
    *, emas, interval_mins, interval_maxs, cfgs, method, steps, num_images: int, ema_stds=(None,), schedule="uniform"
) -> list[Point]:
    """Every combination, the weights first (EMA, then σ_rel of a post-hoc EMA), then the sampler
    (method, schedule, steps), then the interval, then the CFG scale (which varies fastest). method,
    steps, schedule: one value or a list. Raises BadValue for a combination the sampler rejects
    (e.g. interval_min >= interval_max)."""
    try:
        return [
            Point(
                ema,
                SamplerSettings(method=m, steps=n, cfg=cfg, interval_min=lo, interval_max=hi, schedule=s),
                num_images,
                std,
            )
            for ema, std, m, s, n, lo, hi, cfg in itertools.product(
                emas, ema_stds, as_list(method), as_list(schedule), as_list(steps), interval_mins, interval_maxs, cfgs
            )
        ]
    except ValueError as e:
        raise BadValue(str(e)) from None


def eval_points(flags, num_images: int) -> list[Point]:
    """The points of the flags --ema (or, with --phema, --ema_std), --interval_min, --interval_max,
    --cfg, --sampling_method, --num_sampling_steps and --sampling_schedule (one value or several
    each), at num_images (see grid)."""
    phema = bool(flags.phema)
    return grid(
        emas=[None] if phema else as_list(flags.ema),
        ema_stds=as_list(flags.ema_std) if phema else [None],
        interval_mins=as_list(flags.interval_min),
        interval_maxs=as_list(flags.interval_max),
        cfgs=as_list(flags.cfg),
        method=flags.sampling_method,
        steps=flags.num_sampling_steps,
        num_images=num_images,
        schedule=as_list(getattr(flags, "sampling_schedule", None) or "uniform"),
    )


def record_sampler(record: dict) -> dict:
    """The SamplerSettings fields of a metrics.jsonl record or a Point's sampler as a dict: a field the
    record was written without has its default, a schedule written before its rename its new name
    (the same grid, sampling_grid.upgrade_schedule)."""
    out = {k: record.get(k, v) for k, v in asdict(SamplerSettings()).items()}
    return {**out, "schedule": upgrade_schedule(out["schedule"] or "uniform")}


def record_key(record: dict) -> tuple:
    """A metrics.jsonl eval record's Point.key() (see record_sampler for older records)."""
    return (record["ema"], record.get(STD_COLUMN), record["num_images"], *record_sampler(record).values())


def eval_records(metrics_path: str | None, kind: str | tuple = "eval") -> list[dict]:
    """The scored evaluation records ({"kind": kind} with a finite FID; "eval_seed": one seed's of an
    --eval_seeds evaluation; a tuple: any of these kinds) of a metrics.jsonl, in file order; a line cut
    short by a kill is skipped; [] without the file."""
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    records = []
    if not metrics_path or not os.path.isfile(metrics_path):
        return records
    with open(metrics_path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict) and r.get("kind") in kinds and finite(r.get("fid")):
                records.append(r)
    return records


CONTEXT_DEFAULTS = {"eval_seeds": 1}  # what a record written before a context field existed had


def finished(metrics_path: str, context: dict, kind: str | tuple = "eval") -> dict:
    """{Point.key(): record} of the `kind` records in metrics_path whose values of `context`'s keys
    are equal (engine_eval.eval_context: the same weights, seeds, batch size, resolution, classes,
    reference statistics and scoring protocol; a key a record lacks has its CONTEXT_DEFAULTS value)."""
    return {
        record_key(r): r
        for r in eval_records(metrics_path, kind)
        if "ema" in r and all(r.get(k, CONTEXT_DEFAULTS.get(k)) == v for k, v in context.items())
    }


def finite(x) -> bool:
    return x is not None and math.isfinite(x)


def best(records: list[dict]) -> dict | None:
    """The record of the lowest finite FID (None if there is none)."""
    return min((r for r in records if finite(r["fid"])), key=lambda r: r["fid"], default=None)


def describe_record(record: dict) -> str:
    """A point's settings and scores in one line (a missing or NaN score as n/a)."""
    num = lambda x: f"{x:.4f}" if finite(x) else "n/a"  # noqa: E731
    return (
        f"{ema_name(record)}, cfg {record['cfg']}, interval ({record['interval_min']}, {record['interval_max']}): "
        f"FID {num(record['fid'])}, IS {num(record['inception_score'])}"
    )


def has_std_axis(records: list[dict]) -> bool:
    """Whether the records are of post-hoc EMAs (they carry σ_rel as `ema_std`)."""
    return any(r.get(STD_COLUMN) is not None for r in records)


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


def has_sampler_axis(records: list[dict]) -> bool:
    """Whether the records are of more than one sampler (method, steps, schedule)."""
    return len({(r.get("method"), r.get("steps"), r.get("schedule") or "uniform") for r in records}) > 1


def nfe_of(record: dict) -> int:
    """A record's NFE (computed from its settings for a record written before records held it)."""
    if record.get("nfe") is not None:
        return record["nfe"]
    return SamplerSettings(**record_sampler(record)).nfe()


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


def run(points: list[Point], score, *, done: dict, should_stop) -> tuple[list[dict], bool]:
    """Score the points in order, skipping those in `done` ({Point.key(): record}); score(point)
    returns the point's record, or None when it stopped inside the point (between its noise seeds).
    should_stop() is asked before each point (all ranks must agree). Returns (the records of all
    finished points, earlier ones included; whether it stopped early)."""
    todo = [p for p in points if p.key() not in done]
    if len(todo) < len(points):
        print0(
            f"sweep: {len(points) - len(todo)} of {len(points)} points already finished (metrics.jsonl), skipping them"
        )
    records = [done[p.key()] for p in points if p.key() in done]
    left = sum(p.num_images for p in todo)
    images, seconds = 0, 0.0
    for i, p in enumerate(todo, 1):
        if should_stop():
            return records, True
        print0(f"sweep point {i}/{len(todo)}: {p.label()}")
        t0 = time.time()
        record = score(p)
        if record is None:
            return records, True
        records.append(record)
        dt = time.time() - t0
        images, seconds, left = images + p.num_images, seconds + dt, left - p.num_images
        print0(
            f"sweep point {i}/{len(todo)}: FID {records[-1]['fid']:.4f}, {p.num_images / dt:.1f} img/s; "
            f"sweep ETA {hms(left * seconds / images)}"
        )
    return records, False


def finished_everywhere(metrics_path: str, context: dict, kind: str | tuple = "eval") -> dict:
    """finished() as rank 0 reads it, on every rank (all must skip the same points)."""
    return broadcast_object(finished(metrics_path, context, kind) if is_main_process() else None)


def cost_note(points: list[Point]) -> str:
    """What a sweep will generate: images, network evaluations (NFE: a guided one on a doubled batch
    counts once) and network passes (it counts twice)."""
    nfe = sum(p.sampler.nfe() * p.num_images for p in points)
    passes = sum(p.sampler.net_passes() * p.num_images for p in points)
    return (
        f"sweep of {len(points)} points: {sum(p.num_images for p in points)} images, {nfe / 1e6:.1f}M network "
        "evaluations, "
        f"{passes / 1e6:.1f}M network passes (the ETA follows after the first point)"
    )


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
