"""Sampling a truth along tracks and gridding track values to the model grid.

* :func:`sample_daily_fields`: bilinear interpolation (in lon/lat) of daily gridded fields
  at the track points, from the field of the point's calendar day (``time_interp="day"``)
  or linearly in time between the two bracketing snapshots (``"linear"``), plus noise.
* :func:`sample`: the same with a user function ``field_at(day, lon, lat)``.
* :func:`grid_tracks`: daily mean of the track values in each model grid cell, NaN where
  unobserved (``np.bincount``; one pass per day, no loop over points).

Grid conventions: ``lon`` (nx,) and ``lat`` (ny,) are the cell *centres*, 1-D, strictly
increasing; the cell edges are the mid-points between centres, extended by half a step at
both ends. Track longitudes are wrapped into the grid's 360-degree range first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from oceanda.errors import InputError
from oceanda.obs.noise import noise_values
from oceanda.obs.satellites import Satellite
from oceanda.obs.tracks import TrackTable

NoiseArg = Sequence[Satellite] | Mapping[str, Satellite] | None
#: grid_tracks bins this many (day, cell) pairs per np.bincount (128 MB of float64 sums)
_BLOCK_CELLS = 1 << 24


def _axis(c, name: str) -> np.ndarray:
    c = np.asarray(c, dtype=np.float64)
    if c.ndim != 1 or c.size < 2:
        raise InputError(f"{name} must be a 1-D array of >= 2 cell centres, got shape {c.shape}")
    if not np.all(np.diff(c) > 0):
        raise InputError(f"{name} must be strictly increasing")
    return c


def cell_edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges ``(n + 1,)`` of 1-D increasing cell centres ``(n,)``."""
    c = np.asarray(centres, dtype=np.float64)
    mid = 0.5 * (c[1:] + c[:-1])
    return np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])


def _wrap_to(lon: np.ndarray, lon_edges: np.ndarray) -> np.ndarray:
    """``lon`` wrapped into ``[e0, e0 + 360)`` (returned as is when already there)."""
    e0 = lon_edges[0]
    if lon.size == 0 or (lon.min() >= e0 and lon.max() < e0 + 360.0):
        return lon
    return np.mod(lon - e0, 360.0) + e0


def _times(times, n: int | None = None) -> np.ndarray:
    t = np.asarray(times)
    if not np.issubdtype(t.dtype, np.datetime64):
        raise InputError(f"times must be datetime64, got {t.dtype}")
    t = t.astype("datetime64[ns]")
    if t.ndim != 1 or t.size == 0:
        raise InputError("times must be a non-empty 1-D array")
    if t.size > 1 and not np.all(np.diff(t) > np.timedelta64(0, "ns")):
        raise InputError("times must be strictly increasing")
    if n is not None and t.size != n:
        raise InputError(f"times has {t.size} entries, fields have {n}")
    return t


def _group_order(k: np.ndarray, n: int) -> np.ndarray:
    """Stable order grouping the small non-negative integers ``k`` (< n): radix sort."""
    kind = np.int16 if n < 2**15 else np.int32
    return np.argsort(k.astype(kind), kind="stable")


def day_index(tracks: TrackTable, times) -> np.ndarray:
    """Index into ``times`` of the entry on each row's calendar day, -1 if none."""
    t = _times(times)
    days = t.astype("datetime64[D]").astype(np.int64)
    if np.any(np.diff(days) == 0):
        raise InputError("times must hold at most one entry per calendar day")
    rows = tracks.time.astype(np.int64) // (86_400 * 10**9)  # floor: calendar day number
    if days[-1] - days[0] == days.size - 1:  # consecutive days: plain arithmetic
        k = rows - days[0]
        return np.where((k >= 0) & (k < days.size), k, -1)
    k = np.minimum(np.searchsorted(days, rows), days.size - 1)
    return np.where(days[k] == rows, k, -1)


def _bilinear_weights(lon, lat, lonc, latc):
    """Corner indices and weights of bilinear interpolation; rows outside the cells -> nan."""
    le, ae = cell_edges(lonc), cell_edges(latc)
    lon = _wrap_to(lon, le)
    outside = (lon < le[0]) | (lon > le[-1]) | (lat < ae[0]) | (lat > ae[-1])
    i0 = np.clip(np.searchsorted(lonc, lon, side="right") - 1, 0, lonc.size - 2)
    j0 = np.clip(np.searchsorted(latc, lat, side="right") - 1, 0, latc.size - 2)
    fx = np.clip((lon - lonc[i0]) / (lonc[i0 + 1] - lonc[i0]), 0.0, 1.0)
    fy = np.clip((lat - latc[j0]) / (latc[j0 + 1] - latc[j0]), 0.0, 1.0)
    return i0, j0, fx, fy, outside


