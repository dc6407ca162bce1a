"""Spectral (PSD-based) scores of the 2020a SSH mapping data challenge.

Definition (``ocean-data-challenges/2020a_SSH_mapping_NATL60``, ``src/mod_eval.py``,
``psd_based_scores``), with ``e = a - s`` the error of the analysis ``a`` against the
true SSH ``s``:

1. time in days since the first day, longitude in degrees;
2. for every latitude row, the 2-D (time x longitude) power spectral density with
   ``xrft.power_spectrum(field, dim=["time", "lon"], detrend="linear", window="hann")``
   (a plane in (time, lon) removed by least squares, a 2-D Hann window, density scaling)
   of ``e`` and of ``s``;
3. both averaged over latitude and restricted to strictly positive frequencies
   ``freq_lon > 0`` and ``freq_time > 0``;
4. ``PSD score(f_t, f_x) = 1 - PSD(e) / PSD(s)``;
5. the 0.5 iso-line of the score is drawn in wavelength space (``1/freq_lon`` [deg] by
   ``1/freq_time`` [days]) by matplotlib's contouring, which interpolates linearly
   between grid points in wavelength coordinates; the challenge takes the *first* line
   returned (``cs.collections[0].get_paths()[0]``) and reports
   ``lambda_x = min`` of its longitude wavelengths and ``lambda_t = min`` of its time
   wavelengths: the shortest scales resolved.

We call the same contour generator that matplotlib uses (``contourpy``, algorithm
``mpl2014``, one array per separate line) and take its first line, on the same grid
orientation (index 0 = longest wavelength), so the interpolation and the choice of line
are the challenge's. When the score never crosses 0.5 there is no line: ``lambda`` is
``None`` ("no finite lambda"; the challenge's code would fail there) and ``note`` says
whether everything (score >= 0.5 everywhere, e.g. truth against itself) or nothing is
resolved. 4DVarNet-starter uses ``detrend="constant"``; ``detrend`` is a parameter.

Gaps: spectra need gap-free fields. Cells that are not valid in both fields (NaN,
land) are filled day by day by harmonic interpolation (:mod:`oceanda.metrics.fill`,
the exact solution of the Laplace equation that the challenge's Gauss-Seidel fill
relaxes towards), in the truth and the analysis alike; ``filled_fraction`` reports how
many cells that touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from oceanda.data import names as N
from oceanda.errors import InputError
from oceanda.metrics.fill import laplace_fill
from oceanda.metrics.rmse import valid_mask

#: at least this many samples along time and longitude (2 positive frequencies each)
MIN_SAMPLES = 6
#: elements of one latitude block transformed at a time (bounds the FFT memory)
BLOCK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class PsdScores:
    """PSD-based scores; see the module docstring."""

    lambda_x_deg: float | None  #: shortest longitude wavelength resolved [deg], None if no 0.5 crossing
    lambda_t_days: float | None  #: shortest period resolved [days], None if no 0.5 crossing
    score: xr.DataArray  #: PSD score, dims (freq_time, freq_lon), positive frequencies
    score_lon: xr.DataArray  #: 1 - sum_f PSD(e) / sum_f PSD(s), dim (freq_lon,)
    score_time: xr.DataArray  #: 1 - sum_k PSD(e) / sum_k PSD(s), dim (freq_time,)
    psd_truth: xr.DataArray  #: latitude-mean PSD of the truth, dims (freq_time, freq_lon)
    psd_error: xr.DataArray  #: latitude-mean PSD of the error, dims (freq_time, freq_lon)
    note: str | None  #: why a lambda is None
    filled_fraction: float  #: fraction of (time, lat, lon) cells gap-filled before the FFT


def time_in_days(time: xr.DataArray) -> np.ndarray:
    """Time coordinate as float days since its first value (numbers are taken as days)."""
    t = np.asarray(time.values)
    if np.issubdtype(t.dtype, np.datetime64):
        return (t - t[0]) / np.timedelta64(1, "D")
    return t.astype(np.float64) - float(t[0])


def _regular(values: np.ndarray, what: str) -> np.ndarray:
    """``values`` replaced by an exactly regular grid; InputError if not regular to 0.1 %."""
    step = np.diff(values)
    d = float(np.median(step))
    if d <= 0 or np.abs(step - d).max() > 1e-3 * d:
        raise InputError(f"the PSD score needs a regularly spaced '{what}' coordinate "
                         f"(spacing varies from {step.min():g} to {step.max():g})")
    return values[0] + d * np.arange(values.size)


def contour_minima(score: np.ndarray, wl_x: np.ndarray, wl_t: np.ndarray, level: float = 0.5) -> tuple[float | None, float | None, str | None]:
    """Smallest wavelengths on the first ``level`` iso-line of ``score`` (challenge rule).

    Args:
        score: ``(n_t, n_x)`` values on the grid ``wl_t`` (rows) x ``wl_x`` (columns).
        wl_x, wl_t: wavelengths along columns and rows (any monotonic order).

    Returns:
        ``(min x, min y, note)`` over the vertices of the first line that
        matplotlib's ``mpl2014`` contour generator returns; ``(None, None, note)`` when
        the score does not cross ``level``.
    """
    from contourpy import LineType, contour_generator

    z = np.ma.masked_invalid(np.asarray(score, dtype=np.float64))
    if z.count() == 0:
        return None, None, "PSD score undefined (truth spectrum is zero)"
    gen = contour_generator(np.asarray(wl_x, float), np.asarray(wl_t, float), z, name="mpl2014",
                            line_type=LineType.SeparateCode)
    lines = gen.lines(level)[0]
    if not lines:
        if z.min() >= level:
            return None, None, f"PSD score >= {level} at every wavelength: all scales resolved, no finite lambda"
        if z.max() < level:
            return None, None, f"PSD score < {level} at every wavelength: no scale resolved, no finite lambda"
        return None, None, f"PSD score does not cross {level} on the grid"
    first = lines[0]
    return float(first[:, 0].min()), float(first[:, 1].min()), None


def _mean_psd(field: np.ndarray, tdays: np.ndarray, lat: np.ndarray, lon: np.ndarray, detrend: str | None) -> xr.DataArray:
    """Latitude mean of the (time, lon) PSD of ``field`` (T, ny, nx), in latitude blocks."""
    import warnings

    import xrft

    T, ny, nx = field.shape
    rows = max(1, BLOCK_ELEMENTS // (T * nx))
    total = None
    for j0 in range(0, ny, rows):
        block = xr.DataArray(field[:, j0:j0 + rows], dims=N.FIELD_DIMS,
                             coords={N.TIME: tdays, N.LAT: lat[j0:j0 + rows], N.LON: lon})
        with warnings.catch_warnings():  # xrft 1.0 calls xarray's deprecated Dataset.drop
            warnings.simplefilter("ignore", FutureWarning)
            psd = xrft.power_spectrum(block, dim=[N.TIME, N.LON], detrend=detrend, window="hann").sum(N.LAT)
        total = psd if total is None else total + psd
    assert total is not None
    return total / ny


def psd_scores(truth: xr.DataArray, analysis: xr.DataArray, ocean: xr.DataArray | None = None,
               detrend: str | None = "linear") -> PsdScores:
    """lambda_x [deg] and lambda_t [days] of ``analysis`` against ``truth``.

    Args:
        truth, analysis: ``(time, lat, lon)`` DataArrays on the same, regularly spaced
            time and longitude coordinates (loaded into memory as float64: the evaluated
            block should fit in memory a few times over).
        ocean: optional ``(lat, lon)`` mask, nonzero on ocean.
        detrend: ``"linear"`` (the challenge), ``"constant"`` (4DVarNet-starter) or None.

    Raises:
        InputError: fewer than :data:`MIN_SAMPLES` days or longitudes, irregular spacing,
            or a day without any valid cell.
    """
    truth = truth.transpose(*N.FIELD_DIMS)
    analysis = analysis.transpose(*N.FIELD_DIMS)
    nt, ny, nx = truth.shape
    if nt < MIN_SAMPLES or nx < MIN_SAMPLES:
        raise InputError(f"the PSD score needs at least {MIN_SAMPLES} days and {MIN_SAMPLES} longitudes "
                         f"(got {nt} x {nx})")
    tdays = _regular(time_in_days(truth[N.TIME]), N.TIME)
    lon = _regular(np.asarray(truth[N.LON].values, dtype=np.float64), N.LON)
    lat = np.asarray(truth[N.LAT].values, dtype=np.float64)
    valid = np.asarray(valid_mask(truth, analysis, ocean).transpose(*N.FIELD_DIMS).values, dtype=bool)
    s, a = laplace_fill([np.asarray(truth.values), np.asarray(analysis.values)], valid, times=truth[N.TIME].values)
    psd_s = _mean_psd(s, tdays, lat, lon, detrend)
    psd_e = _mean_psd(a - s, tdays, lat, lon, detrend)
    fx, ft = "freq_" + N.LON, "freq_" + N.TIME
    pos = {fx: psd_s[fx].values > 0, ft: psd_s[ft].values > 0}
    psd_s = psd_s.isel(pos).transpose(ft, fx)
    psd_e = psd_e.isel(pos).transpose(ft, fx)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = (1.0 - psd_e / psd_s.where(psd_s > 0)).rename("psd_score")
        score_lon = (1.0 - psd_e.sum(ft) / psd_s.sum(ft).where(psd_s.sum(ft) > 0)).rename("psd_score_lon")
        score_time = (1.0 - psd_e.sum(fx) / psd_s.sum(fx).where(psd_s.sum(fx) > 0)).rename("psd_score_time")
    wl_x = 1.0 / psd_s[fx].values
    wl_t = 1.0 / psd_s[ft].values
    score = score.assign_coords(wavelength_lon=(fx, wl_x), wavelength_time=(ft, wl_t))
    lx, lt, note = contour_minima(score.values, wl_x, wl_t)
    return PsdScores(
        lambda_x_deg=lx,
        lambda_t_days=lt,
        score=score,
        score_lon=score_lon.assign_coords(wavelength_lon=(fx, wl_x)),
        score_time=score_time.assign_coords(wavelength_time=(ft, wl_t)),
        psd_truth=psd_s,
        psd_error=psd_e,
        note=note,
        filled_fraction=float(1.0 - valid.mean()),
    )
