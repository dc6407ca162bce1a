"""Distributed reconstruction of SSH over DAW patches, blended across patches and ranks.

usage:
  oceanda infer                                          # Gulf Stream demo: OSSE -> OI -> scores
  oceanda infer obs_path=OBS.zarr out_dir=DIR [truth_path=TRUTH.zarr] [method=oi] [patch=anchor] [key=value ...]
  mpiexec -n 4 oceanda infer obs_path=... out_dir=...         # or srun (launch/job.sbatch), one rank per GPU
  oceanda infer obs_path=... out_dir=... dry_run=true         # print the rank / tile / patch map and exit

Cuts the observation grid into overlapping space-time patches (configs/patch), runs the
method (configs/method) on each, blends the outputs with weights tapering to zero at patch
borders, and writes DIR/analysis.zarr (ssh (time, lat, lon), chunks = tiles, CF attributes,
provenance). With truth_path=..., also DIR/scores.json (the keys of `oceanda evaluate`).

Each rank owns tiles (configs: tile) balanced by ocean work, computes the patches centred in
them and exchanges halo contributions with its neighbours. The output is bitwise the same
for any number of ranks. DIR/analysis.zarr appears only complete: the run writes
DIR/analysis.zarr.incomplete and renames it at the end. A killed run resumes when rerun with
the same command (completed tiles are not recomputed); an out_dir holding a different run is
refused, the run being identified by its config and the *content* of its inputs (replacing
obs.zarr in place and rerunning is refused, never answered with the old analysis). Per-rank logs in
DIR/logs, a summary in DIR/summary.json.

With no obs_path, runs the Gulf Stream demo: generates the OSSE in demo.dir/osse if missing,
infers into demo.dir/infer_<method> with `method` (OI by default) and then with each method of
demo.compare (by default 4DVarNet with the weights shipped in oceanda.weights), evaluates them
and prints their leaderboard rows side by side (demo.compare=[] runs `method` alone).

obs_path may also be L3 along-track files (a path, a glob or a list; CMEMS / data challenge
2021a layout, or an OSSE's alongtrack/*.nc): they are quality-controlled and binned daily onto
``grid`` (a named domain or a gridded store), per tile + halo (oceanda.data.alongtrack);
obs_exclude=[c2] leaves missions out; summary.json gets the per-mission QC counts.

method=4dvarnet with method.checkpoint=null uses the shipped Gulf Stream weights
(oceanda.weights.default_checkpoint(); `shipped:NAME` picks another shipped checkpoint).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oceanda import __version__
from oceanda.cli._identity import bcast_checked, digest_of, path_digest
from oceanda.data.files import check_out_dir
from oceanda.errors import ConfigError, InputError

#: suffix of analysis.zarr while its run is not finished (renamed to analysis.zarr when complete)
INCOMPLETE_SUFFIX = ".incomplete"

if TYPE_CHECKING:
    from oceanda.cli.schema import InferConfig

log = logging.getLogger("oceanda.infer")


def _list(value: tuple | None) -> list | None:
    return None if value is None else list(value)


def config_ident(cfg: InferConfig, obs_path: str) -> dict[str, Any]:
    """The config keys that determine the output."""
    ident = {
        "box": _list(cfg.box),
        "period": [str(p) for p in (cfg.dates or [])],
        "method": cfg.method.as_dict(),
        "patch": asdict(cfg.patch),
        "tile": list(cfg.tile),
        "dtype": str(cfg.dtype),
    }
    from oceanda.data.alongtrack import is_alongtrack

    if is_alongtrack(obs_path):  # along-track input: how it is read and gridded is part of the run
        ident |= {"grid": cfg.grid, "obs_exclude": list(cfg.obs_exclude), "alongtrack": asdict(cfg.alongtrack)}
    return ident


def input_digests(obs_path: str, checkpoint: str | None = None) -> dict[str, str]:
    """Content digests of the run's inputs: ``obs`` and, for a weights file, ``checkpoint``."""
    out = {"obs": path_digest(obs_path)}
    if checkpoint is not None and Path(checkpoint).is_file():
        from oceanda.data.integrity import file_digest

        out["checkpoint"] = file_digest(checkpoint)
    return out