def bilinear(field: np.ndarray, lonc, latc, lon, lat) -> np.ndarray:
    """Bilinear interpolation of ``field`` (ny, nx) at points ``(lon, lat)``.

    Between the outermost centres and the grid edge the nearest centre's values are used
    (weights clipped to [0, 1]); outside the grid edges the result is NaN. NaN corners
    (land) are left out and the remaining weights renormalised, NaN if all four are NaN.
    """
    lonc, latc = _axis(lonc, "lon"), _axis(latc, "lat")
    f = np.asarray(field)
    if f.shape != (latc.size, lonc.size):
        raise InputError(f"field shape {f.shape} != (lat, lon) = {(latc.size, lonc.size)}")
    i0, j0, fx, fy, outside = _bilinear_weights(np.asarray(lon), np.asarray(lat), lonc, latc)
    return _interp(f, i0, j0, fx, fy, outside)


def _interp(f, i0, j0, fx, fy, outside):
    num = np.zeros(i0.shape)
    den = np.zeros(i0.shape)
    for dj, wy in ((0, 1.0 - fy), (1, fy)):
        for di, wx in ((0, 1.0 - fx), (1, fx)):
            v = f[j0 + dj, i0 + di].astype(np.float64)
            w = wx * wy
            ok = np.isfinite(v) & (w > 0)
            num += np.where(ok, w * np.where(ok, v, 0.0), 0.0)
            den += np.where(ok, w, 0.0)
    out = np.full(i0.shape, np.nan)
    good = (den > 0) & ~outside
    out[good] = num[good] / den[good]
    return out


def _add_noise(values, tracks, noise: NoiseArg, seed: int):
    if noise is None:
        return values
    return values + noise_values(tracks, noise, seed)


def sample_daily_fields(
    tracks: TrackTable,
    fields,
    lon,
    lat,
    times,
    noise: NoiseArg = None,
    seed: int = 0,
    time_interp: str = "day",
) -> np.ndarray:
    """Values of daily gridded fields at the track points, plus noise.

    Args:
        tracks: points to sample.
        fields: ``(T, ny, nx)`` array-like (numpy, zarr, dask: ``fields[d]`` is read one
            day at a time); NaN on land.
        lon, lat: ``(nx,)``, ``(ny,)`` cell centres [deg].
        times: ``(T,)`` datetime64 of the fields, one per calendar day, increasing.
        noise: the satellites (list or name -> Satellite) whose noise models to draw
            (:func:`oceanda.obs.noise.noise_values`); ``None`` for exact values.
        seed: noise seed.
        time_interp: ``"day"`` samples the field of the row's calendar day (as in the data
            challenge's daily OSSE); ``"linear"`` interpolates linearly in time between the
            snapshots bracketing the row's time (constant beyond the first / last one, at
            most one day).

    Returns:
        ``(n,)`` float64; NaN where the point is outside the grid or all corners are land.

    Raises:
        InputError: shapes disagree, or a row's day/time is not covered by ``times``.
    """
    lonc, latc = _axis(lon, "lon"), _axis(lat, "lat")
    shape = getattr(fields, "shape", None)
    if shape is None or len(shape) != 3 or tuple(shape[1:]) != (latc.size, lonc.size):
        raise InputError(
            f"fields must be (time, lat, lon) = (T, {latc.size}, {lonc.size}), got {shape}"
        )
    t = _times(times, shape[0])
    n = len(tracks)
    out = np.full(n, np.nan)
    if n == 0:
        return out
    i0, j0, fx, fy, outside = _bilinear_weights(tracks.lon, tracks.lat, lonc, latc)
    if time_interp == "day":
        k = day_index(tracks, t)
        if (k < 0).any():
            bad = tracks.day()[k < 0]
            raise InputError(
                f"track days {bad.min()}..{bad.max()} have no field in times "
                f"({t[0]}..{t[-1]})"
            )
        order = _group_order(k, t.size)
        bounds = np.searchsorted(k[order], np.arange(t.size + 1))
        for d in range(t.size):
            sel = order[bounds[d] : bounds[d + 1]]
            if sel.size:
                f = np.asarray(fields[d])
                out[sel] = _interp(f, i0[sel], j0[sel], fx[sel], fy[sel], outside[sel])
    elif time_interp == "linear":
        tt = tracks.time.astype(np.int64)
        ti = t.astype(np.int64)
        day_ns = 86_400 * 10**9
        if tt.min() < ti[0] - day_ns or tt.max() > ti[-1] + day_ns:
            raise InputError(
                f"track times {tracks.time.min()}..{tracks.time.max()} are more than a day "
                f"outside the fields' times {t[0]}..{t[-1]}"
            )
        if t.size == 1:
            k = np.zeros(n, np.int64)
            w = np.zeros(n)
        else:
            k = np.clip(np.searchsorted(ti, tt, side="right") - 1, 0, t.size - 2)
            w = np.clip((tt - ti[k]) / (ti[k + 1] - ti[k]), 0.0, 1.0)
        order = _group_order(k, t.size)
        bounds = np.searchsorted(k[order], np.arange(t.size + 1))
        cache: dict[int, np.ndarray] = {}
        for d in range(t.size):
            sel = order[bounds[d] : bounds[d + 1]]
            if not sel.size:
                continue
            cache = {key: v for key, v in cache.items() if key >= d}
            for key in (d, min(d + 1, t.size - 1)):
                if key not in cache:
                    cache[key] = np.asarray(fields[key])
            stencil = (i0[sel], j0[sel], fx[sel], fy[sel], outside[sel])
            a = _interp(cache[d], *stencil)
            b = _interp(cache[min(d + 1, t.size - 1)], *stencil)
            out[sel] = (1.0 - w[sel]) * a + w[sel] * b
    else:
        raise InputError(f"time_interp must be 'day' or 'linear', got {time_interp!r}")
    return _add_noise(out, tracks, noise, seed)


