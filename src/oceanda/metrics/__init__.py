"""Scores: SSH mapping data-challenge metrics, ensemble scores.

The leaderboard scores of the 2020a SSH mapping data challenge
(``ocean-data-challenges/2020a_SSH_mapping_NATL60``), defined exactly as there:

* :func:`rmse_scores` - ``mu = 1 - RMSE / RMS(truth)``, ``sigma_t`` = std over time of the
  daily score, RMSE [m] and the RMSE map (:mod:`oceanda.metrics.rmse`);
* :func:`psd_scores` - ``lambda_x`` [deg] and ``lambda_t`` [days] where the wavenumber-
  frequency PSD score ``1 - PSD(err) / PSD(truth)`` crosses 0.5 (:mod:`oceanda.metrics.spectral`);
* :func:`leaderboard` - the row ``{mu, sigma_t, lambda_x_deg, lambda_t_days, rmse_m}``;
* :func:`spread_skill`, :func:`crps` - ensemble scores (:mod:`oceanda.metrics.ensemble`).

Inputs are ``(time, lat, lon)`` :class:`xarray.DataArray` objects (numpy or dask);
opening files is :mod:`oceanda.data.io`'s job.
"""

from oceanda.metrics.ensemble import (crps, crps_ensemble, crps_gaussian, spread_skill,
                                      spread_skill_members, spread_skill_ratio)
from oceanda.metrics.leaderboard import (
    DC_BOX,
    DC_PERIOD,
    KEYS,
    Evaluation,
    default_window,
    evaluate,
    leaderboard,
    match_grid,
    select_pair,
)
from oceanda.metrics.rmse import RmseScores, rmse_m, rmse_scores
from oceanda.metrics.spectral import PsdScores, psd_scores

__all__ = [
    "DC_BOX",
    "DC_PERIOD",
    "KEYS",
    "Evaluation",
    "PsdScores",
    "RmseScores",
    "crps",
    "crps_ensemble",
    "crps_gaussian",
    "default_window",
    "evaluate",
    "leaderboard",
    "match_grid",
    "psd_scores",
    "rmse_m",
    "rmse_scores",
    "select_pair",
    "spread_skill",
    "spread_skill_members",
    "spread_skill_ratio",
]
