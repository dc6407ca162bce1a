"""Benchmark: batched banded SPD factor + solve, oceanda vs LAPACK (dpbtrf/dpbtrs) vs dense torch.

Usage::

    python hpc/bench/banded.py [--quick] [--json PATH] [--device cpu|cuda]

For each case (B systems of size d, bandwidth k, float64) and method, the median wall
time of ``x = A^{-1} b`` (factor + solve) over repeated runs, measured side by side in
this process on one thread:

* ``oceanda``: :func:`oceanda.linalg.band_solve` (no gradient: fused factor + solve);
* ``oceanda_fwd_grad`` / ``oceanda_backward``: the same solve with gradients enabled
  (the factor is kept) and the backward pass of ``sum(w * x)`` w.r.t. band and b (one
  more solve with the saved factor and the band gradient, timed alone: the forward of
  each repetition is not in the backward's time);
* ``lapack``: ``scipy.linalg.lapack.dpbtrf`` + ``dpbtrs`` called in a Python loop over the
  batch, on arrays already in LAPACK's band storage (conversion not timed);
* ``torch_dense``: ``torch.linalg.cholesky`` + ``torch.cholesky_solve`` on the dense
  (B, d, d) matrices, where they fit in memory (skipped with the reason otherwise).

The goals of issue 2 are checked at the end (``targets`` in the JSON), on the wall and
on the CPU medians: at B=1024 d=96 oceanda >= 4x faster than the LAPACK loop and >= 40x
faster than dense torch; the long system <= 1.2x the LAPACK time; the backward <= 3x the
(plain) forward at every case.

Bandwidth: GB/s = bytes of the method's operands (banded: band + b + x; dense: the d x d
matrices + b + x) / time, against a STREAM-like triad measured in the same run with numpy
(``a = s * c; a += b`` on 3 x 80 MB arrays, counting the 5 x 8 bytes per element that the
two passes move).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import scipy.linalg.lapack as lapack  # noqa: E402
import torch  # noqa: E402

from oceanda.linalg import band_solve, spd_band_from_raw  # noqa: E402

CASES = [  # (name, B, d, k)
    ("B1024_d96_k6", 1024, 96, 6),
    ("B1024_d200_k4", 1024, 200, 4),
    ("B16384_d96_k6", 16384, 96, 6),
    ("B1_d1000000_k8", 1, 1_000_000, 8),
]
DENSE_MAX_BYTES = 3 * 2**30  # input + factor of the dense method


class Times(list):
    """Wall-clock times in ms, with the matching CPU times (this thread) in ``.cpu``."""

    def __init__(self):
        super().__init__()
        self.cpu: list[float] = []


def timeit(fn, min_time: float, min_reps: int, max_reps: int, sync=lambda: None) -> Times:
    """Run ``fn`` repeatedly (after one warm-up call); return wall and CPU times in ms.

    The CPU time of the calling thread (``time.thread_time``) is what one core spends on
    the work; on a shared machine it is far less noisy than the wall-clock time.
    """
    fn()
    sync()
    times = Times()
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time):
        c0, t0 = time.thread_time(), time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
        times.cpu.append((time.thread_time() - c0) * 1e3)
    return times


def stream_triad_gbs(n: int = 10_000_000, reps: int = 10) -> float:
    """STREAM-like triad a = b + s c with numpy (two passes, 40 bytes per element)."""
    a = np.zeros(n)
    b = np.random.default_rng(0).random(n)
    c = np.random.default_rng(1).random(n)

    def triad():
        np.multiply(c, 3.0, out=a)
        a.__iadd__(b)

    t = timeit(triad, 0.5, reps, 4 * reps)
    return 40.0 * n / (min(t) * 1e-3) / 1e9


def make_problem(B: int, d: int, k: int, device: str, seed: int = 0):
    """A well-conditioned random SPD band (Q = L L^T, L with softplus diagonal) and b."""
    g = torch.Generator().manual_seed(seed)
    raw = 0.3 * torch.randn(B, d, k + 1, generator=g, dtype=torch.float64)
    raw[..., 0] += 1.0
    band = spd_band_from_raw(raw, k).to(device)
    b = torch.randn(B, d, generator=g, dtype=torch.float64).to(device)
    return band, b


def lapack_storage(band: torch.Tensor) -> list[np.ndarray]:
    """Per system, LAPACK lower band storage ab[t, j] = A[j + t, j] (Fortran order)."""
    B, d, k1 = band.shape
    out = []
    bn = band.cpu().numpy()
    for s in range(B):
        ab = np.zeros((k1, d), order="F")
        for t in range(k1):
            ab[t, : d - t] = bn[s, t:, t]
        out.append(ab)
    return out


def check_targets(ratios: list[dict]) -> list[dict]:
    """Issue 2's goals against the measured ratios; prints one line per goal and clock."""
    goals = []  # (case prefix, ratio key, comparison, bound, text)
    goals.append(("B1024_d96_k6", "lapack_over_oceanda", ">=", 4.0, "oceanda >= 4x faster than the LAPACK loop"))
    goals.append(("B1024_d96_k6", "dense_over_oceanda", ">=", 40.0, "oceanda >= 40x faster than dense torch"))
    goals.append(("B1_d", "lapack_over_oceanda", ">=", 1 / 1.2, "oceanda <= 1.2x the LAPACK time"))
    for case in dict.fromkeys(r["case"] for r in ratios):
        goals.append((case, "backward_over_forward", "<=", 3.0, "backward <= 3x the forward"))
    out = []
    print("# targets (issue 2):")
    for prefix, key, op, bound, text in goals:
        for r in ratios:
            if not r["case"].startswith(prefix) or key not in r:
                continue
            v = r[key]
            ok = v >= bound if op == ">=" else v <= bound
            clock = r["method"].split("_", 1)[1]
            out.append({"case": r["case"], "clock": clock, "goal": text, "ratio": key, "value": v, "bound": bound, "met": ok})
            print(f"#   {r['case']:<17}{clock:<5} {text}: {key} = {v:.2f} ({op} {bound:.2f}) {'met' if ok else 'NOT MET'}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--quick", action="store_true", help="fewer repetitions, d=10^5 for the long system")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of the oceanda and dense rows")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import numba

    numba.set_num_threads(1)
    dev = args.device
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    min_time, min_reps, max_reps = (0.2, 3, 10) if args.quick else (1.0, 5, 50)
    cases = [c if not (args.quick and c[2] > 100_000) else (c[0].replace("1000000", "100000"), 1, 100_000, c[3]) for c in CASES]

    stream = stream_triad_gbs()
    rows: list[dict] = []
    ratios: list[dict] = []
    print(f"# oceanda banded benchmark: {platform.processor() or platform.machine()}, python {sys.version.split()[0]}, "
          f"torch {torch.__version__}, numba {numba.__version__}, threads=1, float64, device={dev}")
    print(f"# STREAM-like triad (numpy): {stream:.1f} GB/s")
    hdr = f"{'case':<17}{'method':<18}{'median_ms':>11}{'min_ms':>10}{'cpu_ms':>10}{'GB/s':>8}{'%STREAM':>9}  note"
    print(hdr)
    print("-" * len(hdr))

    def record(case, method, times, nbytes, note=""):
        med = statistics.median(times)
        cpu = statistics.median(times.cpu)
        gbs = nbytes / (med * 1e-3) / 1e9
        row = {"case": case, "method": method, "median_ms": med, "min_ms": min(times), "cpu_median_ms": cpu,
               "reps": len(times), "gbs": gbs, "frac_stream": gbs / stream, "note": note}
        rows.append(row)
        print(f"{case:<17}{method:<18}{med:>11.3f}{min(times):>10.3f}{cpu:>10.3f}{gbs:>8.2f}{100 * gbs / stream:>8.1f}%  {note}")
        return row

    for name, B, d, k in cases:
        band, b = make_problem(B, d, k, dev)
        band_bytes = 8 * (B * d * (k + 1) + 2 * B * d)
        t_fwd = record(name, "oceanda", timeit(lambda: band_solve(band, b), min_time, min_reps, max_reps, sync), band_bytes)

        # forward with gradients enabled, then backward of sum(w * x)
        w = torch.randn_like(b)
        bg, rg = band.clone().requires_grad_(True), b.clone().requires_grad_(True)
        t_fg = record(name, "oceanda_fwd_grad",
                      timeit(lambda: band_solve(bg, rg), min_time, min_reps, max_reps, sync), band_bytes)
        bwd_times = Times()

        def backward_once():
            x = band_solve(bg, rg)
            loss = (w * x).sum()
            sync()
            c0, t0 = time.thread_time(), time.perf_counter()
            loss.backward()
            sync()
            bwd_times.append((time.perf_counter() - t0) * 1e3)
            bwd_times.cpu.append((time.thread_time() - c0) * 1e3)
            bg.grad = None
            rg.grad = None

        timeit(backward_once, min_time, min_reps, max_reps)
        del bwd_times[0], bwd_times.cpu[0]  # the warm-up call
        t_bwd = record(name, "oceanda_backward", bwd_times, 8 * (2 * B * d * (k + 1) + 4 * B * d))
        for key, label in (("median_ms", "wall"), ("cpu_median_ms", "cpu")):
            t_bwd[f"ratio_to_forward_{label}"] = t_bwd[key] / t_fwd[key]
            t_bwd[f"ratio_to_forward_with_grad_{label}"] = t_bwd[key] / t_fg[key]

        # LAPACK loop over the batch
        abs_ = lapack_storage(band)
        bs = [np.asfortranarray(b[s].cpu().numpy()[:, None]) for s in range(B)]

        def lapack_loop():
            for s in range(B):
                c, info = lapack.dpbtrf(abs_[s], lower=1)
                if info:
                    raise RuntimeError(f"dpbtrf info={info}")
                lapack.dpbtrs(c, bs[s], lower=1)

        t_lap = record(name, "lapack", timeit(lapack_loop, min_time, min_reps, max_reps), band_bytes)
        # check the answers agree (one system)
        x_ref = lapack.dpbtrs(lapack.dpbtrf(abs_[0], lower=1)[0], bs[0], lower=1)[0][:, 0]
        x_oc = band_solve(band[:1], b[:1])[0].cpu().numpy()
        err = float(np.max(np.abs(x_ref - x_oc)) / np.max(np.abs(x_ref)))
        if err > 1e-8:
            raise RuntimeError(f"{name}: oceanda and LAPACK disagree (rel err {err:.2e})")
        del abs_, bs

        # dense torch
        dense_bytes = 8 * (B * d * d + 2 * B * d)
        if 2 * 8 * B * d * d > DENSE_MAX_BYTES:
            print(f"{name:<17}{'torch_dense':<18}{'skipped':>11}  needs {2 * 8 * B * d * d / 2**30:.0f} GiB "
                  f"for the dense matrices and factor (limit {DENSE_MAX_BYTES / 2**30:.0f} GiB)")
            rows.append({"case": name, "method": "torch_dense", "median_ms": None,
                         "note": f"skipped: needs {2 * 8 * B * d * d / 2**30:.0f} GiB"})
            t_dense = None
        else:
            from oceanda.linalg import band_to_dense

            A = band_to_dense(band)
            rhs = b.unsqueeze(-1)

            def dense():
                Lc = torch.linalg.cholesky(A)
                return torch.cholesky_solve(rhs, Lc)

            t_dense = record(name, "torch_dense", timeit(dense, min_time, min_reps, max_reps, sync), dense_bytes)
            del A
        for key, label in (("median_ms", "wall"), ("cpu_median_ms", "cpu")):
            r = {"case": name, "method": f"ratios_{label}", "lapack_over_oceanda": t_lap[key] / t_fwd[key],
                 "backward_over_forward": t_bwd[key] / t_fwd[key],
                 "backward_over_forward_with_grad": t_bwd[key] / t_fg[key]}
            if t_dense is not None:
                r["dense_over_oceanda"] = t_dense[key] / t_fwd[key]
            ratios.append(r)
            print(f"# {name} ({label} medians): " + ", ".join(f"{a} = {v:.2f}" for a, v in r.items() if a not in ("case", "method")))

    targets = check_targets(ratios)
    if args.json:
        out = {"cases": rows, "ratios": ratios, "targets": targets, "stream_gbs": stream, "device": dev, "threads": 1, "dtype": "float64",
               "quick": args.quick, "torch": torch.__version__, "numba": numba.__version__,
               "processor": platform.processor() or platform.machine()}
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, args.json)
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
