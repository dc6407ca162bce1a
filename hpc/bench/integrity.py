"""Cost of the integrity digests on the Gulf Stream demo's stores, side by side with the
reads they protect and with the demo's own inference time.

usage:
  python hpc/bench/integrity.py [--demo-dir runs/gulfstream_demo] [--repeat 5] [--json PATH]
  python hpc/bench/integrity.py --demo-dir NEW --baseline OLD   # also: outputs bitwise equal?

Needs a demo run (``oceanda infer`` with no obs_path writes ``DEMO/osse`` and
``DEMO/infer_<method>``). Times, in one process, the best of ``--repeat`` runs of:

* ``identity``: :func:`oceanda.data.integrity.content_digest` of ``obs.zarr`` (what
  ``oceanda infer`` computes once per run: every chunk hashed and checked against the
  recorded digests);
* ``read plain`` vs ``read verified``: loading ``ssh_obs`` whole with ``xr.open_zarr``
  (no checks) and with :func:`oceanda.data.io.open_dataset` (every chunk verified before
  decoding); their ratio is the per-read overhead;
* ``record``: :func:`oceanda.data.integrity.compute_chunk_digests` of ``analysis.zarr``
  (what :meth:`AnalysisStore.finalize` adds at the end of a run).

The overhead of a run is identity + record + (verified - plain) for the reads, printed as a
share of the inference wall time recorded in ``infer_oi/summary.json``.

With ``--baseline OLD`` (a demo run by another oceanda version, e.g. before the digests), every
variable of ``osse/truth.zarr``, ``osse/obs.zarr`` and each ``infer_*/analysis.zarr`` present in
both is compared byte for byte (data, dtype, shape); attributes may differ.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo-dir", default="runs/gulfstream_demo")
    ap.add_argument("--method", default="oi")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--baseline", default=None, help="another demo dir: compare the outputs bitwise")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*onsolidated metadata.*")
    import xarray as xr

    from oceanda.data import integrity, io
    from oceanda.data import names as N

    demo = Path(a.demo_dir)
    obs, analysis = demo / "osse" / "obs.zarr", demo / f"infer_{a.method}" / "analysis.zarr"
    summary = json.loads((demo / f"infer_{a.method}" / "summary.json").read_text())
    for p in (obs, analysis):
        if not (p / integrity.DIGEST_FILE).is_file():
            raise SystemExit(f"{p} has no {integrity.DIGEST_FILE}: rerun the demo with this oceanda")
    nbytes = sum(f.stat().st_size for f in obs.rglob("*") if f.is_file())
    rows = {
        "identity": _best(lambda: integrity.content_digest(obs), a.repeat),
        "read plain": _best(lambda: xr.open_zarr(obs)[N.SSH_OBS].values, a.repeat),
        "read verified": _best(lambda: io.open_dataset(obs, [N.SSH_OBS])[N.SSH_OBS].values, a.repeat),
        "record": _best(lambda: integrity.compute_chunk_digests(analysis), a.repeat),
    }
    wall = float(summary["wall_s"])
    overhead = rows["identity"] + rows["record"] + max(rows["read verified"] - rows["read plain"], 0.0)
    print(f"obs.zarr {nbytes / 1e6:.1f} MB on disk; best of {a.repeat}")
    print(f"{'step':<16}{'seconds':>10}")
    for k, v in rows.items():
        print(f"{k:<16}{v:>10.4f}")
    print(f"verified / plain read: x{rows['read verified'] / rows['read plain']:.2f}")
    print(f"per-run overhead {overhead:.3f} s = {100 * overhead / wall:.2f} % of the {a.method} inference "
          f"wall time ({wall:.1f} s, from its summary.json)")
    equal = None
    if a.baseline:
        equal = compare(Path(a.baseline), demo)
        print(f"{'store':<32}{'variable':<12}bitwise equal to {a.baseline}")
        for (store, var), same in equal.items():
            print(f"{store:<32}{var:<12}{same}")
    if a.json:
        Path(a.json).write_text(json.dumps({"obs_bytes": nbytes, "seconds": rows, "infer_wall_s": wall,
                                            "overhead_s": overhead, "overhead_share": overhead / wall,
                                            "bitwise_equal": None if equal is None else
                                            {f"{k[0]}:{k[1]}": v for k, v in equal.items()}},
                                           indent=2) + "\n")
    return 0 if equal is None or all(equal.values()) else 1


def compare(old: Path, new: Path) -> dict[tuple[str, str], bool]:
    """``{(store, variable): bytes equal}`` over the demo stores both runs hold."""
    import xarray as xr

    stores = ["osse/truth.zarr", "osse/obs.zarr"] + sorted(
        str(p.relative_to(new)) for p in new.glob("infer_*/analysis.zarr") if (old / p.relative_to(new)).is_dir())
    out = {}
    for rel in stores:
        a, b = xr.open_zarr(old / rel), xr.open_zarr(new / rel)
        for var in sorted(set(a.variables) | set(b.variables)):
            if var not in a.variables or var not in b.variables:
                out[(rel, var)] = False
                continue
            x, y = a[var].values, b[var].values
            out[(rel, var)] = x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
    return out


if __name__ == "__main__":
    raise SystemExit(main())
