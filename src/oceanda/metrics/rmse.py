"""RMSE-based scores of the 2020a SSH mapping data challenge.

Definitions (``ocean-data-challenges/2020a_SSH_mapping_NATL60``, ``src/mod_eval.py``,
``rmse_based_scores``; identical in 4DVarNet-starter ``src/utils.py``), with ``a`` the
analysis, ``s`` the true SSH and means taken over the evaluated cells (see below):

    mu       = 1 - sqrt(mean_{t,x,y} (a - s)^2) / sqrt(mean_{t,x,y} s^2)
    score(t) = 1 - sqrt(mean_{x,y} (a - s)^2 (t)) / sqrt(mean_{x,y} s^2 (t))
    sigma_t  = std_t score(t)            (population std, ddof = 0, as xarray's .std())
    rmse_m   = sqrt(mean_{t,x,y} (a - s)^2)                                   [m]
    rmse_xy  = sqrt(mean_t (a - s)^2)    (the challenge's RMSE map)           [m]

RMS(s) is the root mean square of the SSH itself (not of its anomaly), as in the
challenge. The challenge averages with NaNs skipped; we average over the *valid* cells:
finite in both fields and ocean (``ocean`` mask, when given).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from oceanda.data import names as N
from oceanda.errors import InputError


@dataclass(frozen=True)
class RmseScores:
    """RMSE-based scores; see the module docstring for the formulas."""

    mu: float
    sigma_t: float
    rmse_m: float
    score_t: xr.DataArray  #: daily score 1 - RMSE_t / RMS_t, dim (time,)
    rmse_t: xr.DataArray  #: daily RMSE [m], dim (time,)
    rmse_xy: xr.DataArray  #: RMSE map over time [m], dims (lat, lon)
    n_valid: int  #: number of evaluated (time, lat, lon) cells


def valid_mask(truth: xr.DataArray, analysis: xr.DataArray, ocean: xr.DataArray | None = None) -> xr.DataArray:
    """Cells evaluated: finite in both fields and, when ``ocean`` is given, ocean (nonzero)."""
    valid = np.isfinite(truth) & np.isfinite(analysis)
    if ocean is not None:
        valid = valid & (ocean.fillna(0) != 0)
    return valid


def rmse_scores(truth: xr.DataArray, analysis: xr.DataArray, ocean: xr.DataArray | None = None) -> RmseScores:
    """mu, sigma_t, RMSE and the daily score / RMSE map of ``analysis`` against ``truth``.

    Args:
        truth, analysis: DataArrays with dims ``(time, lat, lon)`` on the same coordinates
            (numpy- or dask-backed; reductions are lazy and computed once together).
        ocean: optional ``(lat, lon)`` mask, nonzero on ocean.

    Raises:
        InputError: no valid cell, or a truth whose RMS is zero.
    """
    truth, analysis = truth.astype(np.float64), analysis.astype(np.float64)
    valid = valid_mask(truth, analysis, ocean)
    err2 = ((analysis - truth) ** 2).where(valid)
    sig2 = (truth**2).where(valid)
    sums = xr.Dataset(
        {
            "err2_t": err2.sum((N.LAT, N.LON)),
            "sig2_t": sig2.sum((N.LAT, N.LON)),
            "n_t": valid.sum((N.LAT, N.LON)),
            "err2_xy": err2.sum(N.TIME),
            "n_xy": valid.sum(N.TIME),
        }
    ).compute()
    n = int(sums.n_t.sum())
    if n == 0:
        raise InputError("no cell is finite in both truth and analysis (and ocean): nothing to evaluate")
    mse = float(sums.err2_t.sum()) / n
    ms_truth = float(sums.sig2_t.sum()) / n
    if ms_truth == 0.0:
        raise InputError("the truth is identically zero on the evaluated cells: RMS(truth) = 0")
    n_t = sums.n_t.where(sums.n_t > 0)
    rmse_t = np.sqrt(sums.err2_t / n_t)
    rms_t = np.sqrt(sums.sig2_t / n_t)
    score_t = (1.0 - rmse_t / rms_t).rename("score_t")
    rmse_xy = np.sqrt(sums.err2_xy / sums.n_xy.where(sums.n_xy > 0)).rename("rmse_xy")
    return RmseScores(
        mu=1.0 - np.sqrt(mse) / np.sqrt(ms_truth),
        sigma_t=float(score_t.std(N.TIME, skipna=True)),
        rmse_m=float(np.sqrt(mse)),
        score_t=score_t,
        rmse_t=rmse_t.rename("rmse_t"),
        rmse_xy=rmse_xy,
        n_valid=n,
    )


def rmse_m(truth: xr.DataArray, analysis: xr.DataArray, ocean: xr.DataArray | None = None) -> float:
    """Plain RMSE [m] over the valid cells: ``sqrt(mean (analysis - truth)^2)``."""
    valid = valid_mask(truth, analysis, ocean)
    n = int(valid.sum())
    if n == 0:
        raise InputError("no cell is finite in both truth and analysis (and ocean): nothing to evaluate")
    return float(np.sqrt(float(((analysis - truth) ** 2).where(valid).sum()) / n))
