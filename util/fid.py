"""FID and Inception Score with stock torch-fidelity, on uint8 images held in memory.

torch-fidelity's own pieces are used unchanged: its Inception-v3 feature extractor
('inception-v3-compat', features '2048' and 'logits_unbiased', float32), `fid_features_to_statistics`,
`fid_statistics_to_metric` and `isc_features_to_metric` (10 splits, shuffle seed 2020). Fed the same
uint8 images in the same order, the numbers equal `torch_fidelity.calculate_metrics` on PNG files.

Reference statistics are an .npz file with `mu` (2048,) and `sigma` (2048, 2048), the layout of the
reference release's `fid_stats/jit_in{size}_stats.npz` (FD-DINOv2's have D = 1024: load_stats takes
the dimension). `file_digest` is the sha256 a record's protocol names each file by. torch-fidelity
(and torchvision under it) is imported where it is used, so that runs that do not evaluate do not pay
its import time.
"""

import hashlib
import os
import socket

import numpy as np
import torch

from util.errors import BadValue, MissingFile
from util.files import atomic_write

FEATURE_DIM = 2048  # Inception pool features (FID)
LOGITS_DIM = 1008  # Inception logits without bias (IS)
ISC_SPLITS = 10
ISC_SEED = 2020  # torch-fidelity's default rng_seed for the IS shuffle


def cached_weights_path() -> str:
    """Where torch-fidelity's first use stores the downloaded Inception weights (torch hub cache)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))


def resolve_inception_weights(path: str | None = None, timeout_s: float = 60.0) -> str:
    """Path of a local Inception-v3 weights file (torch-fidelity's format).

    An explicit `path` must exist. Without one, the torch hub cache is used, downloading the file
    there first as torch-fidelity does. Raises FileNotFoundError with a message naming
    `--inception_weights` when the file is missing or the download fails (e.g. no network); the
    download gives up after `timeout_s` seconds without data instead of hanging.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    if path is not None:
        if not os.path.isfile(path):
            raise MissingFile(f"--inception_weights {path}: no such file")
        return path
    cached = cached_weights_path()
    if os.path.isfile(cached):
        return cached
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        torch.hub.download_url_to_file(URL_INCEPTION_V3, cached, progress=False)
    except OSError as e:  # URLError (no network, refused proxy), timeout, disk full
        raise MissingFile(
            f"the Inception-v3 weights for FID/IS are not available: downloading {URL_INCEPTION_V3} failed ({e}). "
            f"On a machine without network access, copy that file here and pass --inception_weights PATH "
            f"(or place it at {cached})."
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return cached


class Inception:
    """torch-fidelity's Inception-v3 ('2048' pool features and 'logits_unbiased', float32, eval) on
    `device`: the one place that builds it. The weights file is resolved at construction (fail fast:
    resolve_inception_weights), the network at the first batch."""

    def __init__(self, weights: str | None, device: torch.device):
        self.weights = resolve_inception_weights(weights)
        self.device = device
        self._net = None

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, 3, H, W) -> (B, 2048 + 1008) float32 on the CPU: pool features then
        unbiased logits. Always float32 (no autocast), as torch-fidelity runs."""
        if self._net is None:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

            self._net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=self.weights
            ).to(self.device)
        images = images.to(self.device)
        with torch.autocast(device_type=images.device.type, enabled=False):
            pool, logits = self._net(images)
        return torch.cat([pool, logits], dim=1).cpu()


def statistics(pool: torch.Tensor) -> dict:
    """(N, 2048) float32 CPU features -> {'mu': float32 (2048,), 'sigma': float64 (2048, 2048)}."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(pool.contiguous())


def save_stats(path: str, stats: dict, img_size: int | None = None):
    """Write `mu` and `sigma` (and `img_size`, the side in px of the images they are of, when given:
    load_stats checks it) to an .npz file at exactly `path`, atomically (WriteError on failure)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    size = {} if img_size is None else {"img_size": np.int64(img_size)}
    atomic_write(
        path,
        lambda f: np.savez(f, mu=stats["mu"], sigma=stats["sigma"], **size),
        needed=stats["mu"].nbytes + stats["sigma"].nbytes,
    )


def check_reference_size(found: int | None, img_size: int | None, what: str):
    """BadValue when a reference file of images of `found` px (None: the file does not say, as the
    reference release's) is used by an evaluation of `img_size` px (None: not checked)."""
    if found is not None and img_size is not None and found != img_size:
        raise BadValue(
            f"{what} is of {found} px images, this evaluation's are {img_size} px: make it with "
            f"`python prepare_ref.py --img_size {img_size} ...`"
        )


def load_stats(path: str, dim: int = FEATURE_DIM, flag: str = "--fid_stats", img_size: int | None = None) -> dict:
    """Read reference statistics ({'mu': (dim,), 'sigma': (dim, dim)}); one-line errors naming `flag`
    (and the prepare_ref.py option that makes the file) when missing or bad, or when the file says it
    is of images of another size than `img_size` (check_reference_size)."""
    if not os.path.isfile(path):
        made_by = "--stats" if flag == "--fid_stats" else flag
        raise MissingFile(
            f"{flag} {path} not found: pass {flag} PATH, or make the file with "
            f"`python prepare_ref.py {made_by} {path} ...` (see fid_stats/README.md)"
        )
    try:
        with np.load(path) as f:
            stats = {"mu": f["mu"], "sigma": f["sigma"]}
            found = int(f["img_size"]) if "img_size" in f.files else None
    except Exception as e:  # not a zip, missing key, truncated
        raise BadValue(
            f"{flag} {path} is not a statistics file with arrays 'mu' and 'sigma' ({type(e).__name__}: {e})"
        ) from None
    if stats["mu"].shape != (dim,) or stats["sigma"].shape != (dim, dim):
        raise BadValue(
            f"{flag} {path}: expected mu ({dim},) and sigma ({dim}, {dim}), got {stats['mu'].shape} and "
            f"{stats['sigma'].shape}"
        )
    check_reference_size(found, img_size, f"{flag} {path}")
    return stats


def file_digest(path: str, chunk: int = 1 << 24) -> str:
    """The sha256 of a file's bytes (hex), read in chunks of 16 MB."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def frechet_distance(stats1: dict, stats2: dict) -> float:
    """||mu1 - mu2||² + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^½) (Heusel et al. 2017), by
    torch-fidelity. Arrays of different float types (e.g. a float64 `mu` from another tool) are
    promoted to the common type; equal types are left untouched."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    a, b = dict(stats1), dict(stats2)
    for key in ("mu", "sigma"):
        dtype = np.result_type(a[key], b[key])
        a[key], b[key] = a[key].astype(dtype, copy=False), b[key].astype(dtype, copy=False)
    return fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID]


def inception_score(logits: torch.Tensor) -> tuple[float, float]:
    """(N, 1008) unbiased logits, in image order -> (IS mean, IS std) over 10 splits of a shuffle
    with seed 2020, as torch-fidelity. Needs N >= 10 (NaN otherwise)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    out = isc_features_to_metric(logits.contiguous(), splits=ISC_SPLITS, shuffle=True, rng_seed=ISC_SEED)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]
