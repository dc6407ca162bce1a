"""Device binding: one GPU per rank, CPU otherwise.

The *local rank* (rank among the processes of one node) picks the GPU. It comes from the
communicator (``MPI.COMM_TYPE_SHARED`` split) when MPI runs, else from the launcher's
environment: ``SLURM_LOCALID`` (srun), ``OMPI_COMM_WORLD_LOCAL_RANK`` (Open MPI),
``MPI_LOCALRANKID`` / ``PMI_LOCAL_RANK`` (MPICH / Hydra), ``LOCAL_RANK`` (torchrun).
``CUDA_VISIBLE_DEVICES`` is honoured because torch only sees the listed devices: rank ``l``
gets visible device ``l mod n_visible``. On any device, every CPU thread pool of the rank
(torch, BLAS, OpenMP, numba) is limited to ``threads`` (default ``"auto"``: the rank's share
of its node's cores, :mod:`oceanda.parallel.threads`), so that ranks on one node do not
oversubscribe it whatever the environment.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("oceanda.parallel")

_LOCAL_RANK_VARS = ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                    "PMI_LOCAL_RANK", "LOCAL_RANK")


def local_rank_from_env(default: int = 0) -> int:
    """The node-local rank from the launcher's environment variables (first one set)."""
    for var in _LOCAL_RANK_VARS:
        value = os.environ.get(var)
        if value is not None and value.strip().isdigit():
            return int(value)
    return default


def bind_device(comm=None, device: str = "auto", threads: int | str | None = "auto") -> torch.device:
    """Pick and bind this rank's device.

    Args:
        comm: communicator (its ``local_rank`` is used when it runs MPI).
        device: ``"auto"`` (a GPU when available, else CPU), ``"cpu"`` or ``"cuda"``.
        threads: threads of every pool (torch, BLAS, OpenMP, numba): ``"auto"`` the rank's
            share of the node's cores, an integer the user's choice, ``None`` leaves them.

    Returns:
        ``torch.device("cuda:k")`` (and made current) or ``torch.device("cpu")``.
    """
    if comm is not None and getattr(comm, "is_mpi", False):
        local = comm.local_rank
    else:
        local = local_rank_from_env()
    if device not in ("auto", "cpu", "cuda"):
        from oceanda.errors import ConfigError

        raise ConfigError(f"system.device must be auto, cpu or cuda, got {device!r}")
    if threads is not None:
        from oceanda.parallel.threads import limit_and_log

        limit_and_log(comm, threads)
    if device != "cpu" and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if local >= n:
            log.warning("local rank %d but only %d visible GPUs (CUDA_VISIBLE_DEVICES=%s): "
                        "GPUs are shared", local, n, os.environ.get("CUDA_VISIBLE_DEVICES"))
        dev = torch.device("cuda", local % n)
        torch.cuda.set_device(dev)
        return dev
    if device == "cuda":
        from oceanda.errors import ConfigError

        raise ConfigError("system.device=cuda but no CUDA device is visible")
    return torch.device("cpu")
