"""L3 along-track input: reading, QC, daily binning (against a direct netCDF4 + numpy
reference), laziness by boxes, conventions, bad files; the OSSE's L3 writer."""

from __future__ import annotations

import json

import netCDF4
import numpy as np
import pytest
import xarray as xr

from oceanda.cli import main
from oceanda.data.alongtrack import (
    AlongTrackSource,
    L3Options,
    mission_name,
    read_points,
    resolve_paths,
)
from oceanda.data.alongtrack_write import write_l3
from oceanda.errors import InputError
from oceanda.testing import write_l3_testset

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")


@pytest.fixture(scope="module")
def l3(tmp_path_factory):
    return write_l3_testset(tmp_path_factory.mktemp("l3"))


def reference_binning(files, f, max_abs_sla=2.0, exclude=()):
    """Independent reference: netCDF4 reads, explicit loops over the points."""
    nt, ny, nx = f["truth"].shape
    lon0, lat0, res = f["lon"][0], f["lat"][0], 0.05
    s, n = np.zeros((nt, ny, nx)), np.zeros((nt, ny, nx))
    counts = {}
    t0 = f["time"][0].astype("datetime64[us]").astype(np.int64)
    for path in files:
        m = path.name.split("_")[2]
        if m in exclude:
            continue
        with netCDF4.Dataset(path) as ds:
            t = netCDF4.num2date(ds["time"][:], ds["time"].units, only_use_cftime_datetimes=False)
            tsec = np.array([np.datetime64(x.isoformat()).astype("datetime64[us]").astype(np.int64) for x in t])
            lon, lat = ds["longitude"][:].filled(np.nan), ds["latitude"][:].filled(np.nan)
            sla, mdt, lwe = (ds[v][:].filled(np.nan) for v in ("sla_unfiltered", "mdt", "lwe"))
        c = counts.setdefault(m, {"missing": 0, "absurd": 0, "duplicate_time": 0, "land": 0, "used": 0})
        prev = None
        for i in range(len(tsec)):
            ssh = sla[i] + mdt[i] - lwe[i]
            dup = prev is not None and tsec[i] == prev
            prev = tsec[i]
            if not np.isfinite(ssh):
                c["missing"] += 1
                continue
            if abs(sla[i]) > max_abs_sla:
                c["absurd"] += 1
                continue
            if dup:
                c["duplicate_time"] += 1
                continue
            x = lon[i] - 360.0 if lon[i] > 180 else lon[i]
            ix, iy = int(np.floor((x - lon0) / res + 0.5)), int(np.floor((lat[i] - lat0) / res + 0.5))
            d = int((tsec[i] - t0) // 86_400_000_000)
            if not (0 <= ix < nx and 0 <= iy < ny and 0 <= d < nt):
                continue
            if not f["ocean"][iy, ix]:
                c["land"] += 1
                continue
            c["used"] += 1
            s[d, iy, ix] += ssh
            n[d, iy, ix] += 1
    with np.errstate(invalid="ignore"):
        return np.where(n > 0, s / np.maximum(n, 1), np.nan), counts


def test_binning_and_qc_match_a_direct_reference(l3):
    f = l3["fields"]
    src = AlongTrackSource(l3["files"], f["lon"], f["lat"], f["ocean"])
    assert src.shape == f["truth"].shape and src.missions == ["alg", "c2", "j3", "s3a"]
    got = src.read(((0, 20), (0, 32), (0, 32)))
    ref, counts = reference_binning(l3["files"], f)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref))
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    qc = src.qc_counts()
    for m, c in counts.items():
        for k, v in c.items():
            assert qc[m][k] == v, (m, k)
        assert sum(qc[m].values()) == netCDF4.Dataset(l3["files"][[p.name.split("_")[2] for p in l3["files"]]
                                                               .index(m)]).dimensions["time"].size
    # the planted points are found: fill values, the duplicated time, the absurd value, land
    assert qc["j3"]["duplicate_time"] == 1 and qc["alg"]["absurd"] == 1
    assert all(qc[m]["missing"] == 3 for m in qc) and qc["s3a"]["land"] >= 1
    assert src.count_observed() == sum(c["used"] for c in counts.values()) > 1000
    # counted in 3 parts (ranks), each reading a third of every file: the same totals
    from oceanda.data.alongtrack import merge_qc

    parts = [AlongTrackSource(l3["files"], f["lon"], f["lat"], f["ocean"]).qc_counts(part=(k, 3)) for k in range(3)]
    assert merge_qc(parts) == qc and parts[0] != qc
    # the binned field is the truth (nearest cell) + 1 cm noise
    ok = np.isfinite(got)
    assert np.sqrt(np.nanmean((got[ok] - f["truth"][ok]) ** 2)) < 0.012


