"""Evaluation during training and of trained weights: FID / IS (and precision / recall, FD-DINOv2) of
one sampler setting, or a sweep of settings (util/sweep.py) with the best point scored again; each
point with one noise seed or several (--eval_seeds: a record per seed and their mean ± std,
util/seeds.py). What samples: each EMA's weights (`EMAWeights`, gathered when sharded) or post-hoc
EMAs reconstructed from snapshots (`PostHocWeights`). Generation and scoring themselves are
util/evaluation.py and util/scorer.py."""

import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from util import distributed, seeds, sharding, sweep, sweep_report
from util.evaluation import GenerationSpec, Scorer, image_folder_name, score_images
from util.stop import GenerationStopped, StopSignal, raise_if_requested, requested_anywhere


def compile_sampling_net(net):
    """The network as evaluation samples it, compiled: static shapes (dynamic=False), so that the Heun
    + CFG-interval calls at batch B and 2B each get their own specialised kernels (bench/bench.py
    measures this same compiled net)."""
    return torch.compile(net, dynamic=False)


class EMAWeights:
    """For each EMA, the denoiser that samples and a compiled stand-in of its net (or None). An
    unsharded EMA samples itself; a sharded one (FSDP) is gathered into a full copy on every rank,
    made at the first use and refreshed by `refresh` (collective), so that evaluation runs as in an
    unsharded run, each rank generating its share of the images. `make_denoiser()` builds the
    network on the meta device (it is called under `torch.device("meta")`): the copy is then
    materialised on `device` only, uninitialised, and filled with the gathered weights (no copy on
    the CPU, no random initialisation). `release` frees those copies (a full float32 network per EMA
    on every GPU) when an evaluation during training is done."""

    def __init__(
        self, emas: list, device: torch.device, make_denoiser: Callable[[], torch.nn.Module], compile_net: bool
    ):
        self.emas, self.device, self.make_denoiser, self.compile_net = emas, device, make_denoiser, compile_net
        self.copies, self.nets = {}, {}

    def refresh(self, ks):
        """Gather the sharded EMAs `ks` (1-based) into their copies; nothing for unsharded ones. The
        global RNG streams are not used."""
        for k in sorted(set(ks)):
            if sharding.is_sharded(self.emas[k - 1].module):
                if k not in self.copies:
                    with torch.device("meta"):
                        skeleton = self.make_denoiser()
                    self.copies[k] = skeleton.to_empty(device=self.device).eval().requires_grad_(False)
                sharding.unshard_into(self.copies[k], self.emas[k - 1].module)

    def release(self):
        """Free the gathered copies of sharded EMAs and their compiled stand-ins (nothing else holds
        them); the next `refresh` builds them again. torch.compile's cache matches a new copy's net by
        its type and shapes, not its identity, so this costs no recompilation."""
        for k in list(self.copies):
            del self.copies[k]
            self.nets.pop(k, None)

    def __call__(self, k: int):
        """(denoiser, net stand-in or None) that sample with EMA k."""
        denoiser = self.copies.get(k, self.emas[k - 1].module)
        if k not in self.nets:
            self.nets[k] = compile_sampling_net(denoiser.net) if self.compile_net else None
        return denoiser, self.nets[k]


