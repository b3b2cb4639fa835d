"""Sample grids: one row per class of a fixed set, image (r, j) from the noise of index r·per_class + j
drawn as evaluation draws it (util.evaluation.initial_noise with the seed), so that a grid depends
only on the weights and the sampler: the same after a resume, on any device.

Training writes one every --sample_every epochs and at the end (GridWriter: output_dir/samples/
epoch-NNNN.png, and TensorBoard), sample.py writes one from a checkpoint, the report shows them.
"""

import glob
import os
import re
import time
from dataclasses import dataclass

import numpy as np
import torch

from sampling import SamplerSettings
from util import distributed, stop
from util.errors import BadValue
from util.evaluation import gather_rows, initial_noise, quantize
from util.viz import grid_array, write_png

GRID_IMAGES = 32  # images of a default training grid
GRID_ROWS = 8  # classes of a default training grid (fewer when the run has fewer)
ONE_CLASS_ROW = 8  # images per row of a grid of one class
FOLDER = "samples"
IMAGENET_FIGURE_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)  # the reference's ImageNet figures' grid


def default_classes(class_num: int, rows: int = GRID_ROWS) -> list[int]:
    """`rows` classes spread evenly over 0 .. class_num - 1 (all of them when there are fewer)."""
    rows = min(rows, class_num)
    return [k * class_num // rows for k in range(rows)]


def figure_classes(class_num: int, rows: int = GRID_ROWS) -> list[int]:
    """sample.py's rows when no --classes are given: the classes of the reference's ImageNet figures
    when the weights have them all, else the first `rows` (all of them when there are fewer)."""
    if class_num > max(IMAGENET_FIGURE_CLASSES):
        return list(IMAGENET_FIGURE_CLASSES[:rows])
    return list(range(min(rows, class_num)))


def default_per_class(n_classes: int) -> int:
    """Images per row so that a grid holds about GRID_IMAGES images (at least one per row)."""
    return max(1, GRID_IMAGES // n_classes)


@dataclass(frozen=True)
class GridSpec:
    """A grid: `per_class` images of each of `classes` (one row each, in that order), sampled with
    `sampler`, image (r, j) from the noise of (seed, r·per_class + j). BadValue for an empty grid."""

    classes: tuple
    per_class: int
    sampler: SamplerSettings
    seed: int = 0

    def __post_init__(self):
        if not self.classes or self.per_class < 1:
            raise BadValue(
                f"a sample grid needs at least one class and one image per class, got {len(self.classes)} "
                f"classes × {self.per_class}"
            )
        if self.seed < 0:
            raise BadValue(f"the sample grid's seed must be non-negative, got {self.seed}")

    @property
    def size(self) -> int:
        return len(self.classes) * self.per_class

    def check_classes(self, num_classes: int, flag: str = "--sample_classes"):
        """BadValue for a class outside [0, num_classes)."""
        bad = [c for c in self.classes if not 0 <= c < num_classes]
        if bad:
            raise BadValue(f"{flag} {' '.join(map(str, bad))}: outside [0, {num_classes})")

    def labels(self, indices) -> torch.Tensor:
        """Class of each image index (row-major: image i is in row i // per_class)."""
        return torch.tensor([self.classes[i // self.per_class] for i in indices], dtype=torch.long)


def check_grid_flags(flags):
    """--sample_every, --sample_classes, --sample_per_class against --class_num (BadValue), before any work."""
    if flags.sample_every < 0:
        raise BadValue(f"--sample_every must be >= 0 (0: no sample grids), got {flags.sample_every}")
    if flags.sample_per_class is not None and flags.sample_per_class < 1:
        raise BadValue(f"--sample_per_class must be at least 1, got {flags.sample_per_class}")
    spec_from_flags(flags, SamplerSettings(), flags.class_num)


def spec_from_flags(flags, sampler: SamplerSettings, class_num: int) -> GridSpec:
    """The run's grid: --sample_classes (default: default_classes of class_num), --sample_per_class
    (default: default_per_class), `sampler`, --seed. BadValue for a class outside [0, class_num)."""
    classes = tuple(flags.sample_classes or default_classes(class_num))
    spec = GridSpec(classes, flags.sample_per_class or default_per_class(len(classes)), sampler, flags.seed)
    spec.check_classes(class_num)
    return spec


def sample_images(denoiser, spec: GridSpec, device: torch.device, indices=None, net=None) -> torch.Tensor:
    """uint8 images (len(indices), 3, H, W) on the CPU of the grid's images `indices` (default: all),
    sampled by `denoiser` (net: a stand-in for its net with the same weights, e.g. compiled) in
    autocast on `device`. The global RNG streams are not used."""
    indices = list(range(spec.size) if indices is None else indices)
    size = denoiser.net.input_size
    if not indices:
        return torch.empty((0, 3, size, size), dtype=torch.uint8)
    noise = initial_noise(spec.seed, indices, (3, size, size), denoiser.noise_scale).to(device)
    with torch.no_grad(), distributed.autocast(device):
        x = denoiser.generate(spec.labels(indices).to(device), spec.sampler, noise=noise, net=net)
    return quantize(x).cpu()


def grid_of(images: torch.Tensor, spec: GridSpec) -> np.ndarray:
    """The (H', W', 3) uint8 picture of a grid's images: one row per class; the images of a one-class
    grid (--class_num 1) in rows of ONE_CLASS_ROW (32 images: 4 × 8, not a strip 32 images wide)."""
    return grid_array(images, nrow=spec.per_class if len(spec.classes) > 1 else min(spec.per_class, ONE_CLASS_ROW))


def grid_path(output_dir: str, epoch: int) -> str:
    return os.path.join(output_dir, FOLDER, f"epoch-{epoch:04d}.png")


def list_grids(output_dir: str) -> list[tuple[int, str]]:
    """[(epoch, path)] of the training grids in output_dir/samples, by epoch."""
    found = []
    for path in glob.glob(os.path.join(output_dir, FOLDER, "epoch-*.png")):
        m = re.fullmatch(r"epoch-(\d+)\.png", os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


class GridWriter:
    """The sample grids of a training run: after every `every` epochs (epochs every - 1, 2·every - 1,
    ...) and after the last, EMA 1 samples `spec`, each rank its share of the images; rank 0
    writes output_dir/samples/epoch-NNNN.png atomically and the picture to TensorBoard (tag
    'samples', x = (epoch + 1)·1000). A grid that cannot be written is a warning (`failed` counts them).
    stopper: a util.stop.StopSignal; a stop requested on any rank before a grid is sampled raises
    util.stop.GenerationStopped (the rerun makes the grid: `catch_up`)."""

    def __init__(
        self, output_dir: str, spec: GridSpec, every: int, epochs: int, log, device: torch.device, stopper=None
    ):
        self.output_dir, self.spec, self.every, self.epochs = output_dir, spec, every, epochs
        self.log, self.device, self.stopper = log, device, stopper
        self.failed = 0
        self.timed = False
        self.clock = (time.time(), 0)  # (when, epochs trained since the start)

    def due(self, epoch: int) -> bool:
        return self.every > 0 and epoch >= 0 and ((epoch + 1) % self.every == 0 or epoch + 1 == self.epochs)

    def plan(self, images_per_epoch: int) -> str:
        """What the run will write and its estimated cost, in network passes: a grid costs
        size × sampler passes, an epoch's training about 3 passes per image (forward and backward),
        the ranks sharing both alike. The first grid's measured time is printed when it is made."""
        s, n = self.spec.sampler, self.spec.size
        if self.every <= 0:
            return "sample grids: off (--sample_every 0)"
        share = n * s.net_passes() / (3 * images_per_epoch * self.every)
        return (
            f"sample grids: {len(self.spec.classes)} classes × {self.spec.per_class} with EMA 1 ({s.method}, "
            f"{s.steps} steps, "
            f"cfg {s.cfg} on ({s.interval_min}, {s.interval_max})), every {self.every} epoch(s) and at the end, "
            f"into {os.path.join(self.output_dir, FOLDER)}; about {n * s.net_passes()} network passes each, "
            f"{100 * share:.2f}% of the training's (small batches run slower: the first grid's time follows)"
        )

    def begin(self, start, samplers, images_per_epoch: int):
        """Collective, at the start of training from `start` (util.checkpointer.Start): print the plan,
        make the grid of the epoch before if the run stopped after its checkpoint but before it."""
        distributed.print0(self.plan(images_per_epoch))
        if start.step == 0:
            self.catch_up(start.epoch - 1, samplers, start.epoch)
        else:
            self.start(start.epoch)

    def start(self, epochs_done: int = 0):
        """Start the clock that the first grid's cost is measured against."""
        self.clock = (time.time(), epochs_done)

    def catch_up(self, epoch: int, samplers, epochs_done: int = 0):
        """Collective. At a resume after `epoch` ended (its checkpoint written, the run stopped before
        its grid): make the grid of `epoch` if it is due and missing."""
        missing = (
            distributed.broadcast_object(not os.path.exists(grid_path(self.output_dir, epoch)))
            if self.due(epoch)
            else False
        )
        if missing:
            self.start(epochs_done)
            self(epoch, samplers)
        self.start(epochs_done)

    def __call__(self, epoch: int, samplers) -> str | None:
        """Collective. The grid after `epoch`, sampled with EMA 1 of `samplers` (engine_eval.EMAWeights:
        a sharded EMA is gathered into a full copy on every rank first, and freed after). Returns its path (rank 0,
        when written)."""
        stop.raise_if_requested(self.stopper, "before a sample grid")
        t0 = time.time()
        samplers.refresh([1])
        denoiser, net = samplers(1)
        rank, world, n = distributed.get_rank(), distributed.get_world_size(), self.spec.size
        mine = range(rank * n // world, (rank + 1) * n // world)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            images = sample_images(denoiser, self.spec, self.device, mine, net)
        images = gather_rows(images, self.device)
        samplers.release()  # a gathered copy of a sharded EMA 1 is not kept between grids
        path = None
        if distributed.is_main_process():
            path = self.write(epoch, grid_of(images, self.spec))
        self.report_cost(epoch, time.time() - t0)
        return path

    def write(self, epoch: int, picture: np.ndarray) -> str | None:
        path = grid_path(self.output_dir, epoch)
        try:
            write_png(path, picture)
        except OSError as e:
            self.failed += 1
            distributed.print0(
                f"warning: the sample grid of epoch {epoch} could not be written ({e}); training goes on"
            )
            return None
        self.log.image("samples", tensorboard_picture(picture), (epoch + 1) * 1000)
        return path

    def report_cost(self, epoch: int, seconds: float):
        """Print the first grid's time against the training time per epoch so far, once."""
        if self.timed:
            return
        self.timed = True
        since, done_before = self.clock
        epochs = epoch + 1 - done_before
        per_epoch = (time.time() - seconds - since) / epochs if epochs > 0 else 0.0
        share = (
            f"; {100 * seconds / (per_epoch * self.every):.2f}% of training at one every {self.every} epoch(s) "
            f"(an epoch took {per_epoch:.1f} s)"
            if per_epoch > 0
            else ""
        )
        distributed.print0(f"sample grid of epoch {epoch}: {seconds:.2f} s{share}")


def tensorboard_picture(picture: np.ndarray, max_width: int = 1024) -> np.ndarray:
    """The grid for TensorBoard: at most `max_width` px wide (halved until it fits), to keep the event file small."""
    while picture.shape[1] > max_width:
        h, w = picture.shape[0] // 2 * 2, picture.shape[1] // 2 * 2
        picture = picture[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    return picture