def _obs_ident(obs_path: Any) -> str:
    """The observations' path (provenance): the resolved path, or the sorted along-track files."""
    from oceanda.data.alongtrack import is_alongtrack, resolve_paths

    if is_alongtrack(obs_path):
        return ";".join(str(p.resolve()) for p in resolve_paths(obs_path))
    return str(Path(obs_path).expanduser().resolve())


def _open_obs(cfg: InferConfig, obs_path: Any):
    """The observation source: gridded store (:class:`ObsSource`) or L3 along-track files
    (:class:`oceanda.data.alongtrack.AlongTrackSource`, binned daily onto ``grid``)."""
    from oceanda.data.alongtrack import (
        AlongTrackSource,
        analysis_grid,
        daily_period,
        is_alongtrack,
        resolve_paths,
    )
    from oceanda.data.store import ObsSource

    if not is_alongtrack(obs_path):
        return ObsSource(obs_path, box=_list(cfg.box), period=_list(cfg.dates))
    l3 = replace(cfg.alongtrack, exclude=tuple(cfg.obs_exclude) + tuple(cfg.alongtrack.exclude))
    grid = analysis_grid(cfg.grid, _list(cfg.box))
    return AlongTrackSource(resolve_paths(obs_path), grid.lon, grid.lat, grid.ocean,
                            daily_period(_list(cfg.dates)), l3)


def _demo_paths(cfg: InferConfig, comm) -> tuple[str, str, str]:
    """Generate the Gulf Stream OSSE if missing (rank 0); its obs, truth, out_dir."""
    import json
    import shutil

    from oceanda.data.osse import DEFAULT_TRUTH
    from oceanda.data.store import to_json_attr

    root = Path(cfg.demo.dir)
    osse = root / "osse"
    obs, truth = osse / "obs.zarr", osse / "truth.zarr"
    g = cfg.demo.generate
    # the OSSE the demo asks for, its default truth resolved (the default may change between versions)
    wanted = to_json_attr({**asdict(g), "truth": g.truth or DEFAULT_TRUTH, "figures": None})
    record = osse / "demo_osse.json"
    try:
        same = json.loads(record.read_text()) == json.loads(wanted)
    except (OSError, ValueError):
        same = False  # none recorded (an older demo folder): regenerate
    if not (same and obs.exists() and truth.exists()):
        if comm.rank == 0:
            from oceanda.cli.generate import quicklook, register_truths
            from oceanda.data.io import write_bytes_atomic
            from oceanda.data.osse import generate_osse

            state = "first run only" if not obs.exists() else "the demo's OSSE config changed: replacing it"
            print(f"oceanda infer: generating the Gulf Stream OSSE in {osse} ({state})")
            register_truths()
            generate_osse(out_dir=str(osse), domain=g.domain, obs=g.obs, period=g.period, truth=g.truth,
                          seed=g.seed, obs_noise=g.obs_noise, chunk_days=g.chunk_days, figures=quicklook(g.figures),
                          progress=cfg.progress, overwrite=True)  # the demo's own folder
            write_bytes_atomic(record, wanted.encode())
            for old in sorted(root.glob("infer_*")):  # the demo's analyses of the OSSE just replaced
                shutil.rmtree(old)
        comm.barrier()
    out_dir = cfg.out_dir or str(root / f"infer_{cfg.method.name}")
    return str(obs), str(truth), out_dir


def _check_truth_grid(truth_path: str, obs) -> None:
    """Fail before computing when the truth does not hold the observations' grid."""
    import numpy as np

    from oceanda.data import names as N
    from oceanda.data.io import check_values, open_dataset, require_finite, select_window

    truth = open_dataset(truth_path, [N.SSH], optional=[N.OCEAN])  # what evaluate reads of it
    pad = 1e-6
    box = [obs.lon[0] - pad, obs.lon[-1] + pad, obs.lat[0] - pad, obs.lat[-1] + pad]
    sub = select_window(truth, None, box, what=f"truth {truth_path}")
    check_values(sub[N.SSH], f"truth {truth_path}")  # +-inf or absurd values: before any work
    for dim, ref in ((N.LON, obs.lon), (N.LAT, obs.lat)):
        got = sub[dim].values
        if got.shape != ref.shape or not np.allclose(got, ref, atol=1e-6, rtol=0):
            raise InputError(f"truth {truth_path}: its '{dim}' grid differs from the observations' "
                             f"({len(got)} vs {len(ref)} values in the domain): evaluate on the same grid")
    require_finite(sub[N.SSH], f"truth {truth_path}: variable '{N.SSH}' in the observations' domain")