class PostHocWeights:
    """The samplers of a sweep of post-hoc EMAs (--phema): one denoiser (on every rank), into which
    the weights reconstructed for each σ_rel are loaded in turn, with a compiled stand-in of its net
    (or None). `reconstruct(stds)` returns {σ_rel: full state dict}; rank 0 alone calls it (it reads
    every snapshot) and broadcasts the weights when a σ_rel is first sampled; the other ranks wait for
    the reconstruction at a barrier of the control group, which fails after --dist_timeout (a wait in
    the NCCL broadcast would be ended by NCCL's watchdog instead)."""

    def __init__(
        self, denoiser: torch.nn.Module, reconstruct: Callable[[list], dict], device: torch.device, compile_net: bool
    ):
        self.denoiser = denoiser.eval().requires_grad_(False)
        self.reconstruct, self.device = reconstruct, device
        self.net = compile_sampling_net(self.denoiser.net) if compile_net else None
        self.weights, self.loaded, self.done = {}, None, set()

    def refresh(self, stds):
        """Collective. Rank 0 reconstructs the σ_rel of `stds` it has not yet, in one pass over the
        snapshots, while the other ranks wait at a barrier (bounded by --dist_timeout)."""
        todo = sorted(set(stds) - self.done)
        if not todo:
            return
        if distributed.is_main_process():
            self.weights.update(self.reconstruct(todo))
        self.done.update(todo)
        distributed.barrier()

    def __call__(self, sigma_rel: float):
        """Collective. (denoiser, net stand-in or None) that sample with the post-hoc EMA of σ_rel."""
        if sigma_rel != self.loaded:
            if distributed.is_main_process():
                self.denoiser.load_state_dict(self.weights[sigma_rel])
            if distributed.get_world_size() > 1:
                for t in self.denoiser.state_dict().values():  # views of the parameters and buffers
                    torch.distributed.broadcast(t, src=0)
            self.loaded = sigma_rel
        return self.denoiser, self.net


@dataclass
class Evaluation:
    """How a run evaluates, fixed for the run. points: the --ema × interval × cfg grid at
    --num_images (sweep.Point); spec: the rest of what is generated (each point sets its sampler and
    image count); scorer: FID / IS with one Inception network; log: a RunLog; output_dir: for
    --save_images folders and a sweep's csv / png; final_num_images: after a sweep, the best point
    again with this many images; stopper: SIGTERM / SIGUSR1 stop a sweep between points (and seeds);
    during_training: a sweep's files are named per epoch (sweep-epoch{N}.csv), else sweep.csv;
    weights_context: what else identifies the weights in the records (and when finished points are
    matched): `run_id`, the identity of the run that trained them (so that records of another run's
    weights at the same path and epoch, e.g. a folder's snapshots replaced by a new run's, are not
    taken for these), and for post-hoc EMAs the step they are reconstructed at; eval_seeds: score each
    point with this many noise seeds (spec.seed, spec.seed + 1, ...)."""

    samplers: EMAWeights | PostHocWeights
    points: list
    spec: GenerationSpec
    scorer: Scorer
    log: object
    output_dir: str
    save_images: bool = False
    final_num_images: int | None = None
    stopper: StopSignal | None = None
    during_training: bool = False
    weights_context: dict = dataclasses.field(default_factory=dict)
    eval_seeds: int = 1


def eval_context(ev: Evaluation, checkpoint: str | None, weights_epoch: int) -> dict:
    """What, besides its point, every evaluation record holds and a finished sweep point is matched
    on: the weights (checkpoint file, epoch, ev.weights_context: the run that trained them) and what
    generation and scoring depend on (the scorer's protocol: its files and their digests)."""
    s = ev.spec
    return dict(
        checkpoint=checkpoint,
        checkpoint_epoch=weights_epoch,
        **ev.weights_context,
        seed=s.seed,
        gen_bsz=s.gen_bsz,
        class_num=s.class_num,
        img_size=s.img_size,
        fid_stats=ev.scorer.fid_stats,
        eval_seeds=ev.eval_seeds,
        protocol=ev.scorer.protocol,
    )


def score_point(ev: Evaluation, point, *, epoch: int, context: dict, in_sweep: bool = False) -> dict | None:
    """The scores of one point, written as one record (metrics.jsonl, TensorBoard, console); the global
    RNG streams are left as they were. Returns the record: the point's settings, the scores and
    `context` (eval_context). With ev.eval_seeds > 1, the summary of one record per seed (score_seeds;
    None when a stop signal came between seeds)."""
    if ev.eval_seeds > 1:
        return score_seeds(ev, point, epoch=epoch, context=context, in_sweep=in_sweep)
    record = point_record(ev, point, score_seed(ev, point, ev.spec.seed), epoch=epoch, context=context)
    publish(ev, point, record, in_sweep=in_sweep)
    return record