def test_boxes_with_halo_padding_read_the_same_cells_bitwise(l3):
    f = l3["fields"]
    src = AlongTrackSource(l3["files"], f["lon"], f["lat"], f["ocean"])
    full = src.read(((0, 20), (0, 32), (0, 32)))
    for box in (((-3, 8), (-5, 20), (10, 40)), ((7, 25), (12, 32), (0, 9)), ((19, 20), (0, 1), (0, 32))):
        part = src.read(box)
        inner = tuple(slice(max(lo, 0), min(hi, n)) for (lo, hi), n in zip(box, full.shape))
        dst = tuple(slice(s.start - lo, s.stop - lo) for s, (lo, _) in zip(inner, box))
        np.testing.assert_array_equal(part[dst], full[inner])  # bitwise, NaN included
        pad = np.ones(part.shape, bool)
        pad[dst] = False
        assert np.isnan(part[pad]).all()


def test_longitude_convention_time_units_and_exclude(l3, tmp_path):
    f = l3["fields"]
    base = AlongTrackSource(l3["files"], f["lon"], f["lat"], f["ocean"]).read(((0, 20), (0, 32), (0, 32)))
    # the same files with -180..180 longitudes and times in seconds since 2012-01-01
    moved = []
    for p in l3["files"]:
        ds = xr.open_dataset(p, decode_times=False).load()
        ds["longitude"] = ds["longitude"].where(ds["longitude"] <= 180, ds["longitude"] - 360)
        ds["longitude"].encoding = {}
        days = ds["time"].values  # days since 1950-01-01
        secs = (days - (np.datetime64("2012-01-01") - np.datetime64("1950-01-01")).astype(float)) * 86400
        ds = ds.assign_coords(time=("time", secs, {"units": "seconds since 2012-01-01 00:00:00",
                                                   "calendar": "proleptic_gregorian"}))
        ds.to_netcdf(tmp_path / p.name)
        moved.append(tmp_path / p.name)
    got = AlongTrackSource(moved, f["lon"], f["lat"], f["ocean"]).read(((0, 20), (0, 32), (0, 32)))
    np.testing.assert_allclose(got, base, rtol=0, atol=1e-9)
    ex = AlongTrackSource(l3["files"], f["lon"], f["lat"], f["ocean"], opts=L3Options(exclude=("c2",)))
    assert ex.missions == ["alg", "j3", "s3a"] and ex.qc_counts()["c2"] == {"excluded": 1720}
    ref, _ = reference_binning(l3["files"], f, exclude=("c2",))
    np.testing.assert_allclose(ex.read(((0, 20), (0, 32), (0, 32))), ref, rtol=1e-12, atol=1e-12)


def test_paths_globs_and_mission_names(l3, tmp_path):
    files = l3["files"]
    root = files[0].parent
    assert resolve_paths(str(root / "dt_global_*_phy_l3_*.nc")) == sorted(files)
    assert resolve_paths([str(files[1]), str(files[0]), str(files[0])]) == sorted(files[:2])
    with pytest.raises(InputError, match="matches no file"):
        resolve_paths(str(root / "nothing_*.nc"))
    assert mission_name("dt_global_c2_phy_l3_20161201-20180131_285-315_23-53.nc") == "c2"
    assert mission_name("x/alongtrack/jason.nc") == "jason"
    assert mission_name("a.nc", {"platform": "h2g"}) == "h2g"


