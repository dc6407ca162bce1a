"""Per-rank thread discipline: every thread pool of a rank limited to its share of the cores.

Several MPI ranks on one node each start torch's intra-op pool, the BLAS (OpenBLAS/MKL) and
OpenMP pools behind numpy/scipy, and numba's pool, each sized to the whole machine by
default: ``R`` ranks then run ``R x cores`` busy threads on ``cores`` cores, and dense
kernels (Cholesky, GEMM) slow down by several times (measured on a 2-core machine: the same
900-patch OI run on 2 ranks took 8.5-75.6 s in a default environment, 1.7 s with
``OMP_NUM_THREADS=1``). :func:`limit_threads` sizes every pool to the rank's share, whatever
the environment variables say, and reads the limits back for the rank's log.

The share (:func:`cpu_share`, pure arithmetic): the rank's CPU affinity
(``os.sched_getaffinity``, else ``os.cpu_count()``) divided by the largest number of ranks of
its node whose affinity holds one of its cores: 2 unbound ranks on 2 cores get 1 each, ranks
bound to disjoint core sets by the launcher keep their whole set. ``system.threads`` (an
integer) overrides it.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable

log = logging.getLogger("oceanda.parallel")


def affinity() -> frozenset[int]:
    """The CPUs this process may run on (``sched_getaffinity``; else all ``cpu_count``)."""
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))


def cpu_share(mine: Iterable[int], node: Iterable[Iterable[int]]) -> int:
    """Threads for a rank whose affinity is ``mine`` among the affinities ``node`` of every
    rank of its node (itself included): ``len(mine) // (most ranks sharing one of its
    CPUs)``, at least 1."""
    mine = frozenset(mine)
    counts = Counter(c for cpus in node for c in frozenset(cpus))
    sharing = max((counts[c] for c in mine), default=1)
    return max(1, len(mine) // max(1, sharing))


def thread_limits() -> dict[str, int]:
    """The current sizes of this process's pools: ``torch``, ``blas`` and ``openmp`` (largest
    of the loaded libraries; 0 when none is loaded), ``numba`` (0 for torch / numba when they
    are not imported)."""
    import sys

    from threadpoolctl import threadpool_info

    torch, numba = sys.modules.get("torch"), sys.modules.get("numba")
    out = {"torch": torch.get_num_threads() if torch is not None else 0, "blas": 0, "openmp": 0}
    for lib in threadpool_info():
        api = lib.get("user_api")
        if api in ("blas", "openmp"):
            out[api] = max(out[api], int(lib.get("num_threads", 0)))
    out["numba"] = numba.get_num_threads() if numba is not None else 0
    return out


def limit_threads(comm=None, threads: int | str | None = "auto", load: bool = True) -> dict[str, int]:
    """Limit torch, BLAS, OpenMP and numba to ``threads`` threads each in this process.

    Args:
        comm: the communicator (its node's ranks share the cores); ``None``: a single rank.
        threads: ``"auto"`` / ``None`` (the rank's share, :func:`cpu_share`) or an integer
            >= 1 (the user's override, ``system.threads``).
        load: import torch and numba to limit them (default); ``False`` limits them only if
            already imported (an app that never uses them, e.g. ``evaluate``, run as one process).

    Returns:
        :func:`thread_limits` read back after setting, plus ``share`` (the automatic share)
        and ``cores`` (CPUs in this rank's affinity).
    """
    import importlib
    import sys

    from threadpoolctl import threadpool_limits

    from oceanda.errors import ConfigError

    mine = affinity()
    node_allgather = getattr(comm, "node_allgather", None)
    node = node_allgather(sorted(mine)) if node_allgather is not None else [sorted(mine)]
    share = cpu_share(mine, node)
    if threads in (None, "auto"):
        n = share
    else:
        try:
            n = int(threads)
        except (TypeError, ValueError):
            n = 0
        if n < 1 or str(n) != str(threads).strip():
            raise ConfigError(f"system.threads must be 'auto' or an integer >= 1, got {threads!r}")
    torch, numba = (importlib.import_module(m) if load else sys.modules.get(m) for m in ("torch", "numba"))
    if torch is not None:
        torch.set_num_threads(n)
    # numba first: setting its pool loads its threading layer (an OpenMP runtime, maybe
    # another libgomp), which threadpoolctl then limits with the others
    if numba is not None:
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    threadpool_limits(limits=n)
    got = thread_limits()
    return {**got, "share": share, "cores": len(mine)}


def describe(limits: dict[str, int]) -> str:
    """One line for a rank's log: ``1 thread of torch, BLAS, OpenMP, numba (share of 2 cores)``."""
    pools = [("torch", "torch"), ("blas", "BLAS"), ("openmp", "OpenMP"), ("numba", "numba")]
    vals = {k: limits.get(k, 0) for k, _ in pools}
    loaded = [(k, name) for k, name in pools if vals[k]]
    if not loaded:
        return "no thread pool loaded"
    same = len({vals[k] for k, _ in loaded}) == 1
    if same:
        n = vals[loaded[0][0]]
        body = f"{n} thread{'s' if n != 1 else ''} of " + ", ".join(name for _, name in loaded)
    else:
        body = ", ".join(f"{vals[k]} {name}" for k, name in loaded) + " threads"
    if limits.get("share") is None:
        return body
    return f"{body} (share {limits['share']} of {limits['cores']} cores)"


def limit_and_log(comm=None, threads: int | str | None = "auto", load: bool = True) -> dict[str, int]:
    """:func:`limit_threads`, then one INFO line of the limits in the log of ``oceanda.parallel``
    (``rank R: 1 thread of torch, BLAS, OpenMP, numba (share 1 of 2 cores)``): every app says
    how many threads each of its pools runs."""
    limits = limit_threads(comm, threads, load)
    log.info("rank %d: %s", getattr(comm, "rank", 0), describe(limits))
    return limits
