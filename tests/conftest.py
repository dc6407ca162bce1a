"""Shared test set-up: markers, float64 defaults, one torch thread, a few fixtures."""

from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_mpi = pytest.mark.skip(reason="needs mpiexec and mpi4py (pip install -e '.[mpi]')")
    try:
        import mpi4py  # noqa: F401

        has_mpi = shutil.which("mpiexec") is not None
    except ImportError:
        has_mpi = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "mpi" in item.keywords and not has_mpi:
            item.add_marker(skip_mpi)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread per test; BLAS/OpenMP pools restored after tests that set them
    (``oceanda.parallel.threads.limit_threads`` in an in-process run)."""
    import torch
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(n)
