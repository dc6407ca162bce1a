"""Benchmark: exact SPDE posterior solve and Matheron ensemble, side by side with a sparse
direct solve (scipy ``spsolve`` of ``Q + H^T R^{-1} H``, SuperLU) in the same run.

    OMP_NUM_THREADS=1 python hpc/bench/spde.py --rtol 1e-5 --previous --members 0 \
        --direct-ny 40 --coarse 0 0 --nll-ny 0            # 200 x 200 x 15 vs previous solver
    OMP_NUM_THREADS=2 python hpc/bench/spde.py --rtol 1e-5 --previous --members 0 \
        --direct-ny 40 --coarse 0 0 --nll-ny 0 --threads 2   # 2 threads (numba strips)
    OMP_NUM_THREADS=2 python hpc/bench/spde.py --threads 2 --rtol 1e-5 --members 200 \
        --direct-ny 20 --coarse 0 0 --nll-ny 0 --members-previous 10   # 200 members, 200x200x15
    python hpc/bench/spde.py --ny 100 --nx 100 --members 20 --json out.json

Set-up: 1/20 deg Gulf Stream-like grid (dx = 5.57 km cos(lat), dy = 5.55 km, 33..43 N),
stationary SPDE prior (alpha = 2, kappa = 0.55, gamma = 375 km^2: range ~ 100 km,
correlation time ~ 11 days, std 0.1 m), four synthetic nadir tracks per day (straight lines,
one cell wide: ~2% of the cells), observation noise ``--noise-std``. Truth = a prior draw.

Rows:
- ``F solve lu`` / ``F solve complex``: the two factorisations of ``F = I + dt A^2`` side by
  side (real SuperLU LU of the 13-point ``F`` vs complex LU of the 5-point
  ``I - i sqrt(dt) A``, ``F^{-1} b = Re(...)``): factor time, factor entries, one solve.
- ``factor``: the factor used (``--factor``) and LDL^T of ``Q_0`` (once per DAW; for the
  simulated truth draw).
- ``posterior``: the exact solve with ``--solver`` (default ``auto``: on this separable prior
  the spectral representer CG of :meth:`SPDEPrior.posterior_mean`, nothing factorised) to
  ``--rtol``, on a fresh prior: seconds include every set-up (eigenvectors, factors).
- ``posterior previous`` (``--previous``): the previous default in the same run (PCG on
  ``Q + D`` with the single-precision sparse-factor prior preconditioner, ``solver="pcg"``,
  the same threads, factorisations included), with the agreement of the two means and the
  time ratios.
- ``posterior 2-level CG``: PCG on ``Q + D`` with the prior and a coarse space-time grid
  (``--coarse H HT``) as balancing preconditioner; agreement with the row above.
- ``posterior direct`` (``--direct-ny`` grid, default 60 x 60 x T): scipy's ``spsolve(Q + D)``
  and the library's ``solver="direct"`` (LDL^T of ``Q + D``), with CG on the same problem for
  the ratio and the agreement (max |x_cg - x_direct| relative to max |x_direct|).
- ``nll+grad sparse`` (``--nll-ny``, default 100 x 100 x T): NLL of one prior draw and its
  gradient in (kappa, gamma, tau) through the sparse log-det (exact complex-step gradient);
  ``nll+grad dense`` on ``--nll-dense-ny`` (default 40) for the agreement of both paths.
- ``members``: ``--members`` Matheron members = prior draws (``--sample-method``, default
  spectral when separable) + one block CG with N + 1 right-hand sides (on this prior in
  observation space: all at once), on ``--members-ny`` (default: the full grid);
  spread/skill vs the truth. ``members previous`` (``--members-previous K``): the previous
  ensemble path (simulated draws, whitened block CG with sparse factors) on ``K`` members of
  the same DAW, for the per-member time ratio.
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
from oceanda.metrics.ensemble import spread_skill_members as spread_skill
from oceanda.priors.spde import SPDEPrior, tau_for_std
from oceanda.priors.spde.posterior import SOLVERS, Options, choose


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def setup(ny, nx, T, alpha, std, seed=0, factor="auto", threads=None, backend="auto"):
    lat = np.linspace(33.0, 43.0, ny)
    dx = np.repeat((5.566 * np.cos(np.deg2rad(lat)))[:, None], nx, 1)
    dy = np.full((ny, nx), 5.55)
    kappa, gamma = 0.55, 375.0
    area = float((dx * dy).mean())
    tau = tau_for_std(std, kappa, gamma, area) if alpha == 2 else std
    P = SPDEPrior(dx, dy, None, T=T, dt=1.0, alpha=alpha, kappa=kappa, gamma=gamma, tau=tau,
                  factor=factor, threads=threads, backend=backend)
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
    ap.add_argument("--members-previous", type=int, default=0,
                    help="also run the previous ensemble path (simulated draws, whitened block CG "
                         "with sparse factors) on this many members, for the per-member ratio")
    ap.add_argument("--direct-ny", type=int, default=60)
    ap.add_argument("--coarse", type=int, nargs=2, default=[8, 2], metavar=("H", "HT"),
                    help="coarse spacing of the two-level CG row (0 0: skip the row)")
    ap.add_argument("--factor", default="auto", choices=["auto", "complex", "lu"])
    ap.add_argument("--threads", type=int, default=None,
                    help="sweep threads (default 1)")
    ap.add_argument("--backend", default="auto", choices=["auto", "superlu", "numba"],
                    help="triangular solves: SuperLU's or numba's on grid strips (threads)")
    ap.add_argument("--solver", default="auto", choices=["auto", *SOLVERS],
                    help="posterior solver of the main row")
    ap.add_argument("--previous", action="store_true",
                    help="also time the previous default in the same run: PCG with the "
                         "sparse-factor prior preconditioner (solver=pcg, same threads)")
    ap.add_argument("--sample-method", default="auto", choices=["auto", "simulate", "spectral"],
                    help="prior draws of the members row")
    ap.add_argument("--block-size", type=int, default=None,
                    help="right-hand sides per block CG in the members row (default: as many "
                         "as fit in 1 GiB)")
    ap.add_argument("--baseline", action="store_true",
                    help="also time the previous solver on the full grid (real LU of F, one "
                         "thread) for the ratio")
    ap.add_argument("--baseline-rtol", type=float, default=None,
                    help="rtol of the baseline row (default --rtol; 1e-8 = previous default)")
    ap.add_argument("--nll-ny", type=int, default=100, help="0: skip the NLL rows")
    ap.add_argument("--nll-dense-ny", type=int, default=40)
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
          f"alpha={a.alpha}, noise_std={a.noise_std}, std={a.std}, rtol={a.rtol}, "
          f"cpu_count={os.cpu_count()}, load={os.getloadavg()[0]:.2f}")
    # full-size posterior
    size = f"{a.ny}x{a.nx}x{a.T}"
    if a.alpha == 2:
        bvec = np.random.default_rng(5).standard_normal(a.ny * a.nx)
        sol, cpu_solve = {}, {}
        for fac in ("lu", "complex"):
            Pf, _, _ = setup(a.ny, a.nx, a.T, a.alpha, a.std, factor=fac)
            t = time.process_time()  # CPU seconds: robust to a shared machine
            f = Pf.precision.F_factor(1)
            tf = time.process_time() - t
            f.solve(bvec)
            t = time.process_time()
            for _ in range(10):
                sol[fac] = f.solve(bvec)
            ts = cpu_solve[fac] = (time.process_time() - t) / 10
            extra = {}
            if fac == "complex":
                diff = np.abs(sol["complex"] - sol["lu"]).max() / np.abs(sol["lu"]).max()
                extra = dict(rel_diff_vs_lu=f"{diff:.1e}",
                             solve_speedup_vs_lu=round(cpu_solve["lu"] / ts, 2))
            row(f"F solve {fac}", f"{a.ny}x{a.nx}", tf,
                factor_entries=int(f.nnz), one_solve_cpu_ms=round(1e3 * ts, 2),
                note="seconds = factor CPU time", **extra)
            del Pf, f
    pk = dict(factor=a.factor, threads=a.threads, backend=a.backend)
    P, mask, rng = setup(a.ny, a.nx, a.T, a.alpha, a.std, **pk)
    t = time.perf_counter()
    c0 = time.process_time()
    P.precision.F_factor(1)
    P.precision.Q0_factor()
    t_fac = time.perf_counter() - t
    cpu_fac = time.process_time() - c0
    row("factor F, Q_0 (draws)", size, t_fac, factor=P.factor, threads=P.threads,
        backend=P.backend, cpu_s=round(cpu_fac, 2))
    truth = P.sample(1, rng=rng)[0]
    y = np.where(mask, truth + a.noise_std * rng.standard_normal(truth.shape), 0.0)
    Ps, _, _ = setup(a.ny, a.nx, a.T, a.alpha, a.std, **pk)  # fresh: factors timed too
    t = time.perf_counter()
    c0 = time.process_time()
    x, info = Ps.posterior_mean(y, mask, R, rtol=a.rtol, return_info=True, solver=a.solver)
    t_cg = time.perf_counter() - t
    cpu_cg = time.process_time() - c0
    t_fac = cpu_fac = 0.0  # included above
    row("posterior", size, t_cg, solver=a.solver,
        used=choose(Ps, 1, Options()) if a.solver == "auto" else a.solver,
        iterations=info.iterations,
        obs_fraction=round(float(mask.mean()), 4),
        rmse_vs_truth=round(float(np.sqrt(np.mean((x - truth) ** 2))), 4),
        cpu_s=round(cpu_cg, 2), rel_residual=f"{float(info.rel_residual.max()):.1e}",
        note="incl. factorisation")
    del Ps
    if a.previous:
        Pp, _, _ = setup(a.ny, a.nx, a.T, a.alpha, a.std, **pk)
        t = time.perf_counter()
        c0 = time.process_time()
        xp, infop = Pp.posterior_mean(y, mask, R, rtol=a.rtol, return_info=True,
                                      solver="pcg")
        tp = time.perf_counter() - t
        cp = time.process_time() - c0
        row("posterior previous", size, tp, solver="pcg", iterations=infop.iterations,
            cpu_s=round(cp, 2), note="incl. factorisation",
            rel_diff_vs_new=f"{np.abs(xp - x).max() / np.abs(xp).max():.1e}",
            wall_ratio_previous_over_new=round(tp / t_cg, 2),
            cpu_ratio_previous_over_new=round(cp / cpu_cg, 2))
        del Pp

    if a.baseline:
        Pb, _, _ = setup(a.ny, a.nx, a.T, a.alpha, a.std, factor="lu", threads=1)
        t = time.perf_counter()
        c0 = time.process_time()
        Pb.precision.F_factor(1)
        Pb.precision.Q0_factor()
        rb = a.rtol if a.baseline_rtol is None else a.baseline_rtol
        xb, infob = Pb.posterior_mean(y, mask, R, rtol=rb, return_info=True)
        tb = time.perf_counter() - t
        row("posterior CG baseline", size, tb, iterations=infob.iterations,
            note="real LU, 1 thread, incl. factor", rtol=rb,
            cpu_s=round(time.process_time() - c0, 2),
            rel_diff_vs_cg=f"{np.abs(xb - x).max() / np.abs(xb).max():.1e}",
            speedup_of_factor_plus_cg=round(tb / (t_fac + t_cg), 2),
            cpu_ratio_baseline_over_ours=round((time.process_time() - c0) / (cpu_fac + cpu_cg), 2))
        del Pb

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
    Pd, maskd, rngd = setup(dn, dn, a.T, a.alpha, a.std, seed=1, **pk)
    truthd = Pd.sample(1, rng=rngd)[0]
    yd = np.where(maskd, truthd + a.noise_std * rngd.standard_normal(truthd.shape), 0.0)
    dsize = f"{dn}x{dn}x{a.T}"
    t = time.perf_counter()
    xc, infod = Pd.posterior_mean(yd, maskd, R, rtol=a.rtol, return_info=True, solver=a.solver)
    t_cgd = time.perf_counter() - t
    row("posterior CG", dsize, t_cgd, iterations=infod.iterations)
    t = time.perf_counter()
    Q = Pd.precision.csr()
    Dg = sp.diags(maskd.reshape(-1) / R)
    xd = spla.spsolve((Q + Dg).tocsc(), Dg @ yd.reshape(-1))
    t_dir = time.perf_counter() - t
    err = float(np.abs(xc.reshape(-1) - xd).max() / np.abs(xd).max())
    row("posterior direct", dsize, t_dir, rel_diff_vs_cg=f"{err:.1e}",
        ratio_direct_over_cg=round(t_dir / t_cgd, 2), solver="spsolve (SuperLU, COLAMD)")
    # the library's direct solver: symmetric-mode SuperLU LDL^T of Q + D (solver="direct")
    t = time.perf_counter()
    xd2 = Pd.posterior_mean(yd, maskd, R, solver="direct")
    t_dir2 = time.perf_counter() - t
    err2 = float(np.abs(xc - xd2).max() / np.abs(xd2).max())
    row("posterior direct", dsize, t_dir2, rel_diff_vs_cg=f"{err2:.1e}",
        ratio_direct_over_cg=round(t_dir2 / t_cgd, 2),
        solver='solver="direct" (SPDFactor LDL^T)',
        rel_diff_vs_spsolve=f"{float(np.abs(xd2.reshape(-1) - xd).max() / np.abs(xd).max()):.1e}")

    # NLL and its gradient at patch scale
    if a.nll_ny:
        import torch

        def nll_grad(ny, method):
            P0, _, _ = setup(ny, ny, a.T, a.alpha, a.std)
            x = torch.as_tensor(P0.sample(1, rng=0))
            th = [torch.tensor(v, dtype=torch.float64, requires_grad=True)
                  for v in (0.55, 375.0, float(P0.params["tau"]))]
            t = time.perf_counter()
            c0 = time.process_time()
            P1 = SPDEPrior(P0.dx, P0.dy, None, T=a.T, dt=1.0, alpha=a.alpha, kappa=th[0],
                           gamma=th[1], tau=th[2])
            v = P1.nll(x, logdet_method=method).sum()
            v.backward()
            return (float(v.detach()), np.array([float(u.grad) for u in th]),
                    time.perf_counter() - t, time.process_time() - c0)

        dn2 = a.nll_dense_ny
        vd, gd, td, cd = nll_grad(dn2, "dense")
        vs, gs, ts, cs = nll_grad(dn2, "sparse")
        row("nll+grad dense", f"{dn2}x{dn2}x{a.T}", td, cpu_s=round(cd, 2))
        row("nll+grad sparse", f"{dn2}x{dn2}x{a.T}", ts, cpu_s=round(cs, 2),
            rel_diff_value=f"{abs(vs - vd) / abs(vd):.1e}",
            rel_diff_grad=f"{float(np.max(np.abs(gs - gd) / np.abs(gd))):.1e}")
        vb, gb, tb2, cb = nll_grad(a.nll_ny, "sparse")
        row("nll+grad sparse", f"{a.nll_ny}x{a.nll_ny}x{a.T}", tb2, cpu_s=round(cb, 2),
            params="kappa,gamma,tau",
            dense="not possible (n > 6000)" if a.nll_ny**2 > 6000 else "possible")

    # members
    if a.members:
        mn = a.members_ny or a.ny
        Pm, maskm, rngm = (P, mask, rng) if mn == a.ny else setup(
            mn, mn, a.T, a.alpha, a.std, 2, **pk)
        truthm = Pm.sample(1, rng=rngm)[0]
        ym = np.where(maskm, truthm + a.noise_std * rngm.standard_normal(truthm.shape), 0.0)
        msize = f"{mn}x{mn}x{a.T}"
        its = []

        def recon(Y):
            X, inf = Pm.posterior_mean(Y, maskm, R, rtol=a.rtol,  # NaN off the mask: ignored
                                       return_info=True, block_size=a.block_size)
            its.append(inf.iterations)
            return X

        t = time.perf_counter()
        c_m = time.process_time()
        S = Pm.sample(a.members, rng=rngm, method=a.sample_method)
        t_s = time.perf_counter() - t
        members = matheron_members(recon, ym, maskm, R, S, rng=rngm)
        t_m = time.perf_counter() - t
        ss = spread_skill(members, truthm)
        row(f"members N={a.members}", msize, t_m, prior_sampling_s=round(t_s, 2),
            cg_iterations_max_block=its[0], block_size=a.block_size or "auto",
            cpu_s=round(time.process_time() - c_m, 2), threads=Pm.threads,
            sample_method=a.sample_method,
            spread_skill=round(float(ss), 3))

        if a.members_previous:
            # the previous ensemble path on a few members, same prior / observations: SPDE
            # simulation + block CG on the whitened system with sparse factors
            Pp, _, _ = setup(mn, mn, a.T, a.alpha, a.std, 2, **pk)
            kp = a.members_previous
            t = time.perf_counter()
            c_p = time.process_time()
            Sp = Pp.sample(kp, rng=1, method="simulate")

            def recon_prev(Y):
                return Pp.posterior_mean(Y, maskm, R, rtol=a.rtol, solver="whitened",
                                         block_size=a.block_size)

            mp = matheron_members(recon_prev, ym, maskm, R, Sp, rng=1)
            t_p = time.perf_counter() - t
            row(f"members previous N={kp}", msize, t_p, cpu_s=round(time.process_time() - c_p, 2),
                solver="whitened block CG + simulated draws", threads=Pp.threads,
                seconds_per_member=round(t_p / kp, 2),
                seconds_per_member_new=round(t_m / a.members, 3),
                per_member_ratio_previous_over_new=round((t_p / kp) / (t_m / a.members), 1),
                spread_skill=round(spread_skill(mp, truthm), 3))
            del Pp, Sp, mp

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
