"""Ensemble / probabilistic scores: CRPS and the spread-skill ratio.

CRPS (continuous ranked probability score) of a predictive CDF ``F`` for the outcome
``y``: ``CRPS(F, y) = int (F(x) - 1[x >= y])^2 dx = E|X - y| - E|X - X'| / 2``
(Gneiting & Raftery 2007), in metres; lower is better; it equals the absolute error for
a deterministic forecast.

* Gaussian ``N(mu, sigma^2)``, closed form with ``z = (y - mu) / sigma``:
  ``CRPS = sigma [ z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi) ]``.
* Ensemble ``x_1..x_N``, the *fair* (unbiased for the underlying distribution)
  estimator of Ferro (2014):
  ``CRPS = (1/N) sum_i |x_i - y| - 1 / (2 N (N - 1)) sum_{i,j} |x_i - x_j|``,
  computed in O(N log N) per cell from the sorted members:
  ``sum_{i,j} |x_i - x_j| = 2 sum_k (2k - N + 1) x_(k)`` (k = 0..N-1).

Spread-skill ratio: ``SSR = sqrt(mean spread^2) / RMSE(mean)``, averaged over the valid
cells; 1 for a calibrated ensemble, < 1 under-dispersive, > 1 over-dispersive. With a
standard deviation ``spread^2 = sigma^2``. With N members, ``spread^2`` is the unbiased
member variance (ddof = 1) times ``(N + 1) / N``, the finite-ensemble correction of
Fortin et al. (2014, MWR 142) that makes the ratio 1 in expectation when the truth is
exchangeable with the members: ``E (mean - y)^2 = sigma^2 (1 + 1/N)``.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy.special import ndtr

from oceanda.data import names as N
from oceanda.errors import InputError


def crps_gaussian(y, mu, sigma):
    """Elementwise CRPS of ``N(mu, sigma^2)`` for the outcome ``y`` (closed form; sigma >= 0)."""
    y, mu, sigma = (np.asarray(v, dtype=np.float64) for v in (y, mu, sigma))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (y - mu) / sigma
        pdf = np.exp(-0.5 * z**2) / np.sqrt(2.0 * np.pi)
        out = sigma * (z * (2.0 * ndtr(z) - 1.0) + 2.0 * pdf - 1.0 / np.sqrt(np.pi))
    return np.where(sigma == 0, np.abs(y - mu), out)


def crps_ensemble(y, members, axis: int = 0):
    """Elementwise fair CRPS of the ensemble ``members`` (members along ``axis``) for ``y``."""
    x = np.moveaxis(np.asarray(members, dtype=np.float64), axis, 0)
    y = np.asarray(y, dtype=np.float64)
    n = x.shape[0]
    if n < 2:
        raise InputError(f"the fair CRPS needs at least 2 members, got {n}")
    skill = np.abs(x - y[None]).mean(axis=0)
    xs = np.sort(x, axis=0)
    k = np.arange(n, dtype=np.float64).reshape((n,) + (1,) * (x.ndim - 1))
    pair_sum = 2.0 * ((2.0 * k - n + 1.0) * xs).sum(axis=0)
    return skill - pair_sum / (2.0 * n * (n - 1))


def _valid(truth: xr.DataArray, fields: list[xr.DataArray], ocean: xr.DataArray | None) -> xr.DataArray:
    valid = np.isfinite(truth)
    for f in fields:
        valid = valid & np.isfinite(f)
    if ocean is not None:
        valid = valid & (ocean.fillna(0) != 0)
    return valid


def crps(truth: xr.DataArray, members: xr.DataArray | None = None, *, mean: xr.DataArray | None = None,
         std: xr.DataArray | None = None, ocean: xr.DataArray | None = None) -> float:
    """Mean CRPS [m] over the valid cells, of an ensemble or of a Gaussian ``(mean, std)``.

    Args:
        truth: ``(time, lat, lon)``.
        members: ``(member, time, lat, lon)`` ensemble (fair CRPS), or None.
        mean, std: Gaussian predictive distribution (closed form), used when ``members``
            is None.
        ocean: optional ``(lat, lon)`` mask.
    """
    if members is not None:
        valid = _valid(truth, [], ocean) & np.isfinite(members).all(N.MEMBER)
        per_cell = xr.apply_ufunc(crps_ensemble, truth, members, input_core_dims=[[], [N.MEMBER]],
                                  kwargs={"axis": -1}, dask="parallelized", output_dtypes=[np.float64],
                                  dask_gufunc_kwargs={"allow_rechunk": True})
    elif mean is not None and std is not None:
        valid = _valid(truth, [mean, std], ocean)
        per_cell = xr.apply_ufunc(crps_gaussian, truth, mean, std, dask="parallelized", output_dtypes=[np.float64])
    else:
        raise InputError("crps needs members, or a mean and a standard deviation")
    total = xr.Dataset({"s": per_cell.where(valid).sum(), "n": valid.sum()}).compute()
    if int(total.n) == 0:
        raise InputError("crps: no cell where truth and forecast are finite")
    return float(total.s) / int(total.n)


def spread_skill_ratio(variance: float, mse: float, n_members: int | None = None) -> float:
    """The spread-skill ratio, defined once: ``sqrt(spread^2 / MSE(mean))`` with ``variance``
    the mean unbiased (ddof = 1) member variance of ``n_members`` members, corrected to
    ``spread^2 = (N + 1) / N variance`` (Fortin et al. 2014, module docstring), or a predictive
    variance ``sigma^2`` taken as is (``n_members=None``); ``mse`` the mean squared error of
    the ensemble mean (the forecast) over the same cells."""
    if n_members is not None:
        if n_members < 2:
            raise InputError(f"spread-skill needs at least 2 members, got {n_members}")
        variance = variance * (n_members + 1) / n_members
    if not mse > 0:
        raise InputError("spread-skill: the mean equals the truth exactly (zero error)")
    return float(np.sqrt(variance / mse))


def spread_skill_members(members, truth, mask=None) -> float:
    """:func:`spread_skill_ratio` of in-memory members ``(N, ...)`` (numpy) against ``truth``
    ``(...)`` over the entries where ``mask`` is True (all when ``None``)."""
    m = np.asarray(members, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    var = m.var(axis=0, ddof=1)
    err2 = (m.mean(axis=0) - t) ** 2
    if mask is not None:
        sel = np.broadcast_to(np.asarray(mask, bool), t.shape)
        var, err2 = var[sel], err2[sel]
    return spread_skill_ratio(float(var.mean()), float(err2.mean()), m.shape[0])


def spread_skill(truth: xr.DataArray, mean: xr.DataArray, std_or_members: xr.DataArray,
                 ocean: xr.DataArray | None = None) -> float:
    """:func:`spread_skill_ratio` over the valid cells of xarray fields (lazily with dask).

    ``std_or_members`` is a standard deviation ``(time, lat, lon)`` or members
    ``(member, time, lat, lon)`` (finite-ensemble corrected, see the module docstring);
    ``mean`` is the forecast whose error is measured (the ensemble mean for members).
    """
    n = None
    if N.MEMBER in std_or_members.dims:
        n = std_or_members.sizes[N.MEMBER]
        if n < 2:
            raise InputError(f"spread-skill needs at least 2 members, got {n}")
        var = std_or_members.var(N.MEMBER, ddof=1)
    else:
        var = std_or_members**2
    valid = _valid(truth, [mean, var], ocean)
    total = xr.Dataset({"err2": ((mean - truth) ** 2).where(valid).sum(),
                        "var": var.where(valid).sum(), "n": valid.sum()}).compute()
    if int(total.n) == 0:
        raise InputError("spread-skill: no cell where truth, mean and spread are finite")
    return spread_skill_ratio(float(total["var"]), float(total.err2), n)
