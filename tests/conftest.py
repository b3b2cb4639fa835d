import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GOLDEN = os.path.join(ROOT, "tests", "data", "jit_tiny_reference.pt")


@pytest.fixture(scope="session")
def golden():
    """The reference release's outputs for a tiny JiT (see tests/data/README.md)."""
    return torch.load(GOLDEN, weights_only=True)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or long tests (deselect with -m 'not slow')")
