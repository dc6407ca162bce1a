"""Distributed inference driver: patches -> method -> blended, halo-exchanged, written tiles.

Every rank runs :func:`run_inference` with the same (pure) :class:`~.layout.Layout`:

1. **compute** -- for each tile ``A`` it owns (increasing), read the observations of the
   tile's patch footprints (tile + halo, padding outside the domain), run its patches in
   canonical order in batches of ``batch_size`` through the method, and accumulate
   ``num = sum_p w_p out_p`` and ``den = sum_p w_p`` (float64) over the tile's support box;
   save them (restart partial). A tile whose partial exists is loaded, not recomputed; a
   tile whose every receiving tile is already written is skipped.
2. **halo exchange** -- the part of ``A``'s support box inside tile ``B`` goes to
   ``owner(B)``: one float64 buffer per neighbour rank (mpi4py ``Isend``/``Irecv``), items
   in the order both sides derive from the layout.
3. **blend and write** -- for each owned tile ``B`` not written yet:
   ``x = (sum_A num_{A->B}) / (sum_A den_{A->B})`` with ``A`` increasing, NaN on land;
   write the tile's (chunk-aligned) region, then its marker.

Uncertainty outputs. When the method returns ``std``, the blended ``ssh_std`` is
``sqrt(sum_p w_p std_p^2 / sum_p w_p)``: for convex weights ``a_p`` this bounds the error
std of the blended mean from above (``Var(sum a_p e_p) <= (sum a_p std_p)^2 <= sum a_p
std_p^2``). Members are blended member by member with the same weights (``ssh_members``).

Why the output is bitwise identical on any number of ranks: every floating-point sum runs
in an order fixed by the tiles and the canonical patch order (patches within a tile,
then tiles), never by the rank count; methods are per-patch deterministic and batches are
formed within a tile.

Modes (:attr:`oceanda.data.patches.PatchGeometry.mode`): mapping, near-real-time and
forecast differ only in the patch geometry: the anchor (reconstructed) day of each window
and, for a forecast of lead ``L``, the observations of the window's last ``L`` days, which
are dropped here before the method sees the patch. :func:`check_method` (called by
:func:`run_inference` before any work; callers may call it before creating outputs)
refuses a trained method whose checkpoint records another mode.

Feedback: rank 0 draws one tqdm bar for all ranks' patches (other ranks report with
non-blocking messages), each rank logs to ``log_dir/rankNNNN.log``, and a summary (patches,
time, patches/s, ocean cells/s, time shares, peak memory) is gathered on rank 0.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from oceanda.assim.base import PatchBatch
from oceanda.data import names as N
from oceanda.data.grid import Grid
from oceanda.data.patches import Box, PatchGeometry, PatchSet, check_trained_mode, mode_record_from_patch
from oceanda.data.store import extend_coord
from oceanda.errors import ConfigError, InputError, NumericalError
from oceanda.parallel.layout import Layout, box_size

TAG_PROGRESS = 11
TAG_HALO = 12

#: test hook: ``OCEANDA_FAIL_AFTER_TILES=N`` makes rank ``OCEANDA_FAIL_RANK`` (default 0)
#: die (``os._exit(17)``) right after saving its N-th computed tile (simulated crash); with
#: ``OCEANDA_FAIL_AS=error`` it raises a :class:`NumericalError` there instead (a user-level
#: failure of one rank while the others go on)
FAIL_AFTER_ENV = "OCEANDA_FAIL_AFTER_TILES"
FAIL_RANK_ENV = "OCEANDA_FAIL_RANK"
FAIL_AS_ENV = "OCEANDA_FAIL_AS"


@dataclass
class Timers:
    """Seconds spent per phase on one rank."""

    read: float = 0.0
    method: float = 0.0
    blend: float = 0.0
    halo: float = 0.0
    wait: float = 0.0
    write: float = 0.0
    checkpoint: float = 0.0
    counts: dict = field(default_factory=lambda: defaultdict(int))


def _rank_logger(log_dir: str | os.PathLike | None, rank: int) -> logging.Logger:
    logger = logging.getLogger(f"oceanda.infer.rank{rank}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        h = logging.FileHandler(Path(log_dir) / f"rank{rank:04d}.log")
        h.setFormatter(logging.Formatter(f"%(asctime)s rank {rank}: %(message)s"))
        logger.addHandler(h)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


class _Progress:
    """One bar on rank 0 for every rank's patches; non-blocking reports from the others."""

    def __init__(self, comm, total: int, enabled: bool) -> None:
        self.comm, self.total, self.done = comm, total, 0
        self.requests = []
        self.bar = None
        if comm.rank == 0 and enabled and total > 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="patch", desc="oceanda infer", file=sys.stderr,
                            dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self.comm.rank == 0:
            self._add(n)
            self.poll()
        else:
            self.requests.append(self.comm.isend_obj(n, 0, TAG_PROGRESS))

    def _add(self, n: int) -> None:
        self.done += n
        if self.bar is not None and getattr(self.comm, "failed", bool)():
            self.bar.disable = True  # another rank failed and prints its error: draw nothing after it
            self.bar = None
        if self.bar is not None:
            self.bar.update(n)

    def poll(self) -> None:
        for n in self.comm.poll_obj(TAG_PROGRESS):
            self._add(n)

    def finish(self) -> None:
        if self.comm.rank == 0:
            while self.done < self.total:
                self.poll()
                if self.bar is not None and getattr(self.comm, "failed", bool)():
                    self.bar.disable, self.bar = True, None
                time.sleep(0.02)
            if self.bar is not None:
                self.bar.close()
        else:
            self.comm.waitall(self.requests)


