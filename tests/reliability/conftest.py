"""Shared inputs of the reliability suite: a small valid observation store (synthetic fields)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from oceanda.data import names as N
from oceanda.testing import synthetic_fields

# Small patches/tiles so that every app run here lasts seconds.
SMALL = ["patch.size=[5,16,16]", "patch.stride=[2,12,12]", "patch.crop=[2,2]", "tile=[8,20,24]",
         "progress=false"]


@pytest.fixture(scope="session")
def good_obs(tmp_path_factory):
    """A valid ``obs.zarr`` (16 days, 40 x 48 cells) and its ``truth.zarr``, written by xarray."""
    root = tmp_path_factory.mktemp("reliability_osse")
    f = synthetic_fields((16, 40, 48), seed=3)
    coords = {N.TIME: f["time"], N.LAT: f["lat"], N.LON: f["lon"]}
    obs = root / "obs.zarr"
    xr.Dataset({N.SSH_OBS: (N.FIELD_DIMS, f["obs"].astype(np.float32)),
                N.OCEAN: ((N.LAT, N.LON), f["ocean"].astype(np.int8))}, coords).to_zarr(obs)
    truth = root / "truth.zarr"
    xr.Dataset({N.SSH: (N.FIELD_DIMS, f["truth"].astype(np.float32)),
                N.OCEAN: ((N.LAT, N.LON), f["ocean"].astype(np.int8))}, coords).to_zarr(truth)
    return {"obs": obs, "truth": truth, "root": root}
