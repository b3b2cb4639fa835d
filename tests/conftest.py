import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GOLDEN = os.path.join(ROOT, "tests", "data", "jit_tiny_reference.pt")
# The intra-op thread count of everything run in the test process, fixtures of any scope included: CPU
# kernels split their sums by thread, so two runs compared bit for bit must use the same count.
THREADS = min(2, os.cpu_count() or 1)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: starts processes (scripts, torchrun) or runs a whole training or evaluation; "
        "`pytest -m 'not slow'` skips them",
    )
    torch.set_num_threads(THREADS)  # before any fixture: OMP_NUM_THREADS sets only the start value


@pytest.fixture(scope="session")
def golden():
    """The reference release's outputs for a tiny JiT (see tests/data/README.md)."""
    return torch.load(GOLDEN, weights_only=True)


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> str:
    """An image folder of 3 classes × 8 images (6 steps of the tiny batch 4 per epoch)."""
    from helpers import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def data48(tmp_path_factory) -> str:
    """An image folder of 3 classes × 16 images (12 steps of batch 4 per epoch, 6 on 2 processes)."""
    from helpers import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("data48"), per_class=16)


@pytest.fixture
def start():
    """start(script, *args, **options) -> a started process (helpers.start_script); every process (and
    its children: torchrun's workers) still running at teardown is killed, also after a failure."""
    import signal

    from helpers import start_script

    procs = []

    def launch(*args, **kwargs):
        procs.append(start_script(*args, **kwargs))
        return procs[-1]

    yield launch
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        if p.stdout:
            p.stdout.close()


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
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(THREADS)  # a module-scoped fixture of the next test is set up before its reset