def trained_mode(method) -> dict | None:
    """The patch mode a trained method was trained for (a
    :meth:`~oceanda.data.patches.PatchGeometry.mode_record`), or ``None`` when unknown.

    Taken from ``method.trained_mode`` when the method exposes it, else from the checkpoint
    file named by ``method.checkpoint`` (``extra["mode"]``, or ``extra["patch"]`` of
    checkpoints written before modes were recorded). Methods without a checkpoint (OI,
    SPDE-OI) have no mode: they work in any.
    """
    rec = getattr(method, "trained_mode", None)
    if isinstance(rec, dict):
        return rec
    path = getattr(method, "checkpoint", None)
    if not isinstance(path, (str, os.PathLike)) or not Path(path).expanduser().is_file():
        return None
    try:
        ck = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    except Exception as exc:  # the method read it already: a file changed under us
        raise InputError(f"checkpoint {path}: cannot be read (corrupted or not a torch file: "
                         f"{type(exc).__name__}: {str(exc)[:200]})") from None
    extra = ck.get("extra") if isinstance(ck, dict) else None
    if not isinstance(extra, dict):
        return None
    rec = extra.get("mode")
    return rec if isinstance(rec, dict) else mode_record_from_patch(extra.get("patch"))


def check_method(method, geometry: PatchGeometry, allow_mode_mismatch: bool = False,
                 log: logging.Logger | None = None) -> list[str]:
    """Refuse a trained ``method`` whose checkpoint was trained for another patch mode or
    window length than ``geometry`` (:func:`oceanda.data.patches.check_trained_mode`);
    with ``allow_mode_mismatch`` log the difference instead and return it.

    Raises:
        ConfigError: naming the checkpoint, its mode and the patches' mode.
    """
    source = getattr(method, "checkpoint", None)
    source = f"checkpoint {source}" if source else f"method {type(method).__name__}"
    diffs = check_trained_mode(trained_mode(method), geometry, source, allow_mode_mismatch)
    for d in diffs:
        (log or logging.getLogger("oceanda.infer")).warning("allow_mode_mismatch: %s", d)
    return diffs


