import os
import sys

import pytest
import torch

# Without CUDA the Triton kernels are tested through Triton's CPU interpreter. The flag is read when a kernel is
# decorated, so it must be set before any test (of any directory) imports triton or the kernels; auto dispatch never
# picks Triton for CPU tensors, so it changes nothing else.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


# The suite runs under pytest-xdist on a 2-core machine: one intra-op thread per worker avoids oversubscription,
# which otherwise makes small-tensor ops tens of times slower.
torch.set_num_threads(1)
