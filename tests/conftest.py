"""Shared pytest setup.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, so it must be set before
any test module imports ``medseek.kernels``. On a machine without an NVIDIA GPU the
Triton kernels can only run in the interpreter, which is how CI tests them.
"""

import os
from pathlib import Path

import pytest

if not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_faiss_thread():
    """FAISS on one OpenMP thread for a module (``pytestmark = usefixtures(...)``): the CI
    box has 2 shared cores, and OpenMP spinning across busy cores is 5-10x slower."""
    faiss = pytest.importorskip("faiss")
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one intra-op thread for a module: on the 2 shared cores, two threads spin
    against each other (a small training step took 10x longer, measured)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
