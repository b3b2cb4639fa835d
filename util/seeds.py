"""Several noise seeds per evaluation (main_jit.py --eval_seeds N): the same images, classes and
sampler with the initial noise of seeds s, s + 1, ..., s + N - 1 (s = --seed; image i of seed s starts
from the noise of (s, i), util.evaluation.initial_noise). Each seed's scores are one record; their
summary holds, for every score, the mean over the seeds, the sample standard deviation over the
seeds (ddof = 1: an unbiased variance from N draws) and the per-seed values. Also the one-line
text of a record's scores for the log."""

import math

import numpy as np

SCORES = ("fid", "inception_score", "precision", "recall", "fd_dinov2")  # each a mean over seeds in a summary
NAMES = {"fid": "FID", "inception_score": "IS", "precision": "precision", "recall": "recall", "fd_dinov2": "FD-DINOv2"}


def seed_list(base: int, n: int) -> range:
    """The N seeds of an evaluation at --seed base (a range: no list of N numbers is made up front)."""
    return range(base, base + n)


def as_floats(values) -> np.ndarray:
    """float64 array of scores; None (a NaN as metrics.jsonl stores it) is NaN."""
    return np.array([math.nan if v is None else v for v in values], dtype=np.float64)


def summarize(results: list[dict]) -> dict:
    """Per-seed results (dicts with the SCORES they have, 'inception_score_std', 'num_images',
    'seconds', perhaps 'images_saved'; seed order, at least 2) -> {score: mean, score_seed_std: sample
    std, score_seeds: [per seed]} for every score present, 'inception_score_std' the mean of the seeds'
    split stds, 'num_images' per seed, 'seconds' in all and, where some seed saved images,
    'images_saved': whether every one that did saved all. A NaN score (IS of fewer than 10 images; None
    in a record read back from metrics.jsonl) makes its mean and std NaN, and is None among the per-seed
    values (metrics.jsonl writes a record's NaN floats as null, but not those inside a list)."""
    if len(results) < 2:
        raise ValueError(f"a summary over seeds needs at least 2 results, got {len(results)}")
    out = {}
    for key in SCORES:
        if key not in results[0]:
            continue
        values = as_floats(r[key] for r in results)
        out[key] = float(values.mean())
        out[f"{key}_seed_std"] = float(values.std(ddof=1))
        out[f"{key}_seeds"] = [v if math.isfinite(v) else None for v in values.tolist()]  # JSON has no NaN
    out["inception_score_std"] = float(as_floats(r["inception_score_std"] for r in results).mean())
    out["num_images"] = results[0]["num_images"]
    out["seconds"] = float(sum(r["seconds"] for r in results))
    saved = [r["images_saved"] for r in results if "images_saved" in r]
    if saved:  # --save_images: a seed whose PNGs could not all be written fails the run (exit status 1)
        out["images_saved"] = all(saved)
    return out


def scores_text(record: dict) -> str:
    """'FID 3.1234, IS 5.6789 ± 0.1234, precision 0.7000, recall 0.6000, FD-DINOv2 80.1234' for one
    seed (IS ± its split std); a summary over seeds gives each score as mean ± std over the seeds."""

    def num(x) -> str:
        return f"{x:.4f}" if x is not None and math.isfinite(x) else "n/a"

    parts = []
    for key in SCORES:
        if key not in record:
            continue
        spread = record.get(f"{key}_seed_std")
        if spread is None and key == "inception_score":
            spread = record.get("inception_score_std")
        parts.append(f"{NAMES[key]} {num(record[key])}" + ("" if spread is None else f" ± {num(spread)}"))
    return ", ".join(parts)
