"""What a run records, written by rank 0 only: console lines (also appended to output_dir/log.txt),
TensorBoard scalars, and output_dir/metrics.jsonl (one JSON object per line, "kind": "train" or "eval").

A write that fails (a full disk) is reported once on the console and that output is switched off;
the run goes on, and `failed` tells the caller (evaluation treats it as an error)."""

import json
import math
import os

from util.distributed import copy_console_to, is_main_process, print0
from util.files import append_line, is_write_failure


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

                self.writer = SummaryWriter(log_dir=self.output_dir)
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
            append_line(self.metrics_path, json.dumps(clean))
        except OSError as e:
            self.give_up("metrics.jsonl", e)

    def flush(self):
        if self.writer is not None:
            try:
                self.writer.flush()
            except Exception as e:
                self.writer = None
                self.give_up("TensorBoard", e)

    def close(self):
        self.flush()
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as e:
                self.give_up("TensorBoard", e)
            self.writer = None
        if self.active:
            copy_console_to(None)