def test_writer_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    n = 500
    t = np.datetime64("2017-01-01T00:00:00") + np.arange(n).astype("timedelta64[s]")
    lon, lat = -60 + 0.05 * np.arange(n) / 10, 35 + 0.05 * np.arange(n) / 10
    sla, mdt = rng.normal(0, 0.2, n), rng.normal(0.5, 0.1, n)
    for packed, tol in ((True, 0.0011), (False, 1e-12)):
        p = write_l3(tmp_path / f"dt_global_j3_phy_l3_{packed}.nc", time=t, lon=lon, lat=lat, sla_unfiltered=sla,
                     mdt=mdt, mission="j3", packed=packed)
        pts, qc = read_points([p])
        assert qc["j3"]["used"] == n
        np.testing.assert_allclose(pts["ssh"], sla + mdt, atol=tol)
        np.testing.assert_allclose(np.mod(pts["lon"], 360), np.mod(lon, 360), atol=1e-6)
        # float64 days since 1950: exact to well under a microsecond
        assert np.abs(pts["time"] - t.astype("datetime64[ns]")).max() < np.timedelta64(1, "us")
        with netCDF4.Dataset(p) as ds:
            assert ds["time"].units.startswith("days since 1950-01-01")
            assert (ds["longitude"][:] >= 0).all()


