"""Sweeps of the sampling settings: every combination of EMA (a checkpoint's EMA 1, 2, 3, or
post-hoc EMAs of several lengths σ_rel), guidance interval and CFG scale, scored with the same
per-image seeds and one Inception network; the sampler (method, steps, schedule) is an axis too.
Finished points are found again in metrics.jsonl, so a stopped sweep continues where it was; its
sweep.csv and sweep.png are util/sweep_report.py's. The sampler's command-line flags (shared by
main_jit.py and sample.py) and the grid they give live here too."""

import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass

from sampling import METHODS, SCHEDULES, SamplerSettings, check_denoiser, upgrade_schedule
from util.distributed import broadcast_object, is_main_process, print0
from util.errors import BadValue
from util.logger import hms
from util.stop import GenerationStopped

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


def has_sampler_axis(records: list[dict]) -> bool:
    """Whether the records are of more than one sampler (method, steps, schedule)."""
    return len({(r.get("method"), r.get("steps"), r.get("schedule") or "uniform") for r in records}) > 1


def nfe_of(record: dict) -> int:
    """A record's NFE (computed from its settings for a record written before records held it)."""
    if record.get("nfe") is not None:
        return record["nfe"]
    return SamplerSettings(**record_sampler(record)).nfe()


def run(points: list[Point], score, *, done: dict, should_stop) -> tuple[list[dict], bool]:
    """Score the points in order, skipping those in `done` ({Point.key(): record}); score(point)
    returns the point's record (or raises util.stop.GenerationStopped: a stop inside the point).
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
        try:
            records.append(score(p))
        except GenerationStopped as e:  # inside the point: its finished seeds are kept
            print0(f"sweep point {i}/{len(todo)}: {e}")
            return records, True
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
