"""Benchmark: ``oceanda infer method=spde_oi`` through the app, default solver vs the sparse
path, side by side in one run on the same observations.

    OMP_NUM_THREADS=1 python hpc/bench/spde_infer.py --obs runs/gulfstream_demo/osse/obs.zarr \
        --box -60 -55 35 40 --dates 2012-10-22 2012-11-05 --members 0 20 --json out.json

Each row is one ``oceanda infer`` process (a fresh interpreter, so factor caches and numba
compilation are included as a user sees them): ``auto`` (the configured default: spectral on
the open-ocean rectangle of every patch when the prior is separable) and ``pcg`` (the sparse
path: prior-preconditioned PCG on the whole patch; whitened block CG for the members). Columns:
wall time of the process, the app's own inference time and peak RSS (``summary.json``), and the
maximum difference of the analysis (``ssh``; ``ssh_std`` with members) against the ``pcg``
row's over the cells both wrote, relative to the maximum of the ``pcg`` field. With members
the two paths draw different (equally exact) members, so ``ssh_std`` agrees only to the
Monte-Carlo error ``~ 1/sqrt(2 (N - 1))``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr


def run(obs: str, out: Path, solver: str, members: int, a) -> dict:
    cmd = [sys.executable, "-m", "oceanda", "infer", f"obs_path={obs}", f"out_dir={out}",
           "method=spde_oi", f"method.solver={solver}", f"method.members={members}",
           "progress=false"]
    if a.box:
        cmd.append("box=[" + ",".join(str(v) for v in a.box) + "]")
    if a.dates:
        cmd.append("dates=[" + ",".join(a.dates) + "]")
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    summ = json.loads((out / "summary.json").read_text())
    return dict(solver=solver, members=members, process_s=round(wall, 2),
                infer_s=round(summ["wall_s"], 2),
                peak_rss_mb=round(max(r["peak_rss_mb"] for r in summ["per_rank"]), 1),
                patches=summ["patches_total"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--obs", required=True, help="observation zarr (oceanda generate)")
    ap.add_argument("--box", type=float, nargs=4, default=None,
                    metavar=("LON0", "LON1", "LAT0", "LAT1"))
    ap.add_argument("--dates", nargs=2, default=None, metavar=("START", "END"))
    ap.add_argument("--members", type=int, nargs="+", default=[0])
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = []
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, load={os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        for members in a.members:
            res = {}
            for solver in ("pcg", "auto"):
                out = Path(tmp) / f"{solver}_{members}"
                r = run(a.obs, out, solver, members, a)
                res[solver] = xr.open_zarr(out / "analysis.zarr").load()
                rows.append(r)
            ref = res["pcg"]
            for name in ("ssh", "ssh_std"):
                if name not in ref:
                    continue
                d = np.abs(res["auto"][name].values - ref[name].values)
                rel = float(np.nanmax(d) / np.nanmax(np.abs(ref[name].values)))
                rows[-1][f"max_rel_diff_{name}_vs_pcg"] = f"{rel:.1e}"
            rows[-1]["speedup_process_vs_pcg"] = round(rows[-2]["process_s"] / rows[-1]["process_s"], 2)
            rows[-1]["speedup_infer_vs_pcg"] = round(rows[-2]["infer_s"] / rows[-1]["infer_s"], 2)
            for r in rows[-2:]:
                print("  ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    print("\n| solver | members | process s | infer s | peak RSS MB | notes |\n|---|---|---|---|---|---|")
    for r in rows:
        notes = ", ".join(f"{k}={v}" for k, v in r.items()
                          if k not in ("solver", "members", "process_s", "infer_s", "peak_rss_mb"))
        print(f"| {r['solver']} | {r['members']} | {r['process_s']} | {r['infer_s']} | "
              f"{r['peak_rss_mb']} | {notes} |")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(args=vars(a), rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
