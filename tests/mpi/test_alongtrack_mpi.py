"""``mpiexec -n K python -m oceanda infer obs=L3 files``: the along-track test set (several
missions, 0..360 longitudes, fill values, a duplicated time, a point on land) read, binned and
mapped by OI and by the shipped 4DVarNet on 1 and 2 ranks: bitwise equal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

from oceanda.testing import write_l3_testset

pytestmark = [pytest.mark.mpi, pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")]

COMMON = ["patch.size=[15,16,16]", "patch.stride=[5,12,12]", "patch.crop=[2,2]", "tile=[20,16,16]",
          "progress=false", "obs_exclude=[c2]"]
METHODS = {"oi": ["method=oi", "method.Lx_km=40", "method.Lt_days=4"], "4dvarnet": ["method=4dvarnet"]}


@pytest.fixture(scope="module")
def l3(tmp_path_factory):
    return write_l3_testset(tmp_path_factory.mktemp("l3_mpi"), shape=(20, 32, 32))


def launch(k, l3, out, method):
    cmd = ["mpiexec", "-n", str(k), sys.executable, "-m", "oceanda", "infer",
           f"obs={l3['files'][0].parent}/dt_global_*_phy_l3_*.nc", f"grid={l3['grid']}", f"out_dir={out}",
           *COMMON, *METHODS[method]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("method", ["oi", "4dvarnet"])
def test_alongtrack_input_is_rank_count_invariant_bitwise(l3, tmp_path, method):
    outs = []
    for k in (1, 2):
        res = launch(k, l3, tmp_path / str(k), method)
        assert res.returncode == 0, res.stderr
        assert f"on {k} rank(s)" in res.stdout and "duplicate_time" in res.stdout
        outs.append(xr.open_zarr(tmp_path / str(k) / "analysis.zarr")["ssh"].values)
    ocean = l3["fields"]["ocean"]
    assert np.isfinite(outs[0][:, ocean]).all() and np.isnan(outs[0][:, ~ocean]).all()
    np.testing.assert_array_equal(outs[1], outs[0])
    qc = [json.loads((tmp_path / str(k) / "summary.json").read_text())["alongtrack_qc"] for k in (1, 2)]
    assert qc[0] == qc[1] and qc[0]["c2"] == {"excluded": 1720}
