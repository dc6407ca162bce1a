"""Observation-error draws for track tables (see :class:`oceanda.obs.satellites.NoiseModel`).

Along-track correlated terms are stationary AR(1) processes along each *pass segment*
(consecutive rows of one satellite no more than ``max(10 s, 3 dt)`` apart; a row is one
sample time, i.e. one nadir sample or one line of swath pixels). Within a segment starting
at row ``s``:

    x_s = e_s,   x_k = phi x_{k-1} + sqrt(1 - phi^2) e_k,   e ~ N(0, 1) iid,

with ``phi = exp(-dt v / L)`` (``dt`` the row interval, ``v`` the ground speed, ``L`` the
correlation length), so ``corr(x_k, x_{k+m}) = phi^m = exp(-distance / L)``. All segments
are filtered at once by one ``scipy.signal.lfilter`` pass over the concatenated rows,
``y_k = phi y_{k-1} + c e_k``, followed by the exact correction
``x_k = y_k - phi^(k-s+1) y_(s-1) + phi^(k-s) (1 - c) e_s`` that restarts every segment.

Random streams are keyed by ``(seed, satellite code, first second of its rows)``, so the
chunks of :func:`oceanda.obs.tracks.iter_ground_tracks` get independent, reproducible noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.signal import lfilter

from oceanda.errors import InputError
from oceanda.obs.satellites import Satellite
from oceanda.obs.tracks import TrackTable, orbits_for

_REF_ROLL_KM = 50.0


def ar1_segments(e: np.ndarray, phi: float, seg_start: np.ndarray) -> np.ndarray:
    """Unit-variance AR(1) along rows, restarted at every ``seg_start`` row.

    Args:
        e: ``(m,)`` iid N(0, 1) innovations.
        phi: lag-one correlation in [0, 1).
        seg_start: ``(m,)`` bool, True at the first row of each segment (row 0 included).

    Returns:
        ``(m,)`` x with ``x_s = e_s`` and ``x_k = phi x_{k-1} + sqrt(1 - phi^2) e_k``.
    """
    m = e.shape[0]
    if m == 0:
        return e.copy()
    if phi <= 0.0:
        return e.copy()
    c = math.sqrt(1.0 - phi * phi)
    y = lfilter([c], [1.0, -phi], e)
    k = np.arange(m)
    s = np.maximum.accumulate(np.where(seg_start, k, 0))
    y_prev = np.where(s > 0, y[np.maximum(s - 1, 0)], 0.0)
    lag = (k - s).astype(np.float64)
    return y - phi ** (lag + 1.0) * y_prev + phi**lag * (1.0 - c) * e[s]


def _resolve(noise, names: Sequence[str]) -> dict[str, Satellite]:
    if isinstance(noise, Mapping):
        by_name = dict(noise)
    elif isinstance(noise, Sequence) and all(isinstance(s, Satellite) for s in noise):
        by_name = {s.name: s for s in noise}
    else:
        raise InputError(
            "noise must be the satellites that made the tracks (a list of Satellite or a "
            f"name -> Satellite mapping), got {type(noise).__name__}"
        )
    missing = [n for n in names if n not in by_name]
    if missing:
        raise InputError(f"noise: no satellite definition for track satellite(s) {missing}")
    return {n: by_name[n] for n in names}


def noise_values(
    tracks: TrackTable,
    satellites: Sequence[Satellite] | Mapping[str, Satellite],
    seed: int = 0,
) -> np.ndarray:
    """One draw of observation errors [m] for every row of ``tracks``.

    Args:
        tracks: from :func:`oceanda.obs.ground_tracks` (any row order).
        satellites: the satellites that made ``tracks`` (matched by name), carrying their
            :class:`~oceanda.obs.satellites.NoiseModel`.
        seed: random seed.

    Returns:
        ``(n,)`` float64 errors, 0 for noise-free satellites.
    """
    sats = _resolve(satellites, tracks.sat_names)
    out = np.zeros(len(tracks))
    if len(tracks) == 0:
        return out
    t_ns = tracks.time.astype(np.int64)
    for code, name in enumerate(tracks.sat_names):
        sat = sats[name]
        nm = sat.noise
        idx = np.flatnonzero(tracks.sat == code)
        if idx.size == 0:
            continue
        order = np.lexsort((tracks.xtrack_km[idx], t_ns[idx]))
        idx = idx[order]
        t = t_ns[idx]
        first_s = int(t[0] // 1_000_000_000) + (1 << 40)
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, code, first_s])
        orbit = orbits_for([sat])[0]  # phase is irrelevant here: only dt and speed
        dt = sat.instrument.dt_s(orbit)
        step_km = dt * orbit.ground_speed_m_s / 1e3
        # rows = distinct sample times; segments = runs of rows without a gap
        new_row = np.ones(t.size, bool)
        new_row[1:] = t[1:] != t[:-1]
        row = np.cumsum(new_row) - 1
        t_row = t[new_row]
        gap_ns = max(10.0, 3.0 * dt) * 1e9
        seg_start = np.ones(t_row.size, bool)
        seg_start[1:] = np.diff(t_row) > gap_ns
        x = tracks.xtrack_km[idx].astype(np.float64)
        err = np.zeros(idx.size)

        def along(amp: float, corr_km: float) -> np.ndarray:
            phi = math.exp(-step_km / corr_km)
            return amp * ar1_segments(rng.standard_normal(t_row.size), phi, seg_start)

        if sat.instrument.kind == "nadir":
            if nm.white_m > 0:
                err += nm.white_m * rng.standard_normal(idx.size)
            if nm.ar1_m > 0:
                err += along(nm.ar1_m, nm.ar1_corr_km)[row]
        else:
            inst = sat.instrument
            if nm.white_m > 0:
                centre = 0.5 * (inst.inner_km + inst.outer_km)
                half = 0.5 * (inst.outer_km - inst.inner_km)
                g = 1.0 + (nm.karin_edge_factor - 1.0) * ((np.abs(x) - centre) / half) ** 2
                err += nm.white_m * g * rng.standard_normal(idx.size)
            if nm.roll_m > 0:
                err += along(nm.roll_m, nm.roll_corr_km)[row] * x / _REF_ROLL_KM
            if nm.phase_m > 0:
                left = along(nm.phase_m, nm.phase_corr_km)[row]
                right = along(nm.phase_m, nm.phase_corr_km)[row]
                err += np.where(x < 0, left, right)
        out[idx] = err
    return out
