"""Lorenz-63: where the 4D-Var polish of the neural output goes wrong, and how the starts combine.

Usage::

    OMP_NUM_THREADS=1 python hpc/bench/l63_polish_starts.py --checkpoint runs/validate/lorenz63/model.pt \\
        [--draws 8] [--scale 1.0] [--seed 0] [--worst 12] [--is-samples 1000] [--wide] \\
        [--windows val] [--ps-particles 100000 --ps-stride 4] [--json PATH]

Reads a checkpoint of ``oceanda validate experiment=lorenz63`` (its data settings rebuild the
same test windows), then polishes (4D-Var, the experiment's settings of ``lorenz63.yaml``)
from: the neural output, the cold-diffusion output, z0, ``--draws`` draws of the neural
posterior N(x, (Q + H^T R^-1 H)^-1) (their spread x ``--scale``), and the truth (the oracle
start: 4D-Var from the truth, never used by a method). Prints, side by side on the same
windows, the RMSE (normalised) of

* each start alone;
* the lowest-cost minimum among a set of starts (:func:`oceanda.assim.multistart.lowest_cost`);
* the mean of the Laplace mixture of their distinct minima (what ``neural_var4d`` does), and
  with the truth's minimum added (an oracle bound of the mixture);
* with ``--is-samples M``, the self-normalised importance-sampling estimate of the mean of
  ``exp(-J)`` (the weak-constraint posterior) with that Laplace mixture as the proposal
  (:func:`oceanda.assim.multistart.importance_mean`, M draws per window) and its effective
  sample size: it removes the Laplace approximation of each basin and of its weight, not the
  basins no start reaches;

With ``--wide`` a wider pool of starts is polished too: draws of the neural posterior with
their spread x 0.5 and x 0.25, the neural and cold-diffusion outputs from 8 draws of the first
guess's Gaussian posterior (instead of its mean z0), and 4 of those draws themselves (polished as
4D-Var from z0 is); the table then adds every start together and an oracle row, the start
whose minimum is nearest the truth in each window (a bound on what a search can reach). With
``--ps-particles P`` the bootstrap particle smoother runs on every ``--ps-stride``-th window
with x0 from the attractor (the reference) and from one Gaussian of the training windows' first
states (4D-Var's background with ``var4d.background_components = 1``: then its mean is the
posterior mean of that 4D-Var cost, exp(-J), itself); ``--ps-mixture K...``: also from the
K-component mixtures of the same states (the cost with ``background_components = K``), printed
beside the Laplace
mixture of each start set on the same windows. ``--windows val`` scores 64 fresh trajectories
(``--val-seed``) x the test phases instead of the test windows, to choose settings without them;

and the ``--worst`` windows of the single-start polish: their squared error, that of the
neural and cold-diffusion outputs, and the 4D-Var cost of the minimum from the neural start,
from the truth and the lowest among the draws (a wrong minimum of cost <= the truth's: the
posterior is multimodal there, no selection of one minimum can follow the particle smoother).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from oceanda.assim.incremental import incremental_assimilation, posterior_draws, temperature_levels
from oceanda.assim.multistart import distinct_minima, importance_mean, laplace_mixture_mean, lowest_cost
from oceanda.assim.var4d import MixtureBackground
from oceanda.cli import compose
from oceanda.config_dataclass import from_mapping
from oceanda.dynamics import lorenz63
from oceanda.validation import runner as R
from oceanda.validation.data import PairSet, make_pairs


def validation_pairs(data, n_traj: int, seed: int) -> PairSet:
    """``n_traj`` fresh trajectories (attractor sampler, generator ``seed``) x the test phases,
    with the data's normaliser and noise: windows to choose settings on, never the test ones."""
    g = torch.Generator().manual_seed(seed)
    x0 = lorenz63.sample_attractor(n_traj, data.dt, data.spinup_steps, math.sqrt(data.model_noise_var), g)
    raw = lorenz63.simulate(x0, data.T - 1, data.dt, math.sqrt(data.model_noise_var), g)
    return make_pairs(data.norm.to_norm(raw), data.processes_test, 0, data.obs_std_norm, g)