@pytest.mark.parametrize("damage, message", [
    ("drop_mdt", "missing variable(s) 'mdt'"),
    ("sla_cm", "'sla_unfiltered' has units 'cm'"),
    ("bad_time_units", "variable 'time'"),
    ("not_netcdf", "cannot be read as netCDF"),
])
def test_bad_files_exit_2_name_file_and_variable_and_write_nothing(l3, tmp_path, capsys, damage, message):
    bad = tmp_path / "dt_global_h2g_phy_l3_bad.nc"
    if damage == "not_netcdf":
        bad.write_text("not a netCDF file")
    else:
        ds = xr.open_dataset(l3["files"][0], decode_times=False).load()
        if damage == "drop_mdt":
            ds = ds.drop_vars("mdt")
        elif damage == "sla_cm":
            ds["sla_unfiltered"].attrs["units"] = "cm"
        else:
            ds["time"].attrs["units"] = "fortnights after lunch"
        ds.to_netcdf(bad)
    out = tmp_path / "run"
    rc = main(["infer", f"obs=[{l3['files'][0]},{bad}]", f"grid={l3['grid']}", f"out_dir={out}", "method=oi",
               "patch.size=[5,16,16]", "patch.stride=[2,12,12]", "patch.crop=[2,2]", "tile=[10,16,16]",
               "progress=false"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "oceanda infer: error:" in err and str(bad) in err and message in err
    assert not out.exists()


def test_infer_needs_a_grid_for_alongtrack_input(l3, tmp_path, capsys):
    rc = main(["infer", f"obs={l3['files'][0]}", f"out_dir={tmp_path / 'run'}", "progress=false"])
    assert rc == 2 and "set grid=NAME" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_infer_oi_from_l3_equals_infer_from_the_same_bins_gridded(l3, tmp_path):
    """The L3 path changes only how the observations arrive: OI on the binned L3 points ==
    OI on a gridded store holding the reference binning (float64)."""
    f = l3["fields"]
    ref, _ = reference_binning(l3["files"], f, exclude=("c2",))
    coords = {"time": f["time"], "lat": f["lat"], "lon": f["lon"]}
    xr.Dataset({"ssh_obs": (("time", "lat", "lon"), ref), "ocean": (("lat", "lon"), f["ocean"].astype(np.int8))},
               coords).to_zarr(tmp_path / "obs.zarr")
    common = ["method=oi", "method.Lx_km=40", "method.Lt_days=4", "patch.size=[5,16,16]", "patch.stride=[2,12,12]",
              "patch.crop=[2,2]", "tile=[10,16,16]", "progress=false", "dtype=float64"]
    assert main(["infer", f"obs={l3['files'][0].parent}/dt_global_*_phy_l3_*.nc", f"grid={l3['grid']}",
                 "obs_exclude=[c2]", f"out_dir={tmp_path / 'l3'}", *common]) == 0
    assert main(["infer", f"obs={tmp_path / 'obs.zarr'}", f"out_dir={tmp_path / 'grid'}", *common]) == 0
    a = xr.open_zarr(tmp_path / "l3" / "analysis.zarr")["ssh"].values
    b = xr.open_zarr(tmp_path / "grid" / "analysis.zarr")["ssh"].values
    assert np.isfinite(a[:, f["ocean"]]).all()
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)
    summary = json.loads((tmp_path / "l3" / "summary.json").read_text())
    qc = summary["alongtrack_qc"]
    assert qc["c2"] == {"excluded": 1720} and qc["j3"]["duplicate_time"] == 1 and qc["alg"]["absurd"] == 1


def test_generate_writes_one_l3_file_per_mission_that_reads_back_as_its_obs(tmp_path):
    """`oceanda generate`'s alongtrack/<mission>.nc: the track table in the L3 layout; binned
    back onto the OSSE grid they give the OSSE's gridded observations (to the 1 mm packing)."""
    from oceanda.data import osse

    box = {"name": "box", "lon_min": -61.0, "lon_max": -59.0, "lat_min": 37.0, "lat_max": 39.0, "resolution": 0.1}
    tiny = {"kind": "gaussian", "length_km": 60.0, "time_days": 3.0}
    res = osse.generate_osse(box, "4nadirs", ("2012-10-22", "2012-10-31"), tmp_path / "o", truth=tiny,
                             figures=False, progress=False, obs_noise=True)
    obs = xr.open_zarr(res["obs"])
    sats = obs.attrs["satellites"].split()
    files = sorted(res["alongtrack"].glob("*.nc"))
    assert [p.stem for p in files] == sorted(s for s in sats if (obs["track_sat"].values == sats.index(s)).any())
    with netCDF4.Dataset(files[0]) as ds:
        assert {"time", "longitude", "latitude", "sla_filtered", "sla_unfiltered", "mdt", "lwe"} <= set(ds.variables)
        assert ds["time"].units.startswith("days since 1950-01-01") and (ds["longitude"][:] >= 0).all()
    src = AlongTrackSource(files, obs["lon"].values, obs["lat"].values, obs["ocean"].values > 0, obs["time"].values)
    qc = src.qc_counts()
    assert sum(c["used"] for c in qc.values()) == obs.sizes["obs"]
    got = src.read(((0, src.shape[0]), (0, src.shape[1]), (0, src.shape[2])))
    ref = obs["ssh_obs"].values
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref))
    np.testing.assert_allclose(got[np.isfinite(got)], ref[np.isfinite(ref)], atol=1.1e-3, rtol=0)
    assert not any(".tmp-" in p.name for p in (tmp_path / "o").iterdir())
    from oceanda.data.integrity import DIGEST_FILE, file_digest

    recorded = json.loads((res["alongtrack"] / DIGEST_FILE).read_text())["files"]
    assert recorded == {p.name: file_digest(p) for p in files}


def test_train_loads_l3_files_binned_on_the_truth_grid(l3):
    from oceanda.train.data import load_arrays

    f = l3["fields"]
    glob_ = f"{l3['files'][0].parent}/dt_global_*_phy_l3_*.nc"
    truth, obs, ocean, times, _ = load_arrays(str(l3["grid"]), glob_, with_grid=True)
    ref, _ = reference_binning(l3["files"], f)
    np.testing.assert_allclose(obs, ref.astype(np.float32), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.isfinite(obs), np.isfinite(ref))
    assert truth.shape == obs.shape and (ocean == f["ocean"]).all() and len(times) == 20
