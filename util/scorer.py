"""How generated images are scored: FID and Inception Score (util/fid.py), and on request precision /
recall (util/prc.py) and FD-DINOv2 (util/dinov2.py), with the protocol that produced the numbers.

A `Scorer` is built once per run; every file it needs is checked at construction (one-line errors,
before any image is generated). `features` turns a batch of uint8 images into one row per image
([Inception pool 2048 | Inception logits 1008 | DINOv2 class token, if on]); `scores` turns all
images' rows, in image order, into the numbers. `protocol` says what produced them: the uint8
conversion, each network's resize and precision, and every reference file with its sha256, so that
records of different set-ups are told apart (and are not matched as finished sweep points).
"""

import torch

from util import fid, prc
from util.dinov2 import DINOv2, describe_architecture
from util.distributed import broadcast_object, is_main_process

QUANTIZE = "round(clip(255·(x + 1)/2, 0, 255)) to uint8, ties to even (util.evaluation.quantize)"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


class Scorer:
    """FID against `fid_stats` and Inception Score with one Inception network; with `ref_features`
    (prepare_ref.py --ref_features) also precision and recall (k = 3) of the same pool features; with
    `dinov2_weights` also FD-DINOv2 against `dinov2_stats`. util.errors.BadInput kinds for a missing
    or bad file, or one that says it is of images of another size than `img_size` (px; None: not
    checked), at construction (a collective: rank 0 hashes the files for the protocol; the reference
    features are read by the rank that scores, at its first scoring)."""

    def __init__(
        self,
        fid_stats: str,
        inception_weights: str | None,
        device: torch.device,
        *,
        ref_features: str | None = None,
        dinov2_weights: str | None = None,
        dinov2_stats: str | None = None,
        img_size: int | None = None,
    ):
        self.fid_stats = fid_stats
        self.stats = fid.load_stats(fid_stats, img_size=img_size)
        self.inception = fid.Inception(inception_weights, device)
        self.ref_features = ref_features
        self.reference_count = prc.check_features(ref_features, img_size=img_size) if ref_features else None
        self._reference = None  # the features themselves: read by the rank that scores, when it first does
        self.dinov2 = DINOv2(dinov2_weights, device) if dinov2_weights else None
        self.dinov2_stats_path = dinov2_stats
        self.dinov2_stats = (
            fid.load_stats(dinov2_stats, self.dinov2.dim, "--dinov2_stats", img_size) if self.dinov2 else None
        )
        self.protocol = broadcast_object(self._protocol() if is_main_process() else None)  # files hashed once

    @property
    def device(self) -> torch.device:
        return self.inception.device

    @property
    def feature_dim(self) -> int:
        """Columns of a `features` row."""
        return fid.FEATURE_DIM + fid.LOGITS_DIM + (self.dinov2.dim if self.dinov2 else 0)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, 3, H, W) -> (B, feature_dim) float32 on the CPU."""
        parts = [self.inception.features(images)]
        if self.dinov2 is not None:
            parts.append(self.dinov2.features(images))
        return torch.cat(parts, dim=1)

    def scores(self, features: torch.Tensor) -> dict:
        """All images' features (N, feature_dim), in image order -> {'fid', 'inception_score',
        'inception_score_std'} (+ 'precision', 'recall'; + 'fd_dinov2')."""
        inception_end = fid.FEATURE_DIM + fid.LOGITS_DIM
        pool, logits = features[:, : fid.FEATURE_DIM], features[:, fid.FEATURE_DIM : inception_end]
        is_mean, is_std = fid.inception_score(logits)
        fid_value = fid.frechet_distance(fid.statistics(pool), self.stats)
        out = dict(fid=fid_value, inception_score=is_mean, inception_score_std=is_std)
        if self.ref_features:
            if self._reference is None:
                self._reference = prc.load_features(self.ref_features)
            out["precision"], out["recall"] = prc.precision_recall(pool, self._reference, self.device)
        if self.dinov2 is not None:
            dino = features[:, inception_end:].contiguous()
            out["fd_dinov2"] = fid.frechet_distance(fid.statistics(dino), self.dinov2_stats)
        return out

    def _protocol(self) -> dict:
        """What produced the numbers (see the module docstring); plain JSON values."""
        p = dict(
            images=QUANTIZE,
            inception=f"torch-fidelity {_version('torch-fidelity')} inception-v3-compat, float32: uint8 -> "
            "TF1-compatible bilinear resize to 299 px; FID of the 2048 pool features, IS of the 1008 logits "
            f"({fid.ISC_SPLITS} splits)",
            inception_weights_sha256=fid.file_digest(self.inception.weights),
            fid_stats=self.fid_stats,
            fid_stats_sha256=fid.file_digest(self.fid_stats),
        )
        if self.ref_features:
            p.update(
                prc=f"torch-fidelity prc_features_to_metric, k = {prc.K}, Inception pool features",
                ref_features=self.ref_features,
                ref_features_sha256=fid.file_digest(self.ref_features),
                ref_features_count=int(self.reference_count),
            )
        if self.dinov2 is not None:
            p.update(
                dinov2=f"timm {_version('timm')} DINOv2 {describe_architecture(self.dinov2.arch)}, float32: uint8 -> "
                "TF1-compatible "
                "bilinear resize to 224 px, ImageNet mean / std, class token (torch-fidelity's DINOv2 preprocessing)",
                dinov2_weights_sha256=fid.file_digest(self.dinov2.weights),
                dinov2_stats=self.dinov2_stats_path,
                dinov2_stats_sha256=fid.file_digest(self.dinov2_stats_path),
            )
        return p
