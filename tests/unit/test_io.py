"""oceanda.data.io: lazy opening, validation errors naming the file, atomic writers."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from oceanda.data import io
from oceanda.errors import InputError


def dataset(T=5, ny=4, nx=6, **extra):
    coords = {"time": pd.date_range("2012-10-22", periods=T), "lat": 33.0 + 0.5 * np.arange(ny),
              "lon": -65.0 + 0.5 * np.arange(nx)}
    rng = np.random.default_rng(0)
    data = {"ssh": (("time", "lat", "lon"), rng.standard_normal((T, ny, nx))),
            "ocean": (("lat", "lon"), np.ones((ny, nx), "i1"))}
    data.update(extra)
    return xr.Dataset(data, coords=coords)


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "truth.zarr"
    dataset().to_zarr(path, mode="w", consolidated=False)
    return path


def test_open_zarr_and_netcdf_lazily(store, tmp_path):
    da = io.open_field(store, "ssh")
    assert da.dims == ("time", "lat", "lon") and da.chunks is not None
    nc = tmp_path / "truth.nc"
    dataset().to_netcdf(nc)
    sniffed = tmp_path / "truth_without_suffix"
    os.rename(nc, sniffed)
    ds = io.open_dataset(sniffed, ["ssh", "ocean"])
    np.testing.assert_array_equal(ds.ssh.values, dataset().ssh.values)
    assert io.open_field(store, "ssh_std", required=False) is None


def test_aliases_transposition_and_decreasing_latitude(tmp_path):
    ds = dataset().rename(lat="latitude", lon="longitude")
    ds = ds.isel(latitude=slice(None, None, -1)).transpose("longitude", "time", "latitude")
    path = tmp_path / "a.nc"
    ds.to_netcdf(path)
    da = io.open_field(path, "ssh")
    assert da.dims == ("time", "lat", "lon")
    assert (np.diff(da.lat.values) > 0).all()
    xr.testing.assert_allclose(da.load(), dataset().ssh)


def test_missing_file_and_variable_are_named(store, tmp_path):
    with pytest.raises(InputError, match="nope.zarr: no such file"):
        io.open_field(tmp_path / "nope.zarr", "ssh")
    with pytest.raises(InputError, match=r"truth.zarr: missing variable 'ssh_obs' \(variables: ocean, ssh\)"):
        io.open_field(store, "ssh_obs")
    (tmp_path / "junk.bin").write_bytes(b"not a dataset")
    with pytest.raises(InputError, match="junk.bin: neither a zarr store nor a netCDF"):
        io.open_field(tmp_path / "junk.bin", "ssh")


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda ds: ds.assign_coords(lon=ds.lon.values[[0, 2, 1, 3, 4, 5]]), "'lon' is not monotonic"),
        (lambda ds: ds.assign_coords(lat=np.array([33.0, 33.5, 33.5, 34.0])), "'lat' has duplicated values"),
        (lambda ds: ds.assign_coords(lat=np.array([33.0, np.nan, 34.0, 34.5])), "'lat' holds NaN"),
        (lambda ds: ds.assign(ssh=ds.ssh.rename(lat="y")), "variable 'ssh' has dims"),
        (lambda ds: ds.assign(ssh=(ds.ssh * 100).assign_attrs(units="cm")), "variable 'ssh' has units 'cm'"),
        (lambda ds: ds.assign(ssh=(ds.ssh * 100).astype("i4")), "variable 'ssh' has dtype int32"),
        (lambda ds: ds.assign(ssh=ds.ssh.astype(str)), "variable 'ssh' has dtype <U"),
        (lambda ds: ds.assign(ocean=ds.ocean.astype("f4")), "variable 'ocean' has dtype float32"),
        (lambda ds: ds.assign_coords(lon=("lon", np.deg2rad(ds.lon.values), {"units": "radians"})),
         "'lon' has units 'radians'"),
        (lambda ds: ds.assign_coords(lat=ds.lat.values + 100), r"'lat' spans 133..134.5, outside \[-90, 90\]"),
        (lambda ds: ds.assign_coords(lon=ds.lon.values - 300), r"'lon' spans -365..-362.5, outside \[-180, 360\]"),
        (lambda ds: ds.assign_coords(time=np.arange(5.0)), "'time' holds numbers .* without units"),
        (lambda ds: ds.assign_coords(time=("time", np.arange(5.0), {"units": "hours"})),
         "'time' has units 'hours'"),
    ],
)
def test_bad_coordinates_raise(tmp_path, mutate, match):
    path = tmp_path / "bad.nc"
    mutate(dataset()).to_netcdf(path)
    with pytest.raises(InputError, match=match) as info:
        io.open_dataset(path, ["ssh"], optional=["ocean"])
    assert "bad.nc" in str(info.value)


def test_conventions_that_are_read(tmp_path):
    """Not refused: longitudes 0..360, SSH units spelled 'meters', day numbers with units
    'days', integers packed with a scale_factor (read as floats)."""
    ds = dataset().assign_coords(lon=dataset().lon.values + 360, time=("time", np.arange(5.0), {"units": "days"}))
    ds["ssh"].attrs["units"] = "meters"
    path = tmp_path / "ok.nc"
    ds.to_netcdf(path, encoding={"ssh": {"dtype": "int16", "scale_factor": 1e-4, "_FillValue": -32768}})
    got = io.open_dataset(path, ["ssh"], optional=["ocean"])
    assert got.ssh.dtype.kind == "f" and float(got.lon[0]) == 295.0
    np.testing.assert_allclose(got.ssh.values, ds.ssh.values, atol=1e-4)
    np.testing.assert_array_equal(got.time.values, np.arange(5.0))


def test_check_aligned_tolerance_and_mismatch():
    a = dataset().ssh
    io.check_aligned(a, a.assign_coords(lon=a.lon + 1e-6))
    with pytest.raises(InputError, match=r"'lon'\[0\] is -65.0 in truth and -64.75"):
        io.check_aligned(a, a.assign_coords(lon=a.lon + 0.25))
    with pytest.raises(InputError, match="'time' has 5 values in truth and 4 in analysis"):
        io.check_aligned(a, a.isel(time=slice(1, None)))


def test_select_window_and_empty_window():
    a = dataset(T=10).ssh.assign_coords(time=pd.date_range("2012-10-22T12:00", periods=10))
    sub = io.select_window(a, ["2012-10-23", "2012-10-25"], [-64.6, -64, 33, 34])
    # a plain end date includes its whole day (here the 12:00 value)
    assert sub.sizes == {"time": 3, "lat": 3, "lon": 2}
    with pytest.raises(InputError, match=r"empty evaluation window: period \['2013-01-01', '2013-02-01'\]"):
        io.select_window(a, ["2013-01-01", "2013-02-01"], None, what="truth x.zarr")
    with pytest.raises(InputError, match="box"):
        io.select_window(a, None, [0, 1, 0, 1])
    with pytest.raises(InputError, match="not a date"):
        io.select_window(a, ["yesterday", "2012-10-25"])


def test_require_finite():
    a = dataset().ssh
    io.require_finite(a, "ok")
    with pytest.raises(InputError, match="analysis a.zarr is all NaN"):
        io.require_finite(a * np.nan, "analysis a.zarr")


def test_write_json_atomic_nan_to_null_and_no_leftovers(tmp_path):
    path = tmp_path / "out" / "scores.json"
    io.write_json_atomic(path, {"mu": np.float64(0.5), "lam": float("nan"), "arr": np.arange(2), "inf": np.inf})
    io.write_json_atomic(path, {"mu": 0.9, "lam": None})
    assert json.loads(path.read_text()) == {"mu": 0.9, "lam": None}
    io.write_json_atomic(tmp_path / "b.json", {"lam": float("nan"), "arr": np.arange(2)})
    assert json.loads((tmp_path / "b.json").read_text()) == {"lam": None, "arr": [0, 1]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["scores.json"]


def test_atomic_zarr_write_replaces_and_survives_failure(tmp_path, monkeypatch):
    path = tmp_path / "analysis.zarr"
    io.atomic_zarr_write(dataset(), path)
    io.atomic_zarr_write(dataset(T=3), path)
    assert io.open_field(path, "ssh").sizes["time"] == 3

    def broken(self, store, **kw):
        os.makedirs(store, exist_ok=True)
        (store / "partial").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(xr.Dataset, "to_zarr", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        io.atomic_zarr_write(dataset(T=7), path)
    monkeypatch.undo()
    assert io.open_field(path, "ssh").sizes["time"] == 3  # the old store is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis.zarr"]