def _method_kwargs(cfg: InferConfig) -> tuple[str, dict[str, Any]]:
    """``(name, kwargs)`` of ``cfg.method`` (:meth:`~oceanda.cli.schema.MethodConfig.kwargs`)."""
    return cfg.method.name, cfg.method.kwargs()


def run(cfg: InferConfig) -> int:
    """``oceanda infer``: see the module docstring."""
    from oceanda.parallel.comm import get_comm

    comm = get_comm(cfg.system.use_mpi)
    from oceanda.parallel.threads import limit_threads

    limit_threads(comm, cfg.system.threads)  # before the demo's OSSE is generated too
    if cfg.obs_path is None:
        if not cfg.dry_run:
            check_out_dir(cfg.demo.dir, "demo.dir")
            if cfg.out_dir is not None:
                check_out_dir(cfg.out_dir)
        runs = [cfg]
        if not cfg.dry_run:
            runs += cfg.compare_runs()
        from oceanda.assim.registry import build_method

        methods = []
        for sub in runs:  # every method (name, options, checkpoint) built before the long first run
            name, method_cfg = _method_kwargs(sub)
            methods.append(build_method(name, **method_cfg))
        rows = []
        for sub, method in zip(runs, methods):
            obs_path, truth_path, out_dir = _demo_paths(sub, comm)
            row = _run_one(sub, comm, obs_path, truth_path, out_dir, method)
            if row is not None:
                rows.append(row)
        if comm.rank == 0 and len(rows) > 1:
            from oceanda.cli.evaluate import format_table

            print("\nGulf Stream demo, side by side (same observations, same scoring window):")
            print(format_table(rows))
        return 0
    obs_path, truth_path, out_dir = cfg.obs_path, cfg.truth_path, cfg.out_dir
    if out_dir is None and not cfg.dry_run:
        raise ConfigError("out_dir is required with obs_path=... (e.g. out_dir=runs/oi)")
    if not cfg.dry_run:
        check_out_dir(out_dir)  # a file or a read-only folder: refused before any work
    _run_one(cfg, comm, obs_path, truth_path, out_dir)
    return 0


