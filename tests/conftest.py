"""Shared test setup: seeded fresh inputs, the GPU marker, the backends available here."""
import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen(request):
    """A generator seeded from the test's id: fresh inputs per test, reproducible per test."""
    seed = abs(hash(request.node.nodeid)) % (2 ** 31) if os.environ.get("PYTHONHASHSEED") else \
        sum(map(ord, request.node.nodeid)) * 7919 % (2 ** 31)
    return torch.Generator().manual_seed(seed)
