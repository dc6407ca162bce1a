"""Along-track (L3) altimetry out: files in the Copernicus Marine / data challenge 2021a layout.

:func:`write_l3` writes one mission's points as the L3 files the data challenge distributes
(dimension ``time``; ``time`` in days since 1950-01-01, ``longitude`` 0..360 and ``latitude``
packed as int32 x 1e-6 deg, ``sla_filtered``, ``sla_unfiltered``, ``mdt``, ``lwe`` packed as
int16 x 1 mm with ``_FillValue`` 32767), so :mod:`oceanda.data.alongtrack` reads them back as it
reads the real files. :func:`write_osse_alongtrack` turns an OSSE's along-track table
(``obs.zarr``'s ``track_*``) into ``<dir>/<mission>.nc``: ``mdt`` is the time mean of the truth
over the OSSE period at the point's cell, ``sla_unfiltered = ssh_obs - mdt``, ``lwe = 0``, and
``sla_filtered`` equals ``sla_unfiltered`` (no along-track filter is applied to the synthetic
data: said in the variable's ``comment``). Every file is written to a temporary sibling and
renamed into place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from oceanda import __version__
from oceanda.data import names as N
from oceanda.data.files import atomic_path
from oceanda.data.io import write_file_digests

TIME_UNITS = "days since 1950-01-01 00:00:00"
_SSH_ENC = {"dtype": "int16", "scale_factor": 0.001, "_FillValue": np.int16(32767)}
_DEG_ENC = {"dtype": "int32", "scale_factor": 1e-6, "_FillValue": np.int32(2147483647)}


def write_l3(path: str | os.PathLike, *, time: np.ndarray, lon: np.ndarray, lat: np.ndarray,
             sla_unfiltered: np.ndarray, mdt: np.ndarray, sla_filtered: np.ndarray | None = None,
             lwe: np.ndarray | None = None, mission: str = "", attrs: dict[str, Any] | None = None,
             packed: bool = True) -> Path:
    """Write one mission's points as an L3 file (see the module docstring); returns the path.

    Args:
        time: ``(n,)`` datetime64; lon: degrees (any convention; stored 0..360); lat: degrees.
        sla_unfiltered, mdt: metres; sla_filtered: default ``sla_unfiltered``; lwe: default 0.
        packed: CMEMS-like integer packing (False: float64, for exact round trips).
    """
    path = Path(path)
    n = len(time)
    sla_f = sla_unfiltered if sla_filtered is None else sla_filtered
    lwe = np.zeros(n) if lwe is None else lwe
    ssh_attrs = {"units": "m", "coordinates": "longitude latitude"}
    ds = xr.Dataset(
        {"longitude": ("time", np.mod(np.asarray(lon, np.float64), 360.0),
                       {"units": "degrees_east", "standard_name": "longitude", "long_name": "Longitude"}),
         "latitude": ("time", np.asarray(lat, np.float64),
                      {"units": "degrees_north", "standard_name": "latitude", "long_name": "Latitude"}),
         "sla_filtered": ("time", np.asarray(sla_f, np.float64),
                          {**ssh_attrs, "long_name": "Sea level anomaly filtered",
                           "standard_name": "sea_surface_height_above_sea_level"}),
         "sla_unfiltered": ("time", np.asarray(sla_unfiltered, np.float64),
                            {**ssh_attrs, "long_name": "Sea level anomaly not-filtered",
                             "standard_name": "sea_surface_height_above_sea_level"}),
         "mdt": ("time", np.asarray(mdt, np.float64), {**ssh_attrs, "long_name": "Mean dynamic topography"}),
         "lwe": ("time", np.asarray(lwe, np.float64), {**ssh_attrs, "long_name": "Long wavelength error"})},
        coords={"time": ("time", np.asarray(time).astype("datetime64[ns]"),
                         {"standard_name": "time", "long_name": "Time of measurement", "axis": "T"})},
        attrs={"Conventions": "CF-1.6", "title": f"along-track L3 sea level ({mission})",
               "mission": mission, "source": f"oceanda {__version__}", **(attrs or {})})
    enc: dict[str, dict[str, Any]] = {"time": {"units": TIME_UNITS, "calendar": "gregorian", "dtype": "float64"}}
    if packed:
        enc |= {v: dict(_DEG_ENC) for v in ("longitude", "latitude")}
        enc |= {v: dict(_SSH_ENC) for v in ("sla_filtered", "sla_unfiltered", "mdt", "lwe")}
    with atomic_path(path) as tmp:
        ds.to_netcdf(tmp, encoding=enc, unlimited_dims=["time"], engine="netcdf4")
    return path


def _time_mean(truth_path: str | os.PathLike, chunk: int = 30) -> np.ndarray:
    """Time mean of ``ssh`` in a truth store, read ``chunk`` days at a time."""
    ds = xr.open_zarr(truth_path, consolidated=None)
    ssh = ds[N.SSH]
    acc = np.zeros(ssh.shape[1:])
    for t0 in range(0, ssh.shape[0], chunk):
        acc += ssh.isel({N.TIME: slice(t0, t0 + chunk)}).values.astype(np.float64).sum(axis=0)
    return acc / ssh.shape[0]


def write_osse_alongtrack(obs_path: str | os.PathLike, truth_path: str | os.PathLike,
                          out_dir: str | os.PathLike) -> dict[str, Path]:
    """One L3 file per mission, ``out_dir/<mission>.nc``, from an OSSE's ``obs.zarr`` track
    table and ``truth.zarr`` (for the MDT); returns ``{mission: path}``."""
    obs = xr.open_zarr(obs_path, consolidated=None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if N.TRACK_SSH not in obs:
        return {}
    mdt_field = _time_mean(truth_path)
    lon_g, lat_g = obs[N.LON].values, obs[N.LAT].values
    t = obs[N.TRACK_TIME].values
    lon, lat = obs[N.TRACK_LON].values.astype(np.float64), obs[N.TRACK_LAT].values.astype(np.float64)
    ssh = obs[N.TRACK_SSH].values.astype(np.float64)
    sat = obs[N.TRACK_SAT].values
    names = str(obs[N.TRACK_SAT].attrs.get("flag_meanings", "")).split()
    ix = np.clip(np.round((lon - lon_g[0]) / (lon_g[1] - lon_g[0])).astype(np.int64), 0, lon_g.size - 1)
    iy = np.clip(np.round((lat - lat_g[0]) / (lat_g[1] - lat_g[0])).astype(np.int64), 0, lat_g.size - 1)
    mdt = mdt_field[iy, ix]
    mdt = np.where(np.isfinite(mdt), mdt, 0.0)
    written = {}
    for k, name in enumerate(names):
        sel = sat == k
        if not sel.any():
            continue
        order = np.argsort(t[sel], kind="stable")
        written[name] = write_l3(
            out_dir / f"{name}.nc", time=t[sel][order], lon=lon[sel][order], lat=lat[sel][order],
            sla_unfiltered=(ssh[sel] - mdt[sel])[order], mdt=mdt[sel][order], mission=name,
            attrs={"comment": "oceanda OSSE: ssh = truth + noise along track; mdt = time mean of the "
                              "truth over the OSSE period at the point's cell; sla_filtered = "
                              "sla_unfiltered (no along-track filter); lwe = 0",
                   "platform": name})
    write_file_digests(out_dir, written.values())
    return written
