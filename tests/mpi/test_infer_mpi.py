"""``mpiexec -n K python -m oceanda infer``: bitwise rank-count invariance, kill-one-rank
restart. Launches the MPI jobs itself (plain ``pytest`` runs them)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from oceanda.data import names as N
from oceanda.testing import write_synthetic_osse

pytestmark = [pytest.mark.mpi,
              pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")]

BASE = ["patch.size=[5,16,16]", "patch.stride=[2,12,12]", "patch.crop=[2,2]", "tile=[8,20,24]",
        "progress=false"]
ARGS = [*BASE, "method=oi", "method.Lx_km=40", "method.Lt_days=4"]


@pytest.fixture(scope="module")
def obs_path(tmp_path_factory):
    return write_synthetic_osse(tmp_path_factory.mktemp("mpi_osse"))["obs"]


def launch(k: int, obs: Path, out: Path, env: dict | None = None, timeout=240):
    cmd = ["mpiexec", "-n", str(k), sys.executable, "-m", "oceanda", "infer",
           f"obs_path={obs}", f"out_dir={out}", *ARGS]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture(scope="module")
def serial(obs_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial") / "run"
    res = launch(1, obs_path, out)
    assert res.returncode == 0, res.stderr
    return xr.open_zarr(out / "analysis.zarr")[N.SSH].values


@pytest.mark.parametrize("k", [2, 3, 4])
def test_rank_count_invariance_bitwise(obs_path, serial, tmp_path, k):
    res = launch(k, obs_path, tmp_path / "run")
    assert res.returncode == 0, res.stderr
    assert f"on {k} rank(s)" in res.stdout
    got = xr.open_zarr(tmp_path / "run" / "analysis.zarr")[N.SSH].values
    assert np.isfinite(got).any()
    np.testing.assert_array_equal(got, serial)  # bitwise, NaN on land in both
    logs = sorted((tmp_path / "run" / "logs").glob("rank*.log"))
    assert len(logs) == k


def test_std_and_members_exchange_is_rank_invariant(obs_path, tmp_path):
    """Halo buffers carry every blended field (mean, variance, members): 3 ranks == 1."""
    extra = ["method=identity", "+method.std=0.05", "+method.members=2"]
    outs = []
    for k in (1, 3):
        res = subprocess.run(["mpiexec", "-n", str(k), sys.executable, "-m", "oceanda", "infer",
                              f"obs_path={obs_path}", f"out_dir={tmp_path / str(k)}", *BASE, *extra],
                             capture_output=True, text=True, timeout=240,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr
        outs.append(xr.open_zarr(tmp_path / str(k) / "analysis.zarr").load())
    for name in (N.SSH, N.SSH_STD, N.SSH_MEMBERS):
        assert np.isfinite(outs[0][name].values).any()
        np.testing.assert_array_equal(outs[1][name].values, outs[0][name].values)


def _computed_tiles(out: Path) -> Counter:
    c: Counter = Counter()
    for log in (out / "logs").glob("rank*.log"):
        c.update(int(m) for m in re.findall(r"computed tile (\d+):", log.read_text()))
    return c


def test_killed_rank_restart_identical_and_nothing_computed_twice(obs_path, serial, tmp_path):
    out = tmp_path / "run"
    crash = launch(2, obs_path, out, env={"OCEANDA_FAIL_AFTER_TILES": "2", "OCEANDA_FAIL_RANK": "1"})
    assert crash.returncode != 0
    first = _computed_tiles(out)
    assert sum(first.values()) >= 2  # rank 1 saved 2 tiles before dying
    res = launch(2, obs_path, out)
    assert res.returncode == 0, res.stderr
    total = _computed_tiles(out)
    assert max(total.values()) == 1, total  # no tile computed twice
    assert "loaded tile" in "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    got = xr.open_zarr(out / "analysis.zarr")[N.SSH].values
    np.testing.assert_array_equal(got, serial)
    assert not (out / "restart" / "partials").exists()  # cleaned up once complete


def test_dry_run_under_mpi_prints_the_rank_map(obs_path, tmp_path):
    res = subprocess.run(["mpiexec", "-n", "3", sys.executable, "-m", "oceanda", "infer",
                          f"obs_path={obs_path}", f"out_dir={tmp_path / 'dry'}", "dry_run=true", *ARGS],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("oceanda infer (dry run)") == 1  # rank 0 only
    assert all(f"rank {r}:" in res.stdout for r in range(3))
    assert not (tmp_path / "dry").exists()