def first_guess_draws(fg, pairs: PairSet, R_norm: float, n: int, g: torch.Generator) -> torch.Tensor:
    """``(n, N, d)`` draws of the first guess's Gaussian posterior N(z0, P - P H'(H P H' + R)^-1 H P)
    (the empirical Gaussian prior of the training trajectories, the observations of each window)."""
    x, y, mask = pairs.flat()
    z0 = fg(pairs)
    P = fg.prior.cov.double()
    m = mask.double()
    S = m.unsqueeze(-1) * P * m.unsqueeze(-2) + torch.diag_embed(torch.where(mask, torch.full_like(m, R_norm), 1.0))
    HP = m.unsqueeze(-1) * P
    post = P - HP.transpose(-1, -2) @ torch.linalg.solve(S, HP)
    L = torch.linalg.cholesky(0.5 * (post + post.transpose(-1, -2)) + 1e-8 * torch.eye(P.shape[0], dtype=P.dtype))
    return z0 + (L @ torch.randn(n, *z0.shape, 1, generator=g, dtype=torch.float64)).squeeze(-1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worst", type=int, default=12)
    ap.add_argument("--is-samples", type=int, default=0, help="importance-sampling draws per window (0: none)")
    ap.add_argument("--wide", action="store_true", help="also polish the wider pool of starts (module docstring)")
    ap.add_argument("--windows", choices=("test", "val"), default="test")
    ap.add_argument("--val-seed", type=int, default=777)
    ap.add_argument("--ps-particles", type=int, default=0, help="particle smoother under both x0 priors (0: none)")
    ap.add_argument("--ps-stride", type=int, default=4, help="the particle smoother runs on every k-th window")
    ap.add_argument("--ps-mixture", type=int, nargs="*", default=[],
                    help="also the particle smoother with x0 from a K-component mixture of the training first states")
    ap.add_argument("--background-components", type=int, default=None,
                    help="4D-Var's background on x0: K-component Gaussian mixture (default: the experiment's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    ck = R.read_checkpoint(args.checkpoint, "lorenz63")
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(compose("validate", ["experiment=lorenz63"]).experiment, resolve=True)
    settings = from_mapping(R.ExperimentSettings, raw, "experiment")
    settings.data = dict(ck["data"])
    if args.background_components is not None:
        settings.var4d.background_components = args.background_components
        settings.check()
    data = R.make_data(settings)
    priors, _ = R.load_checkpoint(Path(args.checkpoint), settings, data)
    levels = temperature_levels(settings.n_levels)
    fg = R.FirstGuess(data, settings.z0_inflation)
    pairs = data.test if args.windows == "test" else validation_pairs(data, 64, args.val_seed)
    z0 = fg(pairs)
    N, T, phi = pairs.x.shape
    x, y, mask = pairs.flat()
    f = torch.float32
    neural, draws = posterior_draws(priors["neural"], z0.to(f), y.to(f), mask, data.R_norm, levels, args.draws,
                                    torch.Generator().manual_seed(args.seed), update=settings.update)
    draws = neural + args.scale * (draws - neural)

    def run_neural(prior, start, conditional=True):
        return incremental_assimilation(prior, start.to(f), y.to(f), mask, data.R_norm, levels,
                                        update=settings.update, conditional=conditional).double()

    cold = run_neural(priors["cold_diffusion"], z0, conditional=False)
    var = R.build_var4d(data, settings.var4d)
    var_p = R.build_var4d(data, settings.var4d, polish=True)
    yraw = torch.where(pairs.mask, data.norm.to_raw(pairs.y), torch.zeros_like(pairs.y))

    def polish(start, solver=var_p):
        r = solver.solve(data.norm.to_raw(start.double().reshape(N, T, phi)), yraw, pairs.mask)
        logdet = var.hessian_logdet(r.x, yraw, pairs.mask)
        return data.norm.to_norm(r.x).reshape(N, -1), r.cost, logdet, r.x.reshape(N, -1)

    runs = {"neural": polish(neural), "cold_diffusion": polish(cold), "z0": polish(z0, var),
            "truth (oracle)": polish(x, var)}
    for k in range(args.draws):
        runs[f"draw {k}"] = polish(draws[k])
    d_names = [f"draw {k}" for k in range(args.draws)]
    wide = []
    if args.wide:
        _, more = posterior_draws(priors["neural"], z0.to(f), y.to(f), mask, data.R_norm, levels, 16,
                                  torch.Generator().manual_seed(args.seed + 1), update=settings.update)
        zd = first_guess_draws(fg, pairs, data.R_norm, 8, torch.Generator().manual_seed(args.seed + 2))
        for k in range(8):
            runs[f"draw x0.5 {k}"] = polish(neural + 0.5 * (more[k] - neural))
            runs[f"draw x0.25 {k}"] = polish(neural + 0.25 * (more[8 + k] - neural))
            runs[f"neural from z0 draw {k}"] = polish(run_neural(priors["neural"], zd[k]))
            runs[f"cold diffusion from z0 draw {k}"] = polish(run_neural(priors["cold_diffusion"], zd[k], False))
        for k in range(4):
            runs[f"z0 draw {k}"] = polish(zd[k], var)
        wide = [m for m in runs if m not in ("neural", "cold_diffusion", "z0", "truth (oracle)", *d_names)]
    mse = lambda e: (e - x).pow(2).mean(-1)  # noqa: E731 (per window)
    rmse = lambda e, sel=slice(None): float(mse(e)[sel].mean().sqrt())  # noqa: E731
    sets = {"neural": ["neural"], "neural + cold diffusion": ["neural", "cold_diffusion"],
            "neural + cold diffusion + z0": ["neural", "cold_diffusion", "z0"],
            f"neural + {args.draws} draws (neural_var4d)": ["neural", *d_names],
            f"neural + cold diffusion + z0 + {args.draws} draws": ["neural", "cold_diffusion", "z0", *d_names]}
    if wide:
        sets[f"every start but the truth ({3 + len(d_names) + len(wide)})"] = ["neural", "cold_diffusion", "z0",
                                                                               *d_names, *wide]
    sets[f"oracle: neural + {args.draws} draws + truth"] = ["neural", *d_names, "truth (oracle)"]
    ps_sel = torch.arange(0, N, args.ps_stride) if args.ps_particles > 0 else None
    rows = []
    tol = settings.var4d.polish_tol
    for name, members in sets.items():
        X = torch.stack([runs[m][0] for m in members])
        J = torch.stack([runs[m][1] for m in members])
        L = torch.stack([runs[m][2] for m in members])
        ok = torch.isfinite(L)
        keep = distinct_minima(X, J, tol, ok)
        mix, pi = laplace_mixture_mean(X, J, torch.nan_to_num(L), keep)
        rows.append({"starts": name, "n_starts": len(members), "lowest_cost": rmse(lowest_cost(X, J, ok)),
                     "laplace_mixture": rmse(mix), "minima_mean": float(keep.sum(0).double().mean()),
                     # the start whose minimum is nearest the truth, window by window (an oracle bound)
                     "nearest_minimum": float(mse(X).min(0).values.mean().sqrt())})
        if ps_sel is not None:
            rows[-1]["laplace_mixture_ps_windows"] = rmse(mix, ps_sel)
        if args.is_samples > 0:
            Xr = torch.stack([runs[m][3] for m in members])
            G = var.hessian_band(Xr.reshape(-1, T, phi), yraw.repeat(len(members), 1, 1),
                                 pairs.mask.repeat(len(members), 1, 1)).reshape(len(members), N, T * phi, -1)

            def log_target(xs, b):  # -J of draws xs (raw, flattened) of windows b
                return -var.cost(xs.reshape(-1, T, phi), yraw[b], pairs.mask[b])

            est, ess = importance_mean(Xr, G, torch.nan_to_num(L), pi, log_target, args.is_samples,
                                       torch.Generator().manual_seed(args.seed + 1))
            rows[-1].update(importance=rmse(data.norm.to_norm(est.reshape(N, T, phi)).reshape(N, -1)),
                            ess_median=float(ess.median()), ess_p10=float(ess.quantile(0.1)))
    single = {m: rmse(runs[m][0]) for m in runs}
    print(f"Lorenz-63 polish starts: {N} {args.windows} windows, dt = {data.dt}, checkpoint {args.checkpoint}")
    print("\nsingle start -> RMSE of its minimum (normalised)")
    for m, v in single.items():
        if not m.startswith(("draw", "neural from", "cold diffusion from", "z0 draw")):
            print(f"  {m:28s} {v:.4f}")
    groups = {"draws": d_names, **({g: [m for m in wide if m.startswith(g)] for g in
                                   ("draw x0.5", "draw x0.25", "neural from z0 draw", "cold diffusion from z0 draw",
                                    "z0 draw")} if wide else {})}
    for g, members in groups.items():
        if members:
            print(f"  {g + ' (each)':28s} {min(single[m] for m in members):.4f} .. {max(single[m] for m in members):.4f}")
    print(f"  neural output (no polish)    {rmse(neural):.4f};  cold diffusion {rmse(cold):.4f}")
    print("\nstarts combined                                   lowest cost   Laplace mixture   minima/window"
          "   nearest minimum (oracle)" + (f"   IS (M={args.is_samples}), ESS median / p10" if args.is_samples > 0 else ""))
    for r in rows:
        print(f"  {r['starts']:48s} {r['lowest_cost']:.4f}        {r['laplace_mixture']:.4f}            "
              f"{r['minima_mean']:.2f}            {r['nearest_minimum']:.4f}"
              + (f"            {r['importance']:.4f}, {r['ess_median']:.0f} / {r['ess_p10']:.0f}"
                 if args.is_samples > 0 else ""))
    ps = {}
    if ps_sel is not None:
        sub = PairSet(*(getattr(pairs, k)[ps_sel] for k in ("x", "y", "mask", "traj", "process")))
        xb, Bc = R.background(data)
        gauss = xb + torch.randn(args.ps_particles, phi, generator=torch.Generator().manual_seed(0),
                                 dtype=torch.float64) @ torch.linalg.cholesky(Bc).T
        pools = [("attractor", None), ("gaussian background", gauss)]
        for K in args.ps_mixture:
            mix = MixtureBackground.fit(data.raw_train_x[:, 0], K, seed=0)
            pools.append((f"mixture {K}", mix.sample(args.ps_particles, torch.Generator().manual_seed(0))))
        for prior, pool in pools:
            res, _ = R.run_particle_smoother(data, sub, R.ParticleSettings(n_particles=args.ps_particles, seed=0),
                                             x0_particles=pool)
            est = data.norm.to_norm(res.mean.double()).reshape(len(ps_sel), -1)
            ps[prior] = {"rmse": float((est - sub.flat()[0]).pow(2).mean().sqrt()),
                         "ess_min_median": float(res.ess_min.double().median())}
        print(f"\nparticle smoother ({args.ps_particles} particles) on every {args.ps_stride}-th window "
              f"({len(ps_sel)}): x0 ~ attractor (the reference) {ps['attractor']['rmse']:.4f} (ESS min median "
              f"{ps['attractor']['ess_min_median']:.0f}); x0 ~ one Gaussian (background_components = 1) "
              f"{ps['gaussian background']['rmse']:.4f} (ESS {ps['gaussian background']['ess_min_median']:.0f})"
              + "".join(f"; x0 ~ {k}-component mixture {ps[f'mixture {k}']['rmse']:.4f} "
                        f"(ESS {ps[f'mixture {k}']['ess_min_median']:.0f})" for k in args.ps_mixture))
        for r in rows:
            print(f"  Laplace mixture of {r['starts']:48s} {r['laplace_mixture_ps_windows']:.4f}")
    e = mse(runs["neural"][0])
    worst = e.argsort(descending=True)[:args.worst]
    Jd = torch.stack([runs[d][1] for d in d_names]).min(0).values if d_names else torch.full((N,), float("nan"))
    print(f"\nworst {args.worst} windows of the single-start polish ({float(e[worst].sum() / e.sum()):.0%} of its "
          "squared error): MSE polish / neural / cold diffusion; 4D-Var cost from neural / truth / best draw")
    worst_rows = []
    for i in worst.tolist():
        w = {"window": i, "mse_polish": float(e[i]), "mse_neural": float(mse(neural)[i]),
             "mse_cold_diffusion": float(mse(cold)[i]), "cost_neural_start": float(runs["neural"][1][i]),
             "cost_truth_start": float(runs["truth (oracle)"][1][i]), "cost_best_draw": float(Jd[i])}
        worst_rows.append(w)
        print(f"  {i:4d}  {w['mse_polish']:.3f} / {w['mse_neural']:.3f} / {w['mse_cold_diffusion']:.3f};   "
              f"{w['cost_neural_start']:.1f} / {w['cost_truth_start']:.1f} / {w['cost_best_draw']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"single": single, "combined": rows, "worst": worst_rows,
                                               "particle_smoother": ps, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
