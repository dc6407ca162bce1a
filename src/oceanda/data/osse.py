"""Build an OSSE: a synthetic SSH truth (``truth.zarr``), satellite observations of it
(``obs.zarr``) and quick-look figures, streamed chunk by chunk in time.

:func:`generate_osse` is the library entry point (the ``oceanda generate`` app and the
``infer`` app's demo call it). The truth is a dispatch on ``truth["kind"]``
(:data:`TRUTH_KINDS`: ``gyre`` the wind-driven double-gyre Gulf Stream, the default
(:data:`DEFAULT_TRUTH`), ``qg`` two-layer QG jet, ``gaussian`` Gaussian random field, and
``spde``, an SPDE prior sample (:func:`oceanda.priors.spde_truth.spde_truth`), registered by the
apps: :func:`oceanda.cli.generate.register_truths`); a new kind is one :func:`register_truth` call. The quick-look figures are drawn by
the function passed as ``figures`` (the apps pass :func:`oceanda.plots.osse.quicklook`):
this module imports no layer above ``data``.

Streaming: the truth generator yields one day at a time; every ``chunk_days`` days the
chunk is written as a zarr region of ``truth.zarr`` (time chunks of ``chunk_days``), the
satellites' ground tracks over those days are computed, the truth is sampled along them
(:func:`oceanda.obs.observe_daily_fields`), the gridded observations are written as a
region of ``obs.zarr`` and the along-track rows appended to its ``obs`` dimension. Memory
is therefore bounded by one chunk, whatever the number of days.

Atomicity: both stores and the figure folder are written under ``<name>.tmp-<pid>`` in
``out_dir`` and renamed into place only when everything succeeded; on any error the
temporary paths are removed and an existing output is left untouched (SIGINT, and SIGTERM
under ``oceanda generate``, included). The ``*.tmp-<pid>`` paths of a run that was killed
outright (SIGKILL, a node failure) are removed by the next run into the same ``out_dir``
once no process ``<pid>`` runs on this host (:func:`oceanda.data.files.clean_stale`).

Dataset layout: see :mod:`oceanda.data.names` (``ssh``, ``ocean``; ``ssh_obs``,
``track_*``). CF attributes (units, standard names, axis), global ``Conventions``,
``history``, ``oceanda_version``, ``config`` (the generating config as a YAML string) and
measured diagnostics (SSH std, spectral slope, observed fraction).
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from oceanda import __version__
from oceanda.data import names as N
from oceanda.data.domains import domain_spec, get_domain
from oceanda.data.grid import Grid
from oceanda.data.io import write_digests
from oceanda.config_dataclass import from_mapping
from oceanda.errors import ConfigError, InputError

log = logging.getLogger("oceanda.generate")

#: signature of a truth generator: (grid, days, seed, params, device, progress) -> daily fields;
#: kinds registered with ``dated=True`` also get the first date as keyword ``start``
TruthFn = Callable[..., Iterator[np.ndarray]]

TRUTH_KINDS: dict[str, TruthFn] = {}
DATED_TRUTHS: set[str] = set()  #: kinds whose field depends on the calendar date (``start=`` keyword)

#: time encoding of the along-track table (int64 microseconds: exact for 1 Hz samples)
TRACK_TIME_UNITS = "microseconds since 2000-01-01"
#: rows per zarr chunk of the along-track table
TRACK_CHUNK = 1 << 18

#: default OSSE period: the evaluation window plus 15 days on each side for DAW patches
DEFAULT_PERIOD = {"start": "2012-10-07", "end": "2012-12-17"}
#: the truth when none is given: the double-gyre Gulf Stream (``truth=qg`` keeps the QG jet)
DEFAULT_TRUTH = {"kind": "gyre"}


def register_truth(kind: str, fn: TruthFn, dated: bool = False) -> None:
    """Add a truth generator under ``truth.kind = kind`` (``dated``: it takes ``start=`` the
    first date, datetime64[D], so that the field of a date does not depend on the period)."""
    TRUTH_KINDS[kind] = fn
    if dated:
        DATED_TRUTHS.add(kind)


def _qg_truth(grid: Grid, days: int, seed: int, params: dict[str, Any], device: str,
              progress: Callable[[str, int], None] | None) -> Iterator[np.ndarray]:
    from oceanda.dynamics.qg import QGTruthConfig, qg_truth

    cfg = from_mapping(QGTruthConfig, params, "truth")
    return qg_truth(grid.lon, grid.lat, days, seed=seed, cfg=cfg, device=device, progress=progress)


def _gaussian_truth(grid: Grid, days: int, seed: int, params: dict[str, Any], device: str,
                    progress: Callable[[str, int], None] | None) -> Iterator[np.ndarray]:
    from oceanda.dynamics.gaussian import GaussianFieldConfig, gaussian_truth

    cfg = from_mapping(GaussianFieldConfig, params, "truth")
    for field in gaussian_truth(grid.lon, grid.lat, days, seed=seed, cfg=cfg, device=device):
        if progress:
            progress("truth", 1)
        yield field


def _gyre_truth(grid: Grid, days: int, seed: int, params: dict[str, Any], device: str,
                progress: Callable[[str, int], None] | None, *, start: np.datetime64) -> Iterator[np.ndarray]:
    from oceanda.dynamics.gyre import GyreTruthConfig, gyre_truth

    cfg = from_mapping(GyreTruthConfig, params, "truth")
    return gyre_truth(grid.lon, grid.lat, start, days, seed=seed, cfg=cfg, device=device, progress=progress)


register_truth("qg", _qg_truth)
register_truth("gaussian", _gaussian_truth)
register_truth("gyre", _gyre_truth, dated=True)


def spinup_days(truth: Mapping[str, Any], start: np.datetime64 | None = None) -> int:
    """Model days run before the first stored day (for progress bars)."""
    if truth.get("kind") == "gyre" and start is not None:
        from oceanda.dynamics.gyre import load_state

        try:
            ref = load_state(truth.get("state"))[2]
        except Exception:  # reported by the generator itself
            return 0
        return max(int((np.datetime64(start, "D") - ref).astype(int)), 0)
    if truth.get("kind") == "qg":
        from oceanda.dynamics.qg import QGTruthConfig

        d = QGTruthConfig()
        return int(truth.get("spinup_days", d.spinup_days)) + int(truth.get("spinup_fine_days", d.spinup_fine_days))
    return 0


# ----------------------------------------------------------------------------- inputs
def parse_period(period: Mapping[str, Any] | tuple[Any, Any] | list[Any]) -> np.ndarray:
    """Daily times ``(T,)`` datetime64[ns] from ``{start, end}`` (both included) or a pair."""
    if isinstance(period, Mapping):
        missing = [k for k in ("start", "end") if period.get(k) in (None, "", "???")]
        if missing:
            raise ConfigError(f"period: missing {', '.join('period.' + k for k in missing)}")
        start, end = period["start"], period["end"]
    elif isinstance(period, (tuple, list)) and len(period) == 2:
        start, end = period
    else:
        raise ConfigError(f"period: expected {{start, end}} or [start, end], got {period!r}")
    out = []
    for key, value in (("start", start), ("end", end)):
        try:
            out.append(np.datetime64(str(value), "D"))
        except ValueError:
            raise ConfigError(f"period.{key}={value!r}: not a date (YYYY-MM-DD)") from None
    t0, t1 = out
    if t1 < t0:
        raise ConfigError(f"period.end={t1} is before period.start={t0}")
    days = int((t1 - t0).astype(int)) + 1
    return (t0 + np.arange(days) * np.timedelta64(1, "D")).astype("datetime64[ns]")


def _yaml(obj: Any) -> str:
    import yaml

    def plain(o: Any) -> Any:
        if isinstance(o, Mapping):
            return {str(k): plain(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [plain(v) for v in o]
        if isinstance(o, (np.generic,)):
            return o.item()
        if isinstance(o, Path):
            return str(o)
        return o

    return yaml.safe_dump(plain(obj), sort_keys=False)


def _global_attrs(title: str, config_yaml: str, extra: Mapping[str, Any]) -> dict[str, Any]:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "title": title,
        "Conventions": "CF-1.8",
        "institution": "oceanda (synthetic OSSE)",
        "source": f"oceanda {__version__}",
        "history": f"{now}: oceanda generate (oceanda {__version__})",
        "oceanda_version": __version__,
        "config": config_yaml,
        **{k: v for k, v in extra.items()},
    }


def _coords(grid: Grid, times: np.ndarray) -> dict[str, Any]:
    return {
        N.TIME: (N.TIME, times, {"standard_name": "time", "long_name": "time (daily)", "axis": "T"}),
        N.LAT: (N.LAT, grid.lat, dict(N.LAT_ATTRS)),
        N.LON: (N.LON, grid.lon, dict(N.LON_ATTRS)),
    }


def _ocean_var(grid: Grid) -> tuple:
    return ((N.LAT, N.LON), grid.ocean.astype(np.int8),
            {"long_name": "ocean mask (1 = ocean, 0 = land; GLOBE land mask at cell centres)",
             "flag_values": np.array([0, 1], np.int8), "flag_meanings": "land ocean",
             "coordinates": "lat lon"})


def _field_chunks(grid: Grid, chunk_days: int) -> tuple[int, int, int]:
    return (chunk_days, min(grid.ny, 256), min(grid.nx, 256))


def _create_store(path: Path, grid: Grid, times: np.ndarray, var: str, var_attrs: Mapping[str, Any],
                  chunk_days: int, attrs: Mapping[str, Any]) -> None:
    """Create the zarr store with its coordinates, ``ocean`` and an empty (NaN) field ``var``."""
    import dask.array as da

    chunks = _field_chunks(grid, chunk_days)
    shape = (times.size, grid.ny, grid.nx)
    ds = xr.Dataset(
        {var: (N.FIELD_DIMS, da.full(shape, np.nan, chunks=chunks, dtype=np.float32), dict(var_attrs)),
         N.OCEAN: _ocean_var(grid)},
        coords=_coords(grid, times), attrs=dict(attrs),
    )
    enc = {var: {"chunks": chunks, "_FillValue": np.float32(np.nan)},
           N.TIME: {"units": "days since 1950-01-01", "calendar": "standard", "dtype": "float64"}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata")
        ds.to_zarr(path, mode="w-", compute=False, encoding=enc, consolidated=True)


def _write_region(path: Path, var: str, data: np.ndarray, t0: int) -> None:
    ds = xr.Dataset({var: (N.FIELD_DIMS, data)})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata")
        ds.to_zarr(path, region={N.TIME: slice(t0, t0 + data.shape[0]), N.LAT: slice(None), N.LON: slice(None)},
                   consolidated=False)


def _append_tracks(path: Path, tracks: Any, values: np.ndarray, first: bool) -> int:
    n = len(tracks)
    if n == 0 and not first:
        return 0
    names = list(tracks.sat_names)
    ds = xr.Dataset({
        N.TRACK_TIME: (N.OBS, tracks.time, {"standard_name": "time", "long_name": "sample time"}),
        N.TRACK_LON: (N.OBS, tracks.lon.astype(np.float64), dict(N.LON_ATTRS, axis=None) | {"long_name": "sample longitude"}),
        N.TRACK_LAT: (N.OBS, tracks.lat.astype(np.float64), dict(N.LAT_ATTRS, axis=None) | {"long_name": "sample latitude"}),
        N.TRACK_SSH: (N.OBS, np.asarray(values, np.float32),
                      dict(N.SSH_ATTRS, long_name="observed sea surface height (truth + noise)")),
        N.TRACK_SAT: (N.OBS, tracks.sat.astype(np.int16),
                      {"long_name": "satellite index", "flag_values": np.arange(len(names), dtype=np.int16),
                       "flag_meanings": " ".join(names)}),
    })
    for v in (N.TRACK_LON, N.TRACK_LAT):
        ds[v].attrs.pop("axis", None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata")
        if first:
            enc = {v: {"chunks": (TRACK_CHUNK,)} for v in ds.data_vars}
            enc[N.TRACK_TIME] |= {"units": TRACK_TIME_UNITS, "dtype": "int64"}
            ds.to_zarr(path, mode="a", encoding=enc, consolidated=False)
        else:
            ds.to_zarr(path, append_dim=N.OBS, consolidated=False)
    return n


def _finalise_attrs(path: Path, attrs: Mapping[str, Any]) -> None:
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    group.attrs.update({k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in attrs.items()})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata")
        zarr.consolidate_metadata(str(path))


class _Spectrum:
    """Running mean of the zonal SSH spectrum (rows of the unmasked field)."""

    def __init__(self, dx_km: np.ndarray) -> None:
        self.dx_km = dx_km
        self.k: np.ndarray | None = None
        self.acc: np.ndarray | None = None
        self.n = 0

    def add(self, fields: np.ndarray) -> None:
        from oceanda.dynamics.qg import zonal_spectrum

        if fields.shape[-1] < 8:
            return
        k, psd = zonal_spectrum(fields, self.dx_km)
        self.k = k
        self.acc = psd * len(fields) if self.acc is None else self.acc + psd * len(fields)
        self.n += len(fields)

    def result(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self.acc is None:
            return None
        return self.k, self.acc / self.n


def _resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: CUDA is not available on this machine")
    return str(device)


#: global attribute of an OSSE's stores: the digest of the config that determines their content
OSSE_ID_ATTR = "oceanda_osse_id"


def _osse_id(spec: Mapping[str, Any], obs: Any, times: np.ndarray, kind: str, truth: Mapping[str, Any],
             seed: int, obs_noise: bool, chunk_days: int) -> str:
    """Digest of everything that determines an OSSE's stores (not out_dir, figures, device)."""
    import hashlib
    import json

    ident = {"domain": spec, "obs": obs, "period": [str(times[0])[:10], str(times[-1])[:10]],
             "truth": {"kind": kind, **truth}, "seed": seed, "obs_noise": bool(obs_noise),
             "chunk_days": chunk_days}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_same_osse(out: Path, finals: Mapping[str, Path], osse_id: str) -> None:
    """Refuse (``overwrite=false``) an ``out_dir`` whose outputs belong to another OSSE: every
    existing store must carry this config's :data:`OSSE_ID_ATTR`, and figures or along-track
    files need such a store beside them."""
    existing = [p for p in finals.values() if p.exists()]
    if not existing:
        return
    stores = [p for p in existing if p.suffix == ".zarr"]
    for p in stores:
        try:
            import zarr

            other = zarr.open_group(str(p), mode="r").attrs.get(OSSE_ID_ATTR)
        except Exception:
            other = None
        if other != osse_id:
            what = "another config" if other else "something other than oceanda generate"
            raise InputError(f"out_dir {out} holds another OSSE ({p.name} was written by {what}): set "
                             "overwrite=true to replace it, or use another out_dir")
    if not stores:
        raise InputError(f"out_dir {out} holds {existing[0].name} of another OSSE (no store beside it): "
                         "set overwrite=true to replace it, or use another out_dir")


