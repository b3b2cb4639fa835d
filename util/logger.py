"""What a run records, written by rank 0 only: console lines (also appended to output_dir/log.txt),
TensorBoard scalars, and output_dir/metrics.jsonl (one JSON object per line, "kind": "train" or "eval").

A write that fails (a full disk) is reported once on the console and that output is switched off;
the run goes on, and `failed` tells the caller (evaluation treats it as an error).

Each training step is recorded once, also when a run is killed and rerun: a resumed run first drops
what the killed attempt recorded after the checkpoint it resumes from (RunLog.start_at)."""

import contextlib
import fcntl
import json
import math
import os

from util.distributed import copy_console_to, is_main_process, print0
from util.files import append_line, atomic_write, is_write_failure


def hms(seconds: float) -> str:
    """Seconds as H:MM:SS (hours may exceed 24)."""
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class RunLog:
    """The one logger of a run; on ranks other than 0 every method does nothing."""

    def __init__(self, output_dir: str):
        self.active = is_main_process()
        self.output_dir = output_dir
        self.metrics_path = os.path.join(output_dir, "metrics.jsonl")
        self.writer = None  # the TensorBoard writer, made at the first scalar
        self.purge_step = None  # TensorBoard hides earlier events at or after this x (start_at)
        self.off = set()  # outputs switched off after a failed write
        if self.active:
            os.makedirs(output_dir, exist_ok=True)
            copy_console_to(os.path.join(output_dir, "log.txt"))

    @property
    def failed(self) -> bool:
        return bool(self.off)

    def give_up(self, what: str, e: Exception):
        """Report a failed write of `what` once and switch that output off (other errors: re-raised)."""
        if not is_write_failure(e):
            raise e
        self.off.add(what)
        print0(f"error: {what} could not be written ({e}); it is not written from now on")

    def _tensorboard(self, write):
        """Call write(writer) with the TensorBoard writer (made at the first use)."""
        if not self.active or "TensorBoard" in self.off:
            return
        try:
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=self.output_dir, purge_step=self.purge_step)
            write(self.writer)
        except Exception as e:
            self.writer = None
            self.give_up("TensorBoard", e)

    def scalars(self, values: dict, step: int):
        """TensorBoard scalars {tag: value} at x = step."""

        def write(writer):
            for tag, value in values.items():
                writer.add_scalar(tag, value, step)

        self._tensorboard(write)

    def image(self, tag: str, picture, step: int):
        """A TensorBoard image: an (H, W, 3) uint8 array at x = step."""
        self._tensorboard(lambda writer: writer.add_image(tag, picture, step, dataformats="HWC"))

    def record(self, record: dict):
        """Append one line to metrics.jsonl; non-finite floats are written as null."""
        if not self.active or "metrics.jsonl" in self.off:
            return
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        try:
            with self._metrics_lock():
                append_line(self.metrics_path, json.dumps(clean))
        except OSError as e:
            self.give_up("metrics.jsonl", e)

    @contextlib.contextmanager
    def _metrics_lock(self):
        """Held while metrics.jsonl is appended to or rewritten (an --evaluate_gen beside a training run
        appends to the same file)."""
        fd = os.open(os.path.join(self.output_dir, ".metrics.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def start_at(self, epoch: int, step: int, steps_per_epoch: int):
        """A training run starts `step` steps into `epoch` (a resume; 0, 0: from scratch): what an
        earlier attempt recorded after that point (it trained on, was killed, and is now trained
        again) is dropped, so that every step is recorded once. metrics.jsonl keeps its train records up
        to (epoch, step), the evaluations made during training of earlier epochs, and every record of an
        --evaluate_gen (they name their checkpoint); it is rewritten atomically. TensorBoard hides the
        events from x = the start's + 1 on (`purge_step`: the new event file begins with a restart
        marker that TensorBoard honours; evaluation scalars, at x = epoch, are not hidden)."""
        if not self.active:
            return
        self.purge_step = int((epoch + step / steps_per_epoch) * 1000) + 1
        if self.writer is not None:  # a new writer (at the next scalar) writes the marker
            self.close_writer()
        if "metrics.jsonl" in self.off or not os.path.isfile(self.metrics_path):
            return
        try:
            with self._metrics_lock():
                with open(self.metrics_path) as f:
                    lines = f.readlines()
                kept = [line for line in lines if self.kept_at_start(line, epoch, step)]
                if len(kept) < len(lines):
                    atomic_write(self.metrics_path, lambda f: f.write("".join(kept).encode()))
                    dropped = len(lines) - len(kept)
                    print0(f"metrics.jsonl: {dropped} record(s) after epoch {epoch}, step {step} dropped (done again)")
        except OSError as e:
            self.give_up("metrics.jsonl", e)

    def flush(self):
        if self.writer is not None:
            try:
                self.writer.flush()
            except Exception as e:
                self.writer = None
                self.give_up("TensorBoard", e)

    def close_writer(self):
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as e:
                self.give_up("TensorBoard", e)
            self.writer = None

    def close(self):
        self.flush()
        self.close_writer()
        if self.active:
            copy_console_to(None)

    @staticmethod
    def kept_at_start(line: str, epoch: int, step: int) -> bool:
        """Whether a metrics.jsonl line stays when a run starts `step` steps into `epoch` (start_at):
        a train record up to that point, an evaluation during training (or one seed's) of an earlier epoch, any other
        record. A line cut short by a kill does not; a record whose epoch or step is not a number (not
        written by a run) stays."""
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            return False
        if not isinstance(r, dict):
            return False
        at = (r.get("epoch", -1), r.get("step", 0))
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in at):
            return True
        if r.get("kind") == "train":
            return at <= (epoch, step)
        if r.get("kind") in ("eval", "eval_seed") and r.get("checkpoint") is None:  # eval_seed: one seed's scores
            return at[0] < epoch
        return True
