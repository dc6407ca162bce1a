"""Benchmark: per-window inference cost of the validation methods on Lorenz-63 windows.

Usage::

    python hpc/bench/validate.py [--batch 48 192] [--repeat 3] [--json PATH]

For each batch size B (test windows of the L63 experiment: T = 32, d = 96), measured side
by side in this process on one thread, median wall time over ``--repeat`` runs:

* ``map_kernel``: one MAP ``(Q + H^T R^{-1} H)^{-1} (Q mu + H^T R^{-1} y)`` with the banded
  kernel (:func:`oceanda.linalg.band_map`, bandwidth 2*phi = 6), against ``map_dense``: the
  same system by a dense ``torch.linalg.solve`` (reference);
* ``neural``: Algorithm 2 with l = 5 (6 network evaluations + 6 MAPs) of an untrained
  neural band prior (the cost does not depend on the weights);
* ``var4d_iter``: one Gauss-Newton iteration of weak-constraint 4D-Var (tangent-linear
  model over the window, block-tridiagonal assembly, banded solve, line-search cost);
* ``var4d``: 4D-Var from the first guess z0 to convergence (iterations reported).

Ratios are quoted against ``neural``. Absolute times depend on the machine and its load.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


def _median_time(fn, repeat):
    fn()  # warm-up (numba compilation, allocator)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench(batch: int, repeat: int) -> dict:
    from oceanda.assim.incremental import incremental_assimilation, temperature_levels
    from oceanda.linalg import band_map, band_to_dense
    from oceanda.priors.neural_band import NeuralBandPrior
    from oceanda.validation.runner import ExperimentSettings, FirstGuess, Var4DSettings, build_var4d, make_data

    n_test = max(1, -(-batch // 3))
    settings = ExperimentSettings("lorenz63", data=dict(n_train=128, n_test=n_test, spinup_steps=500))
    data = make_data(settings)
    fg = FirstGuess(data, [1.0])
    x, y, mask = (a[:batch] for a in data.test.flat())
    z0 = fg(data.test)[:batch]
    B = x.shape[0]
    torch.manual_seed(0)
    prior = NeuralBandPrior(data.T, data.phi).eval()
    levels = temperature_levels(5)
    with torch.no_grad():
        mu, Q = prior(z0.float(), 0.5)
    mu = mu.double()
    R = data.R_norm

    def dense():
        A = band_to_dense(Q)
        w = mask.double() / R
        rhs = (A @ mu.unsqueeze(-1)).squeeze(-1) + w * y
        return torch.linalg.solve(A + torch.diag_embed(w), rhs.unsqueeze(-1)).squeeze(-1)

    ref = dense()
    err = float((band_map(mu, Q, y, mask, R) - ref).abs().max())
    rows = {
        "map_kernel": _median_time(lambda: band_map(mu, Q, y, mask, R), repeat),
        "map_dense": _median_time(dense, repeat),
        "neural": _median_time(lambda: incremental_assimilation(prior, z0.float(), y.float(), mask, R, levels),
                               repeat),
    }
    var = build_var4d(data, Var4DSettings())
    one = build_var4d(data, Var4DSettings(max_iter=1))
    yraw = torch.where(data.test.mask[:B], data.norm.to_raw(data.test.y[:B]), torch.zeros_like(data.test.y[:B]))
    start = data.norm.to_raw(z0.reshape(B, data.T, data.phi))
    rows["var4d_iter"] = _median_time(lambda: one.solve(start, yraw, data.test.mask[:B]), repeat)
    res = {}
    rows["var4d"] = _median_time(lambda: res.setdefault("r", var.solve(start, yraw, data.test.mask[:B])), repeat)
    iters = res["r"].iters.double()
    return {"batch": B, "map_max_abs_diff_vs_dense": err, "gn_iters_median": float(iters.median()),
            "seconds": rows, "ms_per_window": {k: 1e3 * v / B for k, v in rows.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[48, 192])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = [bench(b, args.repeat) for b in args.batch]
    print(f"{'batch':>6} {'method':<11} {'ms/window':>10} {'x neural':>9}  notes")
    for r in results:
        ref = r["ms_per_window"]["neural"]
        for k, v in r["ms_per_window"].items():
            note = ""
            if k == "map_kernel":
                note = f"max |kernel - dense| = {r['map_max_abs_diff_vs_dense']:.1e}"
            if k == "var4d":
                note = f"GN iterations median {r['gn_iters_median']:g}"
            print(f"{r['batch']:>6} {k:<11} {v:>10.4g} {v / ref:>9.2f}  {note}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": "cpu", "threads": 1, "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
