"""Lorenz-63: where the 4D-Var polish of the neural output goes wrong, and how the starts combine.

Usage::

    OMP_NUM_THREADS=1 python hpc/bench/l63_polish_starts.py --checkpoint runs/validate/lorenz63/model.pt \\
        [--draws 8] [--scale 1.0] [--seed 0] [--worst 12] [--is-samples 1000] [--json PATH]

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
import sys
from pathlib import Path

import torch

from oceanda.assim.incremental import incremental_assimilation, posterior_draws, temperature_levels
from oceanda.assim.multistart import distinct_minima, importance_mean, laplace_mixture_mean, lowest_cost
from oceanda.cli import compose
from oceanda.config_dataclass import from_mapping
from oceanda.validation import runner as R


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worst", type=int, default=12)
    ap.add_argument("--is-samples", type=int, default=0, help="importance-sampling draws per window (0: none)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    ck = R.read_checkpoint(args.checkpoint, "lorenz63")
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(compose("validate", ["experiment=lorenz63"]).experiment, resolve=True)
    settings = from_mapping(R.ExperimentSettings, raw, "experiment")
    settings.data = dict(ck["data"])
    data = R.make_data(settings)
    priors, _ = R.load_checkpoint(Path(args.checkpoint), settings, data)
    levels = temperature_levels(settings.n_levels)
    fg = R.FirstGuess(data, settings.z0_inflation)
    z0 = fg(data.test)
    N, T, phi = data.test.x.shape
    x, y, mask = data.test.flat()
    f = torch.float32
    neural, draws = posterior_draws(priors["neural"], z0.to(f), y.to(f), mask, data.R_norm, levels, args.draws,
                                    torch.Generator().manual_seed(args.seed), update=settings.update)
    draws = neural + args.scale * (draws - neural)
    cold = incremental_assimilation(priors["cold_diffusion"], z0.to(f), y.to(f), mask, data.R_norm, levels,
                                    update=settings.update, conditional=False).double()
    var = R.build_var4d(data, settings.var4d)
    var_p = R.build_var4d(data, settings.var4d, polish=True)
    yraw = torch.where(data.test.mask, data.norm.to_raw(data.test.y), torch.zeros_like(data.test.y))

    def polish(start, solver=var_p):
        r = solver.solve(data.norm.to_raw(start.double().reshape(N, T, phi)), yraw, data.test.mask)
        logdet = var.hessian_logdet(r.x, yraw, data.test.mask)
        return data.norm.to_norm(r.x).reshape(N, -1), r.cost, logdet, r.x.reshape(N, -1)

    runs = {"neural": polish(neural), "cold_diffusion": polish(cold), "z0": polish(z0, var),
            "truth (oracle)": polish(x, var)}
    for k in range(args.draws):
        runs[f"draw {k}"] = polish(draws[k])
    mse = lambda e: (e - x).pow(2).mean(-1)  # noqa: E731 (per window)
    rmse = lambda e: float(mse(e).mean().sqrt())  # noqa: E731
    d_names = [f"draw {k}" for k in range(args.draws)]
    sets = {"neural": ["neural"], "neural + cold diffusion": ["neural", "cold_diffusion"],
            "neural + cold diffusion + z0": ["neural", "cold_diffusion", "z0"],
            f"neural + {args.draws} draws (neural_var4d)": ["neural", *d_names],
            f"neural + cold diffusion + z0 + {args.draws} draws": ["neural", "cold_diffusion", "z0", *d_names],
            f"oracle: neural + {args.draws} draws + truth": ["neural", *d_names, "truth (oracle)"]}
    rows = []
    tol = settings.var4d.polish_tol
    for name, members in sets.items():
        X = torch.stack([runs[m][0] for m in members])
        J = torch.stack([runs[m][1] for m in members])
        L = torch.stack([runs[m][2] for m in members])
        ok = torch.isfinite(L)
        keep = distinct_minima(X, J, tol, ok)
        mix, pi = laplace_mixture_mean(X, J, torch.nan_to_num(L), keep)
        rows.append({"starts": name, "lowest_cost": rmse(lowest_cost(X, J, ok)), "laplace_mixture": rmse(mix),
                     "minima_mean": float(keep.sum(0).double().mean())})
        if args.is_samples > 0:
            Xr = torch.stack([runs[m][3] for m in members])
            G = var.hessian_band(Xr.reshape(-1, T, phi), yraw.repeat(len(members), 1, 1),
                                 data.test.mask.repeat(len(members), 1, 1)).reshape(len(members), N, T * phi, -1)

            def log_target(xs, b):  # -J of draws xs (raw, flattened) of windows b
                return -var.cost(xs.reshape(-1, T, phi), yraw[b], data.test.mask[b])

            est, ess = importance_mean(Xr, G, torch.nan_to_num(L), pi, log_target, args.is_samples,
                                       torch.Generator().manual_seed(args.seed + 1))
            rows[-1].update(importance=rmse(data.norm.to_norm(est.reshape(N, T, phi)).reshape(N, -1)),
                            ess_median=float(ess.median()), ess_p10=float(ess.quantile(0.1)))
    single = {m: rmse(runs[m][0]) for m in runs}
    print(f"Lorenz-63 polish starts: {N} test windows, dt = {data.dt}, checkpoint {args.checkpoint}")
    print("\nsingle start -> RMSE of its minimum (normalised)")
    for m, v in single.items():
        if not m.startswith("draw"):
            print(f"  {m:28s} {v:.4f}")
    print(f"  draws (each)                 {min(single[d] for d in d_names):.4f} .. "
          f"{max(single[d] for d in d_names):.4f}" if d_names else "")
    print(f"  neural output (no polish)    {rmse(neural):.4f};  cold diffusion {rmse(cold):.4f}")
    print("\nstarts combined                                   lowest cost   Laplace mixture   minima/window"
          + (f"   IS (M={args.is_samples}), ESS median / p10" if args.is_samples > 0 else ""))
    for r in rows:
        print(f"  {r['starts']:48s} {r['lowest_cost']:.4f}        {r['laplace_mixture']:.4f}            "
              f"{r['minima_mean']:.2f}" + (f"            {r['importance']:.4f}, {r['ess_median']:.0f} / {r['ess_p10']:.0f}"
                                           if args.is_samples > 0 else ""))
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
                                               "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
