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
for any number of ranks. A killed run resumes when rerun with the same command (completed
tiles are not recomputed); an out_dir holding a different run is refused. Per-rank logs in
DIR/logs, a summary in DIR/summary.json.

With no obs_path, runs the Gulf Stream demo: generates the OSSE in demo.dir/osse if missing,
infers into demo.dir/infer_<method> with `method` (OI by default) and then with each method of
demo.compare (by default 4DVarNet with the weights shipped in oceanda.weights), evaluates them
and prints their leaderboard rows side by side (demo.compare=[] runs `method` alone).

method=4dvarnet with method.checkpoint=null uses the shipped Gulf Stream weights
(oceanda.weights.default_checkpoint(); `shipped:NAME` picks another shipped checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oceanda import __version__
from oceanda.errors import ConfigError, InputError, OceandaError

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger("oceanda.infer")


def _container(cfg: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


def _list(cfg: DictConfig, key: str, length: int) -> list | None:
    value = _container(cfg.get(key))
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != length:
        raise ConfigError(f"{key} must be a list of {length} values or null, got {value!r}")
    return value


def run_id(cfg: DictConfig, obs_path: str, checkpoint: str | None = None) -> str:
    """Hash of everything that determines the output (not ranks, devices or progress); with
    ``checkpoint``, also the content of the weights file (so new weights are a new run)."""
    ident = {
        "obs": str(Path(obs_path).expanduser().resolve()),
        "box": _container(cfg.get("box")),
        "period": [str(p) for p in (_container(cfg.get("dates")) or [])],
        "method": _container(cfg.method),
        "patch": _container(cfg.patch),
        "tile": _container(cfg.tile),
        "dtype": str(cfg.dtype),
    }
    if checkpoint is not None and Path(checkpoint).is_file():
        ident["checkpoint_sha256"] = _file_digest(checkpoint)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _demo_paths(cfg: DictConfig, comm) -> tuple[str, str, str]:
    """Generate the Gulf Stream OSSE if missing (rank 0); its obs, truth, out_dir."""
    root = Path(cfg.demo.dir)
    osse = root / "osse"
    obs, truth = osse / "obs.zarr", osse / "truth.zarr"
    if not (obs.exists() and truth.exists()):
        if comm.rank == 0:
            try:
                from oceanda.data.osse import generate_osse
            except ImportError as exc:
                raise ConfigError(f"the demo needs `oceanda generate` (oceanda.data.osse): {exc}") from None
            print(f"oceanda infer: generating the Gulf Stream OSSE in {osse} (first run only)")
            generate_osse(out_dir=str(osse), **_container(cfg.demo.generate))
        comm.barrier()
    out_dir = cfg.out_dir or str(root / f"infer_{cfg.method.name}")
    return str(obs), str(truth), out_dir


def _check_truth_grid(truth_path: str, obs) -> None:
    """Fail before computing when the truth does not hold the observations' grid."""
    import numpy as np

    from oceanda.data import names as N
    from oceanda.data.io import open_dataset, select_window

    truth = open_dataset(truth_path, [N.SSH])
    pad = 1e-6
    box = [obs.lon[0] - pad, obs.lon[-1] + pad, obs.lat[0] - pad, obs.lat[-1] + pad]
    sub = select_window(truth, None, box, what=f"truth {truth_path}")
    for dim, ref in ((N.LON, obs.lon), (N.LAT, obs.lat)):
        got = sub[dim].values
        if got.shape != ref.shape or not np.allclose(got, ref, atol=1e-6, rtol=0):
            raise InputError(f"truth {truth_path}: its {dim} grid differs from the observations' "
                             f"({len(got)} vs {len(ref)} values in the domain): evaluate on the same grid")


def _method_kwargs(cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """``(name, kwargs)`` of ``cfg.method``; a 4DVarNet ``checkpoint`` of null / ``default`` /
    ``shipped:NAME`` becomes the path of the shipped weights (:mod:`oceanda.weights`)."""
    method_cfg = dict(_container(cfg.method))
    name = method_cfg.pop("name", None)
    if not name:
        raise ConfigError("method.name is missing (choose a method: method=oi)")
    if name == "4dvarnet" and "checkpoint" in method_cfg:
        from oceanda.weights import resolve_checkpoint

        method_cfg["checkpoint"] = resolve_checkpoint(method_cfg["checkpoint"])
    return name, method_cfg


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _compare_configs(cfg: DictConfig) -> list[DictConfig]:
    """The demo's extra runs: ``cfg`` with ``method`` (and ``patch`` overrides) of each
    ``demo.compare`` entry ``{method: {name: ..., ...}, patch: {...}}``."""
    from omegaconf import OmegaConf, open_dict

    entries = _container(cfg.demo.get("compare")) or []
    if not isinstance(entries, list):
        raise ConfigError(f"demo.compare must be a list of {{method: {{name: ...}}, patch: {{...}}}}, got {entries!r}")
    subs = []
    for i, e in enumerate(entries):
        if not (isinstance(e, dict) and isinstance(e.get("method"), dict) and e["method"].get("name")):
            raise ConfigError(f"demo.compare[{i}]={e!r}: expected {{method: {{name: ..., ...}}, patch: {{...}}}}")
        unknown = set(e) - {"method", "patch"}
        if unknown:
            raise ConfigError(f"demo.compare[{i}]: unknown key(s) {sorted(unknown)} (allowed: method, patch)")
        if e["method"]["name"] == cfg.method.name:
            continue  # already the main run
        sub = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        with open_dict(sub):
            sub.method = OmegaConf.create(e["method"])
            patch = _container(sub.patch)
            for k, v in (e.get("patch") or {}).items():
                if k not in patch:
                    raise ConfigError(f"demo.compare[{i}].patch.{k}: unknown patch key (one of {sorted(patch)})")
                patch[k] = v
            sub.patch = OmegaConf.create(patch)
            sub.out_dir = None
        subs.append(sub)
    return subs


def run(cfg: DictConfig) -> int:
    """``oceanda infer``: see the module docstring."""
    from oceanda.parallel.comm import get_comm

    mpi = cfg.system.get("mpi", "auto")
    comm = get_comm(None if mpi in ("auto", None) else bool(mpi))
    from oceanda.parallel.threads import limit_threads

    limit_threads(comm, cfg.system.get("threads", "auto"))  # before the demo's OSSE is generated too
    if cfg.obs_path is None:
        runs = [cfg]
        if not cfg.dry_run:
            runs += _compare_configs(cfg)
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
    obs_path, truth_path, out_dir = str(cfg.obs_path), cfg.truth_path, cfg.out_dir
    if out_dir is None and not cfg.dry_run:
        raise ConfigError("out_dir is required with obs_path=... (e.g. out_dir=runs/oi)")
    _run_one(cfg, comm, obs_path, truth_path, out_dir)
    return 0


def _run_one(cfg: DictConfig, comm, obs_path: str, truth_path: str | None,
             out_dir: str | None, method: Any = None) -> dict[str, Any] | None:
    """One inference run (+ evaluation when ``truth_path``); the scores on rank 0, else None.
    ``method``: the method built from ``cfg.method`` (None: built here)."""
    from oceanda.assim.registry import build_method
    from oceanda.data.patches import PatchGeometry, make_patches
    from oceanda.data.store import AnalysisStore, ObsSource, to_json_attr
    from oceanda.parallel.device import bind_device
    from oceanda.parallel.driver import run_inference
    from oceanda.parallel.layout import build_layout
    from oceanda.parallel.restart import RunState

    name, method_cfg = _method_kwargs(cfg)
    if method is None:
        method = build_method(name, **method_cfg)
    geometry = PatchGeometry(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in _container(cfg.patch).items()})
    n_time = getattr(getattr(method, "cfg", None), "n_time", None)  # trained window length (4DVarNet)
    if isinstance(n_time, int) and geometry.size[0] != n_time:
        raise ConfigError(f"patch.size[0]={geometry.size[0]} days does not fit method={name} "
                          f"({method_cfg.get('checkpoint', '')} was trained on {n_time}-day windows): "
                          f"set patch.size[0]={n_time}")
    from oceanda.parallel.driver import check_method

    allow_mm = bool(cfg.get("allow_mode_mismatch", False))
    check_method(method, geometry, allow_mm)  # a checkpoint trained for another mode: before any write
    tile = _list(cfg, "tile", 3)
    if cfg.dtype not in ("float32", "float64"):
        raise ConfigError(f"dtype must be float32 or float64, got {cfg.dtype!r}")

    obs = ObsSource(obs_path, box=_list(cfg, "box", 4), period=_list(cfg, "dates", 2))
    if obs.count_observed() == 0:
        raise InputError(f"observations {obs_path}: the observation window (period "
                         f"{_list(cfg, 'dates', 2)}, box {_list(cfg, 'box', 4)}) holds no "
                         "observation (all NaN)")
    if truth_path:
        _check_truth_grid(truth_path, obs)
    patches = make_patches(geometry, obs.shape, obs.ocean)
    planned = comm.size
    if cfg.dry_run and cfg.get("ranks") is not None:
        planned = int(cfg.ranks)
    layout = build_layout(patches, tile, planned, obs.ocean)
    if cfg.dry_run:
        if comm.rank == 0:
            print(f"oceanda infer (dry run): obs {obs_path}, method {name}, patches {geometry.size} "
                  f"stride {geometry.stride}")
            print(layout.describe())
        return None

    out = Path(out_dir)
    analysis = out / "analysis.zarr"
    rid = run_id(cfg, obs_path, method_cfg.get("checkpoint") if name == "4dvarnet" else None)
    state = RunState(out, rid)
    state.check(analysis)  # every rank, before anything is written
    comm.barrier()
    if comm.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        state.init()
        if not analysis.exists():
            from omegaconf import OmegaConf

            AnalysisStore.create(
                analysis, time=obs.time, lat=obs.lat, lon=obs.lon, ocean=obs.ocean,
                chunks=layout.tile_shape, dtype=str(cfg.dtype),
                attrs={"title": f"oceanda {name} analysis of sea surface height",
                       "method": name, "source": f"oceanda {__version__}",
                       "history": f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} oceanda infer",
                       "observations": str(Path(obs_path).resolve()), "run_id": rid,
                       "oceanda_version": __version__,
                       "oceanda_config": OmegaConf.to_yaml(cfg, resolve=True),
                       "patch": to_json_attr(_container(cfg.patch)),
                       "method_config": to_json_attr({"name": name, **method_cfg})})
    comm.barrier()
    store = AnalysisStore(analysis)
    device = bind_device(comm, str(cfg.system.get("device", "auto")), cfg.system.get("threads", 1))
    try:
        summary = run_inference(obs=obs, ocean=obs.ocean, patches=patches, layout=layout,
                                method=method, store=store, state=state, comm=comm, device=device,
                                batch_size=int(cfg.batch_size), progress=bool(cfg.progress),
                                log_dir=out / "logs", allow_mode_mismatch=allow_mm)
    except OceandaError as exc:
        if comm.size > 1:  # one rank failing mid-run: stop every rank, do not hang
            print(f"oceanda infer: error on rank {comm.rank}: {exc}", flush=True)
            comm.abort(2)
        raise
    if comm.rank != 0:
        return None
    from oceanda.data.io import write_json_atomic

    write_json_atomic(out / "summary.json", {"method": name, "run_id": rid, **summary})
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

    ev = _container(cfg.evaluate) or {}
    result = evaluate_paths(truth_path, analysis, period=ev.get("period"), box=ev.get("box"),
                            out_dir=out, figures=bool(ev.get("figures", True)), name=name)
    print()
    print(format_table([result]))
    print(f"\nwrote {out / 'scores.json'}")
    return result
