"""Benchmark of the fast OI (``method.solver=cg``) against the exact one (``solver=cholesky``),
and of the OI-initialised 4DVarNet that starts from it, through ``oceanda infer``.

    python hpc/bench/oi.py --obs runs/osse_year/obs.zarr --obs-swot runs/osse_year_swot/obs.zarr \\
        --natl runs/osse_natl/obs.zarr --demo --json oi.json

Parts (each optional, all side by side in one run, one table + JSON):

* ``patches`` (with ``--obs`` / ``--obs-swot``): ``--n-patches`` DAW patches (15 x 100 x 100,
  the ``gulfstream`` patch) drawn from each observation set, each solved by both solvers in
  this process (``--threads``, default 1, threads of every pool): seconds per patch, CG iterations, preconditioner rank, and the difference
  ``max |x_cg - x_cholesky| / max |x_cholesky - mu|`` (relative to the analysis increment).
* ``year`` (``--obs``, ``--obs-swot``): ``mpiexec -n RANKS oceanda infer`` on the whole file
  (one year for ``period=year`` OSSEs) with ``method=oi`` (fast), the shipped
  ``method=4dvarnet`` (its first guess the fast OI) and, as the reference,
  ``method=oi method.solver=cholesky`` (``--no-exact`` skips it): wall time, patches/s, the
  shares of blending / halo / I/O, peak memory per rank, the speed-up over the exact OI
  and the maximum difference of the blended analyses [m].
* ``natl`` (``--natl OBS``, the North Atlantic 1/20 deg OSSE, first ``--natl-days`` days): OI
  and the shipped 4DVarNet on RANKS ranks: per-patch cost, shares, peak memory per rank and the
  year estimate ``wall x (patches of 365 days) / (patches of the run)`` (same tiles and ranks).
* ``--make-osse OUT DOMAIN OBS START END`` writes an OSSE for timing first: the real
  satellite tracks and noise of ``OBS`` over ``DOMAIN`` sampling an analytic smooth SSH (cheap,
  where the QG truth of a basin takes hours on a CPU; OI's cost depends on the observations'
  number and geometry, the 4DVarNet's on neither).
* ``demo`` (``--demo``): ``/usr/bin/time -v python -m oceanda infer`` from an empty directory
  (OSSE generation included, as from a fresh checkout): wall and peak memory; then the demo's
  OI and 4DVarNet scores with the fast and with the exact OI (``--demo-exact``), whose
  differences must stay within 1e-4.

Every ``oceanda infer`` runs in the caller's environment: the thread discipline
(:mod:`oceanda.parallel.threads`) sizes the pools, whatever ``OMP_NUM_THREADS`` says. On a
shared machine absolute times are inflated; the ratios measured in one run are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = {
    "oi": ["method=oi"],
    "oi_cholesky": ["method=oi", "method.solver=cholesky"],
    "4dvarnet": ["method=4dvarnet"],
    "4dvarnet_cholesky": ["method=4dvarnet", "method.oi_solver=cholesky"],
}


def infer(ranks: int, obs: str, out: Path, overrides: list[str], cwd: str | None = None) -> dict:
    """``mpiexec -n ranks oceanda infer``; its summary.json plus the wall time of the command."""
    cmd = ["mpiexec", "-n", str(ranks), sys.executable, "-m", "oceanda", "infer",
           f"obs_path={obs}", f"out_dir={out}", "progress=false", *overrides]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["command_wall_s"] = wall
    return summary


def _overrides(method: str) -> list[str]:
    return list(METHODS[method])


def _field(path: Path) -> np.ndarray:
    import xarray as xr

    from oceanda.data import names as N

    return xr.open_zarr(path / "analysis.zarr")[N.SSH].values.astype(np.float64)


def _row(summary: dict) -> dict:
    per = summary["per_rank"]
    sh = summary["overhead_share"]
    patches = max(1, summary["patches_computed"])
    return {
        "wall_s": summary["wall_s"], "command_wall_s": summary["command_wall_s"],
        "patches": summary["patches_computed"], "patches_per_s": summary["patches_per_s"],
        "method_s_per_patch_per_rank": sum(r["method_s"] for r in per) / patches,
        "share_blend": sh["blend"], "share_halo": sh["halo"],
        "share_io": sh["read"] + sh["write"] + sh["checkpoint"], "share_wait": sh["wait"],
        "peak_rss_mb_per_rank": [round(r["peak_rss_mb"], 1) for r in per],
        "threads_per_rank": [r.get("threads") for r in per],
    }


# ------------------------------------------------------------------------------ patches
def bench_patches(label: str, obs_path: str, n: int, seed: int, size=(15, 100, 100)) -> list[dict]:
    import xarray as xr

    from oceanda.assim.oi import oi_patch
    from oceanda.data import names as N

    ds = xr.open_zarr(obs_path)
    nt, ny, nx = ds[N.SSH_OBS].shape
    rng = np.random.default_rng(seed)
    tdays = (ds[N.TIME].values - ds[N.TIME].values[0]) / np.timedelta64(1, "D")
    rows = []
    kw = dict(Lx_km=100.0, Ly_km=100.0, Lt_days=10.0, R=0.05**2)
    for _ in range(n):
        t0, y0, x0 = (int(rng.integers(0, d - s + 1)) for d, s in zip((nt, ny, nx), size))
        obs = ds[N.SSH_OBS][t0:t0 + size[0], y0:y0 + size[1], x0:x0 + size[2]].values.astype(np.float64)
        lon = ds[N.LON].values[x0:x0 + size[2]]
        lat = ds[N.LAT].values[y0:y0 + size[1]]
        tt = tdays[t0:t0 + size[0]].astype(np.float64)
        info: dict = {}
        w0 = time.perf_counter()
        fast = oi_patch(obs, lon, lat, tt, info=info, **kw)
        w1 = time.perf_counter()
        exact = oi_patch(obs, lon, lat, tt, solver="cholesky", **kw)
        w2 = time.perf_counter()
        mu = np.nanmean(obs) if info["m"] else 0.0
        inc = np.abs(exact - mu).max()
        rows.append({"set": label, "m": info["m"], "path": info["path"],
                     "iterations": info.get("iterations"), "precond_rank": info.get("precond_rank"),
                     "cg_s": w1 - w0, "cholesky_s": w2 - w1,
                     "max_abs_diff_m": float(np.abs(fast - exact).max()),
                     "rel_to_increment": float(np.abs(fast - exact).max() / inc) if inc > 0 else 0.0})
    return rows


# ------------------------------------------------------------------------------ runs
def bench_year(label: str, obs: str, ranks: int, work: Path, exact: bool, extra: list[str]) -> dict:
    out = {}
    names = ["oi", "4dvarnet"] + (["oi_cholesky"] if exact else [])
    for name in names:
        print(f"  {label}: {name} on {ranks} rank(s) ...", flush=True)
        s = infer(ranks, obs, work / f"{label}_{name}", _overrides(name) + extra)
        out[name] = _row(s)
    if exact:
        a, b = _field(work / f"{label}_oi"), _field(work / f"{label}_oi_cholesky")
        ok = np.isfinite(b)
        out["oi_vs_exact"] = {
            "speedup": out["oi_cholesky"]["wall_s"] / out["oi"]["wall_s"],
            "speedup_4dvarnet": out["oi_cholesky"]["wall_s"] / out["4dvarnet"]["wall_s"],
            "max_abs_diff_m": float(np.abs(a[ok] - b[ok]).max()),
            "max_abs_diff_over_std": float(np.abs(a[ok] - b[ok]).max() / b[ok].std()),
        }
    return out


def bench_natl(obs: str, days: int, ranks: int, work: Path, tile: list[int]) -> dict:
    import xarray as xr

    from oceanda.data import names as N
    from oceanda.data.patches import PatchGeometry, make_patches
    from oceanda.data.store import ObsSource

    t = xr.open_zarr(obs)[N.TIME].values
    if len(t) < days:
        raise SystemExit(f"--natl {obs}: {len(t)} days < --natl-days {days}")
    dates = [str(t[0])[:10], str(t[days - 1])[:10]]
    src = ObsSource(obs, period=dates)
    geom = PatchGeometry(size=(15, 100, 100), stride=(5, 80, 80), crop=(10, 10))
    n_run = len(make_patches(geom, src.shape, src.ocean))
    n_year = len(make_patches(geom, (365, *src.shape[1:]), src.ocean))
    res = {"days": days, "grid": list(src.shape), "patches_run": n_run, "patches_year": n_year}
    for name in ("oi", "4dvarnet"):
        print(f"  natl: {name} on {ranks} rank(s), {days} days ...", flush=True)
        s = infer(ranks, obs, work / f"natl_{name}", _overrides(name) +
                  [f"dates=[{dates[0]},{dates[1]}]", f"tile=[{tile[0]},{tile[1]},{tile[2]}]"])
        row = _row(s)
        row["year_estimate_h"] = s["wall_s"] * n_year / max(1, s["patches_computed"]) / 3600
        res[name] = row
    return res


def _time_v(cmd: list[str], cwd: str) -> dict:
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=cwd)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", res.stderr)
    parts = [float(p) for p in wall.group(1).split(":")]
    secs = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    return {"wall_s": secs, "peak_rss_gb": int(rss.group(1)) / 1024**2, "stdout_tail": res.stdout[-1500:]}


def bench_demo(work: Path, exact: bool) -> dict:
    fresh = work / "demo_fresh"
    fresh.mkdir(parents=True, exist_ok=True)
    print("  demo: /usr/bin/time -v python -m oceanda infer (fresh directory) ...", flush=True)
    out = {"fresh": _time_v([sys.executable, "-m", "oceanda", "infer"], str(fresh))}
    demo = fresh / "runs" / "gulfstream_demo"
    scores = {"oi": json.loads((demo / "infer_oi" / "scores.json").read_text()),
              "4dvarnet": json.loads((demo / "infer_4dvarnet" / "scores.json").read_text())}
    out["scores"] = scores
    if exact:
        osse = demo / "osse"
        net_patch = ["patch.size=[15,64,64]", "patch.stride=[5,34,34]", "patch.crop=[8,8]"]
        ref = {}
        for name, ov in (("oi_cholesky", _overrides("oi_cholesky")),
                         ("4dvarnet_cholesky", _overrides("4dvarnet_cholesky") + net_patch)):
            print(f"  demo: {name} ...", flush=True)
            d = work / f"demo_{name}"
            infer(1, str(osse / "obs.zarr"), d, ov + [f"truth_path={osse / 'truth.zarr'}"])
            ref[name] = json.loads((d / "scores.json").read_text())
        keys = ("mu", "sigma_t", "lambda_x_deg", "lambda_t_days", "rmse_m")
        out["scores_exact"] = ref
        out["max_score_diff"] = {
            m: max(abs(float(scores[m][k]) - float(ref[f"{m}_cholesky"][k])) for k in keys
                   if scores[m].get(k) is not None and ref[f"{m}_cholesky"].get(k) is not None)
            for m in ("oi", "4dvarnet")}
    return out


# ------------------------------------------------------------------------------ OSSEs for timing
def _analytic_truth(grid, days, seed, params, device, progress):
    """A cheap smooth SSH (travelling waves of 100-300 km, 0.2 m): for timing runs only, where
    the observations' number and geometry matter and the truth's physics does not."""
    lon, lat = np.meshgrid(np.asarray(grid.lon, float), np.asarray(grid.lat, float))
    rng = np.random.default_rng(seed)
    waves = [(rng.uniform(1.5, 4.0), rng.uniform(1.5, 4.0), rng.uniform(0, 2 * np.pi),
              rng.uniform(0.05, 0.2)) for _ in range(6)]
    for d in range(days):
        f = sum(0.07 * np.sin(lon / a + lat / b + ph + w * d) for a, b, ph, w in waves)
        if progress:
            progress("truth", 1)
        yield f.astype(np.float32)


def make_osse(out_dir: str, domain: str, obs: str, start: str, end: str) -> None:
    """``truth.zarr`` + ``obs.zarr`` of ``domain`` with the satellites ``obs`` (real orbits and
    noise, :func:`oceanda.data.osse.generate_osse`) sampling :func:`_analytic_truth`."""
    from oceanda.data.osse import generate_osse, register_truth

    register_truth("bench_analytic", _analytic_truth)
    generate_osse(domain=domain, obs=obs, period={"start": start, "end": end}, out_dir=out_dir,
                  truth={"kind": "bench_analytic"}, figures=False, progress=False)


# ------------------------------------------------------------------------------ main
def _table(report: dict) -> str:
    lines = []
    for r in report.get("patches", []):
        lines.append(f"patch {r['set']:>6} m={r['m']:6d} {r['path']:>8} it={r['iterations']!s:>4} "
                     f"k={r['precond_rank']!s:>5}  cg {r['cg_s']:7.3f} s  cholesky {r['cholesky_s']:8.3f} s  "
                     f"x{r['cholesky_s'] / max(r['cg_s'], 1e-9):7.1f}  diff/increment {r['rel_to_increment']:.1e}")
    for label, runs in report.get("year", {}).items():
        for name, r in runs.items():
            if name == "oi_vs_exact":
                lines.append(f"{label:>10} fast OI vs exact: speed-up x{r['speedup']:.1f} (4DVarNet vs exact OI "
                             f"x{r['speedup_4dvarnet']:.1f}), max |diff| {r['max_abs_diff_m']:.2e} m "
                             f"({r['max_abs_diff_over_std']:.1e} of the field's std)")
                continue
            lines.append(f"{label:>10} {name:>18}: {r['wall_s']:8.1f} s  {r['patches']:5d} patches "
                         f"{r['patches_per_s']:6.2f}/s  method {r['method_s_per_patch_per_rank']:.3f} s/patch  "
                         f"blend {100 * r['share_blend']:.1f}% halo {100 * r['share_halo']:.1f}% "
                         f"I/O {100 * r['share_io']:.1f}% wait {100 * r['share_wait']:.1f}%  "
                         f"peak {r['peak_rss_mb_per_rank']} MB")
    natl = report.get("natl")
    if natl:
        for name in ("oi", "4dvarnet"):
            r = natl[name]
            lines.append(f"natl {natl['days']} d {name:>9}: {r['wall_s']:8.1f} s  {r['patches']} patches  "
                         f"method {r['method_s_per_patch_per_rank']:.3f} s/patch  blend {100 * r['share_blend']:.1f}% "
                         f"halo {100 * r['share_halo']:.1f}% I/O {100 * r['share_io']:.1f}%  "
                         f"peak {r['peak_rss_mb_per_rank']} MB  year ~ {r['year_estimate_h']:.2f} h "
                         f"({natl['patches_year']} patches)")
    demo = report.get("demo")
    if demo:
        f = demo["fresh"]
        lines.append(f"demo (fresh): {f['wall_s']:.0f} s wall, {f['peak_rss_gb']:.2f} GB peak")
        if "max_score_diff" in demo:
            lines.append(f"demo scores, fast vs exact OI: max |diff| OI {demo['max_score_diff']['oi']:.1e}, "
                         f"4DVarNet {demo['max_score_diff']['4dvarnet']:.1e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--obs", help="obs.zarr of the 4-nadir OSSE (a year of the 200x200 box)")
    p.add_argument("--obs-swot", help="obs.zarr of the same with 4 nadirs + SWOT")
    p.add_argument("--natl", help="obs.zarr of a North Atlantic 1/20 deg OSSE")
    p.add_argument("--natl-days", type=int, default=30)
    p.add_argument("--natl-tile", type=int, nargs=3, default=[30, 200, 200])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--n-patches", type=int, default=4, help="patches per set in the per-patch part (0: skip)")
    p.add_argument("--no-exact", action="store_true", help="skip the exact OI runs of the year part")
    p.add_argument("--no-year", action="store_true", help="skip the year part")
    p.add_argument("--demo", action="store_true", help="time the demo from an empty directory")
    p.add_argument("--demo-exact", action="store_true", help="also the demo's scores with the exact OI")
    p.add_argument("--extra", nargs="*", default=[], help="overrides added to every year run")
    p.add_argument("--work", help="output folder of the runs (default: a temporary one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", default="1",
                   help="threads of every pool in this process (the per-patch part): an integer or auto")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--make-osse", nargs=5, metavar=("OUT_DIR", "DOMAIN", "OBS", "START", "END"),
                   help="first write a timing OSSE (analytic truth, real tracks), e.g. "
                        "runs/natl natl 4nadirs 2013-01-01 2013-02-01")
    a = p.parse_args(argv)
    if a.make_osse:
        make_osse(*a.make_osse)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="oi_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    sets = [(lbl, path) for lbl, path in (("4nadirs", a.obs), ("swot", a.obs_swot)) if path]
    report: dict = {"ranks": a.ranks, "cpu_count": os.cpu_count(), "work": str(work)}
    if a.n_patches:
        from oceanda.parallel.threads import limit_threads

        report["threads"] = limit_threads(None, a.threads)
        report["patches"] = [r for lbl, path in sets for r in bench_patches(lbl, path, a.n_patches, a.seed)]
    if sets and not a.no_year:
        report["year"] = {lbl: bench_year(lbl, path, a.ranks, work, not a.no_exact, a.extra) for lbl, path in sets}
    if a.natl:
        report["natl"] = bench_natl(a.natl, a.natl_days, a.ranks, work, a.natl_tile)
    if a.demo or a.demo_exact:
        report["demo"] = bench_demo(work, a.demo_exact)
    print(_table(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
