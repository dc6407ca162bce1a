"""Checkers and small fixtures shipped with oceanda (usable in users' own tests).

* :func:`check_tiling`: every ocean cell of the grid is covered by a patch with positive
  blend weight (brute force over the patches, independent of the runtime's arithmetic);
* :func:`check_weights_normalise`: the normalised blend weights ``w_p / sum_q w_q`` sum to
  one on every ocean cell;
* the ``identity`` method (:class:`oceanda.assim.identity.IdentityMethod`, re-exported: returns
  its observations, so with a fully observed truth as input blending must give it back exactly);
* :func:`synthetic_fields`: a small smooth SSH field, land mask and nadir-like observation
  mask for tests.
"""

from __future__ import annotations

import numpy as np

from oceanda.assim.identity import IdentityMethod  # noqa: F401  (re-exported)
from oceanda.data.patches import PatchSet


def _accumulate(patches: PatchSet, values: np.ndarray | None = None) -> np.ndarray:
    nt, ny, nx = patches.shape
    acc = np.zeros((nt, ny, nx))
    w = patches.weights.full()
    T, H, W = patches.geometry.size
    for i in range(len(patches)):
        (t0, t1), (y0, y1), (x0, x1) = patches.footprint(i)
        gt, gy, gx = slice(max(t0, 0), min(t1, nt)), slice(max(y0, 0), min(y1, ny)), slice(max(x0, 0), min(x1, nx))
        lt = slice(gt.start - t0, gt.stop - t0)
        ly = slice(gy.start - y0, gy.stop - y0)
        lx = slice(gx.start - x0, gx.stop - x0)
        acc[gt, gy, gx] += w[lt, ly, lx] if values is None else w[lt, ly, lx] * values[i][lt, ly, lx]
    return acc


def check_tiling(patches: PatchSet, ocean: np.ndarray) -> np.ndarray:
    """Assert that every ocean cell (every day) has a positive total blend weight.

    Returns the ``(nt, ny, nx)`` total weight ``sum_p w_p``.
    """
    acc = _accumulate(patches)
    covered = acc > 0
    missing = ~covered & np.asarray(ocean, bool)[None]
    if missing.any():
        t, y, x = np.argwhere(missing)[0]
        raise AssertionError(f"{int(missing.sum())} ocean cells not covered by any patch, "
                             f"first (t, y, x) = ({t}, {y}, {x})")
    return acc


def check_weights_normalise(patches: PatchSet, ocean: np.ndarray, atol: float = 1e-12) -> None:
    """Assert ``sum_p w_p / W = 1`` on every ocean cell, ``W = sum_q w_q`` (two passes)."""
    total = check_tiling(patches, ocean)
    nt, ny, nx = patches.shape
    norm = np.zeros((nt, ny, nx))
    w = patches.weights.full()
    for i in range(len(patches)):
        (t0, t1), (y0, y1), (x0, x1) = patches.footprint(i)
        gt, gy, gx = slice(max(t0, 0), min(t1, nt)), slice(max(y0, 0), min(y1, ny)), slice(max(x0, 0), min(x1, nx))
        lw = w[gt.start - t0:gt.stop - t0, gy.start - y0:gy.stop - y0, gx.start - x0:gx.stop - x0]
        with np.errstate(invalid="ignore", divide="ignore"):
            norm[gt, gy, gx] += np.where(total[gt, gy, gx] > 0, lw / total[gt, gy, gx], 0.0)
    sel = np.broadcast_to(np.asarray(ocean, bool)[None], norm.shape)
    err = np.abs(norm[sel] - 1.0).max(initial=0.0)
    if err > atol:
        raise AssertionError(f"normalised blend weights sum to 1 +- {err:.3g} (> {atol})")


def synthetic_fields(shape: tuple[int, int, int] = (12, 30, 40), seed: int = 0,
                     land: bool = True, n_tracks: int = 3) -> dict[str, np.ndarray]:
    """A small smooth SSH ``truth`` (nt, ny, nx) [m] (sum of propagating waves), an
    ``ocean`` mask (ny, nx) with a land blob in one corner, and ``obs``: the truth on a few
    diagonal tracks per day (NaN elsewhere), plus ``lon``/``lat`` (1/20 deg) and
    ``time`` (datetime64 daily)."""
    nt, ny, nx = shape
    rng = np.random.default_rng(seed)
    lon = -65.0 + 0.05 * np.arange(nx)
    lat = 33.0 + 0.05 * np.arange(ny)
    t = np.arange(nt, dtype=float)
    T, Y, X = np.meshgrid(t, np.arange(ny), np.arange(nx), indexing="ij")
    truth = np.zeros(shape)
    for _ in range(4):
        kx, ky = rng.uniform(0.05, 0.3, 2)
        om, ph, a = rng.uniform(0.05, 0.3), rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.2)
        truth += a * np.cos(kx * X + ky * Y - om * T + ph)
    ocean = np.ones((ny, nx), bool)
    if land:
        yy, xx = np.mgrid[:ny, :nx]
        ocean &= (yy - ny) ** 2 + (xx - nx) ** 2 > (min(ny, nx) // 3) ** 2
    obs = np.full(shape, np.nan)
    for d in range(nt):
        for k in range(n_tracks):
            off = rng.integers(-nx, nx)
            slope = rng.choice([-1.0, 1.0]) * rng.uniform(0.7, 1.5)
            cols = np.round(off + slope * np.arange(ny)).astype(int)
            ok = (cols >= 0) & (cols < nx)
            obs[d, np.arange(ny)[ok], cols[ok]] = truth[d, np.arange(ny)[ok], cols[ok]]
    truth = np.where(ocean[None], truth, np.nan)
    obs = np.where(ocean[None], obs, np.nan)
    time = np.datetime64("2012-10-01") + np.arange(nt).astype("timedelta64[D]")
    return {"truth": truth, "obs": obs, "ocean": ocean, "lon": lon, "lat": lat, "time": time}
