"""What a run records, written by rank 0 only: console lines (also appended to output_dir/log.txt),
TensorBoard scalars, and output_dir/metrics.jsonl (one JSON object per line, "kind": "train" or "eval")."""
import json
import math
import os

from util.distributed import copy_console_to, is_main_process


class RunLog:
    """The one logger of a run; on ranks other than 0 every method does nothing."""

    def __init__(self, output_dir: str):
        self.active = is_main_process()
        self.output_dir = output_dir
        self.metrics_path = os.path.join(output_dir, "metrics.jsonl")
        self.writer = None  # the TensorBoard writer, made at the first scalar
        if self.active:
            os.makedirs(output_dir, exist_ok=True)
            copy_console_to(os.path.join(output_dir, "log.txt"))

    def scalars(self, values: dict, step: int):
        """TensorBoard scalars {tag: value} at x = step."""
        if not self.active:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=self.output_dir)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def record(self, record: dict):
        """Append one line to metrics.jsonl; non-finite floats are written as null."""
        if self.active:
            clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(clean) + "\n")

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.active:
            copy_console_to(None)
