"""Shared inputs of the reliability suite: a small valid observation store (synthetic fields)."""

from __future__ import annotations

import pytest

from oceanda.testing import write_synthetic_osse

# Small patches/tiles so that every app run here lasts seconds.
SMALL = ["patch.size=[5,16,16]", "patch.stride=[2,12,12]", "patch.crop=[2,2]", "tile=[8,20,24]",
         "progress=false"]


@pytest.fixture(scope="session")
def good_obs(tmp_path_factory):
    """A valid ``obs.zarr`` (16 days, 40 x 48 cells) and its ``truth.zarr``, written by xarray."""
    root = tmp_path_factory.mktemp("reliability_osse")
    return {**write_synthetic_osse(root), "root": root}
