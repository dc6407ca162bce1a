"""Benchmark: reading + gridding L3 along-track files for a North Atlantic year, per rank.

Usage::

    OMP_NUM_THREADS=1 mpiexec -n 2 python hpc/bench/alongtrack.py [--days 365] [--data-dir DIR] [--json PATH]
    OMP_NUM_THREADS=1 python hpc/bench/alongtrack.py --days 30          # one rank, quick

Data (made once in ``--data-dir``, reused): a year (``--days``) of 6 nadir missions (the
``5nadirs`` set + ``sentinel3b``; 1 Hz samples from :func:`oceanda.obs.iter_ground_tracks`)
over the ``natl`` domain (-77..5 x 27..64), one L3 file a mission in the data challenge 2021a
layout (:func:`oceanda.data.alongtrack_write.write_l3`, CMEMS packing), values an analytic
field (no truth model: the bench measures I/O and binning).

Measured on every rank, exactly as ``oceanda infer`` reads (``--patch``/``--tile`` as its
configs; the layout of :func:`oceanda.parallel.layout.build_layout` for the number of ranks):

* ``open_s``: open every file and read its ``time`` variable;
* ``qc_s``: the streaming QC pass over this rank's slice of every file
  (:meth:`AlongTrackSource.qc_counts` with ``part=(rank, ranks)``, as ``infer`` does);
* ``tiles_s``: :meth:`AlongTrackSource.read` of the tile + halo box of each tile the rank owns
  (the box :func:`oceanda.parallel.driver` reads), i.e. reading + classifying + binning;
* throughput: points of the rank's QC slice per second of ``qc_s``, points read for the tiles per second
  of ``tiles_s``, observed (cell, day) values produced per second;
* peak RSS of the rank.

Reference, side by side on rank 0 (``--no-reference`` skips it): every file loaded whole
(xarray), then ``--reference-tiles`` (24) of rank 0's tile boxes, evenly picked, binned from the
in-memory points with numpy masks (no time index); those tiles are checked equal (bitwise, by
hash) to the lazy reader's, and the time per tile and the memory of the loaded points are
reported next to the lazy path's.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import hashlib
import json
import resource
import time
from pathlib import Path

import numpy as np

MISSIONS = ("5nadirs", "sentinel3b")


def make_data(data_dir: Path, days: int) -> list[Path]:
    """The synthetic L3 year (skipped when the files exist)."""
    from oceanda import obs
    from oceanda.data.alongtrack_write import write_l3
    from oceanda.data.domains import DOMAINS

    d = DOMAINS["natl"]
    box = (d["lon_min"], d["lon_max"], d["lat_min"], d["lat_max"])
    sats = [s for name in MISSIONS for s in obs.constellation(name)]
    names = [s.name for s in sats]
    paths = [data_dir / f"dt_natl_{n}_phy_l3_2013-{days}d_283-5_27-64.nc" for n in names]
    if all(p.exists() for p in paths):
        return paths
    data_dir.mkdir(parents=True, exist_ok=True)
    acc: dict[int, list] = {k: [] for k in range(len(sats))}
    t0 = np.datetime64("2013-01-01")
    for tab in obs.iter_ground_tracks(sats, t0, t0 + np.timedelta64(days, "D"), box, chunk_days=5.0):
        for k in range(len(sats)):
            m = tab.sat == k
            acc[k].append((tab.time[m], tab.lon[m], tab.lat[m]))
    for k, p in enumerate(paths):
        t = np.concatenate([a[0] for a in acc[k]])
        lon = np.concatenate([a[1] for a in acc[k]])
        lat = np.concatenate([a[2] for a in acc[k]])
        days_f = (t - t0) / np.timedelta64(1, "D")
        sla = 0.2 * np.sin(np.deg2rad(lon) * 30 + 0.1 * days_f) * np.cos(np.deg2rad(lat) * 25)
        mdt = 0.5 * np.cos(np.deg2rad(lat) * 3)
        write_l3(p, time=t, lon=lon, lat=lat, sla_unfiltered=sla, mdt=mdt, mission=names[k])
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--data-dir", default="runs/bench_alongtrack")
    ap.add_argument("--patch", type=int, nargs=3, default=[15, 100, 100], help="patch size (gulfstream)")
    ap.add_argument("--stride", type=int, nargs=3, default=[5, 80, 80])
    ap.add_argument("--tile", type=int, nargs=3, default=[38, 100, 100])
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--reference-tiles", type=int, default=24, help="tiles of rank 0 the reference bins")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from oceanda.data.alongtrack import AlongTrackSource
    from oceanda.data.domains import get_domain
    from oceanda.data.patches import PatchGeometry, make_patches
    from oceanda.parallel.comm import get_comm
    from oceanda.parallel.layout import build_layout

    comm = get_comm(None)
    data_dir = Path(args.data_dir) / f"{args.days}d"
    t_make = time.perf_counter()
    if comm.rank == 0:
        paths = make_data(data_dir, args.days)
    comm.barrier()
    paths = make_data(data_dir, args.days) if comm.rank else paths
    make_s = time.perf_counter() - t_make
    grid = get_domain("natl")
    times = np.datetime64("2013-01-01") + np.arange(args.days).astype("timedelta64[D]")

    t0 = time.perf_counter()
    src = AlongTrackSource(paths, grid.lon, grid.lat, grid.ocean, times)
    open_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    qc = src.qc_counts(part=(comm.rank, comm.size))  # this rank's slice of every file, as infer does
    qc_s = time.perf_counter() - t0
    my_points = sum(sum(c.values()) for m, c in qc.items() if "excluded" not in c)
    n_points = sum(comm.allgather(my_points))

    geometry = PatchGeometry(size=tuple(args.patch), stride=tuple(args.stride), crop=(8, 8))
    patches = make_patches(geometry, src.shape, src.ocean)
    layout = build_layout(patches, list(args.tile), comm.size, src.ocean)
    boxes = []
    for a in layout.tiles_of(comm.rank):
        plist = layout.tile_patches[a]
        if layout.support[a] is None or len(plist) == 0:
            continue
        fp = np.asarray([[(lo, hi) for lo, hi in patches.footprint(p)] for p in plist])
        boxes.append(tuple((int(fp[:, k, 0].min()), int(fp[:, k, 1].max())) for k in range(3)))
    t0 = time.perf_counter()
    read_pts = 0
    cells = 0
    tiles = []
    for box in boxes:
        for f in src.files:  # points of the box's time range (what the reader classifies)
            lo = src._t0 + max(box[0][0], 0) * 86_400_000_000_000
            hi = src._t0 + min(box[0][1], src.shape[0]) * 86_400_000_000_000
            i0, i1 = src._range(f, lo, hi)
            read_pts += max(i1 - i0, 0) if (f._cache is None or f._cache[0] != (i0, i1)) else 0
        g = src.read(box)
        cells += int(np.isfinite(g).sum())
        if comm.rank == 0 and not args.no_reference:
            tiles.append(hashlib.sha256(g.tobytes()).hexdigest())  # not the tile: memory
    tiles_s = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    mine = {"rank": comm.rank, "tiles": len(boxes), "open_s": open_s, "qc_s": qc_s, "tiles_s": tiles_s,
            "points_in_files": n_points, "points_qc": my_points, "points_read_for_tiles": read_pts,
            "cells_observed": cells, "qc_points_per_s": my_points / qc_s, "tile_points_per_s": read_pts / tiles_s if tiles_s else None,
            "cells_per_s": cells / tiles_s if tiles_s else None, "peak_rss_mb": rss}

    ref = None
    if comm.rank == 0 and not args.no_reference:
        import xarray as xr

        t0 = time.perf_counter()
        pts = []
        for f in src.files:
            with xr.open_dataset(f.path) as ds:
                ds = ds.load()
                ssh = ds["sla_unfiltered"].values + ds["mdt"].values - ds["lwe"].values
                tt = ds["time"].values.astype("datetime64[ns]").astype(np.int64)
                pts.append((tt, ds["longitude"].values, ds["latitude"].values, ssh))
        load_s = time.perf_counter() - t0
        nbytes = sum(sum(a.nbytes for a in p) for p in pts)
        e_lon, e_lat = src._lon_edges, src._lat_edges  # the same cell edges
        step = max(1, len(boxes) // args.reference_tiles)
        picked = list(zip(boxes, tiles))[::step]
        t0 = time.perf_counter()
        same = True
        for box, mine_tile in picked:
            shape = tuple(hi - lo for lo, hi in box)
            flats, vals = [], []
            for tt, lo_, la_, v in pts:
                day = (tt - src._t0) // 86_400_000_000_000
                lon_g = np.mod(lo_ - e_lon[0], 360.0) + e_lon[0]
                ix = np.searchsorted(e_lon, lon_g, "right") - 1
                iy = np.searchsorted(e_lat, la_, "right") - 1
                dup = np.concatenate([[False], tt[1:] == tt[:-1]])
                ok = ((day >= box[0][0]) & (day < box[0][1]) & (iy >= box[1][0]) & (iy < box[1][1])
                      & (ix >= box[2][0]) & (ix < box[2][1]) & (day >= 0) & (day < src.shape[0])
                      & (iy >= 0) & (iy < src.shape[1]) & (ix >= 0) & (ix < src.shape[2]) & np.isfinite(v) & ~dup)
                ok[ok] &= grid.ocean[iy[ok], ix[ok]]
                flat = np.ravel_multi_index((day[ok] - box[0][0], iy[ok] - box[1][0], ix[ok] - box[2][0]), shape)
                flats.append(flat)
                vals.append(v[ok])
            flat, v = np.concatenate(flats), np.concatenate(vals)  # file order, as the reader sums
            s = np.bincount(flat, weights=v, minlength=int(np.prod(shape)))
            n = np.bincount(flat, minlength=int(np.prod(shape)))
            with np.errstate(invalid="ignore"):
                r = np.where(n > 0, s / np.maximum(n, 1), np.nan).reshape(shape)
            same &= hashlib.sha256(r.tobytes()).hexdigest() == mine_tile
        bin_s = time.perf_counter() - t0
        per_tile_lazy = tiles_s / max(len(boxes), 1)
        per_tile_ref = bin_s / max(len(picked), 1)
        ref = {"load_s": load_s, "tiles_checked": len(picked), "bin_tiles_s": bin_s, "loaded_mb": nbytes / 2**20,
               "tiles_equal_bitwise": same, "per_tile_s": per_tile_ref, "lazy_per_tile_s": per_tile_lazy,
               "ratio_per_tile": per_tile_ref / per_tile_lazy if per_tile_lazy else None}

    ranks = comm.allgather(mine)
    if comm.rank == 0:
        print(f"along-track read + gridding: natl {grid.ny}x{grid.nx} at 1/20 deg, {args.days} days, "
              f"{len(paths)} missions ({n_points:,} points in the files), {comm.size} rank(s), tiles {args.tile}, "
              f"patch {args.patch} stride {args.stride}; data made in {make_s:.1f} s")
        hdr = ("rank", "tiles", "open s", "QC pts", "QC pass s", "QC Mpts/s", "tiles s", "pts read", "tile Mpts/s",
               "cells", "Mcells/s", "RSS MB")
        print("  ".join(f"{h:>11}" for h in hdr))
        for r in ranks:
            vals = (r["rank"], r["tiles"], f"{r['open_s']:.2f}", f"{r['points_qc']:,}", f"{r['qc_s']:.2f}", f"{r['qc_points_per_s'] / 1e6:.2f}",
                    f"{r['tiles_s']:.2f}", f"{r['points_read_for_tiles']:,}",
                    f"{(r['tile_points_per_s'] or 0) / 1e6:.2f}", f"{r['cells_observed']:,}",
                    f"{(r['cells_per_s'] or 0) / 1e6:.3f}", f"{r['peak_rss_mb']:.0f}")
            print("  ".join(f"{v:>11}" for v in vals))
        if ref is not None:
            print(f"reference on rank 0 (every file loaded whole: {ref['load_s']:.2f} s, {ref['loaded_mb']:.0f} MB of "
                  f"points; then numpy masks per tile on {ref['tiles_checked']} of its tiles): "
                  f"{ref['per_tile_s']:.3f} s a tile vs {ref['lazy_per_tile_s']:.3f} s for the lazy reader "
                  f"({ref['ratio_per_tile']:.1f}x); those tiles bitwise equal: {ref['tiles_equal_bitwise']}")
        if args.json:
            Path(args.json).write_text(json.dumps({"days": args.days, "missions": len(paths), "points": n_points,
                                                   "ranks": ranks, "reference_rank0": ref, "tile": args.tile,
                                                   "patch": args.patch, "stride": args.stride}, indent=1))
            print(f"wrote {args.json}")
    src.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