def score_seed(ev: Evaluation, point, seed: int, folder_suffix: str = "") -> dict:
    """util.evaluation.score_images of the point with the noise of `seed` (--save_images: into the
    reference's folder name + folder_suffix); the global RNG streams are left as they were."""
    spec = dataclasses.replace(ev.spec, sampler=point.sampler, num_images=point.num_images, seed=seed)
    image_dir = (
        os.path.join(ev.output_dir, image_folder_name(spec.sampler, spec.num_images, spec.img_size) + folder_suffix)
        if ev.save_images
        else None
    )
    denoiser, net = ev.samplers(point.weights)
    should_stop = functools.partial(requested_anywhere, ev.stopper) if ev.stopper else None
    with torch.random.fork_rng(devices=[ev.samplers.device] if ev.samplers.device.type == "cuda" else []):
        return score_images(denoiser, spec, ev.scorer, net=net, image_dir=image_dir, should_stop=should_stop)


def point_record(ev: Evaluation, point, result: dict, *, epoch: int, context: dict, kind: str = "eval") -> dict:
    """A metrics.jsonl record: `kind`, the epoch, `context`, the scores, the point's weights and sampler."""
    std = {} if point.ema_std is None else {sweep.STD_COLUMN: point.ema_std}
    s = point.sampler
    return dict(
        kind=kind,
        epoch=epoch,
        **context,
        **result,
        ema=point.ema,
        **std,
        **dataclasses.asdict(s),
        nfe=s.nfe(),
        net_passes=s.net_passes(),
        world_size=distributed.get_world_size(),
    )


def publish(ev: Evaluation, point, record: dict, *, in_sweep: bool):
    """The point's record to the console, TensorBoard (fid / is of the point's tags, and the other
    scores and the spread over seeds where present) and metrics.jsonl."""
    s = point.sampler
    over = f", {len(record['seeds'])} seeds" if "seeds" in record else ""
    distributed.print0(
        f"eval ({record['num_images']} images, cfg {s.cfg}, {sweep.sampler_name(record)}{over}): "
        f"{seeds.scores_text(record)}, {record['seconds']:.0f}s"
    )
    weights = f"_std{point.ema_std:g}" if point.ema_std is not None else (f"_ema{point.ema}" if point.ema != 1 else "")
    suffix = (
        f"_cfg{s.cfg}_res{ev.spec.img_size}"
        + weights
        + (f"_interval{s.interval_min}-{s.interval_max}" if in_sweep else "")
    )
    scalars = {f"fid{suffix}": record["fid"], f"is{suffix}": record["inception_score"]}
    for key in ("precision", "recall", "fd_dinov2", "fid_seed_std"):
        if key in record:
            scalars[f"{key}{suffix}"] = record[key]
    ev.log.scalars(scalars, record["epoch"])
    ev.log.flush()
    ev.log.record(record)


def score_seeds(ev: Evaluation, point, *, epoch: int, context: dict, in_sweep: bool) -> dict | None:
    """--eval_seeds N: the point scored with each seed (an "eval_seed" record each, a single-seed
    evaluation's context with its seed; one found in metrics.jsonl, as an "eval_seed" record or as the
    "eval" record of a single-seed evaluation, is not scored again), then the "eval" record of their
    summary (util.seeds.summarize: mean, std over seeds, per-seed values). A stop signal, before a seed
    or between two generation batches, raises GenerationStopped saying how many seeds are kept."""
    per_seed = []
    for k, seed in enumerate(seeds.seed_list(ev.spec.seed, ev.eval_seeds), 1):
        own = {**context, "seed": seed, "eval_seeds": 1}
        record = sweep.finished_everywhere(ev.log.metrics_path, own, kind=("eval_seed", "eval")).get(point.key())
        note = ", found in metrics.jsonl" if record else ""
        if record is None:
            try:
                raise_if_requested(ev.stopper, "before a seed")
                result = score_seed(ev, point, seed, f"-seed{seed}")
            except GenerationStopped as e:
                raise GenerationStopped(
                    f"stop requested (signal) after {k - 1} of {ev.eval_seeds} seeds of {point.label()}: their "
                    "records are in metrics.jsonl"
                ) from e
            record = point_record(ev, point, result, epoch=epoch, context=own, kind="eval_seed")
            ev.log.record(record)
        distributed.print0(f"eval seed {seed} ({k} of {ev.eval_seeds}{note}): {seeds.scores_text(record)}")
        per_seed.append(record)
    summary = seeds.summarize(per_seed)
    record = point_record(ev, point, {**summary, "seeds": [r["seed"] for r in per_seed]}, epoch=epoch, context=context)
    publish(ev, point, record, in_sweep=in_sweep)
    return record


