"""Benchmark and diagnostics of the double-gyre truth (``truth=gyre``) vs the QG truth (``truth=qg``)
on the Gulf Stream box (33-43N, 65-55W).

Usage::

    python hpc/bench/gyre_truth.py --out runs/bench_gyre [--gyre-truth T.zarr] [--qg-truth T.zarr]
        [--time] [--divergence DAYS] [--figure gyre.png] [--json PATH]

* ``--time``: runs ``oceanda generate`` (4 nadirs, figures: what a user runs) in subprocesses,
  one after the other: ``truth=gyre`` and ``truth=qg`` on the demo period (``dc_eval``, 72 days)
  and ``truth=gyre`` on ``period=year``; wall time and peak resident memory of each (the
  children's ``ru_maxrss``). The year run's truth is the gyre truth of the diagnostics unless
  ``--gyre-truth`` is given.
* diagnostics (:mod:`oceanda.metrics.gulfstream`) of both truths over the box, printed as a table
  next to the targets of issue 15; ``--qg-truth`` (default: generated, ``period=year``, no
  observations) is today's QG truth.
* ``--divergence DAYS``: how much the truth of one seed depends on the machine. Runs the gyre
  truth of seed 0 from its reference date three times in this process: with 1 torch thread,
  with 2 (``--threads-days``, default 30), and with 1 thread after a relative perturbation of 1e-15 of the state (a rounding
  difference, what another CPU or library build introduces), and prints the RMS difference of
  the basin's float64 end-of-day SSH per day and the first days it exceeds 1 mm and 1 cm.
* ``--figure``: one day, the time-mean SSH and the SSH std of the gyre truth.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

BOX = (-65.0, -55.0, 33.0, 43.0)

#: issue 15's targets and published values for the real Gulf Stream / NATL60 (see README)
TARGETS = {
    "mean step within 150 km [m]": (">= 0.8", "~1 m across the Stream (mean dynamic topography: Rio et al. 2014)"),
    "jet axis range within 90 days [deg]": (">= 1", "meanders grow east of the New England Seamounts (Cornillon 1986)"),
    "eddies north / south per day": ("> 0 both", "warm-core rings north, cold-core south (Richardson 1983)"),
    "propagation south of jet [km/day east, north]": ("west", "westward, near long Rossby wave speed (Chelton et al. 2011)"),
    "propagation along jet [km/day east, north]": ("east", "meanders propagate downstream (Watts & Johns 1982)"),
    "SSH anomaly std, box mean / max [m]": ("0.15-0.35", "> 0.3 m along the Stream (Ducet et al. 2000)"),
    "std near jet / elsewhere": ("> 1", "largest along the Stream"),
    "spectral slope 70-250 km, zonal / meridional": ("-5..-3.5", "k^-11/3..k^-5 (Le Traon et al. 2008; Xu & Fu 2011)"),
    "Laplacian kurtosis / surrogate's": (">= 2", ""),
    "|grad| p99/median / surrogate's": (">= 1.8", ""),
}


def load_box(path: str | Path, period: tuple[str, str] | None = None):
    import xarray as xr

    ds = xr.open_zarr(str(path))
    ssh = ds["ssh"].sel(lon=slice(BOX[0], BOX[1]), lat=slice(BOX[2], BOX[3]))
    if period:
        ssh = ssh.sel(time=slice(*period))
    return ssh.values.astype(np.float64), ssh["lon"].values, ssh["lat"].values, ssh["time"].values


def generate(args: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``python -m oceanda generate ARGS`` in a subprocess; its wall time, CPU time (user +
    system: what a shared machine's load does not inflate much) and peak RSS."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "oceanda", "generate", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_gb": r1.ru_maxrss / 1e6 if r1.ru_maxrss > r0.ru_maxrss else float("nan"),
            "args": " ".join(args)}


def divergence(days: int, threads_days: int = 30) -> dict[str, object]:
    """Daily upper-layer SSH of seed 0 over the whole basin, in float64 (the float32 output would
    hide differences below its rounding), for 1 thread, 2 threads, and 1 thread after a 1e-15
    relative perturbation; RMS differences against the 1-thread run."""
    import torch

    from oceanda.dynamics import gyre

    cfg = gyre.GyreTruthConfig()
    runs: dict[str, np.ndarray] = {}
    for name, threads, eps, n in (("threads1", 1, 0.0, days), ("threads2", 2, 0.0, min(days, threads_days)),
                                  ("rounding", 1, 1e-15, days)):
        torch.set_num_threads(threads)
        model, q, psi, _ref, _meta = gyre.gyre_start(cfg, 0)
        if eps:
            psi = psi * (1 + eps)
            q = model.q_from_psi(psi)
        out = []
        t = time.perf_counter()
        for _ in range(n):
            q, psi = model.run(q, psi, 1)
            out.append(model.ssh(psi[0]).cpu().numpy().astype(np.float64))
        runs[name] = np.stack(out)
        print(f"divergence run {name}: {n} days in {time.perf_counter() - t:.0f} s", flush=True)
    torch.set_num_threads(1)
    res: dict[str, object] = {"days": days, "ssh_std_m": float(runs["threads1"].std())}
    for name in ("threads2", "rounding"):
        n = len(runs[name])
        d = np.sqrt(((runs[name] - runs["threads1"][:n]) ** 2).mean(axis=(1, 2)))
        res[name] = {
            "days": n,
            "bitwise_equal_days": int(np.argmax(d > 0)) if (d > 0).any() else n,
            "rms_m": [float(v) for v in d],
            "first_day_rms_over_1mm": int(np.argmax(d > 1e-3)) + 1 if (d > 1e-3).any() else None,
            "first_day_rms_over_1cm": int(np.argmax(d > 1e-2)) + 1 if (d > 1e-2).any() else None,
        }
    return res


def fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the generated OSSEs")
    ap.add_argument("--gyre-truth", help="existing truth.zarr of truth=gyre (default: generated)")
    ap.add_argument("--qg-truth", help="existing truth.zarr of truth=qg (default: generated, period=year)")
    ap.add_argument("--period", nargs=2, default=None, help="restrict the diagnostics to [start end]")
    ap.add_argument("--time", action="store_true", help="time oceanda generate (demo and year)")
    ap.add_argument("--divergence", type=int, default=0, help="days of the cross-machine divergence test")
    ap.add_argument("--threads-days", type=int, default=30, help="days of its 2-thread run")
    ap.add_argument("--figure", help="write the gyre truth figure here")
    ap.add_argument("--no-diagnostics", action="store_true", help="only --time / --divergence")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res: dict[str, object] = {"machine": platform.processor() or platform.machine(),
                              "loadavg_start": os.getloadavg()[0]}
    if a.time:
        timing = {}
        timing["gyre_demo"] = generate(["truth=gyre", f"out_dir={out / 'gyre_demo'}", "progress=false"], env)
        timing["qg_demo"] = generate(["truth=qg", f"out_dir={out / 'qg_demo'}", "progress=false"], env)
        timing["gyre_year"] = generate(["truth=gyre", "period=year", f"out_dir={out / 'gyre_year'}",
                                        "progress=false"], env)
        res["timing"] = timing
        for k, v in timing.items():
            print(f"generate {k:10s}: {v['wall_s']:7.1f} s wall, {v['cpu_s']:7.1f} s CPU, "
                  f"peak RSS {v['peak_rss_gb']:.2f} GB  ({v['args']})")
    if a.no_diagnostics:
        if a.divergence:
            res["divergence"] = divergence(a.divergence, a.threads_days)
            print(json.dumps(res["divergence"], indent=1))
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1, default=str))
        return
    gyre_truth = a.gyre_truth or str(out / "gyre_year" / "truth.zarr")
    qg_truth = a.qg_truth
    if not qg_truth:
        qg_truth = str(out / "qg_year" / "truth.zarr")
        if not Path(qg_truth).exists():
            generate(["truth=qg", "period=year", "~obs", "figures=false", f"out_dir={out / 'qg_year'}",
                      "progress=false"], env)
    from oceanda.metrics import gulfstream as gs

    period = tuple(a.period) if a.period else None
    diags = {}
    for name, path in (("gyre", gyre_truth), ("qg", qg_truth)):
        ssh, lon, lat, times = load_box(path, period)
        t = time.perf_counter()
        diags[name] = gs.gulfstream_diagnostics(ssh, lon, lat)
        diags[name]["period"] = [str(times[0])[:10], str(times[-1])[:10]]
        diags[name]["seconds"] = time.perf_counter() - t
        if name == "gyre" and a.figure:
            from oceanda.plots.gulfstream import truth_panels

            mid = len(times) // 2
            truth_panels(a.figure, lon, lat, ssh[mid], ssh.mean(axis=0), ssh.std(axis=0),
                         axis=gs.mean_axis(ssh, lon, lat), day_label=str(times[mid])[:10],
                         title=f"truth=gyre, seed 0, {str(times[0])[:10]}..{str(times[-1])[:10]}")
    res["diagnostics"] = diags

    def row(d):
        p = d["propagation"]
        return {
            "mean step within 150 km [m]": d["mean_step"]["step_m"],
            "jet axis range within 90 days [deg]": d["meander"]["range_deg"],
            "eddies north / south per day": f"{d['eddies']['north_per_day']:.2f} / {d['eddies']['south_per_day']:.2f}",
            "propagation south of jet [km/day east, north]":
                f"{p['south'].get('u_km_day', float('nan')):+.1f}, {p['south'].get('v_km_day', float('nan')):+.1f}",
            "propagation along jet [km/day east, north]":
                f"{p['jet'].get('u_km_day', float('nan')):+.1f}, {p['jet'].get('v_km_day', float('nan')):+.1f}",
            "SSH anomaly std, box mean / max [m]": f"{d['std']['std_mean_m']:.3f} / {d['std']['std_max_m']:.3f}",
            "std near jet / elsewhere": d["std"]["std_jet_over_rest"],
            "spectral slope 70-250 km, zonal / meridional": f"{d['slopes']['zonal']:.2f} / {d['slopes']['meridional']:.2f}",
            "Laplacian kurtosis / surrogate's":
                f"{d['non_gaussianity']['lap_kurtosis_ratio']:.2f} "
                f"({d['non_gaussianity']['lap_kurtosis']:.2f} / {d['non_gaussianity']['lap_kurtosis_surrogate']:.2f})",
            "|grad| p99/median / surrogate's":
                f"{d['non_gaussianity']['grad_ratio']:.2f} "
                f"({d['non_gaussianity']['grad_p99_over_median']:.2f} / "
                f"{d['non_gaussianity']['grad_p99_over_median_surrogate']:.2f})",
        }

    rg, rq = row(diags["gyre"]), row(diags["qg"])
    print(f"\nGulf Stream box {BOX}: gyre {diags['gyre']['period']}, qg {diags['qg']['period']}")
    print(f"{'diagnostic':48s} {'target':>10s} {'gyre':>22s} {'qg':>22s}   published")
    for k, (target, pub) in TARGETS.items():
        print(f"{k:48s} {target:>10s} {fmt(rg[k]):>22s} {fmt(rq[k]):>22s}   {pub}")
    if a.divergence:
        res["divergence"] = divergence(a.divergence, a.threads_days)
        print(json.dumps(res["divergence"], indent=1))
    res["loadavg_end"] = os.getloadavg()[0]
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
