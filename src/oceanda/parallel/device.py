"""Device binding: one GPU per rank, CPU otherwise.

The *local rank* (rank among the processes of one node) picks the GPU. It comes from the
communicator (``MPI.COMM_TYPE_SHARED`` split) when MPI runs, else from the launcher's
environment: ``SLURM_LOCALID`` (srun), ``OMPI_COMM_WORLD_LOCAL_RANK`` (Open MPI),
``MPI_LOCALRANKID`` / ``PMI_LOCAL_RANK`` (MPICH / Hydra), ``LOCAL_RANK`` (torchrun).
``CUDA_VISIBLE_DEVICES`` is honoured because torch only sees the listed devices: rank ``l``
gets visible device ``l mod n_visible``. Without CUDA the rank runs on CPU with
``threads`` torch threads (default 1, so that ranks on one node do not oversubscribe it).
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


def bind_device(comm=None, device: str = "auto", threads: int | None = 1) -> torch.device:
    """Pick and bind this rank's device.

    Args:
        comm: communicator (its ``local_rank`` is used when it runs MPI).
        device: ``"auto"`` (a GPU when available, else CPU), ``"cpu"`` or ``"cuda"``.
        threads: torch intra-op threads on CPU (``None`` leaves torch's default).

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
    if threads is not None:
        torch.set_num_threads(int(threads))
    return torch.device("cpu")