def _compute_tile(a: int, *, obs, ocean: np.ndarray, patches: PatchSet, layout: Layout, method,
                  batch_size: int, device: torch.device, lon: np.ndarray, lat: np.ndarray,
                  tdays: np.ndarray, timers: Timers, on_batch) -> dict[str, np.ndarray]:
    """Weighted sums over tile ``a``'s support box, patches in canonical order:
    ``den = sum w``, ``mean = sum w x``, and when the method returns them
    ``var = sum w std^2`` and ``members = sum w x_i`` (N, ...)."""
    sup = layout.support[a]
    plist = layout.tile_patches[a]
    T, H, W = patches.geometry.size
    fp = np.asarray([[(lo, hi) for lo, hi in patches.footprint(p)] for p in plist])  # (P, 3, 2)
    fbox = tuple((int(fp[:, k, 0].min()), int(fp[:, k, 1].max())) for k in range(3))
    t0 = time.perf_counter()
    obs_box = obs.read(fbox)
    timers.read += time.perf_counter() - t0
    ny, nx = ocean.shape
    ocean_box = np.zeros((fbox[1][1] - fbox[1][0], fbox[2][1] - fbox[2][0]), bool)
    ys = slice(max(fbox[1][0], 0), min(fbox[1][1], ny))
    xs = slice(max(fbox[2][0], 0), min(fbox[2][1], nx))
    ocean_box[ys.start - fbox[1][0]:ys.stop - fbox[1][0], xs.start - fbox[2][0]:xs.stop - fbox[2][0]] = ocean[ys, xs]
    lon_box = extend_coord(lon, *fbox[2])
    lat_box = extend_coord(lat, *fbox[1])
    t_box = extend_coord(tdays, *fbox[0])
    box_grid = Grid(lon=lon_box, lat=lat_box, ocean=ocean_box)  # WGS84 metric factors
    dx_box, dy_box = box_grid.dx_m, box_grid.dy_m

    shape = tuple(hi - lo for lo, hi in sup)
    acc: dict[str, np.ndarray] = {"den": np.zeros(shape)}
    w = patches.weights
    (lt0, lt1), (ly0, ly1), (lx0, lx1) = w.support
    wfull = w.full()
    for b0 in range(0, len(plist), batch_size):
        chunk = plist[b0:b0 + batch_size]
        loc = [patches.starts[p] - np.array([f[0] for f in fbox]) for p in chunk]
        sl = [tuple(slice(int(o), int(o) + n) for o, n in zip(l, (T, H, W))) for l in loc]
        batch = PatchBatch(
            # forecast: observations after (target day - lead) never reach the method
            obs=torch.from_numpy(patches.geometry.mask_obs(np.stack([obs_box[s] for s in sl]))),
            ocean=torch.from_numpy(np.stack([ocean_box[s[1], s[2]] for s in sl])),
            lon=torch.from_numpy(np.stack([lon_box[s[2]] for s in sl])),
            lat=torch.from_numpy(np.stack([lat_box[s[1]] for s in sl])),
            time=torch.from_numpy(np.stack([t_box[s[0]] for s in sl])),
            dx_m=torch.from_numpy(np.stack([dx_box[s[1], s[2]] for s in sl])),
            dy_m=torch.from_numpy(np.stack([dy_box[s[1], s[2]] for s in sl])),
        ).to(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            res = method(batch)
        outs = {"mean": res.mean}
        if res.std is not None:
            outs["var"] = res.std.square()  # variances are blended (see run_inference)
        if res.members is not None:
            outs["members"] = res.members
        outs = {k: v.detach().to("cpu", torch.float64).numpy() for k, v in outs.items()}
        t1 = time.perf_counter()
        timers.method += t1 - t0
        for name, v in outs.items():
            if name not in acc:
                acc[name] = np.zeros(v.shape[1:-3] + shape)
        for k, p in enumerate(chunk):
            # global support of this patch, clipped; local offsets into the outputs and acc
            start = patches.starts[p]
            g = [(max(int(start[d]) + lo, sup[d][0]), min(int(start[d]) + hi, sup[d][1]))
                 for d, (lo, hi) in enumerate(((lt0, lt1), (ly0, ly1), (lx0, lx1)))]
            src = tuple(slice(g0 - int(start[d]), g1 - int(start[d])) for d, (g0, g1) in enumerate(g))
            dst = tuple(slice(g0 - sup[d][0], g1 - sup[d][0]) for d, (g0, g1) in enumerate(g))
            wk = wfull[src]
            oc = ocean_box[src[1].start + loc[k][1]:src[1].stop + loc[k][1],
                           src[2].start + loc[k][2]:src[2].stop + loc[k][2]]
            for name, v in outs.items():
                val = v[k][(Ellipsis, *src)]
                if not np.isfinite(val[..., oc]).all():
                    raise NumericalError(f"method returned NaN/inf ({name}) on ocean cells of patch "
                                         f"{int(p)} (start t, y, x = {tuple(int(x) for x in start)})")
                acc[name][(Ellipsis, *dst)] += wk * np.where(oc[None], val, 0.0)
            acc["den"][dst] += wk
        timers.blend += time.perf_counter() - t1
        on_batch(len(chunk))
    return acc


#: order of the blended fields in partials and halo buffers
FIELDS = ("den", "mean", "var", "members")


def field_spec(partial: dict[str, np.ndarray]) -> tuple:
    """``((name, leading shape), ...)`` of a partial's fields, in :data:`FIELDS` order."""
    return tuple((k, tuple(partial[k].shape[:-3])) for k in FIELDS if k in partial)


def _spec_size(spec: tuple) -> int:
    return sum(int(np.prod(lead)) for _, lead in spec)


def _piece(arr: np.ndarray, sup: Box, box: Box) -> np.ndarray:
    """The global ``box`` of an array (..., t, y, x) laid over the global ``sup`` box."""
    return arr[(Ellipsis, *(slice(lo - s0, hi - s0) for (lo, hi), (s0, _) in zip(box, sup)))]


def run_inference(*, obs, ocean: np.ndarray, patches: PatchSet, layout: Layout, method, store,
                  state, comm, device: torch.device | str = "cpu", batch_size: int = 8,
                  progress: bool = True, log_dir: str | os.PathLike | None = None,
                  allow_mode_mismatch: bool = False) -> dict:
    """Run the distributed inference (see the module docstring); every rank calls it.

    Args:
        obs: observation source with ``read(box)``, ``lon``, ``lat``, ``time_days``
            (:class:`oceanda.data.store.ObsSource`).
        ocean: (ny, nx) bool land mask.
        patches, layout: from :func:`oceanda.data.patches.make_patches` and
            :func:`oceanda.parallel.layout.build_layout` (same on every rank).
        method: a :class:`oceanda.assim.base.Method`.
        store: an opened :class:`oceanda.data.store.AnalysisStore` (created by rank 0).
        state: :class:`oceanda.parallel.restart.RunState` (manifest initialised).
        comm: communicator (:func:`oceanda.parallel.comm.get_comm`).
        allow_mode_mismatch: run a trained method on patches of another mode than it was
            trained for (:func:`check_method`; by default a :class:`ConfigError`).

    Returns:
        The run summary (same dict on every rank; rank 0 also finalises the store).
    """
    if int(batch_size) < 1:  # range(0, n, batch_size) would skip every patch and save empty partials
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    rank = comm.rank
    log = _rank_logger(log_dir, rank)
    check_method(method, patches.geometry, allow_mode_mismatch, log)
    timers = Timers()
    wall0 = time.perf_counter()
    device = torch.device(device)
    ocean = np.asarray(ocean, bool)
    written = state.written()  # read by every rank before anyone writes this run
    ntiles = len(layout.tiles)
    needed = [any(b not in written for b, _ in layout.contributions[a]) for a in range(ntiles)]
    own = layout.tiles_of(rank)
    to_compute = [a for a in own if needed[a] and not state.has_partial(a)]
    my_work = sum(len(layout.tile_patches[a]) for a in to_compute)
    total = sum(comm.allgather(my_work))
    from oceanda.parallel.threads import describe, thread_limits

    threads = thread_limits()
    log.info("threads: %s", describe(threads))
    log.info("tiles %s; %d to compute (%d patches), %d already written in total",
             own, len(to_compute), my_work, len(written))
    bar = _Progress(comm, total, progress)
    fail_after = int(os.environ.get(FAIL_AFTER_ENV, "0") or 0)
    fail_rank = int(os.environ.get(FAIL_RANK_ENV, "0") or 0)

    # ---- 1. compute (or load) own tiles
    partial: dict[int, dict[str, np.ndarray]] = {}
    lon, lat, tdays = obs.lon, obs.lat, obs.time_days
    computed = 0
    for a in own:
        if not needed[a] or layout.support[a] is None:
            continue
        if a not in to_compute:
            t0 = time.perf_counter()
            partial[a] = state.load_partial(a)
            timers.checkpoint += time.perf_counter() - t0
            log.info("loaded tile %d partial sums (computed by an earlier run)", a)
            continue
        t0 = time.perf_counter()
        acc = _compute_tile(a, obs=obs, ocean=ocean, patches=patches, layout=layout,
                            method=method, batch_size=batch_size, device=device, lon=lon,
                            lat=lat, tdays=tdays, timers=timers, on_batch=bar.update)
        t1 = time.perf_counter()
        state.save_partial(a, acc)
        timers.checkpoint += time.perf_counter() - t1
        partial[a] = acc
        timers.counts["patches"] += len(layout.tile_patches[a])
        timers.counts["tiles_computed"] += 1
        log.info("computed tile %d: %d patches in %.2f s", a, len(layout.tile_patches[a]), t1 - t0)
        computed += 1
        if fail_after and rank == fail_rank and computed >= fail_after:
            if os.environ.get(FAIL_AS_ENV) == "error":
                raise NumericalError(f"{FAIL_AFTER_ENV}={fail_after}: simulated failure of rank {rank} "
                                     f"after tile {a}")
            log.info("%s=%d: simulated crash", FAIL_AFTER_ENV, fail_after)
            logging.shutdown()
            os._exit(17)
    t_wait = time.perf_counter()
    bar.finish()
    # the blended fields (mean; std, members when the method returns them): same everywhere
    specs = {sp for sp in comm.allgather(field_spec(next(iter(partial.values()))) if partial else None)
             if sp is not None}
    if len(specs) > 1:
        raise NumericalError(f"patches returned different outputs (std / members) on different "
                             f"tiles: {sorted(specs)}")
    spec = specs.pop() if specs else (("den", ()), ("mean", ()))
    if rank == 0:
        store.ensure_outputs(dict(spec), layout.tile_shape)

    # ---- 2. halo exchange: one buffer per neighbour rank, layout-defined order
    comm.barrier()  # time waiting for the slowest rank = load imbalance, not exchange
    timers.wait += time.perf_counter() - t_wait
    t0 = time.perf_counter()

    def items(src: int, dst: int):
        return [(a, b, box) for a, b, box in layout.messages(src, dst) if b not in written]

    requests, recv_bufs = [], {}
    for s in layout.neighbours(rank):
        n_in = _spec_size(spec) * sum(box_size(box) for _, _, box in items(s, rank))
        if n_in:
            recv_bufs[s] = np.empty(n_in)
            requests.append(comm.Irecv(recv_bufs[s], source=s, tag=TAG_HALO))
    send_bufs = []
    for s in layout.neighbours(rank):
        its = items(rank, s)
        if not its:
            continue
        parts = []
        for a, _, box in its:
            parts += [_piece(partial[a][k], layout.support[a], box).ravel() for k, _ in spec]
        buf = np.ascontiguousarray(np.concatenate(parts))
        send_bufs.append(buf)
        requests.append(comm.Isend(buf, dest=s, tag=TAG_HALO))
    comm.waitall(requests)
    received: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    for s, buf in recv_bufs.items():
        off = 0
        for a, b, box in items(s, rank):
            shape = tuple(hi - lo for lo, hi in box)
            got = {}
            for k, lead in spec:
                n = int(np.prod(lead)) * box_size(box)
                got[k] = buf[off:off + n].reshape(lead + shape)
                off += n
            received[(a, b)] = got
    timers.halo += time.perf_counter() - t0

    # ---- 3. blend in tile order, normalise, write own tiles
    n_written = 0
    for b in own:
        if b in written:
            continue
        t0 = time.perf_counter()
        tile = layout.tiles[b]
        tot = {k: np.zeros(lead + tile.shape) for k, lead in spec}
        for a, box in layout.incoming(b):
            dst = tuple(slice(lo - t0_, hi - t0_) for (lo, hi), (t0_, _) in zip(box, tile.box))
            for k, _ in spec:
                piece = (_piece(partial[a][k], layout.support[a], box) if layout.owner[a] == rank
                         else received[(a, b)][k])
                tot[k][(Ellipsis, *dst)] += piece
        (_, _), (y0, y1), (x0, x1) = tile.box
        den = tot.pop("den")
        oc = np.broadcast_to(ocean[y0:y1, x0:x1][None], den.shape)
        if (oc & (den <= 0)).any():
            raise NumericalError(f"tile {b}: ocean cells without any patch weight (geometry bug)")
        safe = np.where(den > 0, den, 1.0)
        outs = {N.SSH: np.where(oc, tot["mean"] / safe, np.nan)}
        if "var" in tot:
            outs[N.SSH_STD] = np.where(oc, np.sqrt(np.maximum(tot["var"] / safe, 0.0)), np.nan)
        if "members" in tot:
            outs[N.SSH_MEMBERS] = np.where(oc[None], tot["members"] / safe, np.nan)
        t1 = time.perf_counter()
        timers.blend += t1 - t0
        for name, data in outs.items():
            region = tile.box if data.ndim == 3 else ((0, data.shape[0]), *tile.box)
            store.write_region(name, region, data)
        state.mark_written(b)
        timers.write += time.perf_counter() - t1
        n_written += 1
        log.info("wrote tile %d", b)
    timers.counts["tiles_written"] = n_written
    comm.barrier()
    wall = time.perf_counter() - wall0

    # ---- summary
    mine = {"rank": rank, "patches": int(timers.counts["patches"]),
            "tiles_computed": int(timers.counts["tiles_computed"]), "tiles_written": n_written,
            "read_s": timers.read, "method_s": timers.method, "blend_s": timers.blend,
            "halo_s": timers.halo, "wait_s": timers.wait, "write_s": timers.write, "checkpoint_s": timers.checkpoint,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "threads": threads}
    ranks = comm.allgather(mine)
    patches_done = sum(r["patches"] for r in ranks)
    nt = layout.shape[0]
    ocean_cells = int(ocean.sum()) * nt
    summary = {
        "ranks": comm.size, "tiles": ntiles, "patches_total": len(patches),
        "patches_computed": patches_done, "wall_s": wall,
        "patches_per_s": patches_done / wall if wall > 0 else 0.0,
        "ocean_cells_per_s": ocean_cells / wall if wall > 0 and patches_done == len(patches) else None,
        "overhead_share": {k: sum(r[f"{k}_s"] for r in ranks) / (wall * comm.size)
                           for k in ("read", "blend", "halo", "write", "checkpoint", "wait")},
        "method_share": sum(r["method_s"] for r in ranks) / (wall * comm.size),
        "per_rank": ranks,
    }
    log.info("done: %s", {k: v for k, v in summary.items() if k != "per_rank"})
    if rank == 0 and len(state.written()) == ntiles:
        store.finalize()
        state.clear_partials()
    comm.barrier()
    for h in list(log.handlers):
        h.flush()
    return summary
