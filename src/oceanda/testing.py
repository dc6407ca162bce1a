"""Checkers and small fixtures shipped with oceanda (usable in users' own tests).

* :func:`check_tiling`: every ocean cell of the grid is covered by a patch with positive
  blend weight (brute force over the patches, independent of the runtime's arithmetic);
* :func:`check_weights_normalise`: the normalised blend weights ``w_p / sum_q w_q`` sum to
  one on every ocean cell;
* the ``identity`` method (:class:`oceanda.assim.identity.IdentityMethod`, re-exported: returns
  its observations, so with a fully observed truth as input blending must give it back exactly);
* :func:`synthetic_fields`: a small smooth SSH field, land mask and nadir-like observation
  mask for tests.
"""

from __future__ import annotations

import numpy as np

from oceanda.assim.identity import IdentityMethod  # noqa: F401  (re-exported)
from oceanda.data.patches import PatchSet


def _accumulate(patches: PatchSet, values: np.ndarray | None = None) -> np.ndarray:
    nt, ny, nx = patches.shape
    acc = np.zeros((nt, ny, nx))
    w = patches.weights.full()
    T, H, W = patches.geometry.size
    for i in range(len(patches)):
        (t0, t1), (y0, y1), (x0, x1) = patches.footprint(i)
        gt, gy, gx = slice(max(t0, 0), min(t1, nt)), slice(max(y0, 0), min(y1, ny)), slice(max(x0, 0), min(x1, nx))
        lt = slice(gt.start - t0, gt.stop - t0)
        ly = slice(gy.start - y0, gy.stop - y0)
        lx = slice(gx.start - x0, gx.stop - x0)
        acc[gt, gy, gx] += w[lt, ly, lx] if values is None else w[lt, ly, lx] * values[i][lt, ly, lx]
    return acc


def check_tiling(patches: PatchSet, ocean: np.ndarray) -> np.ndarray:
    """Assert that every ocean cell (every day) has a positive total blend weight.

    Returns the ``(nt, ny, nx)`` total weight ``sum_p w_p``.
    """
    acc = _accumulate(patches)
    covered = acc > 0
    missing = ~covered & np.asarray(ocean, bool)[None]
    if missing.any():
        t, y, x = np.argwhere(missing)[0]
        raise AssertionError(f"{int(missing.sum())} ocean cells not covered by any patch, "
                             f"first (t, y, x) = ({t}, {y}, {x})")
    return acc


def check_weights_normalise(patches: PatchSet, ocean: np.ndarray, atol: float = 1e-12) -> None:
    """Assert ``sum_p w_p / W = 1`` on every ocean cell, ``W = sum_q w_q`` (two passes)."""
    total = check_tiling(patches, ocean)
    nt, ny, nx = patches.shape
    norm = np.zeros((nt, ny, nx))
    w = patches.weights.full()
    for i in range(len(patches)):
        (t0, t1), (y0, y1), (x0, x1) = patches.footprint(i)
        gt, gy, gx = slice(max(t0, 0), min(t1, nt)), slice(max(y0, 0), min(y1, ny)), slice(max(x0, 0), min(x1, nx))
        lw = w[gt.start - t0:gt.stop - t0, gy.start - y0:gy.stop - y0, gx.start - x0:gx.stop - x0]
        with np.errstate(invalid="ignore", divide="ignore"):
            norm[gt, gy, gx] += np.where(total[gt, gy, gx] > 0, lw / total[gt, gy, gx], 0.0)
    sel = np.broadcast_to(np.asarray(ocean, bool)[None], norm.shape)
    err = np.abs(norm[sel] - 1.0).max(initial=0.0)
    if err > atol:
        raise AssertionError(f"normalised blend weights sum to 1 +- {err:.3g} (> {atol})")


