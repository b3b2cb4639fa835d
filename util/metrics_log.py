"""output_dir/metrics.jsonl: one JSON object per line ("kind": "train" or "eval"), written by rank 0."""
import json
import os

from util.distributed import is_main_process


class MetricsLog:
    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, "metrics.jsonl")

    def write(self, record: dict):
        if is_main_process():
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
