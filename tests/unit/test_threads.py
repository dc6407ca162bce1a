"""Per-rank thread discipline (oceanda.parallel.threads): the share arithmetic and the
limits read back from torch, threadpoolctl (BLAS / OpenMP) and numba."""

from __future__ import annotations

import numba
import pytest
import torch
from threadpoolctl import threadpool_info

from oceanda.errors import ConfigError
from oceanda.parallel.threads import affinity, cpu_share, describe, limit_threads


@pytest.mark.parametrize("mine, node, expected", [
    ({0, 1}, [{0, 1}, {0, 1}], 1),                 # 2 unbound ranks on 2 cores
    ({0, 1, 2, 3}, [{0, 1, 2, 3}] * 2, 2),         # 2 unbound ranks on 4 cores
    ({0, 1, 2, 3}, [{0, 1, 2, 3}] * 3, 1),         # 3 ranks on 4 cores: floor, never 0
    ({0, 1}, [{0, 1}, {2, 3}], 2),                 # bound to disjoint sets: keep the set
    ({0}, [{0}] * 4, 1),                           # oversubscribed: at least 1
    ({0, 1, 2, 3}, [{0, 1, 2, 3}], 4),             # a single rank
])
def test_cpu_share(mine, node, expected):
    assert cpu_share(mine, node) == expected


def _blas_threads():
    return {lib["user_api"]: lib["num_threads"] for lib in threadpool_info()
            if lib["user_api"] in ("blas", "openmp")}


def test_limit_threads_reads_back_every_pool():
    n_auto = max(1, len(affinity()))
    got = limit_threads(None, "auto")
    assert got["share"] == n_auto and got["cores"] == len(affinity())
    assert got["torch"] == torch.get_num_threads() == n_auto
    assert all(v == n_auto for v in _blas_threads().values())
    assert numba.get_num_threads() == min(n_auto, numba.config.NUMBA_NUM_THREADS)
    got = limit_threads(None, 1)  # the user's override
    assert got["torch"] == 1 and got["numba"] == 1 and got["blas"] in (0, 1)
    assert all(v == 1 for v in _blas_threads().values())
    assert describe(got).startswith("1 thread of torch")


@pytest.mark.parametrize("bad", [0, -2, "many", 1.5])
def test_limit_threads_rejects_bad_values(bad):
    with pytest.raises(ConfigError, match="system.threads"):
        limit_threads(None, bad)