def _move_into_place(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


# ----------------------------------------------------------------------------- main entry
def generate_osse(
    domain: str | Mapping[str, Any] = "gulfstream",
    obs: str | Mapping[str, Any] | None = "4nadirs",
    period: Mapping[str, Any] | tuple[Any, Any] | None = None,
    out_dir: str | os.PathLike | None = None,
    truth: Mapping[str, Any] | None = None,
    seed: int = 0,
    figures: Callable[..., None] | None = None,
    progress: bool = True,
    *,
    obs_noise: bool = True,
    chunk_days: int = 10,
    device: str | None = "auto",
    overwrite: bool = False,
    config_yaml: str | None = None,
) -> dict[str, Any]:
    """Write ``truth.zarr``, ``obs.zarr`` and ``figures/`` of an OSSE into ``out_dir``.

    Args:
        domain: a domain name (``gulfstream``, ``gulfstream_train``, ``natl``) or box
            mapping (see :func:`oceanda.data.domains.get_domain`).
        obs: an observation set name (``4nadirs``, ``4nadirs_swot``, ...), its config
            mapping (``configs/obs/*.yaml``), or None for no observations.
        period: ``{start, end}`` dates (both included), daily fields (default
            :data:`DEFAULT_PERIOD`: the data challenge's evaluation window +- 15 days).
        out_dir: output folder (created; required).
        truth: ``{"kind": "gyre" | "qg" | "gaussian" | ..., **params}`` (default
            :data:`DEFAULT_TRUTH`, the double gyre).
        seed: truth seed; observations use ``seed + 1`` (orbit phases left unset, noise).
        figures: the function drawing the quick-look figures into ``out_dir/figures``
            (``oceanda.plots.osse.quicklook``'s signature; the apps pass it), None: no figures.
        progress: show a tqdm progress bar (model days).
        obs_noise: add each satellite's noise model to the observations.
        chunk_days: time chunk of the stores and of the streaming loop.
        device: torch device of the truth model (``auto``: CUDA when available).
        overwrite: replace the outputs of another OSSE in ``out_dir`` (else
            :class:`InputError` when one exists; the outputs of this same config are
            replaced in any case: rerunning it gives the same stores).
        config_yaml: provenance string stored in the attributes (default: these args).

    Returns:
        ``{"truth": path, "obs": path (if obs), "alongtrack": folder of the L3 files, one
        a mission (if obs), "figures": path (if figures)}`` and the
        measured ``"stats"`` (a dict: ``ssh_std_m``, ``spectral_slope_50_250km``,
        ``observed_fraction`` and ``n_track_points`` when obs, ``seconds``).

    Raises:
        ConfigError / InputError: naming the bad key, before anything is written.
    """
    import time as _time

    t_start = _time.perf_counter()
    if figures is not None and not callable(figures):
        if figures is False:
            figures = None
        else:
            raise ConfigError(f"figures={figures!r}: pass the function drawing them "
                              "(oceanda.plots.osse.quicklook) or None")
    truth = dict(truth or DEFAULT_TRUTH)
    kind = truth.pop("kind", DEFAULT_TRUTH["kind"])
    truth.pop("name", None)
    truth.pop("description", None)
    if kind not in TRUTH_KINDS:
        raise ConfigError(f"truth.kind={kind!r}: unknown; one of {', '.join(sorted(TRUTH_KINDS))}")
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise ConfigError(f"seed={seed!r}: must be an integer") from None
    if int(chunk_days) != chunk_days or chunk_days < 1:
        raise ConfigError(f"chunk_days={chunk_days}: must be an integer >= 1")
    chunk_days = int(chunk_days)
    spec = domain_spec(domain)
    grid = get_domain(spec)
    times = parse_period(DEFAULT_PERIOD if period is None else period)
    sats = None
    obs_name = None
    if obs not in (None, "none", "None"):
        from oceanda import obs as obslib

        sats = obslib.with_noise(obslib.constellation(obs), bool(obs_noise))
        obs_name = obs if isinstance(obs, str) else str(obs.get("name", "custom")) if isinstance(obs, Mapping) else "custom"
    dev = _resolve_device(device)
    if out_dir in (None, "", "???"):
        raise ConfigError("out_dir: must be set to a folder")
    out = Path(out_dir).expanduser()
    finals = {"truth": out / "truth.zarr"}
    if sats is not None:
        finals["obs"] = out / "obs.zarr"
        finals["alongtrack"] = out / "alongtrack"  # one L3 file per mission (oceanda.data.alongtrack_write)
    if figures:
        finals["figures"] = out / "figures"
    osse_id = _osse_id(spec, obs, times, kind, truth, seed, obs_noise, chunk_days)
    if not overwrite:
        _check_same_osse(out, finals, osse_id)
    # build the generator now: config errors of the truth surface before any write
    holder: dict[str, Any] = {"bar": None}

    def tick(stage: str, n: int) -> None:
        b = holder["bar"]
        if b is not None:
            if b.desc != f"generate: {stage}":
                b.set_description(f"generate: {stage}")
            b.update(n)

    dated = {"start": times[0].astype("datetime64[D]")} if kind in DATED_TRUTHS else {}
    fields = TRUTH_KINDS[kind](grid, times.size, seed, truth, dev, tick, **dated)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"out_dir={out}: cannot create it ({exc.strerror})") from None
    if not os.access(out, os.W_OK):
        raise InputError(f"out_dir={out}: not writable")
    config_yaml = config_yaml or _yaml({
        "domain": spec, "obs": obs, "period": {"start": str(times[0])[:10], "end": str(times[-1])[:10]},
        "truth": {"kind": kind, **truth}, "seed": seed, "obs_noise": obs_noise, "chunk_days": chunk_days,
    })
    from oceanda.data.files import clean_stale, remove_trees

    for stale in clean_stale(out):  # *.tmp-PID left by a killed run (its process is gone)
        log.info("removed %s, left by a run that was killed", stale)
    pid = os.getpid()
    tmps = {name: p.with_name(f"{p.name}.tmp-{pid}") for name, p in finals.items()}
    for p in tmps.values():
        if p.exists():
            shutil.rmtree(p)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=spinup_days({"kind": kind, **truth}, times[0]) + times.size, unit="day",
                   desc=f"generate {kind} truth", dynamic_ncols=True)
        holder["bar"] = bar

    stats: dict[str, Any] = {}
    try:
        common = {"domain": spec["name"], "truth_kind": kind, "seed": seed, OSSE_ID_ATTR: osse_id}
        _create_store(tmps["truth"], grid, times, N.SSH,
                      dict(N.SSH_ATTRS, coordinates="time lat lon",
                           comment=f"daily synthetic SSH ({kind} truth); NaN on land"),
                      chunk_days, _global_attrs(f"oceanda OSSE truth ({kind}) on {spec['name']}", config_yaml, common))
        obs_attrs: dict[str, Any] = {}
        if sats is not None:
            obs_attrs = _global_attrs(f"oceanda OSSE observations ({obs_name}) on {spec['name']}", config_yaml,
                                      {**common, "obs": obs_name, "satellites": " ".join(s.name for s in sats),
                                       "obs_noise": int(bool(obs_noise))})
            _create_store(tmps["obs"], grid, times, N.SSH_OBS,
                          dict(N.SSH_ATTRS, long_name="gridded observed sea surface height (daily cell mean)",
                               coordinates="time lat lon", comment="NaN where unobserved"),
                          chunk_days, obs_attrs)
        land = ~grid.ocean
        s1 = s2 = 0.0
        count = 0
        n_obs = 0
        observed = 0
        spectrum = _Spectrum(grid.dx_m[:, 0] / 1e3)
        first_tracks = True
        mid_day = times.size // 2
        snap: dict[str, Any] = {}
        for t0 in range(0, times.size, chunk_days):
            t1 = min(t0 + chunk_days, times.size)
            chunk = np.empty((t1 - t0, grid.ny, grid.nx), np.float32)
            for i in range(t1 - t0):
                f = next(fields)
                if f.shape != grid.shape:
                    raise InputError(f"truth {kind}: generator returned shape {f.shape}, grid is {grid.shape}")
                chunk[i] = f
            spectrum.add(chunk)
            chunk[:, land] = np.nan
            ok = chunk[:, grid.ocean].astype(np.float64)
            s1 += ok.sum()
            s2 += (ok**2).sum()
            count += ok.size
            _write_region(tmps["truth"], N.SSH, chunk, t0)
            if t0 <= mid_day < t1:
                snap["truth"] = chunk[mid_day - t0].copy()
            if sats is not None:
                from oceanda import obs as obslib

                o = obslib.observe_daily_fields(sats, chunk, grid.lon, grid.lat, times[t0:t1],
                                                noise=bool(obs_noise), seed=seed + 1 + 7919 * (t0 // chunk_days))
                _write_region(tmps["obs"], N.SSH_OBS, o.gridded.astype(np.float32), t0)
                n_obs += _append_tracks(tmps["obs"], o.tracks, o.values, first_tracks)
                first_tracks = False
                observed += int(np.isfinite(o.gridded[:, grid.ocean]).sum())
                if t0 <= mid_day < t1:
                    d = mid_day - t0
                    sel = o.tracks.day() == times[mid_day].astype("datetime64[D]")
                    snap["obs"] = o.gridded[d].copy()
                    snap["tracks"] = (o.tracks.lon[sel], o.tracks.lat[sel], o.values[sel])
                snap.setdefault("count", np.zeros(grid.shape, np.int32))
                snap["count"] += np.isfinite(o.gridded).sum(axis=0).astype(np.int32)
        mean = s1 / max(count, 1)
        stats["ssh_std_m"] = float(math.sqrt(max(s2 / max(count, 1) - mean**2, 0.0)))
        spec_res = spectrum.result()
        if spec_res is not None:
            from oceanda.dynamics.qg import spectral_slope

            try:
                stats["spectral_slope_50_250km"] = spectral_slope(*spec_res)
            except Exception:  # band not resolved by a tiny domain
                stats["spectral_slope_50_250km"] = float("nan")
        truth_attrs = {"ssh_std_m": stats["ssh_std_m"],
                       "spectral_slope_50_250km": stats.get("spectral_slope_50_250km", float("nan"))}
        _finalise_attrs(tmps["truth"], truth_attrs)
        if sats is not None:
            n_ocean = int(grid.ocean.sum()) * times.size
            stats["observed_fraction"] = observed / max(n_ocean, 1)
            stats["n_track_points"] = n_obs
            # (appending the track table in mode "a" resets the global attributes: set them all)
            _finalise_attrs(tmps["obs"], {**obs_attrs, "observed_fraction_daily_mean": stats["observed_fraction"],
                                          "n_track_points": n_obs})
        for name in ("truth", "obs"):  # both stores complete: record their chunk digests
            if name in tmps:
                write_digests(tmps[name])
        if sats is not None:
            from oceanda.data.alongtrack_write import write_osse_alongtrack

            write_osse_alongtrack(tmps["obs"], tmps["truth"], tmps["alongtrack"])
        if figures:
            tmps["figures"].mkdir(parents=True)
            label = str(times[mid_day])[:10]
            figures(tmps["figures"], grid.lon, grid.lat, grid.ocean, snap.get("truth"), label,
                            obs_field=snap.get("obs"), tracks=snap.get("tracks"),
                            coverage=(snap["count"] / times.size) if "count" in snap else None,
                            spectrum=spec_res, title=f"{spec['name']} {kind} truth"
                            + (f", {obs_name}" if obs_name else ""))
        if bar is not None:
            bar.close()
            bar = None
        for name, tmp in tmps.items():
            _move_into_place(tmp, finals[name])
    except BaseException as exc:
        if bar is not None:
            bar.close()
        remove_trees(tmps.values(), settle=isinstance(exc, KeyboardInterrupt))
        raise
    stats["seconds"] = _time.perf_counter() - t_start
    return {**finals, "stats": stats}
