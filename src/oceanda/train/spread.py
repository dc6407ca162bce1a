"""Spread calibration of the SPDE-prior 4DVarNet's conditional members (``method=spde_4dvarnet``).

The Matheron members ``x_i = x* + (s_i - x*(s_i))`` of a trained model are scaled to
``x* + c r_p (x_i - x*)`` (:func:`oceanda.assim.spde_fourdvarnet.scale_members`; ``r_p`` the
per-patch factor of ``spread_mode``: 1 for ``global``, observed std / predicted prior std for
``obs_std``). ``c`` is fitted on TRAINING-period patches (never the evaluation window):
:func:`pick_patches` draws them, :func:`collect_members` runs the model with ``c = 1`` on them,
:func:`calibration_fit` fits ``c`` in closed form (:func:`fit_spread_scale`) and
:func:`calibrate_spde_checkpoint` writes a copy of the checkpoint holding it, which ``oceanda
infer method=spde_4dvarnet`` applies. :func:`calibrate` is the whole procedure;
``hpc/bench/spde_fourdvarnet_qg.py --fit-patches N --calibrated-out PATH`` drives it and scores
the result on held-out days.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oceanda.assim.base import PatchBatch
from oceanda.assim.spde_fourdvarnet import (SPREAD_MODES, SPDEFourDVarNetMethod, read_spde_checkpoint,
                                            scale_members, spread_factors)
from oceanda.errors import ConfigError, InputError
from oceanda.metrics.ensemble import crps_ensemble, spread_skill_ratio
from oceanda.train.loop import save_atomic

log = logging.getLogger("oceanda.train")

__all__ = ["fit_spread_scale", "calibrate_spde_checkpoint", "pick_patches", "patch_batch", "collect_members",
           "mode_factors", "calibration_fit", "calibrate"]


def fit_spread_scale(members, centre, truth, mask=None, *, finite_ensemble: bool = True) -> dict[str, float]:
    """Spread factor ``c`` of the members ``centre + c (members - centre)``, fitted in closed form.

    ``members`` ``(N, ...)``, ``centre`` (the solver's ``x*(y)``) and ``truth`` ``(...)``,
    ``mask`` bool ``(...)`` (all entries when ``None``). With ``d_i = members_i - centre``,
    ``e = centre - truth`` and, over the masked entries, ``A = mean(e^2)``, ``B = mean(e dbar)``,
    ``C = mean(dbar^2)``, ``V = mean(var_i d_i)`` (``N - 1`` denominator), the scaled ensemble
    has mean variance ``c^2 V`` and ensemble-mean MSE ``A + 2 c B + c^2 C``; ``c`` solves

        k c^2 V = A + 2 c B + c^2 C,   k = (N + 1) / N  (finite_ensemble) or 1,

    i.e. ``c = (B + sqrt(B^2 + A (k V - C))) / (k V - C)``, the only positive root. With
    ``k = (N + 1) / N`` this is the spread-error identity of an exchangeable ``N``-member
    ensemble (Fortin et al. 2014): the scaled ensemble's spread/skill
    (:func:`oceanda.metrics.ensemble.spread_skill_ratio`, which carries that correction) is 1;
    ``k = 1`` makes it ``sqrt((N + 1) / N)``.

    Returns ``{"spread_scale": c, "spread_skill_before", "spread_skill_after", "rmse_centre"
    (sqrt(A)), "spread_before" (sqrt(V)), "n_members", "n_cells", "finite_ensemble"}``. Raises
    :class:`InputError` when the shapes disagree, nothing is selected, or the members have no
    spread (``k V <= C``).
    """
    m = np.asarray(members, dtype=np.float64)
    x = np.asarray(centre, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    if m.ndim < 1 or m.shape[1:] != x.shape or x.shape != t.shape:
        raise InputError(f"fit_spread_scale: members {m.shape}, centre {x.shape} and truth {t.shape} "
                         "must be (N, ...), (...), (...)")
    n = m.shape[0]
    if n < 2:
        raise InputError(f"fit_spread_scale: needs at least 2 members, got {n}")
    sel = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), x.shape)
    if not sel.any():
        raise InputError("fit_spread_scale: the mask selects no entry")
    d = m[:, sel] - x[sel][None]
    e = x[sel] - t[sel]
    dbar = d.mean(0)
    A, B, C = float(np.mean(e * e)), float(np.mean(e * dbar)), float(np.mean(dbar * dbar))
    V = float(np.mean(d.var(0, ddof=1)))
    k = (n + 1) / n if finite_ensemble else 1.0
    a = k * V - C
    if not (a > 0 and math.isfinite(a)):
        raise InputError(f"fit_spread_scale: the members have no spread (k V = {k * V:.3g} <= C = {C:.3g})")
    c = (B + math.sqrt(B * B + A * a)) / a
    ss = lambda c: spread_skill_ratio(c * c * V, A + 2 * c * B + c * c * C, n)  # noqa: E731
    return {"spread_scale": c, "spread_skill_before": ss(1.0), "spread_skill_after": ss(c),
            "rmse_centre": math.sqrt(A), "spread_before": math.sqrt(V), "n_members": int(n),
            "n_cells": int(sel.sum()), "finite_ensemble": bool(finite_ensemble)}


def calibrate_spde_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, spread_scale: float,
                              info: dict[str, Any] | None = None, spread_mode: str = "global") -> Path:
    """Copy the SPDE-4DVarNet checkpoint ``src`` to ``dst`` (atomically) with ``spread_scale = c``,
    ``spread_mode`` (and ``calibration = info``: plain numbers / strings / lists describing the
    fit); the weights, config and normalisation are unchanged. ``oceanda infer
    method=spde_4dvarnet`` then scales the members by ``c r_b``
    (:func:`oceanda.assim.spde_fourdvarnet.scale_members`, :func:`~oceanda.assim.spde_fourdvarnet.spread_factors`)."""
    c = float(spread_scale)
    if not (math.isfinite(c) and c > 0):
        raise ConfigError(f"spread_scale must be a finite number > 0, got {spread_scale!r}")
    if spread_mode not in SPREAD_MODES:
        raise ConfigError(f"spread_mode must be one of {list(SPREAD_MODES)}, got {spread_mode!r}")
    read_spde_checkpoint(src)  # validate (clear InputError naming src)
    ck = torch.load(src, map_location="cpu", weights_only=True)
    ck["spread_scale"] = c
    ck["spread_mode"] = str(spread_mode)
    ck["calibration"] = dict(info or {})
    return save_atomic(ck, dst)


def pick_patches(ocean: np.ndarray, obs: np.ndarray, nt: int, T: int, size: int, n: int, rng: np.random.Generator,
                 min_ocean: float = 0.5, min_obs: int = 20) -> list[tuple[int, int, int]]:
    """``n`` distinct random ``(t, y, x)`` starts of ``T x size x size`` windows inside the
    ``nt`` days with at least ``min_ocean`` ocean and ``min_obs`` observations."""
    ny, nx = ocean.shape
    out: set[tuple[int, int, int]] = set()
    for _ in range(200 * n):
        t, y, x = (int(rng.integers(0, nt - T + 1)), int(rng.integers(0, ny - size + 1)),
                   int(rng.integers(0, nx - size + 1)))
        oc = ocean[y:y + size, x:x + size]
        if oc.mean() < min_ocean or (t, y, x) in out:
            continue
        if np.isfinite(obs[t:t + T, y:y + size, x:x + size][:, oc]).sum() < min_obs:
            continue
        out.add((t, y, x))
        if len(out) == n:
            break
    if len(out) < n:
        raise InputError(f"only {len(out)} of {n} patches found (domain too small for size {size}?)")
    return sorted(out)


def patch_batch(obs, ocean, grid, days, t, y, x, T, size) -> PatchBatch:
    ys, xs = slice(y, y + size), slice(x, x + size)
    f = lambda a: torch.from_numpy(np.array(a, np.float64))[None]  # noqa: E731  (a writable copy)
    return PatchBatch(obs=f(obs[t:t + T, ys, xs]), ocean=torch.from_numpy(ocean[ys, xs].copy())[None],
                      lon=f(grid.lon[xs]), lat=f(grid.lat[ys]), time=f(days[t:t + T]),
                      dx_m=f(grid.dx_m[ys, xs]), dy_m=f(grid.dy_m[ys, xs]))


def collect_members(method, obs, ocean, grid, days, truth, starts, T, size, oi=None, soi=None, label="") -> dict:
    """Run ``method`` (raw members), and optionally ``oi`` / ``soi``, on the patches ``starts``:
    stacked ``(P, ...)`` arrays (members ``(P, N, T, H, W)``) and the predicted prior std [m]."""
    acc = {k: [] for k in ("truth", "net", "oi", "soi", "mem", "soi_mem", "ocean", "obs")}
    theta_std, r_obs, t_net, t_oi = [], [], 0.0, 0.0
    Rn = float(method.model.R) if method.noise_std is None else (method.noise_std / method.std) ** 2
    for i, (t, y, x) in enumerate(starts):
        b = patch_batch(obs, ocean, grid, days, t, y, x, T, size)
        t0 = time.perf_counter()
        r = method(b)
        t_net += time.perf_counter() - t0
        obs_n = ((b.obs - method.mean) / method.std).float()
        with torch.no_grad():
            th = method.model.predict_theta(obs_n, b.ocean)
        theta_std.append(float(th["std"].mean()) * method.std)
        r_obs.append(float(spread_factors(obs_n, b.ocean, th["std"], Rn, "obs_std")[0]))
        acc["truth"].append(truth[t:t + T, y:y + size, x:x + size].astype(np.float64))
        acc["net"].append(r.mean[0].numpy())
        acc["mem"].append(r.members[0].numpy())
        acc["obs"].append(b.obs[0].numpy())
        acc["ocean"].append(np.broadcast_to(b.ocean[0].numpy(), (T, size, size)))
        if oi is not None:
            t0 = time.perf_counter()
            acc["oi"].append(oi(b).mean[0].numpy())
            t_oi += time.perf_counter() - t0
        if soi is not None:
            rs = soi(b)
            acc["soi"].append(rs.mean[0].numpy())
            acc["soi_mem"].append(rs.members[0].numpy())
        log.info("%spatch %d/%d (t=%d, y=%d, x=%d) done", label, i + 1, len(starts), t, y, x)
    A = {k: np.stack(v) for k, v in acc.items() if v}
    A["theta_std"] = np.array(theta_std)
    A["r_obs"] = np.array(r_obs)  # obs_std mode's per-patch factor sigma_y / sigma_Theta
    A["t_net"], A["t_oi"] = t_net / len(starts), t_oi / len(starts)
    return A


def mode_factors(A: dict, mode: str) -> np.ndarray:
    """Per-patch factors ``r_p`` ``(P, 1, 1, 1)`` of ``spread_mode`` (before the global c)."""
    r = A["r_obs"] if mode == "obs_std" else np.ones(len(A["net"]))
    return r.reshape(-1, 1, 1, 1)


def calibration_fit(A: dict, T: int, mode: str) -> dict:
    """Fit the spread factor on the (training-period) patches ``A`` for ``spread_mode`` ``mode``:
    the global ``c`` (:func:`fit_spread_scale` on the members ``x* + r_p d``, what is stored), and
    for the report only: ``c`` per patch (times ``r_p``), per day of the window, the
    CRPS-minimising ``c`` and the ``k = 1`` variant."""
    from scipy.optimize import minimize_scalar

    r = mode_factors(A, mode)
    mem = scale_members(A["net"], np.moveaxis(A["mem"], 1, 0), r, axis=0)  # (N, P, T, H, W)
    sel = A["ocean"]
    fit = fit_spread_scale(mem, A["net"], A["truth"], sel)
    per_patch = [fit_spread_scale(mem[:, p], A["net"][p], A["truth"][p], sel[p])["spread_scale"]
                 for p in range(mem.shape[1])]
    per_day = []
    for t in range(T):
        s = np.zeros_like(sel)
        s[:, t] = sel[:, t]
        per_day.append(fit_spread_scale(mem, A["net"], A["truth"], s)["spread_scale"])

    def crps_of(c):
        m = scale_members(A["net"], mem, c, axis=0)
        return float(crps_ensemble(A["truth"][sel], m[:, sel], axis=0).mean())

    opt = minimize_scalar(crps_of, bounds=(0.05, 3.0), method="bounded", options={"xatol": 1e-3})
    pp = np.array(per_patch)
    return {**fit, "mode": mode, "per_patch": per_patch, "per_patch_cv": float(pp.std() / pp.mean()),
            "per_day": per_day,
            "k1_spread_scale": fit_spread_scale(mem, A["net"], A["truth"], sel,
                                                finite_ensemble=False)["spread_scale"],
            "crps_optimal_spread_scale": float(opt.x), "crps_at_optimum": float(opt.fun),
            "crps_at_fitted": crps_of(fit["spread_scale"]), "crps_at_1": crps_of(1.0)}


def calibrate(checkpoint: str | os.PathLike, truth: str | os.PathLike, obs: str | os.PathLike,
              period: tuple[str, str], out: str | os.PathLike | None = None, *, n_patches: int = 32,
              size: int = 32, members: int = 50, member_batch: int = 25, seed: int = 0,
              spread_mode: str = "obs_std", noise_std: float | None = None) -> dict[str, Any]:
    """Fit the spread factor of ``checkpoint`` on ``n_patches`` random ``T x size x size``
    patches of the TRAINING ``period`` (``[start, end]``) of ``truth`` / ``obs``, with
    ``members`` raw members each; with ``out``, write the calibrated checkpoint for
    ``spread_mode``. Returns ``{mode: calibration_fit(...)}`` for every spread mode, each with
    its ``patches`` and ``period``."""
    from oceanda.train.data import load_arrays

    if spread_mode not in SPREAD_MODES:
        raise ConfigError(f"spread_mode must be one of {list(SPREAD_MODES)}, got {spread_mode!r}")
    method = SPDEFourDVarNetMethod(str(checkpoint), members=members, return_members=True, seed=seed,
                                   noise_std=noise_std, member_batch=member_batch, spread_scale=1.0,
                                   spread_mode="global")
    T = method.cfg.n_time
    tr, ob, oc, times, grid = load_arrays(str(truth), str(obs), None, list(period), with_grid=True)
    days = ((times - times[0]) / np.timedelta64(1, "D")).astype(np.float64)
    starts = pick_patches(oc, ob, len(times), T, size, n_patches, np.random.default_rng(seed + 1))
    F = collect_members(method, ob, oc, grid, days, tr, starts, T, size, label="fit ")
    result = {}
    for mode in SPREAD_MODES:
        cal = calibration_fit(F, T, mode)
        cal["patches"] = [list(s) for s in starts]
        cal["period"] = list(period)
        result[mode] = cal
    if out is not None:
        cal = result[spread_mode]
        info = {k: cal[k] for k in ("spread_scale", "spread_skill_before", "spread_skill_after",
                                    "n_members", "n_cells", "period", "per_patch_cv", "mode")}
        info["n_patches"] = n_patches
        calibrate_spde_checkpoint(checkpoint, out, cal["spread_scale"], info, spread_mode=spread_mode)
        log.info("calibrated checkpoint written: %s (spread_mode=%s)", out, spread_mode)
    return result
