"""Is a truth a Gulf Stream? Diagnostics of daily SSH maps on a lon/lat box.

All functions take ``ssh`` ``(T, ny, nx)`` [m] on a regular lon/lat grid (``lon`` ``(nx,)``,
``lat`` ``(ny,)`` [deg], increasing), distances in km on the sphere (``R = 6371 km``); no NaN.

* :func:`mean_step` - the time-mean SSH step across the jet: per longitude, the largest drop of
  the time-mean SSH over any meridional span of ``span_km``; the median over longitudes.
* :func:`jet_axis` / :func:`meander_range` - the jet axis of a day and longitude is the latitude
  of the largest eastward surface geostrophic velocity (largest ``-dSSH/dy``); its range
  ``max - min`` over windows of ``window_days`` (a season), median over windows and longitudes.
* :func:`eddy_census` - coherent eddies: local SSH extrema (over a ``radius_km`` neighbourhood)
  standing ``min_amp_m`` above / below the mean of the ring at ``radius_km`` around them, counted
  north and south of the time-mean jet axis (warm = anticyclonic = maximum, cold = minimum).
* :func:`lagged_displacement` - coherent propagation: the spatial lag of the peak of the
  correlation between the anomaly at ``t`` and at ``t + lag_days`` within a latitude band.
* :func:`zonal_phase_speeds` - which way the anomalies of a latitude band travel, per band of
  zonal wavelength: their share of the variance, eastward / westward power and power-weighted
  phase speed from the zonal wavenumber-frequency spectrum.
* :func:`std_map` / :func:`std_summary` - SSH anomaly std, its box mean, maximum and the ratio of
  the std within ``band_deg`` of the mean jet axis to the std outside.
* :func:`spectral_slopes` - zonal and meridional wavenumber spectra slopes over ``band_km``.
* :func:`non_gaussianity` - kurtosis of the SSH Laplacian and ``p99 / median`` of ``|grad SSH|``,
  and the same for a phase-randomised surrogate with the same spectrum (each day mirrored
  to a periodic field, Fourier phases replaced by those of white noise, cropped back): their
  ratios measure fronts and coherent vortices (a Gaussian field gives 1).
* :func:`gulfstream_diagnostics` - all of them in one dict (what ``hpc/bench/gyre_truth.py``
  prints).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

EARTH_RADIUS_KM = 6371.0


def _km_per_deg_lat() -> float:
    return EARTH_RADIUS_KM * math.pi / 180.0


def _dx_km(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Zonal spacing [km] per row ``(ny,)``."""
    dlon = float(np.mean(np.diff(lon)))
    return _km_per_deg_lat() * dlon * np.cos(np.radians(np.asarray(lat, float)))


def _dy_km(lat: np.ndarray) -> float:
    return _km_per_deg_lat() * float(np.mean(np.diff(lat)))


