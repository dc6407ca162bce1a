"""Gulf Stream diagnostics of a spin-up's last stage, before shipping its state: the daily basin
SSH kept by ``gyre_spinup.py --save-daily`` (``WORK/daily``) sampled onto the Gulf Stream box
(33-43N, 65-55W at 1/20 deg) for boxes centred at several ``--x0-km`` (each ``y0`` on the
time-mean jet by the spin-up's own rule), then :func:`oceanda.metrics.gulfstream.gulfstream_diagnostics`
and the spectral slopes over 70-120 and 120-250 km (the two halves of the target band); within
0.75 deg of the box-mean jet axis (the band of the along-jet propagation),
:func:`oceanda.metrics.gulfstream.zonal_phase_speeds` (``jet_phase``: which wavelengths travel which way).

These days precede the state's reference date and carry no seed perturbation: a quick look at a
candidate state (e.g. another resolution) side by side with the shipped one; the README's table
is measured on ``oceanda generate`` output with ``hpc/bench/gyre_truth.py``.

    python hpc/truth/spinup_diagnostics.py runs/spin200 --x0-km 600 700 800 --json d.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from gyre_spinup import jet_y0_km  # noqa: E402
from oceanda.dynamics import gyre  # noqa: E402
from oceanda.metrics import gulfstream as gs  # noqa: E402


def summary(d: dict) -> dict[str, float]:
    p, ng = d["propagation"], d["non_gaussianity"]
    return {"step_m": d["mean_step"]["step_m"], "meander_deg": d["meander"]["range_deg"],
            "eddies_north": d["eddies"]["north_per_day"], "eddies_south": d["eddies"]["south_per_day"],
            "u_south_km_day": p["south"].get("u_km_day", float("nan")),
            "u_jet_km_day": p["jet"].get("u_km_day", float("nan")),
            "std_mean_m": d["std"]["std_mean_m"], "std_jet_over_rest": d["std"]["std_jet_over_rest"],
            "slope_zonal": d["slopes"]["zonal"], "slope_meridional": d["slopes"]["meridional"],
            "lap_kurtosis_ratio": ng["lap_kurtosis_ratio"], "grad_ratio": ng["grad_ratio"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", help="the spin-up's --work folder (daily/ and gyre_state.npz, or --state)")
    ap.add_argument("--state", help="the state it wrote (default WORK/gyre_state.npz): its grid")
    ap.add_argument("--x0-km", type=float, nargs="+", default=[700.0])
    ap.add_argument("--half-width-km", type=float, default=440.0)
    ap.add_argument("--json")
    a = ap.parse_args()
    work = Path(a.work)
    params = gyre.load_state(a.state or work / "gyre_state.npz")[0]
    files = sorted((work / "daily").glob("*.npy"))
    if not files:
        raise SystemExit(f"{work / 'daily'}: no daily maps (run gyre_spinup.py with --save-daily)")
    eta = np.stack([np.load(f) for f in files])
    if eta.shape[1:] != (params.ny + 1, params.nx + 1):
        raise SystemExit(f"daily maps {eta.shape[1:]} do not match the state's grid {(params.ny + 1, params.nx + 1)}")
    mean = eta.mean(axis=0)
    lon = np.arange(-64.975, -55.0, 0.05)  # the gulfstream domain's cell centres
    lat = np.arange(33.025, 43.0, 0.05)
    res = {"days": len(eta), "grid": [params.nx, params.ny], "dx_km": params.dx / 1e3, "boxes": {}}
    print(f"{len(eta)} days, {params.nx} x {params.ny} ({params.dx / 1e3:.2f} km)")
    for x0 in a.x0_km:
        y0 = jet_y0_km(mean, params, x0, a.half_width_km)
        sampler = gyre.BasinSampler(params, lon, lat, x0 * 1e3, y0 * 1e3)
        box = np.stack([sampler(f) for f in eta])
        d = gs.gulfstream_diagnostics(box, lon, lat)
        s = summary(d)
        ax = d["jet_axis_lat_deg"]
        phase = gs.zonal_phase_speeds(box, lon, lat, (ax - 0.75, ax + 0.75))
        sub = {f"{lo:g}-{hi:g}": gs.spectral_slopes(box, lon, lat, band_km=(lo, hi)) for lo, hi in ((70, 120), (120, 250))}
        res["boxes"][str(x0)] = {"y0_km": y0, **s, "jet_phase": phase, "slopes_sub_bands": sub}
        print(f"x0 {x0:6.0f} km, y0 {y0:6.0f} km: " + ", ".join(f"{k} {v:.3g}" for k, v in s.items()), flush=True)
        print("   along the jet, wavelength: variance share, east/west power, phase speed: " + "; ".join(
            f"{b['lo_km']:g}-{b['hi_km']:g} km {b['frac']:.2f}, {b['east_over_west']:.2f}, {b['c_km_day']:+.1f} km/day"
            for b in phase), flush=True)
        print("   spectral slopes zonal / meridional: " + "; ".join(
            f"{k} km {v['zonal']:.2f} / {v['meridional']:.2f}" for k, v in sub.items()), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
