"""Benchmark of distributed inference (``oceanda infer``): throughput, overhead shares, weak
scaling 1 -> 2 ranks, memory per rank vs tile size.

    python hpc/bench/infer.py                  # table
    python hpc/bench/infer.py --json out.json  # + JSON
    python hpc/bench/infer.py --days 20 --size 200 --method oi --ranks 2

Cases, all in one run on a synthetic nadir-like observation set (``oceanda.testing.
synthetic_fields``: ~4 tracks a day, a few % of the cells observed):

* ``bare``: the method called on every patch in one process, no runtime (the reference);
* ``1rank``: ``mpiexec -n 1 oceanda infer`` on ``days`` days: patches/s, ocean cells/s,
  shares of time in the method, blending, halo exchange, I/O (read, zarr write, restart
  partials) and waiting for other ranks (load imbalance, reported apart); ratio to ``bare``;
* ``{R}ranks_weak``: ``mpiexec -n R`` on ``R x days`` days (same work per rank):
  weak-scaling efficiency ``wall(1 rank) / wall(R ranks)``;
* ``mem_tileN``: one rank with N x N-cell tiles: peak resident memory per rank.

Times are the driver's wall time (from ``summary.json``), not the interpreter start-up.
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


def write_obs(path: Path, days: int, size: int, seed: int = 0) -> None:
    import xarray as xr

    from oceanda.data import names as N
    from oceanda.testing import synthetic_fields

    f = synthetic_fields((days, size, size), seed=seed, n_tracks=4)
    coords = {N.TIME: f["time"], N.LAT: f["lat"], N.LON: f["lon"]}
    xr.Dataset({N.SSH_OBS: (N.FIELD_DIMS, f["obs"].astype(np.float32)),
                N.OCEAN: ((N.LAT, N.LON), f["ocean"].astype(np.int8))},
               coords).to_zarr(path, mode="w", encoding={N.SSH_OBS: {"chunks": (10, size, size)}})


def infer(ranks: int, obs: Path, out: Path, overrides: list[str]) -> dict:
    cmd = ["mpiexec", "-n", str(ranks), sys.executable, "-m", "oceanda", "infer",
           f"obs_path={obs}", f"out_dir={out}", "progress=false", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def bare(obs: Path, overrides: dict) -> tuple[float, int]:
    """The method on every patch, one process, no blending / halo / output (reference)."""
    import torch
    import xarray as xr

    from oceanda.assim.base import PatchBatch
    from oceanda.assim.registry import build_method
    from oceanda.data import names as N
    from oceanda.data.patches import PatchGeometry, make_patches
    from oceanda.data.store import extend_coord

    torch.set_num_threads(1)
    ds = xr.open_zarr(obs)
    y = ds[N.SSH_OBS].values.astype(np.float64)
    ocean = ds[N.OCEAN].values.astype(bool)
    lon, lat = ds[N.LON].values, ds[N.LAT].values
    days = np.arange(y.shape[0], dtype=float)
    g = PatchGeometry(**overrides["patch"])
    ps = make_patches(g, y.shape, ocean)
    method = build_method(overrides["method"], **overrides["method_kwargs"])
    T, H, W = g.size
    pad = np.full(np.array(y.shape) + 2 * max(g.size), np.nan)
    p0 = max(g.size)
    pad[p0:-p0, p0:-p0, p0:-p0] = y
    t0 = time.perf_counter()
    for i in range(len(ps)):
        (a, b), (c, d), (e, f) = ps.footprint(i)
        batch = PatchBatch(
            obs=torch.from_numpy(pad[a + p0:b + p0, c + p0:d + p0, e + p0:f + p0][None].copy()),
            ocean=torch.ones(1, H, W, dtype=torch.bool),
            lon=torch.from_numpy(extend_coord(lon, e, f)[None]),
            lat=torch.from_numpy(extend_coord(lat, c, d)[None]),
            time=torch.from_numpy(extend_coord(days, a, b)[None]),
            dx_m=torch.full((1, H, W), 5e3, dtype=torch.float64),
            dy_m=torch.full((1, H, W), 5e3, dtype=torch.float64))
        method(batch)
    return time.perf_counter() - t0, len(ps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=20, help="days per rank (weak scaling unit)")
    ap.add_argument("--size", type=int, default=200, help="grid cells per side")
    ap.add_argument("--ranks", type=int, default=2, help="ranks of the weak-scaling case")
    ap.add_argument("--method", default="oi")
    ap.add_argument("--json", default=None, help="write the table as JSON here")
    args = ap.parse_args()
    patch = {"size": [15, 100, 100], "stride": [5, 80, 80], "crop": [10, 10]}
    over = [f"method={args.method}", "patch.size=[15,100,100]", "patch.stride=[5,80,80]",
            "patch.crop=[10,10]"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="oceanda_bench_") as tmp:
        tmp = Path(tmp)
        o1, oR = tmp / "obs1.zarr", tmp / "obsR.zarr"
        write_obs(o1, args.days, args.size)
        write_obs(oR, args.days * args.ranks, args.size)
        tile = [f"tile=[{args.days},{args.size},{args.size}]"]
        t_bare, n_bare = bare(o1, {"patch": patch, "method": args.method, "method_kwargs": {}})
        rows.append({"case": "bare", "ranks": 1, "patches": n_bare, "wall_s": t_bare,
                     "patches_per_s": n_bare / t_bare})
        s1 = infer(1, o1, tmp / "r1", over + tile)
        sR = infer(args.ranks, oR, tmp / "rR", over + tile)
        for name, s in (("1rank", s1), (f"{args.ranks}ranks_weak", sR)):
            sh = s["overhead_share"]
            rows.append({"case": name, "ranks": s["ranks"], "patches": s["patches_computed"],
                         "wall_s": s["wall_s"], "patches_per_s": s["patches_per_s"],
                         "ocean_cells_per_s": s["ocean_cells_per_s"],
                         "method_share": s["method_share"], "blend_share": sh["blend"],
                         "halo_share": sh["halo"],
                         "io_share": sh["read"] + sh["write"] + sh["checkpoint"],
                         "imbalance_share": sh["wait"],
                         "overhead_share": sh["blend"] + sh["halo"] + sh["read"] + sh["write"] + sh["checkpoint"],
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in s["per_rank"])})
        rows[1]["vs_bare"] = rows[1]["wall_s"] / t_bare
        rows[2]["weak_efficiency"] = s1["wall_s"] / sR["wall_s"]
        for ts in (50, 100, args.size):
            s = infer(1, o1, tmp / f"m{ts}", over + [f"tile=[{args.days},{ts},{ts}]"])
            rows.append({"case": f"mem_tile{ts}", "ranks": 1, "tile_cells": args.days * ts * ts,
                         "patches": s["patches_computed"], "wall_s": s["wall_s"],
                         "peak_rss_mb": s["per_rank"][0]["peak_rss_mb"]})
    cols = ["case", "ranks", "patches", "wall_s", "patches_per_s", "ocean_cells_per_s", "method_share",
            "overhead_share", "blend_share", "halo_share", "io_share", "imbalance_share", "vs_bare", "weak_efficiency",
            "tile_cells", "peak_rss_mb"]
    cols = [c for c in cols if any(c in r for r in rows)]

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    table = [cols] + [[fmt(r.get(c)) for c in cols] for r in rows]
    w = [max(len(row[i]) for row in table) for i in range(len(cols))]
    print(f"oceanda infer benchmark: method {args.method}, {args.size}x{args.size} grid, "
          f"{args.days} days per rank, patches 15x100x100 stride 5x80x80")
    for row in table:
        print("  ".join(c.rjust(wi) for c, wi in zip(row, w)))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