def _run_one(cfg: InferConfig, comm, obs_path: str, truth_path: str | None,
             out_dir: str | None, method: Any = None) -> dict[str, Any] | None:
    """One inference run (+ evaluation when ``truth_path``); the scores on rank 0, else None.
    ``method``: the method built from ``cfg.method`` (None: built here)."""
    from oceanda.assim.registry import build_method
    from oceanda.data.patches import make_patches
    from oceanda.data.store import AnalysisStore, to_json_attr
    from oceanda.parallel.device import bind_device
    from oceanda.parallel.driver import run_inference
    from oceanda.parallel.layout import build_layout
    from oceanda.parallel.restart import RunState

    name, method_cfg = _method_kwargs(cfg)
    if method is None:
        method = build_method(name, **method_cfg)
    geometry = cfg.patch
    n_time = getattr(getattr(method, "cfg", None), "n_time", None)  # trained window length (4DVarNet)
    if isinstance(n_time, int) and geometry.size[0] != n_time:
        raise ConfigError(f"patch.size[0]={geometry.size[0]} days does not fit method={name} "
                          f"({method_cfg.get('checkpoint', '')} was trained on {n_time}-day windows): "
                          f"set patch.size[0]={n_time}")
    from oceanda.parallel.driver import check_method

    allow_mm = cfg.allow_mode_mismatch
    check_method(method, geometry, allow_mm)  # a checkpoint trained for another mode: before any write
    tile = list(cfg.tile)

    obs = _open_obs(cfg, obs_path)
    qc = None
    if hasattr(obs, "qc_counts"):  # along-track input: each rank counts a slice of the files
        from oceanda.data.alongtrack import format_qc, merge_qc

        qc = merge_qc(comm.allgather(obs.qc_counts(part=(comm.rank, comm.size))))
        if comm.rank == 0:
            print(f"oceanda infer: along-track observations, points per mission and QC outcome:\n{format_qc(qc)}")
    n_observed = sum(c.get("used", 0) for c in qc.values()) if qc is not None else obs.count_observed()
    if n_observed == 0:
        from oceanda.data import names as N

        raise InputError(f"observations {obs_path}: the observation window (period "
                         f"{_list(cfg.dates)}, box {_list(cfg.box)}) holds no "
                         f"observation (variable '{N.SSH_OBS}' all NaN)")
    if truth_path:  # read once, on rank 0; its refusal raised on every rank
        bcast_checked(comm, lambda: _check_truth_grid(truth_path, obs))
    try:
        patches = make_patches(geometry, obs.shape, obs.ocean)
    except InputError as exc:  # a domain smaller than a patch: say which observations
        raise InputError(f"observations {obs_path}: {exc}") from None
    planned = comm.size
    if cfg.dry_run and cfg.ranks is not None:
        planned = cfg.ranks
    layout = build_layout(patches, tile, planned, obs.ocean)
    if cfg.dry_run:
        if comm.rank == 0:
            print(f"oceanda infer (dry run): obs {obs_path}, method {name}, patches {geometry.size} "
                  f"stride {geometry.stride}")
            print(layout.describe())
        return None

    out = Path(out_dir)
    analysis = out / "analysis.zarr"
    working = out / f"analysis.zarr{INCOMPLETE_SUFFIX}"  # renamed analysis.zarr once complete
    checkpoint = method_cfg.get("checkpoint")  # trained methods: new weights are a new run
    inputs = bcast_checked(comm, lambda: input_digests(obs_path, checkpoint))
    ident = config_ident(cfg, obs_path)
    rid = digest_of({"inputs": inputs, "config": ident})
    state = RunState(out, rid, inputs=inputs, config=digest_of(ident))
    state.check(analysis, working)  # every rank, before anything is written
    complete = analysis.exists()  # a finished run, rerun: nothing to compute
    comm.barrier()
    if comm.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        state.init()
        if not complete and not working.exists():
            AnalysisStore.create(
                working, time=obs.time, lat=obs.lat, lon=obs.lon, ocean=obs.ocean,
                chunks=layout.tile_shape, dtype=str(cfg.dtype),
                attrs={"title": f"oceanda {name} analysis of sea surface height",
                       "method": name, "source": f"oceanda {__version__}",
                       "history": f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} oceanda infer",
                       "observations": _obs_ident(obs_path), "observations_digest": inputs["obs"],
                       "run_id": rid,
                       "oceanda_version": __version__,
                       "oceanda_config": cfg.source_yaml,
                       "patch": to_json_attr(asdict(cfg.patch)),
                       "method_config": to_json_attr({"name": name, **method_cfg})})
    comm.barrier()
    store = AnalysisStore(analysis) if complete else AnalysisStore(working, final=analysis)
    device = bind_device(comm, cfg.system.device, cfg.system.threads)
    summary = run_inference(obs=obs, ocean=obs.ocean, patches=patches, layout=layout,
                            method=method, store=store, state=state, comm=comm, device=device,
                            batch_size=cfg.batch_size, progress=cfg.progress,
                            log_dir=out / "logs", allow_mode_mismatch=allow_mm)
    if comm.rank != 0:
        return None
    from oceanda.data.io import write_json_atomic

    write_json_atomic(out / "summary.json", {"method": name, "run_id": rid, **summary,
                                              **({"alongtrack_qc": qc} if qc is not None else {})})
    sh = summary["overhead_share"]
    print(f"oceanda infer: {name}: {summary['patches_computed']}/{summary['patches_total']} patches on "
          f"{summary['ranks']} rank(s) in {summary['wall_s']:.1f} s "
          f"({summary['patches_per_s']:.2f} patches/s"
          + (f", {summary['ocean_cells_per_s']:.3g} ocean cells/s" if summary["ocean_cells_per_s"] else "")
          + f"); method {100 * summary['method_share']:.1f}%, blend {100 * sh['blend']:.1f}%, "
          f"halo {100 * sh['halo']:.1f}%, I/O {100 * (sh['read'] + sh['write'] + sh['checkpoint']):.1f}%, "
          f"waiting for other ranks {100 * sh['wait']:.1f}%")
    print(f"wrote {analysis}")
    if not truth_path:
        return None
    from oceanda.cli.evaluate import evaluate_paths, format_table

    ev = cfg.evaluate
    result = evaluate_paths(truth_path, analysis, period=_list(ev.period), box=_list(ev.box),
                            out_dir=out, figures=ev.figures, name=name)
    print()
    print(format_table([result]))
    print(f"\nwrote {out / 'scores.json'}")
    return result
