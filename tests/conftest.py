"""Shared test set-up: make the flat top-level modules and tools/ importable."""
import functools
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Goldens and key lists copied from the functional specification (REFERENCE.md section 13).
GOLDEN_DIR = os.path.join(ROOT, "tests", "golden")
# The DEEN/CAJ/MMN goldens are read where the specification keeps them (shared/ beside the checkout, as in CI):
# at 26 MB they do not belong in the repository.
SPEC_GOLDEN_DIR = os.path.join(os.path.dirname(ROOT), "shared", "spec", "goldens_deen_caj_mmn")


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for modules of many small forward passes: OpenMP hand-offs between threads cost
    more than they save at these sizes, and far more on a loaded 2-core machine."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def caj_goldens():
    """(npz arrays, case descriptions) of the official CAJ goldens (README 6.2 beside them)."""
    import numpy as np
    with open(os.path.join(SPEC_GOLDEN_DIR, "caj_goldens.json")) as f:
        cases = json.load(f)
    return np.load(os.path.join(SPEC_GOLDEN_DIR, "caj_goldens.npz")), cases