def _check(ssh: np.ndarray, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    ssh = np.asarray(ssh, np.float64)
    if ssh.ndim == 2:
        ssh = ssh[None]
    if ssh.ndim != 3 or ssh.shape[1:] != (len(lat), len(lon)):
        raise ValueError(f"ssh: expected (T, {len(lat)}, {len(lon)}), got {ssh.shape}")
    if not np.isfinite(ssh).all():
        raise ValueError("ssh: holds NaN or inf")
    return ssh


# ----------------------------------------------------------------------------- jet
def mean_step(ssh: np.ndarray, lon: np.ndarray, lat: np.ndarray, span_km: float = 150.0) -> dict[str, Any]:
    """Time-mean SSH step across the jet: per longitude the largest ``mean(y) - mean(y + span)``
    (north lower than south, as across the Gulf Stream), the median and minimum over longitudes [m]."""
    ssh = _check(ssh, lon, lat)
    m = ssh.mean(axis=0)
    n = max(int(round(span_km / _dy_km(lat))), 1)
    drops = (m[:-n] - m[n:]).max(axis=0)  # (nx,)
    return {"step_m": float(np.median(drops)), "step_min_m": float(drops.min()), "span_km": n * _dy_km(lat)}


def jet_axis(ssh: np.ndarray, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Latitude [deg] of the largest ``-dSSH/dy`` (eastward geostrophic velocity) per day and
    longitude, ``(T, nx)``, refined by a parabola through the maximum and its two neighbours."""
    ssh = _check(ssh, lon, lat)
    g = -(ssh[:, 1:, :] - ssh[:, :-1, :])  # (T, ny-1, nx) at mid-latitudes
    latm = 0.5 * (np.asarray(lat)[1:] + np.asarray(lat)[:-1])
    j = np.clip(g.argmax(axis=1), 1, g.shape[1] - 2)
    t_idx, i_idx = np.meshgrid(np.arange(g.shape[0]), np.arange(g.shape[2]), indexing="ij")
    a, b, c = g[t_idx, j - 1, i_idx], g[t_idx, j, i_idx], g[t_idx, j + 1, i_idx]
    den = a - 2 * b + c
    off = np.where(np.abs(den) > 0, 0.5 * (a - c) / np.where(den == 0, 1, den), 0.0)
    dlat = float(np.mean(np.diff(lat)))
    return latm[j] + np.clip(off, -1, 1) * dlat


def meander_range(ssh: np.ndarray, lon: np.ndarray, lat: np.ndarray, window_days: int = 90) -> dict[str, Any]:
    """Meridional excursions of the jet axis: per longitude and window of ``window_days``
    consecutive days, ``max - min`` of :func:`jet_axis`; the median over windows and longitudes [deg]
    (and the std of the axis over the whole period)."""
    axis = jet_axis(ssh, lon, lat)
    t = axis.shape[0]
    w = min(int(window_days), t)
    ranges = [axis[s:s + w].max(axis=0) - axis[s:s + w].min(axis=0) for s in range(0, t - w + 1, max(w // 3, 1))]
    r = np.stack(ranges)
    return {"range_deg": float(np.median(r)), "window_days": w, "axis_mean_deg": float(axis.mean()),
            "axis_std_deg": float(axis.std(axis=0).mean())}


def mean_axis(ssh: np.ndarray, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Time-mean jet axis per longitude ``(nx,)``: :func:`jet_axis` of the time-mean SSH."""
    return jet_axis(np.asarray(ssh, np.float64).mean(axis=0)[None], lon, lat)[0]


# ----------------------------------------------------------------------------- eddies
def eddy_census(ssh: np.ndarray, lon: np.ndarray, lat: np.ndarray, radius_km: float = 60.0,
                min_amp_m: float = 0.1, axis: np.ndarray | None = None, gap_deg: float = 0.5) -> dict[str, Any]:
    """Mean number per day of eddies (local extrema within ``radius_km`` standing at least
    ``min_amp_m`` above (warm) / below (cold) the mean of the ring of radius ``radius_km``),
    north and south of the jet axis ``axis`` ``(nx,)`` (default :func:`mean_axis`), ignoring those
    within ``gap_deg`` of it and within ``radius_km`` of the box edges."""
    from scipy.ndimage import maximum_filter, minimum_filter

    ssh = _check(ssh, lon, lat)
    lat = np.asarray(lat, float)
    axis = mean_axis(ssh, lon, lat) if axis is None else np.asarray(axis, float)
    dy = _dy_km(lat)
    dx = float(_dx_km(lon, lat).mean())
    ry, rx = max(int(round(radius_km / dy)), 1), max(int(round(radius_km / dx)), 1)
    yy, xx = np.mgrid[-ry:ry + 1, -rx:rx + 1]
    rr = np.hypot(yy * dy, xx * dx)
    disk = rr <= radius_km
    ring = np.abs(rr - radius_km) <= 0.5 * max(dx, dy)
    ring_off = np.argwhere(ring) - [ry, rx]
    counts = {"warm_north": 0, "cold_north": 0, "warm_south": 0, "cold_south": 0}
    for f in ssh:
        for kind, filt, sign in (("warm", maximum_filter, 1.0), ("cold", minimum_filter, -1.0)):
            ext = filt(f, footprint=disk, mode="nearest") == f
            ext[:ry], ext[-ry:], ext[:, :rx], ext[:, -rx:] = False, False, False, False
            for j, i in np.argwhere(ext):
                ringv = f[j + ring_off[:, 0], i + ring_off[:, 1]]
                if sign * (f[j, i] - ringv.mean()) < min_amp_m:
                    continue
                d = lat[j] - axis[i]
                if abs(d) < gap_deg:
                    continue
                counts[f"{kind}_{'north' if d > 0 else 'south'}"] += 1
    t = ssh.shape[0]
    out: dict[str, Any] = {k: v / t for k, v in counts.items()}
    out["north_per_day"] = out["warm_north"] + out["cold_north"]
    out["south_per_day"] = out["warm_south"] + out["cold_south"]
    return out


# ----------------------------------------------------------------------------- propagation
def lagged_displacement(ssh: np.ndarray, lon: np.ndarray, lat: np.ndarray, lat_band: tuple[float, float],
                        lag_days: int = 10, max_shift_km: float = 200.0) -> dict[str, Any]:
    """Peak of the lagged correlation of the SSH anomaly (time mean removed) within ``lat_band``:
    ``C(sx, sy) = corr(a(x, y, t), a(x + sx, y + sy, t + lag))`` over shifts up to
    ``max_shift_km``, pooled over days; returns the shift of the peak (``dx_km`` > 0 east,
    ``dy_km`` > 0 north), the speeds [km/day] and the peak correlation."""
    ssh = _check(ssh, lon, lat)
    lat = np.asarray(lat, float)
    if ssh.shape[0] <= lag_days:
        raise ValueError(f"lagged_displacement: need more than lag_days={lag_days} days")
    a = ssh - ssh.mean(axis=0)
    dy = _dy_km(lat)
    dx = float(_dx_km(lon, lat)[(lat >= lat_band[0]) & (lat <= lat_band[1])].mean())
    sy, sx = int(max_shift_km / dy), int(max_shift_km / dx)
    rows = np.nonzero((lat >= lat_band[0]) & (lat <= lat_band[1]))[0]
    j0, j1 = max(rows.min(), sy), min(rows.max() + 1, len(lat) - sy)
    if j1 - j0 < 2:
        raise ValueError(f"lagged_displacement: band {lat_band} too close to the box edge for {max_shift_km} km")
    from scipy.signal import fftconvolve

    i0, i1 = sx, len(lon) - sx
    x0 = a[:-lag_days, j0:j1, i0:i1]
    x0 = (x0 - x0.mean()) / x0.std()
    x1 = a[lag_days:, j0 - sy:j1 + sy, :]  # every shifted window lies inside
    # C(sx, sy) = mean(x0 * x1[shifted]) / std(x1[shifted]) (x0 has zero mean and unit std),
    # the sums over each window by 'valid' FFT convolutions, pooled over days
    flip = x0[:, ::-1, ::-1]
    num = fftconvolve(x1, flip, mode="valid", axes=(1, 2)).sum(axis=0)
    ones = np.ones(x0.shape[1:])[None]
    s1 = fftconvolve(x1, ones, mode="valid", axes=(1, 2)).sum(axis=0)
    s2 = fftconvolve(x1**2, ones, mode="valid", axes=(1, 2)).sum(axis=0)
    count = x0.size
    var = np.maximum(s2 / count - (s1 / count) ** 2, 1e-300)
    corr = num / count / np.sqrt(var)  # (2 sy + 1, 2 sx + 1), index (ky + sy, kx + sx)
    ky, kx = np.unravel_index(int(np.argmax(corr)), corr.shape)
    ky, kx = int(ky) - sy, int(kx) - sx
    c = float(corr.max())
    return {"dx_km": kx * dx, "dy_km": ky * dy, "u_km_day": kx * dx / lag_days, "v_km_day": ky * dy / lag_days,
            "corr": c, "lag_days": lag_days, "lat_band": list(lat_band)}


def zonal_phase_speeds(ssh: np.ndarray, lon: np.ndarray, lat: np.ndarray, lat_band: tuple[float, float],
                       bands_km: tuple[tuple[float, float], ...] = ((600.0, 2000.0), (300.0, 600.0),
                                                                    (150.0, 300.0), (70.0, 150.0))
                       ) -> list[dict[str, float]]:
    """Zonal wavenumber-frequency power of the SSH anomaly (time mean removed) in ``lat_band``:
    per row, Hann windows in time and longitude, ``|FFT|^2`` summed over the rows. A component
    ``exp(2 pi i (f t + k x))`` has phase speed ``c = -f / k`` [km/day] (> 0 east). Per band
    ``(lo, hi)`` of wavelengths ``1/|k|`` [km]: ``frac`` its share of the total power,
    ``east_over_west`` the power with ``c > 0`` over that with ``c < 0`` (``f = 0`` excluded) and
    ``c_km_day`` the power-weighted mean ``c``."""
    ssh = _check(ssh, lon, lat)
    lat = np.asarray(lat, float)
    rows = (lat >= lat_band[0]) & (lat <= lat_band[1])
    if not rows.any():
        raise ValueError(f"zonal_phase_speeds: no latitude in the band {lat_band}")
    a = ssh[:, rows, :] - ssh[:, rows, :].mean(axis=0)
    t, _, nx = a.shape
    win = np.hanning(t)[:, None, None] * np.hanning(nx)[None, None, :]
    power = (np.abs(np.fft.fft2(a * win, axes=(0, 2))) ** 2).sum(axis=1)  # (f, k)
    dx = float(_dx_km(lon, lat)[rows].mean())
    f, k = np.meshgrid(np.fft.fftfreq(t, 1.0), np.fft.fftfreq(nx, dx), indexing="ij")
    c = np.where((k != 0) & (f != 0), -f / np.where(k == 0, 1.0, k), 0.0)
    total = power.sum()
    out = []
    for lo, hi in bands_km:
        sel = (np.abs(k) >= 1.0 / hi) & (np.abs(k) < 1.0 / lo)
        moving = sel & (f != 0)
        east, west = power[moving & (c > 0)].sum(), power[moving & (c < 0)].sum()
        out.append({"lo_km": lo, "hi_km": hi, "frac": float(power[sel].sum() / total),
                    "east_over_west": float(east / west) if west > 0 else float("inf"),
                    "c_km_day": float((power[moving] * c[moving]).sum() / power[moving].sum())
                    if power[moving].sum() > 0 else float("nan")})
    return out


# ----------------------------------------------------------------------------- variability, spectra
def std_map(ssh: np.ndarray) -> np.ndarray:
    """Std over time of the SSH anomaly ``(ny, nx)`` [m]."""
    return np.asarray(ssh, np.float64).std(axis=0)


def std_summary(ssh: np.ndarray, lon: np.ndarray, lat: np.ndarray, band_deg: float = 1.0,
                axis: np.ndarray | None = None) -> dict[str, Any]:
    """Box-mean and maximum SSH anomaly std [m], and the ratio of the mean std within
    ``band_deg`` of the mean jet axis to the mean std farther away."""
    ssh = _check(ssh, lon, lat)
    s = std_map(ssh)
    axis = mean_axis(ssh, lon, lat) if axis is None else np.asarray(axis, float)
    near = np.abs(np.asarray(lat, float)[:, None] - axis[None, :]) <= band_deg
    ratio = float(s[near].mean() / s[~near].mean()) if (~near).any() and near.any() else float("nan")
    return {"std_mean_m": float(s.mean()), "std_max_m": float(s.max()), "std_jet_over_rest": ratio,
            "std_zonal_max_lat": float(np.asarray(lat)[int(s.mean(axis=1).argmax())])}


def spectral_slopes(ssh: np.ndarray, lon: np.ndarray, lat: np.ndarray,
                    band_km: tuple[float, float] = (70.0, 250.0)) -> dict[str, float]:
    """Slopes of the zonal and meridional SSH wavenumber spectra over ``band_km`` (rows/columns
    linearly detrended and Hann-windowed, averaged over rows/columns and days)."""
    from oceanda.dynamics.qg import spectral_slope, zonal_spectrum

    ssh = _check(ssh, lon, lat)
    kx, px = zonal_spectrum(ssh, _dx_km(lon, lat))
    ky, py = zonal_spectrum(np.swapaxes(ssh, 1, 2), _dy_km(lat))
    return {"zonal": spectral_slope(kx, px, band_km), "meridional": spectral_slope(ky, py, band_km),
            "band_km": list(band_km)}


# ----------------------------------------------------------------------------- non-Gaussianity
def phase_randomised(ssh: np.ndarray, seed: int = 0) -> np.ndarray:
    """Surrogate with the same power spectrum and random phases, day by day: each field is
    mirrored into a periodic ``(2 ny, 2 nx)`` field, its rfft2 amplitudes kept and phases taken
    from the rfft2 of white noise (Hermitian symmetry preserved), transformed back and cropped."""
    ssh = np.asarray(ssh, np.float64)
    rng = np.random.default_rng(seed)
    out = np.empty_like(ssh)
    for t, f in enumerate(ssh):
        m = f.mean()
        big = np.concatenate([f - m, (f - m)[::-1]], axis=0)
        big = np.concatenate([big, big[:, ::-1]], axis=1)
        amp = np.abs(np.fft.rfft2(big))
        ph = np.fft.rfft2(rng.standard_normal(big.shape))
        ph = ph / np.maximum(np.abs(ph), 1e-300)
        out[t] = np.fft.irfft2(amp * ph, s=big.shape)[: f.shape[0], : f.shape[1]] + m
    return out


def _laplacian_grad(ssh: np.ndarray, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dx = _dx_km(lon, lat)[None, :, None]
    dy = _dy_km(lat)
    f = ssh
    fx = (f[:, 1:-1, 2:] - f[:, 1:-1, :-2]) / (2 * dx[:, 1:-1])
    fy = (f[:, 2:, 1:-1] - f[:, :-2, 1:-1]) / (2 * dy)
    lap = (f[:, 1:-1, 2:] - 2 * f[:, 1:-1, 1:-1] + f[:, 1:-1, :-2]) / dx[:, 1:-1] ** 2 + \
          (f[:, 2:, 1:-1] - 2 * f[:, 1:-1, 1:-1] + f[:, :-2, 1:-1]) / dy**2
    return lap, np.hypot(fx, fy)


def _kurt_ratio(ssh: np.ndarray, lon: np.ndarray, lat: np.ndarray) -> tuple[float, float]:
    lap, grad = _laplacian_grad(ssh, lon, lat)
    lap = lap - lap.mean()
    kurt = float((lap**4).mean() / (lap**2).mean() ** 2)
    return kurt, float(np.percentile(grad, 99) / np.median(grad))


def non_gaussianity(ssh: np.ndarray, lon: np.ndarray, lat: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Kurtosis (not excess) of the SSH Laplacian and ``p99 / median`` of ``|grad SSH|`` (pooled
    over days and interior points) of the field and of its :func:`phase_randomised` surrogate,
    and their ratios (field / surrogate)."""
    ssh = _check(ssh, lon, lat)
    k, g = _kurt_ratio(ssh, lon, lat)
    ks, gs = _kurt_ratio(phase_randomised(ssh, seed), lon, lat)
    return {"lap_kurtosis": k, "lap_kurtosis_surrogate": ks, "lap_kurtosis_ratio": k / ks,
            "grad_p99_over_median": g, "grad_p99_over_median_surrogate": gs, "grad_ratio": g / gs}


# ----------------------------------------------------------------------------- all
def gulfstream_diagnostics(ssh: np.ndarray, lon: np.ndarray, lat: np.ndarray, lag_days: int = 10,
                           seed: int = 0, max_days_eddies: int = 120) -> dict[str, Any]:
    """Every diagnostic of this module on one series of daily maps (the eddy census on at
    most ``max_days_eddies`` evenly spaced days). Propagation is measured in two bands:
    ``south`` 1.5-4 deg south of the box-mean jet axis, ``jet`` within 0.75 deg of it."""
    ssh = _check(ssh, lon, lat)
    axis = mean_axis(ssh, lon, lat)
    ax = float(np.median(axis))
    lat = np.asarray(lat, float)
    days = ssh.shape[0]
    sel = np.unique(np.linspace(0, days - 1, min(days, max_days_eddies)).round().astype(int))
    out: dict[str, Any] = {
        "days": days, "jet_axis_lat_deg": ax,
        "mean_step": mean_step(ssh, lon, lat),
        "meander": meander_range(ssh, lon, lat),
        "eddies": eddy_census(ssh[sel], lon, lat, axis=axis),
        "std": std_summary(ssh, lon, lat, axis=axis),
        "slopes": spectral_slopes(ssh, lon, lat),
        "non_gaussianity": non_gaussianity(ssh, lon, lat, seed=seed),
    }
    prop: dict[str, Any] = {}
    for name, band in (("south", (ax - 4.0, ax - 1.5)), ("jet", (ax - 0.75, ax + 0.75))):
        band = (max(band[0], lat[0]), min(band[1], lat[-1]))
        try:
            prop[name] = lagged_displacement(ssh, lon, lat, band, lag_days=lag_days)
        except ValueError as exc:
            prop[name] = {"error": str(exc)}
    out["propagation"] = prop
    return out
