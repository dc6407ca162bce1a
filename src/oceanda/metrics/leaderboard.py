"""The leaderboard row of the 2020a SSH mapping data challenge, and the evaluation window.

``leaderboard(truth, analysis)`` returns the five numbers of a leaderboard row:

====================  =========================================================
``mu``                1 - RMSE / RMS(truth) over the space-time block
``sigma_t``           std over time of the daily 1 - RMSE_t / RMS_t
``lambda_x_deg``      shortest longitude wavelength resolved [deg] (None: no finite lambda)
``lambda_t_days``     shortest period resolved [days] (None: no finite lambda)
``rmse_m``            RMSE [m]
====================  =========================================================

(:mod:`oceanda.metrics.rmse`, :mod:`oceanda.metrics.spectral` give the formulas.)

The challenge evaluates the box lon -65..-55, lat 33..43 (:data:`DC_BOX`) over
2012-10-22..2012-12-02 (:data:`DC_PERIOD`, 42 days, two SWOT cycles); see
``ocean-data-challenges/2020a_SSH_mapping_NATL60`` README and 4DVarNet-starter's
``test_domain``. :func:`default_window` uses them where they intersect the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from oceanda.data import names as N
from oceanda.data.io import as_days, check_aligned, select_window
from oceanda.errors import InputError
from oceanda.metrics.ensemble import crps, spread_skill
from oceanda.metrics.rmse import RmseScores, rmse_scores
from oceanda.metrics.spectral import MIN_SAMPLES, PsdScores, psd_scores

#: the data challenge's evaluation box [lon_min, lon_max, lat_min, lat_max]
DC_BOX = (-65.0, -55.0, 33.0, 43.0)
#: the data challenge's evaluation period (inclusive)
DC_PERIOD = ("2012-10-22", "2012-12-02")

#: keys of a leaderboard row, in table order
KEYS = ("mu", "sigma_t", "lambda_x_deg", "lambda_t_days", "rmse_m")


@dataclass
class Evaluation:
    """Everything computed by :func:`evaluate` (scores, curves, notes)."""

    rmse: RmseScores
    psd: PsdScores | None
    spread_skill: float | None = None
    crps: float | None = None
    notes: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        """The leaderboard row (``None`` for a lambda that is not finite)."""
        return {
            "mu": float(self.rmse.mu),
            "sigma_t": float(self.rmse.sigma_t),
            "lambda_x_deg": None if self.psd is None else self.psd.lambda_x_deg,
            "lambda_t_days": None if self.psd is None else self.psd.lambda_t_days,
            "rmse_m": float(self.rmse.rmse_m),
        }


def evaluate(truth: xr.DataArray, analysis: xr.DataArray, ocean: xr.DataArray | None = None,
             std: xr.DataArray | None = None, members: xr.DataArray | None = None,
             detrend: str | None = "linear") -> Evaluation:
    """Scores of ``analysis`` against ``truth`` on their (already selected, aligned) block.

    Args:
        truth, analysis: ``(time, lat, lon)`` on the same coordinates.
        ocean: optional ``(lat, lon)`` mask, nonzero on ocean.
        std: optional analysis standard deviation ``(time, lat, lon)``.
        members: optional ensemble ``(member, time, lat, lon)``; used instead of ``std``
            for the ensemble scores when both are given.
        detrend: detrending of the spectra (``"linear"`` as in the challenge).
    """
    notes: list[str] = []
    rmse = rmse_scores(truth, analysis, ocean)
    psd = None
    if truth.sizes[N.TIME] < MIN_SAMPLES or truth.sizes[N.LON] < MIN_SAMPLES:
        notes.append(f"PSD score skipped: it needs at least {MIN_SAMPLES} days and {MIN_SAMPLES} longitudes "
                     f"(got {truth.sizes[N.TIME]} x {truth.sizes[N.LON]})")
    else:
        psd = psd_scores(truth, analysis, ocean, detrend=detrend)
        if psd.note:
            notes.append(psd.note)
        if psd.filled_fraction > 0:
            notes.append(f"PSD score: {100 * psd.filled_fraction:.1f}% of the cells (land or NaN) were gap-filled "
                         f"by harmonic interpolation before the FFT")
    out = Evaluation(rmse=rmse, psd=psd, notes=notes)
    if members is not None:
        out.spread_skill = spread_skill(truth, members.mean(N.MEMBER), members, ocean)
        out.crps = crps(truth, members, ocean=ocean)
    elif std is not None:
        out.spread_skill = spread_skill(truth, analysis, std, ocean)
        out.crps = crps(truth, mean=analysis, std=std, ocean=ocean)
    return out


def _extent(a: xr.DataArray, b: xr.DataArray, dim: str) -> tuple[Any, Any]:
    lo = max(a[dim].values[0], b[dim].values[0])
    hi = min(a[dim].values[-1], b[dim].values[-1])
    return lo, hi


def _fmt_time(t: Any, unit: str = "D") -> str:
    """A time bound as text: ISO date (``unit="D"``) or date-time (``"s"``), numbers as is."""
    if isinstance(t, np.datetime64):
        if unit != "D" and t == t.astype("datetime64[D]"):
            unit = "D"  # midnight: the date says it all
        return str(np.datetime_as_string(t, unit=unit))
    return f"{float(t):.10g}"


def default_window(truth: xr.DataArray, analysis: xr.DataArray, period: Sequence[Any] | None = None,
                   box: Sequence[float] | None = None) -> tuple[list[Any], list[float], list[str]]:
    """The evaluation ``(period, box, notes)``.

    A given ``period`` / ``box`` is kept as is. When ``None``: the data challenge's
    (:data:`DC_PERIOD`, :data:`DC_BOX`) clipped to the common extent of both datasets
    when it intersects it, else the whole common extent. ``notes`` say which was used.

    Raises:
        InputError: truth and analysis share no time, longitude or latitude.
    """
    notes: list[str] = []
    if np.issubdtype(truth[N.TIME].dtype, np.datetime64) != np.issubdtype(analysis[N.TIME].dtype, np.datetime64):
        raise InputError(f"truth and analysis time coordinates differ in kind ({truth[N.TIME].dtype} vs "
                         f"{analysis[N.TIME].dtype}): both must be dates, or both numbers of days")
    for dim in N.FIELD_DIMS:
        lo, hi = _extent(truth, analysis, dim)
        if lo > hi:
            raise InputError(f"truth and analysis do not overlap in '{dim}' (truth {_fmt_time(truth[dim].values[0])}"
                             f"..{_fmt_time(truth[dim].values[-1])}, analysis {_fmt_time(analysis[dim].values[0])}"
                             f"..{_fmt_time(analysis[dim].values[-1])})")
    t_lo, t_hi = _extent(truth, analysis, N.TIME)
    if period is None:
        period = [t_lo, t_hi]
        if np.issubdtype(truth[N.TIME].dtype, np.datetime64):
            dc = [np.datetime64(DC_PERIOD[0], "ns"), np.datetime64(DC_PERIOD[1], "ns")]
            if dc[0] <= t_hi and dc[1] >= t_lo:
                period = [max(dc[0], t_lo), min(dc[1], t_hi)]
                notes.append(f"period: the data challenge's {DC_PERIOD[0]}..{DC_PERIOD[1]} within the data: "
                             f"{_fmt_time(period[0])}..{_fmt_time(period[1])}")
        if len(notes) == 0:
            notes.append(f"period: the data do not cover the data challenge's {DC_PERIOD[0]}..{DC_PERIOD[1]}; "
                         f"using all common times {_fmt_time(period[0])}..{_fmt_time(period[1])}")
        period = [_fmt_time(p, unit="s") for p in period]
    if box is None:
        (x0, x1), (y0, y1) = _extent(truth, analysis, N.LON), _extent(truth, analysis, N.LAT)
        x0, x1, y0, y1 = float(x0), float(x1), float(y0), float(y1)
        if DC_BOX[0] <= x1 and DC_BOX[1] >= x0 and DC_BOX[2] <= y1 and DC_BOX[3] >= y0:
            box = [max(DC_BOX[0], x0), min(DC_BOX[1], x1), max(DC_BOX[2], y0), min(DC_BOX[3], y1)]
            notes.append(f"box: the data challenge's lon {DC_BOX[0]:g}..{DC_BOX[1]:g}, lat {DC_BOX[2]:g}..{DC_BOX[3]:g} "
                         f"within the data: lon {box[0]:g}..{box[1]:g}, lat {box[2]:g}..{box[3]:g}")
        else:
            box = [x0, x1, y0, y1]
            notes.append(f"box: the data do not intersect the data challenge's box; using the common extent "
                         f"lon {x0:g}..{x1:g}, lat {y0:g}..{y1:g}")
    return list(period), [float(b) for b in box], notes


def _nearest_within(da: xr.DataArray, ref: xr.DataArray, dim: str, rtol: float = 1e-3) -> xr.DataArray:
    """``da`` at ``ref``'s ``dim`` values (nearest, within ``rtol`` of a cell), or ``da`` unchanged
    when some value has no match (the caller's alignment check then names it)."""
    values = ref[dim].values
    if values.size < 2:
        return da
    step = np.sort(np.diff(values))[(values.size - 1) // 2]
    tol = step // int(1 / rtol) if np.issubdtype(values.dtype, np.datetime64) else float(step) * rtol
    try:
        return da.sel({dim: values}, method="nearest", tolerance=tol)
    except KeyError:
        return da


def match_grid(da: xr.DataArray, ref: xr.DataArray, names: tuple[str, str] = ("truth", "analysis"),
               dims: Sequence[str] = N.FIELD_DIMS) -> xr.DataArray:
    """``da`` cut to ``ref``'s coordinates on ``dims`` and given exactly those coordinates.

    Values may differ by float round-off (a thousandth of a cell); anything more raises
    :class:`InputError` (:func:`oceanda.data.io.check_aligned`): no silent regridding.
    """
    for dim in dims:
        if da.sizes[dim] != ref.sizes[dim] or not np.array_equal(da[dim].values, ref[dim].values):
            da = _nearest_within(da, ref, dim)
    check_aligned(ref, da, names=names, dims=dims)
    return da.assign_coords({d: ref[d] for d in dims})


def select_pair(truth: xr.DataArray, analysis: xr.DataArray, period: Sequence[Any] | None,
                box: Sequence[float] | None, names: tuple[str, str] = ("truth", "analysis")) -> tuple[xr.DataArray, xr.DataArray]:
    """Both fields cut to ``period`` / ``box`` (None: no cut), on the truth's coordinates.

    Raises:
        InputError: an empty window in either field, or grids that do not match.
    """
    t = select_window(truth, period, box, what=names[0])
    select_window(analysis, period, box, what=names[1])  # names an empty window in the analysis
    matched = match_grid(analysis, t, names=names)  # names a misaligned coordinate
    _check_same_cells(t, analysis, names)
    return t, matched


def _check_same_cells(t: xr.DataArray, analysis: xr.DataArray, names: tuple[str, str],
                      rtol: float = 1e-3) -> None:
    """Refuse an analysis with more cells than the truth over the truth's window (a finer
    or shifted grid, which nearest matching would silently subsample): each ``dim`` must
    hold as many values within the window's extent (+- ``rtol`` of a cell) in both."""
    for dim in N.FIELD_DIMS:
        tv, av = as_days(t[dim].values), as_days(analysis[dim].values)
        tol = rtol * (float(np.median(np.diff(tv))) if tv.size > 1 else 1.0)
        n_a = int(((av >= tv[0] - tol) & (av <= tv[-1] + tol)).sum())
        if n_a != tv.size:
            raise InputError(f"{names[0]} and {names[1]} are on different grids: over the evaluation window "
                             f"'{dim}' has {tv.size} values in {names[0]} and {n_a} in {names[1]}; "
                             "evaluate on the same grid (regrid one of them first)")


def leaderboard(truth: xr.DataArray, analysis: xr.DataArray, period: Sequence[Any] | None = None,
                box: Sequence[float] | None = None, ocean: xr.DataArray | None = None,
                detrend: str | None = "linear") -> dict[str, Any]:
    """The leaderboard row ``{mu, sigma_t, lambda_x_deg, lambda_t_days, rmse_m}``.

    ``period = [start, end]`` and ``box = [lon_min, lon_max, lat_min, lat_max]`` select
    the evaluated block (``None``: everything; :func:`default_window` gives the data
    challenge's). Cells evaluated: finite in both fields and ocean.
    """
    t, a = select_pair(truth, analysis, period, box)
    if ocean is not None:
        ocean = match_grid(ocean, t, names=("truth", "ocean mask"), dims=(N.LAT, N.LON))
    return evaluate(t, a, ocean, detrend=detrend).row()
