"""Scores of a gridded SSH analysis against independent along-track data (data challenge 2021a).

What the challenge's evaluation (``ocean-data-challenges/2021a_SSH_mapping_OSE``,
``src/mod_interp.py``, ``mod_stats.py``, ``mod_write.py``, ``mod_spectral.py``) computes, here
re-implemented:

1. :func:`interp_to_points`: the analysis interpolated to every along-track point, linearly in
   time, longitude and latitude (trilinear, as ``pyinterp.trivariate``); NaN when a corner is
   NaN or the point lies outside the grid. Points within ``edge_margin_deg`` (0.25) of the
   evaluation box edges are dropped, as the challenge does "to insure similar number of points".
2. :func:`rmse_scores`: per time bin (1 day), ``score_t = 1 - RMSE_t / RMS_t(reference)``;
   bins with fewer than ``min_obs`` (10) points are masked; ``mu`` = mean, ``sigma`` =
   (population) standard deviation of ``score_t`` over the bins.
3. :func:`spectral_scores`: tracks are cut where consecutive points are more than
   ``4 dt`` apart (the challenge: 4 s); every track at least ``segment_km`` (1000 km) long gives
   segments of ``npt = int(segment_km / dx)`` points every ``npt / 4`` points (75 % overlap);
   the PSDs of the reference, of the analysis and of their difference are Welch averages over
   the segments (``scipy.signal.welch``, Hann window, constant detrend, density scaling, one
   segment a window); the PSD score is ``1 - PSD(err) / PSD(ref)`` and ``lambda_x`` [km] is
   the wavelength where it crosses 0.5 (linear interpolation between the two wavenumbers that
   bracket the first crossing, coming from the long wavelengths). Two deliberate differences
   with the challenge's code: the last track (after the last gap) is used too, and a segment
   with a NaN (analysis undefined) is skipped rather than compressed (which shifts the next
   segments' samples).
4. :func:`binned_rmse`: RMSE of the difference in ``bin_deg`` (1 degree) lon/lat bins.

``dx`` [km] and ``dt`` [s] default to the median spacing of consecutive points (haversine
distance, time step); the challenge sets them for CryoSat-2 (0.9434 s, 6.77 km/s x dt).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.signal

EARTH_RADIUS_KM = 6371.0


@dataclass(frozen=True)
class AlongTrackOptions:
    """Parameters of the along-track scores (defaults: the data challenge 2021a)."""

    segment_km: float = 1000.0
    segment_overlap: float = 0.25  # step between segments, as a fraction of a segment
    max_gap_dt: float = 4.0        # a track is cut where points are more than max_gap_dt * dt apart
    dx_km: float | None = None     # None: median spacing of the points
    dt_s: float | None = None      # None: median time step of the points
    time_bin_days: float = 1.0
    min_obs: int = 10
    edge_margin_deg: float = 0.25
    bin_deg: float = 1.0

    def __post_init__(self) -> None:
        from oceanda.errors import ConfigError

        checks = (("segment_km", self.segment_km > 0, "> 0"),
                  ("segment_overlap", 0 <= self.segment_overlap < 1, "in [0, 1)"),
                  ("max_gap_dt", self.max_gap_dt > 0, "> 0"),
                  ("dx_km", self.dx_km is None or self.dx_km > 0, "> 0 or null"),
                  ("dt_s", self.dt_s is None or self.dt_s > 0, "> 0 or null"),
                  ("time_bin_days", self.time_bin_days > 0, "> 0"),
                  ("min_obs", self.min_obs >= 1, ">= 1"),
                  ("edge_margin_deg", self.edge_margin_deg >= 0, ">= 0"),
                  ("bin_deg", self.bin_deg > 0, "> 0"))
        for key, ok, want in checks:
            if not ok:
                raise ConfigError(f"alongtrack_options.{key} must be {want}, got {getattr(self, key)}")


def _as_ns(t: np.ndarray) -> np.ndarray:
    return np.asarray(t).astype("datetime64[ns]").astype(np.int64)


def _axis_weights(coord: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower index, weight of the upper neighbour and inside-flag of ``x`` on an increasing axis."""
    c = np.asarray(coord, np.float64)
    i = np.clip(np.searchsorted(c, x, "right") - 1, 0, max(c.size - 2, 0))
    if c.size == 1:
        return np.zeros(x.size, np.int64), np.zeros(x.size), np.isclose(x, c[0])
    w = (x - c[i]) / (c[i + 1] - c[i])
    inside = (x >= c[0]) & (x <= c[-1])
    return i, w, inside


