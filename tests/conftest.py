import os
import sys

# Waiting OpenMP threads sleep instead of spinning: the suite runs 2 workers (and the processes they
# start) on 2 cores, each with torch's 2 threads, and a spinning wait holds a core another process
# needs (the quick tier took 137 s spinning, 65 s sleeping). libgomp reads it once, when torch loads:
# scripts/test.sh exports it for every process; here for a direct pytest run.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The suite's processes (and those it starts) write the .pyc of what they import, once: the venvs
# install without byte-compiling (scripts/setup.sh), and these machines set PYTHONDONTWRITEBYTECODE=1,
# under which every process would compile torch's modules from source again.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

# The Triton kernels run under the interpreter on CPU-only machines; this must be set
# before any @triton.jit module is imported. On a GPU machine they run natively.
if os.environ.get("UMAE_TEST_NO_INTERPRET") != "1":
    import torch  # noqa: E402

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_backend():
    # every test starts from the same seeds (torch's; Python's and numpy's, which timm's augmentations
    # draw from) and umae's default backend; which implementation a test runs, it says itself
    # (tests/umae_testing.py: @runs_impl)
    import random

    import numpy as np

    import umae

    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    prev = umae.get_backend()
    umae.set_backend("fused")
    yield
    umae.set_backend(prev)


def pytest_configure(config):
    # umae.data silences torchvision 0.29's deprecation of its decoders once per process; pytest
    # resets warning filters per test, so say it here too
    config.addinivalue_line("filterwarnings",
                            "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")


def pytest_collection_modifyitems(config, items):
    # the long tests (the GPU machine's checks, the spawned runs) first: with pytest-xdist a long
    # test started last keeps one worker busy while the other has nothing left to take
    first = {"gpucheck": 0, "dist": 1}
    items.sort(key=lambda item: min([first.get(m.name, 2) for m in item.iter_markers()] + [2]))
