"""Benchmark: OSSE truth generation speed (QG model) at 1/20 deg on the gulfstream domain.

Usage::

    python hpc/bench/generate.py [--days 5] [--warmup 5] [--domain gulfstream] [--device cpu|cuda]
                                 [--threads 1] [--json PATH]

Measured side by side in this process (torch threads = ``--threads``, default 1):

* ``qg_float32`` / ``qg_float64``: model days per second of the full-resolution QG truth
  (``truth=qg`` defaults: model grid, CFL time step, daily means, sampling onto the
  1/20 deg grid), after ``--warmup`` days from a spun-up-like random state; also per core.
* ``qg_coarse_spinup``: the half-resolution spin-up model (float32).
* ``fft_reference``: rfft2 + irfft2 pairs per second on the model grid (the model's
  building block: one RK4 step of the two layers costs 4 x (8 inverse + 2 forward)
  single-layer transforms), and the FFT-bound upper limit on days/s it implies with the
  measured steps per day; the ratio model / FFT bound tells how much of a step is FFT.
* ``default_runtime``: the predicted wall time of the default ``oceanda generate`` truth
  (spin-up + 72 stored days) and of a full year, from the measured rates.

Rates depend on the machine's load: the table prints the load average.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from oceanda.data.domains import get_domain  # noqa: E402
from oceanda.dynamics import qg  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_model(model: qg.QGModel, qh: torch.Tensor, sampler, days: int, device: str) -> tuple[float, int, torch.Tensor]:
    """Seconds per model day (with daily-mean sampling) and the mean steps per day."""
    steps = []
    scale = model.p.f0 / model.p.g

    def cb(d, p1h):
        sampler(p1h) * scale if sampler is not None else None

    _sync(device)
    t0 = time.perf_counter()
    for _ in range(days):
        steps.append(model.cfl_steps_per_day(qh))
        qh = model.run(qh, 1, callback=cb)
    _sync(device)
    return (time.perf_counter() - t0) / days, int(np.mean(steps)), qh


def fft_rate(ny: int, nx: int, device: str, dtype: torch.dtype, repeat: int = 50) -> float:
    """Single-layer rfft2 + irfft2 pairs per second on an (ny, nx) grid."""
    a = torch.randn(ny, nx, device=device, dtype=dtype)
    for _ in range(3):
        torch.fft.irfft2(torch.fft.rfft2(a), s=(ny, nx))
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        torch.fft.irfft2(torch.fft.rfft2(a), s=(ny, nx))
    _sync(device)
    return repeat / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--days", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--domain", default="gulfstream")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cores = args.threads if not args.device.startswith("cuda") else 1
    grid = get_domain({"name": args.domain, "land": False})
    cfg = qg.QGTruthConfig()
    rows = []
    results: dict[str, float | int | str] = {}
    states = {}
    for dtype in ("float32", "float64"):
        model, _, x, y = qg.qg_setup(grid.lon, grid.lat, replace(cfg, dtype=dtype), device=args.device)
        gen = torch.Generator().manual_seed(0)
        qh = model.random_state(gen, ssh_amp=0.1)
        qh = model.run(qh, args.warmup)
        sampler = qg.SpectralSampler(model, x, y)
        sec, steps, qh = time_model(model, qh, sampler, args.days, args.device)
        states[dtype] = (model, steps)
        results[f"qg_{dtype}_days_per_s"] = 1 / sec
        results[f"qg_{dtype}_steps_per_day"] = steps
        rows.append((f"qg_{dtype}", f"{model.p.ny}x{model.p.nx}", steps, sec, 1 / sec, 1 / sec / cores))
    model32, steps32 = states["float32"]
    coarse = qg.QGModel(replace(model32.p, nx=model32.p.nx // 2, ny=model32.p.ny // 2), device=args.device)
    qc = coarse.random_state(torch.Generator().manual_seed(0), ssh_amp=0.1)
    qc = coarse.run(qc, args.warmup)
    sec_c, steps_c, _ = time_model(coarse, qc, None, args.days, args.device)
    results["qg_coarse_spinup_days_per_s"] = 1 / sec_c
    rows.append(("qg_coarse_spinup", f"{coarse.p.ny}x{coarse.p.nx}", steps_c, sec_c, 1 / sec_c, 1 / sec_c / cores))
    # FFT reference: 4 RK4 stages x (8 inverse + 2 forward) single-layer transforms = 20 pairs/step
    pairs = fft_rate(model32.p.ny, model32.p.nx, args.device, torch.float32)
    bound = pairs / (20 * steps32)
    results["fft_pairs_per_s"] = pairs
    results["fft_bound_days_per_s"] = bound
    results["model_over_fft_bound"] = results["qg_float32_days_per_s"] / bound
    rows.append(("fft_reference", f"{model32.p.ny}x{model32.p.nx}", steps32, 1 / bound, bound, bound / cores))
    # predicted runtime of the default generate (truth only) and a year
    spin, fine = cfg.spinup_days, cfg.spinup_fine_days
    r32, rc = results["qg_float32_days_per_s"], results["qg_coarse_spinup_days_per_s"]
    default_s = spin / rc + (fine + 72) / r32
    year_s = spin / rc + (fine + 365) / r32
    results["default_truth_seconds_predicted"] = default_s
    results["year_truth_seconds_predicted"] = year_s
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    results.update({"device": args.device, "threads": args.threads, "domain": args.domain,
                    "grid": f"{grid.ny}x{grid.nx}", "load_average_1min": load, "torch": torch.__version__,
                    "machine": platform.processor() or platform.machine()})
    print(f"QG truth generation, domain {args.domain} ({grid.ny}x{grid.nx} at 1/20 deg), device {args.device}, "
          f"{args.threads} thread(s), load average {load:.1f}")
    print(f"{'case':<18} {'model grid':>10} {'steps/day':>9} {'s/day':>8} {'days/s':>8} {'days/s/core':>11}")
    for name, g, st, sec, rate, per_core in rows:
        print(f"{name:<18} {g:>10} {st:>9} {sec:>8.3f} {rate:>8.2f} {per_core:>11.2f}")
    print(f"float64 / float32 time ratio: {results['qg_float32_days_per_s'] / results['qg_float64_days_per_s']:.2f}; "
          f"model / FFT bound: {results['model_over_fft_bound']:.2f}")
    print(f"predicted truth time: default (spin-up {spin}+{fine} d, 72 d) {default_s:.0f} s, "
          f"one year {year_s:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