def interp_to_points(field_of_day, time: np.ndarray, lat: np.ndarray, lon: np.ndarray,
                     p_time: np.ndarray, p_lat: np.ndarray, p_lon: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of a gridded field to points.

    Args:
        field_of_day: callable ``k -> (ny, nx)`` array of time index ``k`` (so a long analysis
            is read two days at a time), or an array ``(nt, ny, nx)``.
        time: ``(nt,)`` datetime64, increasing; lat ``(ny,)``, lon ``(nx,)`` increasing degrees.
        p_time, p_lat, p_lon: the points (datetime64, degrees; longitudes in either convention).

    Returns:
        ``(n,)`` float64, NaN outside the grid or where a neighbouring grid value is NaN.
    """
    if not callable(field_of_day):
        arr = np.asarray(field_of_day)
        field_of_day = lambda k: arr[k]
    lon = np.asarray(lon, np.float64)
    e0 = lon[0] - 0.5 * (lon[1] - lon[0] if lon.size > 1 else 1.0)
    plon = np.mod(np.asarray(p_lon, np.float64) - e0, 360.0) + e0
    tt = _as_ns(time).astype(np.float64)
    pt = _as_ns(p_time).astype(np.float64)
    it, wt, int_ = _axis_weights(tt, pt)
    iy, wy, iny = _axis_weights(np.asarray(lat, np.float64), np.asarray(p_lat, np.float64))
    ix, wx, inx = _axis_weights(lon, plon)
    out = np.full(pt.size, np.nan)
    ok = int_ & iny & inx
    for k in np.unique(it[ok]):
        sel = np.flatnonzero(ok & (it == k))
        a = np.asarray(field_of_day(int(k)), np.float64)
        b = np.asarray(field_of_day(int(k) + 1), np.float64) if tt.size > 1 else a
        y0, x0, fy, fx, ft = iy[sel], ix[sel], wy[sel], wx[sel], wt[sel]
        y1 = np.minimum(y0 + 1, a.shape[0] - 1)
        x1 = np.minimum(x0 + 1, a.shape[1] - 1)

        out[sel] = (1 - ft) * _bilinear(a, y0, x0, y1, x1, fy, fx) + ft * _bilinear(b, y0, x0, y1, x1, fy, fx)
    return out


def _bilinear(f, y0, x0, y1, x1, fy, fx):
    return (1 - fy) * ((1 - fx) * f[y0, x0] + fx * f[y0, x1]) + fy * ((1 - fx) * f[y1, x0] + fx * f[y1, x1])


def haversine_km(lon1, lat1, lon2, lat2) -> np.ndarray:
    lon1, lat1, lon2, lat2 = (np.deg2rad(np.asarray(v, np.float64)) for v in (lon1, lat1, lon2, lat2))
    h = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(h, 0, 1)))


@dataclass
class RmseSeries:
    """Daily (``time_bin_days``) RMSE statistics along track."""

    bin_start: np.ndarray      # datetime64 start of each bin
    count: np.ndarray
    rmse: np.ndarray
    rms_ref: np.ndarray
    score: np.ndarray          # 1 - rmse / rms_ref, NaN where count < min_obs
    mu: float
    sigma: float
    rmse_m: float


def rmse_scores(time: np.ndarray, ref: np.ndarray, est: np.ndarray, time_bin_days: float = 1.0,
                min_obs: int = 10) -> RmseSeries:
    """mu and sigma of ``1 - RMSE_t / RMS_t(ref)`` over time bins (``mod_write.write_timeserie_stat``)."""
    tns = _as_ns(time)
    width = round(time_bin_days * 86400e9)
    b = (tns // width)  # bins aligned on the epoch, as pandas' resample('1D')
    b0 = int(b.min())
    idx = (b - b0).astype(np.int64)
    nb = int(idx.max()) + 1
    cnt = np.bincount(idx, minlength=nb)
    d2 = np.bincount(idx, weights=(est - ref) ** 2, minlength=nb)
    r2 = np.bincount(idx, weights=ref ** 2, minlength=nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        rmse = np.sqrt(d2 / cnt)
        rms = np.sqrt(r2 / cnt)
        score = 1.0 - rmse / rms
    score = np.where(cnt >= min_obs, score, np.nan)
    valid = score[np.isfinite(score)]
    starts = ((b0 + np.arange(nb)) * width).astype("datetime64[ns]")
    return RmseSeries(starts, cnt, rmse, rms, score,
                      float(valid.mean()) if valid.size else float("nan"),
                      float(valid.std()) if valid.size else float("nan"),
                      float(np.sqrt(np.mean((est - ref) ** 2))))


@dataclass
class SpectralScores:
    wavenumber: np.ndarray     # cycles / km
    psd_ref: np.ndarray
    psd_study: np.ndarray
    psd_diff: np.ndarray
    score: np.ndarray
    lambda_x_km: float | None
    n_segments: int
    npt: int
    dx_km: float


def segments(time: np.ndarray, lon: np.ndarray, lat: np.ndarray, npt: int, max_gap_ns: float,
             step: int) -> list[tuple[int, int]]:
    """``[start, start + npt)`` index ranges of the segments (see the module docstring)."""
    tns = _as_ns(time)
    cut = np.flatnonzero(np.diff(tns) > max_gap_ns) + 1
    bounds = np.concatenate([[0], cut, [tns.size]])
    out = []
    for s, e in itertools.pairwise(bounds):
        if e - s < npt:
            continue
        for a in range(int(s), int(e) - npt + 1, max(step, 1)):
            out.append((a, a + npt))
    return out


def lambda_crossing(wavenumber: np.ndarray, score: np.ndarray, level: float = 0.5) -> float | None:
    """Wavelength [1 / wavenumber units] where ``score`` first drops below ``level`` coming
    from the longest wavelengths (k > 0 only); linear interpolation in wavelength between the two
    bracketing wavenumbers. None when the score never exceeds or never falls below ``level``."""
    k = np.asarray(wavenumber, np.float64)
    s = np.asarray(score, np.float64)
    keep = (k > 0) & np.isfinite(s)
    k, s = k[keep], s[keep]
    if k.size < 2 or not (s >= level).any():
        return None
    above = s >= level
    first = int(np.argmax(above))
    below = np.flatnonzero(~above[first:])
    if below.size == 0:
        return None
    j = first + int(below[0])          # first wavenumber below the level
    l0, l1 = 1.0 / k[j - 1], 1.0 / k[j]
    f = (s[j - 1] - level) / (s[j - 1] - s[j])
    return float(l0 + f * (l1 - l0))


def spectral_scores(time: np.ndarray, lon: np.ndarray, lat: np.ndarray, ref: np.ndarray, est: np.ndarray,
                    opts: AlongTrackOptions = AlongTrackOptions()) -> SpectralScores | None:
    """Along-track wavenumber spectra and lambda_x (``mod_spectral.compute_spectral_scores``);
    None when no track is long enough for one segment."""
    tns = _as_ns(time)
    if tns.size < 3:
        return None
    dt_ns = np.diff(tns)
    dt = opts.dt_s * 1e9 if opts.dt_s else float(np.median(dt_ns[dt_ns > 0])) if (dt_ns > 0).any() else 1e9
    near = dt_ns <= opts.max_gap_dt * dt
    if opts.dx_km:
        dx = float(opts.dx_km)
    else:
        d = haversine_km(lon[:-1], lat[:-1], lon[1:], lat[1:])[near]
        d = d[d > 0]
        if d.size == 0:
            return None
        dx = float(np.median(d))
    npt = int(opts.segment_km / dx)
    if npt < 4:
        return None
    segs = segments(time, lon, lat, npt, opts.max_gap_dt * dt, int(npt * opts.segment_overlap))
    segs = [(a, b) for a, b in segs if np.isfinite(ref[a:b]).all() and np.isfinite(est[a:b]).all()]
    if not segs:
        return None
    r = np.concatenate([ref[a:b] for a, b in segs])
    e = np.concatenate([est[a:b] for a, b in segs])
    kw = {"fs": 1.0 / dx, "nperseg": npt, "noverlap": 0, "scaling": "density", "window": "hann",
          "detrend": "constant"}
    k, p_ref = scipy.signal.welch(r, **kw)
    _, p_est = scipy.signal.welch(e, **kw)
    _, p_diff = scipy.signal.welch(e - r, **kw)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = 1.0 - p_diff / p_ref
    return SpectralScores(k, p_ref, p_est, p_diff, score, lambda_crossing(k, score), len(segs), npt, dx)


def binned_rmse(lon: np.ndarray, lat: np.ndarray, diff: np.ndarray, bin_deg: float = 1.0,
                box: tuple[float, float, float, float] | None = None) -> dict[str, np.ndarray]:
    """RMSE of ``diff`` in ``bin_deg`` lon/lat bins over ``box`` (default: the points' extent):
    ``{"lon_edges", "lat_edges", "rmse" (nlat, nlon), "count"}``."""
    lo0, lo1, la0, la1 = box or (np.floor(lon.min()), np.ceil(lon.max()), np.floor(lat.min()), np.ceil(lat.max()))
    le = np.arange(lo0, lo1 + 0.5 * bin_deg, bin_deg)
    ae = np.arange(la0, la1 + 0.5 * bin_deg, bin_deg)
    if le.size < 2:
        le = np.array([lo0, lo0 + bin_deg])
    if ae.size < 2:
        ae = np.array([la0, la0 + bin_deg])
    cnt, _, _ = np.histogram2d(lat, lon, bins=[ae, le])
    s2, _, _ = np.histogram2d(lat, lon, bins=[ae, le], weights=diff ** 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        rmse = np.where(cnt > 0, np.sqrt(s2 / np.where(cnt > 0, cnt, 1)), np.nan)
    return {"lon_edges": le, "lat_edges": ae, "rmse": rmse, "count": cnt}


@dataclass
class AlongTrackScores:
    rmse: RmseSeries
    psd: SpectralScores | None
    bins: dict[str, np.ndarray]
    n_points: int
    notes: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {"mu": self.rmse.mu, "sigma": self.rmse.sigma,
                "lambda_x_km": None if self.psd is None else self.psd.lambda_x_km,
                "rmse_m": self.rmse.rmse_m, "n_points": self.n_points}


def alongtrack_scores(time: np.ndarray, lon: np.ndarray, lat: np.ndarray, ref: np.ndarray, est: np.ndarray,
                      opts: AlongTrackOptions = AlongTrackOptions(),
                      box: tuple[float, float, float, float] | None = None) -> AlongTrackScores:
    """All along-track scores of ``est`` (the analysis at the points) against ``ref``.

    Points where ``est`` or ``ref`` is NaN are dropped (as the challenge does) before the RMSE
    statistics, and within ``opts.edge_margin_deg`` of ``box`` (lon_min, lon_max, lat_min,
    lat_max; longitudes in the points' convention). The spectra use the same points, in time order.
    """
    ok = np.isfinite(ref) & np.isfinite(est)
    notes = []
    if box is not None:
        m = opts.edge_margin_deg
        ok &= (lon >= box[0] + m) & (lon <= box[1] - m) & (lat >= box[2] + m) & (lat <= box[3] - m)
    t, x, y, r, e = (np.asarray(a)[ok] for a in (time, lon, lat, ref, est))
    if t.size == 0:
        raise ValueError("no along-track point where both the reference and the analysis are defined")
    rm = rmse_scores(t, r, e, opts.time_bin_days, opts.min_obs)
    psd = spectral_scores(t, x, y, r, e, opts)
    if psd is None:
        notes.append(f"no track segment of {opts.segment_km:g} km: lambda_x not computed")
    elif psd.lambda_x_km is None:
        notes.append("the PSD score does not cross 0.5: lambda_x is null")
    bins = binned_rmse(x, y, e - r, opts.bin_deg, box)
    return AlongTrackScores(rm, psd, bins, int(t.size), notes)
