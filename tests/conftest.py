import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GOLDEN = os.path.join(ROOT, "tests", "data", "jit_tiny_reference.pt")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts processes (scripts, torchrun) or runs a whole training or evaluation; "
                                       "`pytest -m 'not slow'` skips them")


@pytest.fixture(scope="session")
def golden():
    """The reference release's outputs for a tiny JiT (see tests/data/README.md)."""
    return torch.load(GOLDEN, weights_only=True)


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> str:
    """A stand-in Inception weights file in torch-fidelity's format (random weights, no download)."""
    from helpers import make_standin_inception_weights

    path = str(tmp_path_factory.mktemp("inception") / "standin-inception.pth")
    make_standin_inception_weights(path)
    return path


@pytest.fixture(scope="session")
def fid_ref_stats(tmp_path_factory) -> str:
    """A reference statistics file of a random Gaussian (no Inception pass needed)."""
    from util import fid

    rng = np.random.default_rng(0)
    a = rng.standard_normal((fid.FEATURE_DIM, 16)) * 0.1
    path = str(tmp_path_factory.mktemp("stats") / "ref.npz")
    fid.save_stats(path, {"mu": (rng.random(fid.FEATURE_DIM) * 0.5).astype(np.float32), "sigma": a @ a.T})
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
