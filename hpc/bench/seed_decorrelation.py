"""How independent are the gyre OSSEs of two seeds, and two dates of one seed?

Every seed of ``truth=gyre`` starts from the same shipped state plus a small seed-dependent
perturbation (``truth.perturb_ssh_m``), so two seeds are the same field at first and drift apart
as the perturbation grows. Training on other seeds than the test seed is only independent once
they have decorrelated, and training dates must also be far enough from the test dates of the same
field. This prints, for two truths of different seeds on the same dates, the pattern correlation
of their SSH anomalies (each day minus the time mean of both seeds over the common days, ocean
cells of ``--box``) and their RMS difference relative to the anomaly RMS (sqrt(2) for independent
fields), and for one truth the lagged autocorrelation of its anomaly (the lags at which a later
window of one seed is as good as another seed).

usage: python hpc/bench/seed_decorrelation.py --a S1/truth.zarr --b S2/truth.zarr [--lags 0,10,30,62,90]
       [--box -65,-55,33,43] [--every 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def load(path: str, box):
    from oceanda.data import io
    from oceanda.data import names as N

    ds = io.open_dataset(path, [N.SSH], optional=[N.OCEAN])
    ds = io.select_window(ds, period=None, box=box, what=path)
    return ds[N.SSH].values.astype(np.float64), ds[N.TIME].values.astype("datetime64[D]")


def highpass(F: np.ndarray, length_km: float, box) -> np.ndarray:
    """``F`` minus its Gaussian smoothing (std ``length_km / 4``, in cells of the grid's mean spacing)."""
    from scipy.ndimage import gaussian_filter

    ny, nx = F.shape[1:]
    dy_km = (box[3] - box[2]) / ny * 111.2
    dx_km = (box[1] - box[0]) / nx * 111.2 * np.cos(np.deg2rad(0.5 * (box[2] + box[3])))
    out = np.empty_like(F)
    for k, f in enumerate(F):
        g = np.where(np.isfinite(f), f, np.nanmean(f))
        out[k] = np.where(np.isfinite(f), g - gaussian_filter(g, (length_km / 4 / dy_km, length_km / 4 / dx_km)), np.nan)
    return out


def corr(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok] - x[ok].mean(), y[ok] - y[ok].mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", required=True, help="truth.zarr of one seed")
    ap.add_argument("--b", default=None, help="truth.zarr of another seed (same dates)")
    ap.add_argument("--box", default="-65,-55,33,43")
    ap.add_argument("--lags", default="0,5,10,20,30,45,62,90,120")
    ap.add_argument("--every", type=int, default=10, help="days between the dates compared")
    ap.add_argument("--highpass-km", type=float, default=0.0,
                    help="compare only scales below this: each day minus its Gaussian smoothing of std L / 4 "
                         "(land filled by the ocean mean first); 0: the whole anomaly")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    box = [float(v) for v in a.box.split(",")]
    A, ta = load(a.a, box)
    res: dict = {"a": a.a, "b": a.b, "box": box, "highpass_km": a.highpass_km}
    hp = (lambda F: highpass(F, a.highpass_km, box)) if a.highpass_km else (lambda F: F)
    A = hp(A)
    anom_a = A - np.nanmean(A, axis=0)
    if a.b:
        B, tb = load(a.b, box)
        B = hp(B)
        common, ia, ib = np.intersect1d(ta, tb, return_indices=True)
        mean = 0.5 * (np.nanmean(A[ia], 0) + np.nanmean(B[ib], 0))
        rows = []
        for k in range(0, len(common), a.every):
            xa, xb = A[ia[k]] - mean, B[ib[k]] - mean
            rms = np.sqrt(0.5 * (np.nanmean(xa ** 2) + np.nanmean(xb ** 2)))
            rows.append({"date": str(common[k]), "corr": corr(xa, xb),
                         "rms_diff_rel": float(np.sqrt(np.nanmean((xa - xb) ** 2)) / rms)})
        res["seeds"] = rows
        print(f"seeds {Path(a.a).parent.name} vs {Path(a.b).parent.name}: anomaly pattern correlation, RMS difference "
              "/ anomaly RMS (independent fields: 0, 1.41)")
        for r in rows:
            print(f"  {r['date']}  corr {r['corr']:+.3f}  rms diff {r['rms_diff_rel']:.3f}")
    lags = [int(v) for v in a.lags.split(",")]
    auto = []
    for lag in lags:
        if lag >= len(A):
            continue
        c = [corr(anom_a[d], anom_a[d + lag]) for d in range(0, len(A) - lag, max(1, a.every // 2))]
        auto.append({"lag_days": lag, "corr_mean": float(np.mean(c)), "corr_max": float(np.max(c)), "n": len(c)})
    res["autocorrelation"] = auto
    print(f"lagged autocorrelation of {a.a}'s anomaly (mean, max over start days)")
    for r in auto:
        print(f"  lag {r['lag_days']:4d} d  corr {r['corr_mean']:+.3f} (max {r['corr_max']:+.3f}, {r['n']} pairs)")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