def synthetic_fields(shape: tuple[int, int, int] = (12, 30, 40), seed: int = 0,
                     land: bool = True, n_tracks: int = 3) -> dict[str, np.ndarray]:
    """A small smooth SSH ``truth`` (nt, ny, nx) [m] (sum of propagating waves), an
    ``ocean`` mask (ny, nx) with a land blob in one corner, and ``obs``: the truth on a few
    diagonal tracks per day (NaN elsewhere), plus ``lon``/``lat`` (1/20 deg) and
    ``time`` (datetime64 daily)."""
    nt, ny, nx = shape
    rng = np.random.default_rng(seed)
    lon = -65.0 + 0.05 * np.arange(nx)
    lat = 33.0 + 0.05 * np.arange(ny)
    t = np.arange(nt, dtype=float)
    T, Y, X = np.meshgrid(t, np.arange(ny), np.arange(nx), indexing="ij")
    truth = np.zeros(shape)
    for _ in range(4):
        kx, ky = rng.uniform(0.05, 0.3, 2)
        om, ph, a = rng.uniform(0.05, 0.3), rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.2)
        truth += a * np.cos(kx * X + ky * Y - om * T + ph)
    ocean = np.ones((ny, nx), bool)
    if land:
        yy, xx = np.mgrid[:ny, :nx]
        ocean &= (yy - ny) ** 2 + (xx - nx) ** 2 > (min(ny, nx) // 3) ** 2
    obs = np.full(shape, np.nan)
    for d in range(nt):
        for k in range(n_tracks):
            off = rng.integers(-nx, nx)
            slope = rng.choice([-1.0, 1.0]) * rng.uniform(0.7, 1.5)
            cols = np.round(off + slope * np.arange(ny)).astype(int)
            ok = (cols >= 0) & (cols < nx)
            obs[d, np.arange(ny)[ok], cols[ok]] = truth[d, np.arange(ny)[ok], cols[ok]]
    truth = np.where(ocean[None], truth, np.nan)
    obs = np.where(ocean[None], obs, np.nan)
    time = np.datetime64("2012-10-01") + np.arange(nt).astype("timedelta64[D]")
    return {"truth": truth, "obs": obs, "ocean": ocean, "lon": lon, "lat": lat, "time": time}


def _gridded(f: dict[str, np.ndarray], name: str, values: np.ndarray):
    """The (time, lat, lon) field ``values`` of :func:`synthetic_fields` output ``f`` as variable
    ``name`` (float32) with its ``ocean`` mask, an :class:`xarray.Dataset` as oceanda reads it."""
    import xarray as xr

    from oceanda.data import names as N

    coords = {N.TIME: f["time"], N.LAT: f["lat"], N.LON: f["lon"]}
    return xr.Dataset({name: (N.FIELD_DIMS, values.astype(np.float32)),
                       N.OCEAN: ((N.LAT, N.LON), f["ocean"].astype(np.int8))}, coords)


def write_synthetic_osse(root, shape: tuple[int, int, int] = (16, 40, 48), seed: int = 3) -> dict:
    """Write the :func:`synthetic_fields` observations and truth as ``root/obs.zarr`` and
    ``root/truth.zarr`` (what ``oceanda generate`` would give an app); returns their paths
    ``{"obs", "truth"}``."""
    from pathlib import Path

    from oceanda.data import names as N

    root = Path(root)
    f = synthetic_fields(shape, seed=seed)
    paths = {"obs": root / "obs.zarr", "truth": root / "truth.zarr"}
    _gridded(f, N.SSH_OBS, f["obs"]).to_zarr(paths["obs"])
    _gridded(f, N.SSH, f["truth"]).to_zarr(paths["truth"])
    return paths


def write_l3_testset(root, shape: tuple[int, int, int] = (20, 32, 32), seed: int = 3,
                     missions: tuple[str, ...] = ("j3", "s3a", "alg", "c2")) -> dict:
    """Small L3 along-track files in the data challenge 2021a layout (one a mission,
    ``dt_global_<m>_phy_l3_..._295-305_33-43.nc``; longitudes 0..360, CMEMS packing), sampling
    the ``truth`` of :func:`synthetic_fields` (nearest cell) along straight 1 Hz passes that run
    past the grid's edges, plus: a few fill values (missing sla), one duplicated time (first
    mission), one point on land (second mission), one absurd sla (third mission). ``ssh = sla +
    mdt - lwe`` with a non-zero mdt and lwe. Writes ``grid.zarr`` (the truth ``ssh`` and ``ocean``
    on the grid). Returns ``{"files", "grid", "fields", "special"}``; ``special`` counts the
    planted points per mission and QC reason."""
    from pathlib import Path

    from oceanda.data import names as N
    from oceanda.data.alongtrack_write import write_l3

    root = Path(root)
    f = synthetic_fields(shape, seed=seed)
    nt, ny, nx = shape
    lon, lat, truth, ocean = f["lon"], f["lat"], f["truth"], f["ocean"]
    _gridded(f, N.SSH, truth).to_zarr(root / "grid.zarr", mode="w")
    rng = np.random.default_rng(seed + 100)
    files, special = [], {}
    t0 = f["time"][0].astype("datetime64[s]")
    span = (lon[0] - 0.2, lon[-1] + 0.2, lat[0] - 0.2, lat[-1] + 0.2)
    for k, m in enumerate(missions):
        ts, los, las = [], [], []
        for d in range(nt):
            for _ in range(2):
                sec = int(rng.integers(0, 86000 - 200))
                y0, y1 = span[2] + 0.0123, span[3]  # off the cell edges: no ties
                x0 = rng.uniform(span[0], span[1])
                slope = rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 1.0)
                n = int((y1 - y0) / 0.045)
                yy = y0 + 0.045 * np.arange(n)
                xx = x0 + slope * (yy - y0)
                ts.append(t0 + np.timedelta64(d * 86400 + sec, "s") + np.arange(n).astype("timedelta64[s]"))
                los.append(xx)
                las.append(yy)
        t = np.concatenate(ts).astype("datetime64[ns]")
        x, y = np.concatenate(los), np.concatenate(las)
        order = np.argsort(t, kind="stable")
        t, x, y = t[order], x[order], y[order]
        day = ((t - f["time"][0].astype("datetime64[ns]")) // np.timedelta64(1, "D")).astype(int)
        ix = np.clip(np.round((x - lon[0]) / 0.05).astype(int), 0, nx - 1)
        iy = np.clip(np.round((y - lat[0]) / 0.05).astype(int), 0, ny - 1)
        ssh = np.nan_to_num(truth[day, iy, ix], nan=0.0) + 0.01 * rng.standard_normal(t.size)
        mdt = 0.4 + 0.2 * np.sin(np.deg2rad(y) * 20)
        lwe = np.full(t.size, 0.02 * (k + 1))
        sla = ssh - mdt + lwe
        sp = {"missing": 3}
        inside = np.flatnonzero((x > lon[0] + 0.1) & (x < lon[-1] - 0.1) & (y > lat[0] + 0.1) & (y < lat[-1] - 0.1)
                                & ocean[iy, ix])
        sla[rng.choice(inside, 3, replace=False)] = np.nan  # written as _FillValue
        if k == 0:  # a duplicated time: the point after a mid-pass point repeats its time
            j = int(inside[len(inside) // 2])
            t[j + 1] = t[j]
            sp["duplicate_time"] = 1
        if k == 1:  # a point on land, inserted at its time
            ly, lx = np.argwhere(~ocean)[0]
            j = int(inside[len(inside) // 3])
            t = np.insert(t, j + 1, t[j] + np.timedelta64(500, "ms"))
            x, y = np.insert(x, j + 1, lon[lx]), np.insert(y, j + 1, lat[ly])
            sla, mdt, lwe = np.insert(sla, j + 1, 0.1), np.insert(mdt, j + 1, 0.4), np.insert(lwe, j + 1, lwe[0])
            sp["land_planted"] = 1
        if k == 2:
            sla[int(inside[len(inside) // 2])] = 9.0
            sp["absurd"] = 1
        path = root / f"dt_global_{m}_phy_l3_20121001-20121020_295-305_33-43.nc"
        write_l3(path, time=t, lon=np.mod(x, 360.0), lat=y, sla_unfiltered=sla, mdt=mdt, lwe=lwe,
                 sla_filtered=sla, mission=m)
        files.append(path)
        special[m] = sp
    return {"files": files, "grid": root / "grid.zarr", "fields": f, "special": special}