def sample(
    tracks: TrackTable,
    field_at: Callable[[np.datetime64, np.ndarray, np.ndarray], np.ndarray],
    noise: NoiseArg = None,
    seed: int = 0,
) -> np.ndarray:
    """Values of a user-defined field at the track points, plus noise.

    ``field_at(day, lon, lat)`` is called once per calendar day present in ``tracks``
    with ``day`` a ``datetime64[D]`` and the ``(m,)`` lon/lat of that day's rows, and
    returns ``(m,)`` values. ``noise``/``seed`` as in :func:`sample_daily_fields`.
    """
    n = len(tracks)
    out = np.full(n, np.nan)
    if n:
        days = tracks.day()
        uniq, inv = np.unique(days, return_inverse=True)
        order = np.argsort(inv, kind="stable")
        bounds = np.searchsorted(inv[order], np.arange(uniq.size + 1))
        for d, day in enumerate(uniq):
            sel = order[bounds[d] : bounds[d + 1]]
            v = np.asarray(field_at(day, tracks.lon[sel], tracks.lat[sel]), dtype=np.float64)
            if v.shape != sel.shape:
                raise InputError(
                    f"field_at returned shape {v.shape} for {sel.size} points of {day}"
                )
            out[sel] = v
    return _add_noise(out, tracks, noise, seed)


def grid_tracks(
    tracks: TrackTable,
    values: np.ndarray,
    lon,
    lat,
    times,
    dtype=None,
    return_counts: bool = False,
):
    """Daily mean of track values in each grid cell: ``(T, ny, nx)``, NaN where unobserved.

    A row goes to the cell containing it (edges half-way between centres) and to the time
    index of its calendar day; rows outside the grid, on days not in ``times`` or with a
    non-finite value are dropped.

    Args:
        tracks: the points; values: ``(n,)`` their values.
        lon, lat: ``(nx,)``, ``(ny,)`` cell centres; times: ``(T,)`` datetime64, one per day.
        dtype: output dtype (default: that of ``values``, at least float32).
        return_counts: also return the ``(T, ny, nx)`` int32 number of rows per cell.
    """
    lonc, latc = _axis(lon, "lon"), _axis(lat, "lat")
    t = _times(times)
    v = np.asarray(values)
    if v.shape != (len(tracks),):
        raise InputError(f"values has shape {v.shape}, tracks have {len(tracks)} rows")
    dtype = np.result_type(v.dtype, np.float32) if dtype is None else np.dtype(dtype)
    ny, nx = latc.size, lonc.size
    out = np.full((t.size, ny, nx), np.nan, dtype=dtype)
    counts = np.zeros((t.size, ny, nx), np.int32) if return_counts else None
    if len(tracks):
        le, ae = cell_edges(lonc), cell_edges(latc)
        x = _wrap_to(tracks.lon, le)
        i = np.searchsorted(le, x, side="right") - 1
        j = np.searchsorted(ae, tracks.lat, side="right") - 1
        k = day_index(tracks, t)
        ok = (i >= 0) & (i < nx) & (j >= 0) & (j < ny) & (k >= 0) & np.isfinite(v)
        if ok.all():
            flat = j * nx + i
        else:
            k, flat, v = k[ok], (j * nx + i)[ok], v[ok]
        ncell = ny * nx
        # blocks of whole days with at most ~2^24 cells: one bincount per block
        per_block = max(1, _BLOCK_CELLS // ncell)
        if t.size <= per_block:
            blocks = [(0, t.size, slice(None))]  # a view: no copies of the rows
        else:
            order = _group_order(k, t.size)
            bounds = np.searchsorted(k[order], np.arange(0, t.size + per_block, per_block))
            blocks = [
                (d0, min(d0 + per_block, t.size), order[bounds[b] : bounds[b + 1]])
                for b, d0 in enumerate(range(0, t.size, per_block))
            ]
        flat_out = out.reshape(t.size, ncell)
        for d0, d1, sel in blocks:
            idx = (k[sel] - d0) * ncell + flat[sel]
            if not idx.size:
                continue
            size = (d1 - d0) * ncell
            c = np.bincount(idx, minlength=size).reshape(d1 - d0, ncell)
            s_ = np.bincount(idx, weights=v[sel], minlength=size).reshape(d1 - d0, ncell)
            seen = c > 0
            blk = flat_out[d0:d1]
            blk[seen] = s_[seen] / c[seen]
            if counts is not None:
                counts[d0:d1] = c.reshape(d1 - d0, ny, nx)
    return (out, counts) if return_counts else out
