"""Shared test setup: GPU tests are skipped without CUDA; CPU threads kept small for the 2-core CI."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    # tests reading the results of a Triton-interpreter script (a subprocess running the kernels on
    # the CPU, seconds to tens of seconds each) or of whole training runs are slow: the fast lane
    # (-m "not slow") leaves them out
    for item in items:
        names = getattr(item, "fixturenames", ())
        if any(n.endswith("interpreter_results") for n in names) or "two_seeds" in names:
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