def evaluate(ev: Evaluation, *, epoch: int, weights_epoch: int, checkpoint: str | None = None) -> dict | None:
    """Evaluate the run's point, or sweep its points (then --final_num_images), with the current EMA
    weights (of `weights_epoch`, loaded from `checkpoint` if any). Call on every rank. Returns the
    (best) point's record; None when a sweep was stopped. SIGTERM / SIGUSR1 (ev.stopper) also stop
    it between two generation batches: outside training it then returns None (a rerun continues a
    sweep where it stopped), during training it raises util.stop.GenerationStopped (the rerun
    catches up, see `catch_up`). During training, the gathered copies of sharded EMAs are freed
    afterwards (EMAWeights.release)."""
    ev.samplers.refresh(p.weights for p in ev.points)
    context = eval_context(ev, checkpoint, weights_epoch)
    try:
        if len(ev.points) == 1 and ev.final_num_images is None:
            return score_point(ev, ev.points[0], epoch=epoch, context=context)
        return run_sweep(ev, epoch=epoch, context=context)
    except GenerationStopped as e:
        if ev.during_training:
            raise
        distributed.print0(f"evaluation stopped: {e}; rerun the same command to continue")
        return None
    finally:
        if ev.during_training:
            ev.samplers.release()


def run_sweep(ev: Evaluation, *, epoch: int, context: dict) -> dict | None:
    """Score every point, skipping points finished before (metrics.jsonl records of the same
    context); stop between points on SIGTERM / SIGUSR1. Writes sweep.csv and sweep.png (per epoch
    during training), prints the best point and evaluates it again with final_num_images."""
    points = ev.points
    done = sweep.finished_everywhere(ev.log.metrics_path, context)
    if len(points) > 50:
        distributed.print0(sweep.cost_note(points))

    stop = functools.partial(requested_anywhere, ev.stopper)

    def score(p):
        return score_point(ev, p, epoch=epoch, context=context, in_sweep=True)

    records, stopped = sweep.run(points, score, done=done, should_stop=stop)
    if stopped:
        return sweep_stopped(ev, f"after {len(records)} of {len(points)} points")
    best = sweep_report.report(records, ev.output_dir, f"sweep-epoch{epoch}" if ev.during_training else "sweep", ev.log)
    if ev.final_num_images is None or best is None:
        return best
    best_point = next(p for p in points if p.key() == sweep.record_key(best))
    distributed.print0(f"final: the best point again with {ev.final_num_images} images")
    records, stopped = sweep.run(
        [dataclasses.replace(best_point, num_images=ev.final_num_images)], score, done=done, should_stop=stop
    )
    return sweep_stopped(ev, "before the final point was scored") if stopped else records[0]


def sweep_stopped(ev: Evaluation, where: str) -> None:
    """A sweep stopped by a signal (`where`: how far it got): None with a line to rerun, or during
    training GenerationStopped (the epoch's checkpoint is saved, the rerun finishes the sweep: catch_up)."""
    if ev.during_training:
        raise GenerationStopped(f"stop requested (signal) {where} of the sweep")
    distributed.print0(f"sweep stopped (signal) {where}; rerun the same command to continue")


def catch_up(ev: Evaluation, epoch: int):
    """Collective. At a resume after `epoch` (its checkpoint written, the run stopped, by a signal or a
    kill, before the evaluation of its weights was done): evaluate it now if metrics.jsonl lacks a
    scored record of one of its points (a sweep goes on where it stopped; sweep.finished)."""
    context = eval_context(ev, None, epoch)
    done = sweep.finished_everywhere(ev.log.metrics_path, context)
    sizes = {r["num_images"] for r in done.values()}
    if all(p.key() in done for p in ev.points) and ev.final_num_images in (None, *sizes):
        return
    distributed.print0(f"the evaluation of epoch {epoch} was not finished before the run stopped: evaluating now")
    evaluate(ev, epoch=epoch, weights_epoch=epoch)
