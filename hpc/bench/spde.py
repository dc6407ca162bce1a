"""Benchmark: exact SPDE posterior solve and Matheron ensemble, side by side with a sparse
direct solve (scipy ``spsolve`` of ``Q + H^T R^{-1} H``, SuperLU) in the same run.

    OMP_NUM_THREADS=2 python hpc/bench/spde.py                      # 200 x 200 x 15, 200 members
    python hpc/bench/spde.py --ny 100 --nx 100 --members 20 --json out.json

Set-up: 1/20 deg Gulf Stream-like grid (dx = 5.57 km cos(lat), dy = 5.55 km, 33..43 N),
stationary SPDE prior (alpha = 2, kappa = 0.55, gamma = 375 km^2: range ~ 100 km,
correlation time ~ 11 days, std 0.1 m), four synthetic nadir tracks per day (straight lines,
one cell wide: ~2% of the cells), observation noise ``--noise-std``. Truth = a prior draw.

Rows:
- ``factor``: sparse LU of ``F = I + dt A^2`` and LDL^T of ``Q_0`` (once per DAW).
- ``posterior CG``: whitened CG to relative residual ``--rtol`` (the exact solve).
- ``posterior 2-level CG``: PCG on ``Q + D`` with the prior and a coarse space-time grid
  (``--coarse H HT``) as balancing preconditioner; agreement with the row above.
- ``posterior direct`` (``--direct-ny`` grid, default 60 x 60 x T): ``spsolve(Q + D)``,
  with CG on the same problem for the ratio and the agreement (max |x_cg - x_direct|
  relative to max |x_direct|).
- ``members``: ``--members`` Matheron members = prior simulation + one block CG with N + 1
  right-hand sides, on ``--members-ny`` (default: the full grid); spread/skill vs the truth.
Peak memory is the process's max resident set size after each row (monotone).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from oceanda.assim.ensemble import matheron_members
from oceanda.priors.spde import SPDEPrior, tau_for_std


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def setup(ny, nx, T, alpha, std, seed=0):
    lat = np.linspace(33.0, 43.0, ny)
    dx = np.repeat((5.566 * np.cos(np.deg2rad(lat)))[:, None], nx, 1)
    dy = np.full((ny, nx), 5.55)
    kappa, gamma = 0.55, 375.0
    area = float((dx * dy).mean())
    tau = tau_for_std(std, kappa, gamma, area) if alpha == 2 else std
    P = SPDEPrior(dx, dy, None, T=T, dt=1.0, alpha=alpha, kappa=kappa, gamma=gamma, tau=tau)
    rng = np.random.default_rng(seed)
    mask = np.zeros((T, ny, nx), bool)
    for k in range(T):
        for _ in range(4):
            j0 = rng.integers(0, nx)
            slope = rng.choice([-0.7, 0.7])
            ii = np.arange(ny)
            jj = np.round(j0 + slope * ii).astype(int)
            ok = (jj >= 0) & (jj < nx)
            mask[k, ii[ok], jj[ok]] = True
    return P, mask, rng


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ny", type=int, default=200)
    ap.add_argument("--nx", type=int, default=200)
    ap.add_argument("--T", type=int, default=15)
    ap.add_argument("--alpha", type=int, default=2)
    ap.add_argument("--std", type=float, default=0.1)
    ap.add_argument("--noise-std", type=float, default=0.05)
    ap.add_argument("--rtol", type=float, default=1e-8)
    ap.add_argument("--members", type=int, default=200)
    ap.add_argument("--members-ny", type=int, default=None)
    ap.add_argument("--direct-ny", type=int, default=60)
    ap.add_argument("--coarse", type=int, nargs=2, default=[8, 2], metavar=("H", "HT"),
                    help="coarse spacing of the two-level CG row (0 0: skip the row)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    R = a.noise_std**2
    rows = []

    def row(name, size, seconds, **extra):
        r = dict(name=name, size=size, seconds=round(seconds, 3), peak_rss_mb=round(rss_mb(), 1))
        r.update(extra)
        rows.append(r)
        print(f"{name:<22} {size:<14} {seconds:9.2f} s  rss {r['peak_rss_mb']:8.1f} MB  "
              + "  ".join(f"{k}={v}" for k, v in extra.items()), flush=True)

    print(f"threads OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"alpha={a.alpha}, noise_std={a.noise_std}, std={a.std}, rtol={a.rtol}")
    # full-size posterior
    P, mask, rng = setup(a.ny, a.nx, a.T, a.alpha, a.std)
    size = f"{a.ny}x{a.nx}x{a.T}"
    t = time.perf_counter()
    P._F_lu(1)
    P._Q0_factor()
    row("factor", size, time.perf_counter() - t, nnz_lu=int(P._F_lu(1).lu.L.nnz
                                                          + P._F_lu(1).lu.U.nnz))
    truth = P.sample(1, rng=rng)[0]
    y = np.where(mask, truth + a.noise_std * rng.standard_normal(truth.shape), 0.0)
    t = time.perf_counter()
    x, info = P.posterior_mean(y, mask, R, rtol=a.rtol, return_info=True)
    t_cg = time.perf_counter() - t
    row("posterior CG", size, t_cg, iterations=info.iterations,
        obs_fraction=round(float(mask.mean()), 4),
        rmse_vs_truth=round(float(np.sqrt(np.mean((x - truth) ** 2))), 4))

    if a.coarse[0] > 0:
        t = time.perf_counter()
        x2, info2 = P.posterior_mean(y, mask, R, rtol=a.rtol, coarse=tuple(a.coarse),
                                     return_info=True)
        t2 = time.perf_counter() - t
        row("posterior 2-level CG", size, t2, iterations=info2.iterations,
            coarse=f"{a.coarse[0]}x{a.coarse[1]}",
            rel_diff_vs_cg=f"{np.abs(x2 - x).max() / np.abs(x).max():.1e}",
            speedup_vs_cg=round(t_cg / t2, 2))

    # side by side with sparse direct on a smaller DAW
    dn = a.direct_ny
    Pd, maskd, rngd = setup(dn, dn, a.T, a.alpha, a.std, seed=1)
    truthd = Pd.sample(1, rng=rngd)[0]
    yd = np.where(maskd, truthd + a.noise_std * rngd.standard_normal(truthd.shape), 0.0)
    dsize = f"{dn}x{dn}x{a.T}"
    t = time.perf_counter()
    xc, infod = Pd.posterior_mean(yd, maskd, R, rtol=a.rtol, return_info=True)
    t_cgd = time.perf_counter() - t
    row("posterior CG", dsize, t_cgd, iterations=infod.iterations)
    t = time.perf_counter()
    Q = Pd.precision_csr()
    Dg = sp.diags(maskd.reshape(-1) / R)
    xd = spla.spsolve((Q + Dg).tocsc(), Dg @ yd.reshape(-1))
    t_dir = time.perf_counter() - t
    err = float(np.abs(xc.reshape(-1) - xd).max() / np.abs(xd).max())
    row("posterior direct", dsize, t_dir, rel_diff_vs_cg=f"{err:.1e}",
        ratio_direct_over_cg=round(t_dir / t_cgd, 2))

    # members
    if a.members:
        mn = a.members_ny or a.ny
        Pm, maskm, rngm = (P, mask, rng) if mn == a.ny else setup(mn, mn, a.T, a.alpha, a.std, 2)
        truthm = Pm.sample(1, rng=rngm)[0]
        ym = np.where(maskm, truthm + a.noise_std * rngm.standard_normal(truthm.shape), 0.0)
        msize = f"{mn}x{mn}x{a.T}"
        its = []

        def recon(Y):
            X, inf = Pm.posterior_mean(np.nan_to_num(Y), maskm, R, rtol=a.rtol,
                                       return_info=True)
            its.append(inf.iterations)
            return X

        t = time.perf_counter()
        S = Pm.sample(a.members, rng=rngm)
        t_s = time.perf_counter() - t
        members = matheron_members(recon, ym, maskm, R, S, rng=rngm)
        t_m = time.perf_counter() - t
        ss = np.sqrt(members.var(0, ddof=1).mean() / ((members.mean(0) - truthm) ** 2).mean())
        row(f"members N={a.members}", msize, t_m, prior_sampling_s=round(t_s, 2),
            cg_iterations=its[0], spread_skill=round(float(ss), 3))

    print("\n| row | size | seconds | peak RSS MB | notes |\n|---|---|---|---|---|")
    for r in rows:
        notes = ", ".join(f"{k}={v}" for k, v in r.items()
                          if k not in ("name", "size", "seconds", "peak_rss_mb"))
        print(f"| {r['name']} | {r['size']} | {r['seconds']} | {r['peak_rss_mb']} | {notes} |")
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(args=vars(a), rows=rows), f, indent=1)
        os.replace(tmp, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
