"""``mpiexec -n 2 python -m oceanda infer``: each rank limits torch, BLAS/OpenMP and numba to
its share of the cores whatever OMP_NUM_THREADS says, logs it, and reports it (summary.json)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

from oceanda.data import names as N
from oceanda.parallel.threads import affinity
from oceanda.testing import synthetic_fields

pytestmark = [pytest.mark.mpi,
              pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")]


@pytest.mark.parametrize("threads", ["auto", "1"])
def test_two_ranks_limit_every_pool_to_their_share(tmp_path, threads):
    f = synthetic_fields((8, 24, 24), seed=1)
    obs = tmp_path / "obs.zarr"
    xr.Dataset({N.SSH_OBS: (N.FIELD_DIMS, f["obs"].astype(np.float32)),
                N.OCEAN: ((N.LAT, N.LON), f["ocean"].astype(np.int8))},
               {N.TIME: f["time"], N.LAT: f["lat"], N.LON: f["lon"]}).to_zarr(obs)
    out = tmp_path / "run"
    cmd = ["mpiexec", "-n", "2", sys.executable, "-m", "oceanda", "infer", f"obs_path={obs}",
           f"out_dir={out}", "patch.size=[5,12,12]", "patch.stride=[2,8,8]", "patch.crop=[2,2]",
           "tile=[8,12,24]", "progress=false", "method.Lx_km=40", "method.Lt_days=4",
           f"system.threads={threads}"]
    # an environment asking for many threads: the limits must not follow it
    env = {**os.environ, "OMP_NUM_THREADS": "8", "OPENBLAS_NUM_THREADS": "8", "NUMBA_NUM_THREADS": "8"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr
    expected = max(1, len(affinity()) // 2) if threads == "auto" else 1
    per_rank = json.loads((out / "summary.json").read_text())["per_rank"]
    assert len(per_rank) == 2
    for r in per_rank:
        t = r["threads"]
        assert t["torch"] == expected and t["numba"] == expected, t
        assert t["blas"] in (0, expected) and t["openmp"] in (0, expected), t
    for rank in (0, 1):
        text = (out / "logs" / f"rank{rank:04d}.log").read_text()
        assert f"rank {rank}: threads: {expected} thread" in text
