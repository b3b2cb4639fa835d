"""Precision and recall of generated images (Kynkäänniemi et al. 2019, k = 3; the JiT paper's
appendix reports them) from the Inception pool features FID already computes: no second network pass.

The metric is torch-fidelity's own computation (torch_fidelity.metric_prc.prc_features_to_metric, its
memory-saving path: distances in blocks of 10,000 rows): a generated image counts for precision when
it lies within the k-th-nearest-neighbour radius of some reference image (radii among the
reference features, the point itself excluded), a reference image counts for recall when it lies
within the radius of some generated image. The cost grows with (generated + reference)² × 2048.

It needs the reference set's features, not only their mean and covariance: prepare_ref.py
--ref_features writes them, all images' or a random subset (--ref_features_num), as an .npz with
`features` (N, 2048) float32, `indices` (N,) int64 (the images' positions in the dataset's sorted
order), `total` (the dataset's size) and `img_size` (their side in px; evaluation of another size refuses
the file). ImageNet's 1,281,167 images make 10.5 GB; a random 50,000
(the generated set's usual size) make 410 MB.
"""

import os
import zipfile

import numpy as np
import torch

from util import fid
from util.errors import BadValue, MissingFile
from util.files import atomic_write

K = 3  # neighbourhood size (the paper's)
BATCH = 10000  # torch-fidelity's default prc_batch_size


def subset(total: int, num: int | None, seed: int) -> np.ndarray:
    """Sorted int64 indices of `num` images drawn without replacement from `total` (numpy PCG64
    seeded with `seed`); all of them when num is None or not below total."""
    if num is None or num >= total:
        return np.arange(total, dtype=np.int64)
    if num <= K:
        raise BadValue(f"--ref_features_num {num}: precision and recall need more than k = {K} reference images")
    return np.sort(np.random.default_rng(seed).choice(total, size=num, replace=False)).astype(np.int64)


def save_features(path: str, features: torch.Tensor, indices: np.ndarray, total: int, img_size: int | None = None):
    """Write reference features (N, D) float32 with their dataset indices (and `img_size`, the side in
    px of their images, when given: check_features checks it) atomically to `path`."""
    feats = features.numpy().astype(np.float32, copy=False)
    size = {} if img_size is None else {"img_size": np.int64(img_size)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(
        path,
        lambda f: np.savez(
            f, features=feats, indices=np.asarray(indices, dtype=np.int64), total=np.int64(total), **size
        ),
        needed=feats.nbytes + 8 * len(indices),
    )


def check_features(path: str, dim: int = 2048, img_size: int | None = None) -> int:
    """The number of reference images of a --ref_features file, from its header alone (the features
    are read where they are used); one-line errors when it is missing, not (N > K, dim) float32, or of
    images of another size than `img_size` (fid.check_reference_size; a file that does not say is not checked)."""
    if not os.path.isfile(path):
        raise MissingFile(
            f"--ref_features {path}: no such file; make it with `python prepare_ref.py --ref_features {path} ...` "
            "(see docs/evaluation.md)"
        )
    try:
        with zipfile.ZipFile(path) as z, z.open("features.npy") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
        with np.load(path) as f:  # an .npz reads only the members asked for
            found = int(f["img_size"]) if "img_size" in f.files else None
    except Exception as e:  # not a zip, no 'features', truncated
        raise BadValue(f"--ref_features {path}: not a features file ({type(e).__name__}: {e})") from None
    if len(shape) != 2 or shape[1] != dim or shape[0] <= K or dtype != np.float32:
        raise BadValue(
            f"--ref_features {path}: expected float32 features of shape (N > {K}, {dim}), got {dtype} {tuple(shape)}"
        )
    fid.check_reference_size(found, img_size, f"--ref_features {path}")
    return shape[0]


def load_features(path: str, dim: int = 2048) -> torch.Tensor:
    """The (N, dim) float32 features of a --ref_features file (check_features first)."""
    check_features(path, dim)
    with np.load(path) as f:
        return torch.from_numpy(f["features"])


def precision_recall(generated: torch.Tensor, reference: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """(precision, recall) of generated (n, D) against reference (N, D) features, k = K, by
    torch-fidelity on `device` (the distance blocks come back to the CPU). NaN for n <= K (no radius)."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    if generated.shape[0] <= K:
        return float("nan"), float("nan")
    out = prc_features_to_metric(
        generated.to(device, torch.float32),
        reference.to(device, torch.float32),
        prc_neighborhood=K,
        prc_batch_size=BATCH,
        save_cpu_ram=True,
        verbose=False,
    )
    return out[KEY_METRIC_PRECISION], out[KEY_METRIC_RECALL]
