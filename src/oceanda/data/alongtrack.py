"""Along-track (L3) altimetry in: reading, quality control and daily binning onto a grid.

Input layout (Copernicus Marine L3 / SSH mapping data challenge 2021a, one file per
mission, e.g. ``dt_global_c2_phy_l3_20161201-20180131_285-315_23-53.nc``; also the
``alongtrack/<mission>.nc`` files of ``oceanda generate``): one dimension ``time``, with
``time`` (any CF time units, decoded by xarray / cftime), ``longitude`` (0..360 or
-180..180), ``latitude``, ``sla_filtered`` and / or ``sla_unfiltered``, ``mdt`` and
optionally ``lwe`` (all in metres; packed integers with ``scale_factor`` / ``_FillValue``
are decoded). The observed sea-surface height is, as in the data challenge
(``mod_interp.interp_on_alongtrack``)::

    ssh = sla + mdt - lwe          (lwe = 0 when absent or lwe=False)

with ``sla`` the filtered or unfiltered SLA (:class:`L3Options.sla`). The mission comes
from the file name (``dt_<area>_<mission>_phy_l3_...``; any other name: its stem), else
from a global attribute ``mission`` / ``platform``.

Quality control (:data:`QC_REASONS`; each point counted once, under the first rule that drops
it): ``bad_time`` (NaT / undecodable), ``outside_period``, ``missing`` (NaN or fill value in
longitude, latitude, sla, mdt or lwe), ``absurd`` (|sla| > max_abs_sla_m, |ssh| >
max_abs_ssh_m, latitude outside [-90, 90]), ``duplicate_time`` (same time as the previous
point of the same file: the first is kept), ``outside_domain`` (outside the grid's cells),
``land`` (falls in a land cell); the rest is ``used``.

Laziness (:class:`AlongTrackSource`, the ``infer`` input): at opening only the ``time``
variable of every file is read (8 bytes a point; a file that is not sorted in time is the
exception, read whole and sorted). :meth:`AlongTrackSource.read` takes a global index box
(time, lat, lon) of the analysis grid, reads the longitudes and latitudes of the points in
the box's time range, then the SLA / MDT / LWE of the range covering those inside the box,
and bins them: the daily cell mean over the points of the cell and day (days ``[t_k,
t_k + 1 day)``; cells by their edges, midway between centres). A rank therefore reads only
the time window of its tiles + halo, and keeps only their points. Points are summed in file
order, files in path order, so a cell's value does not depend on the box (bitwise the same on
any number of ranks). :meth:`AlongTrackSource.qc_counts` is one streaming pass over the files
in blocks of :data:`BLOCK` points (memory bounded by a block), split across ranks (each rank
counts one slice of every file; the counts are summed).
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from oceanda.data import names as N
from oceanda.data.integrity import verify_files
from oceanda.data.io import METRES
from oceanda.errors import ConfigError, InputError

log = logging.getLogger("oceanda.alongtrack")

#: L3 variable names
TIME, LON, LAT = "time", "longitude", "latitude"
SLA = {"filtered": "sla_filtered", "unfiltered": "sla_unfiltered"}
MDT, LWE = "mdt", "lwe"

#: QC outcomes, in the order the rules are applied
QC_REASONS = ("bad_time", "outside_period", "missing", "absurd", "duplicate_time",
              "outside_domain", "land", "used")

#: points per block of the streaming QC pass
BLOCK = 1 << 20

_MISSION_RE = re.compile(r"^dt_[^_]+_(?P<mission>[^_]+)_phy_l3_")
_DAY_NS = np.int64(86_400_000_000_000)


@dataclass(frozen=True)
class L3Options:
    """How L3 files become observations.

    Attributes:
        sla: ``"unfiltered"`` (the data challenge's choice for mapping and scoring) or
            ``"filtered"``.
        lwe: subtract the long-wavelength error ``lwe`` when the file has it.
        max_abs_sla_m: QC: |sla| above this is absurd.
        max_abs_ssh_m: QC: |sla + mdt - lwe| above this is absurd.
        exclude: missions left out (e.g. the held-out ``c2``).
    """

    sla: str = "unfiltered"
    lwe: bool = True
    max_abs_sla_m: float = 2.0
    max_abs_ssh_m: float = 5.0
    exclude: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.sla not in SLA:
            raise ConfigError(f"alongtrack.sla={self.sla!r}: must be one of {', '.join(SLA)}")
        for key in ("max_abs_sla_m", "max_abs_ssh_m"):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and v > 0):
                raise ConfigError(f"alongtrack.{key}={v!r}: must be a positive number [m]")
        object.__setattr__(self, "exclude", tuple(str(m) for m in (self.exclude or ())))


# ------------------------------------------------------------------------------ paths
def resolve_paths(spec: str | os.PathLike | Sequence[Any]) -> list[Path]:
    """Files of ``spec``: a path, a glob pattern (``*``, ``?``, ``[``), or a list of either;
    sorted and deduplicated. Raises InputError naming a path or pattern that matches nothing,
    or a file whose bytes differ from the digest oceanda recorded beside it
    (:func:`oceanda.data.integrity.verify_files`)."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec or [])
    if not items:
        raise InputError("along-track input: no file given")
    out: list[Path] = []
    for item in items:
        s = os.path.expanduser(str(item))
        if any(c in s for c in "*?["):
            hits = sorted(glob.glob(s))
            if not hits:
                raise InputError(f"{s}: the pattern matches no file")
            out += [Path(h) for h in hits]
        else:
            p = Path(s)
            if not p.exists():
                raise InputError(f"{p}: no such file or directory")
            if p.is_dir() and p.suffix != ".zarr":
                hits = sorted(p.glob("*.nc"))
                if not hits:
                    raise InputError(f"{p}: a directory without .nc files")
                out += hits
            else:
                out.append(p)
    seen: dict[str, Path] = {}
    for p in out:
        seen.setdefault(str(p.resolve()), p)
    files = [seen[k] for k in sorted(seen)]
    verify_files(files)  # files oceanda wrote: their recorded digests
    return files


def is_alongtrack(spec: Any) -> bool:
    """True when ``spec`` names L3 along-track files (a list, a glob, or netCDF files with
    an ``sla_*`` variable) rather than one gridded store (zarr / netCDF with ``ssh_obs``)."""
    if spec is None:
        return False
    if not isinstance(spec, (str, os.PathLike)):
        return True
    s = os.path.expanduser(str(spec))
    if any(c in s for c in "*?["):
        return True
    p = Path(s)
    if p.is_dir():
        return p.suffix != ".zarr" and not any((p / f).exists() for f in ("zarr.json", ".zgroup"))
    if p.is_file() and p.suffix.lower() in (".nc", ".nc4", ".cdf", ".h5"):
        try:
            with xr.open_dataset(p, decode_times=False) as ds:
                return any(v in ds.variables for v in SLA.values())
        except Exception:  # noqa: BLE001 - unreadable: the gridded reader names the problem
            return False
    return False


def mission_name(path: str | os.PathLike, attrs: dict[str, Any] | None = None) -> str:
    """Mission of an L3 file: ``c2`` from ``dt_global_c2_phy_l3_...nc``; else the global
    attribute ``mission`` / ``platform``; else the file stem (``alongtrack/jason.nc``: jason)."""
    name = Path(path).name
    m = _MISSION_RE.match(name)
    if m:
        return m.group("mission")
    for key in ("mission", "platform"):
        if attrs and attrs.get(key):
            return str(attrs[key])
    return Path(path).stem


# ------------------------------------------------------------------------------ files
def _units_ok(da: xr.DataArray) -> bool:
    return str(da.attrs.get("units", "m")).strip().lower() in METRES


class L3File:
    """One L3 file opened lazily; its times (int64 ns, sorted) are read at opening."""

    def __init__(self, path: str | os.PathLike, opts: L3Options) -> None:
        self.path = Path(path)
        where = str(self.path)
        try:
            ds = xr.open_dataset(self.path, engine="netcdf4", decode_times=True, use_cftime=None,
                                 mask_and_scale=True)
        except ValueError as exc:
            if "time" in str(exc).lower() or "units" in str(exc).lower():
                raise InputError(f"{where}: variable 'time': cannot decode its units ({exc})") from None
            raise InputError(f"{where}: cannot be read as netCDF ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file for the user
            raise InputError(f"{where}: cannot be read as netCDF ({type(exc).__name__}: {exc})") from None
        self.ds = ds
        self.mission = mission_name(self.path, dict(ds.attrs))
        self.sla_var = SLA[opts.sla]
        required = [TIME, LON, LAT, self.sla_var, MDT]
        missing = [v for v in required if v not in ds.variables]
        if missing:
            raise InputError(f"{where}: missing variable(s) {', '.join(repr(v) for v in missing)} "
                             f"(has: {', '.join(sorted(map(str, ds.variables)))})")
        self.lwe = opts.lwe and LWE in ds.variables
        for v in (*required, *([LWE] if self.lwe else [])):
            if ds[v].ndim != 1 or ds[v].dims != (TIME,):
                raise InputError(f"{where}: variable {v!r} must be 1-D along 'time', has dims {ds[v].dims}")
        for v in (self.sla_var, MDT, *([LWE] if self.lwe else [])):
            if not _units_ok(ds[v]):
                raise InputError(f"{where}: variable {v!r} has units {ds[v].attrs.get('units')!r}, expected m")
        t = ds[TIME].values
        if t.dtype == object:  # cftime dates (non-standard calendar)
            try:
                t = xr.coding.times.cftime_to_nptime(t)
            except Exception as exc:  # noqa: BLE001 - a calendar numpy cannot hold
                raise InputError(f"{where}: variable 'time': calendar cannot be converted ({exc})") from None
        if not np.issubdtype(t.dtype, np.datetime64):
            raise InputError(f"{where}: variable 'time' is not a date (units "
                             f"{ds[TIME].attrs.get('units', ds[TIME].encoding.get('units'))!r}; "
                             "expected e.g. 'days since 1950-01-01')")
        tns = t.astype("datetime64[ns]").astype(np.int64)
        nat = np.isnat(t)
        self.n = int(tns.size)
        self.order: np.ndarray | None = None
        valid = tns[~nat]
        if valid.size > 1 and (np.diff(valid) < 0).any():
            log.info("%s: not sorted in time: read whole and sorted", where)
            self.order = np.argsort(np.where(nat, np.iinfo(np.int64).max, tns), kind="stable")
            tns, nat = tns[self.order], nat[self.order]
        self.nat = nat
        self.tns = np.where(nat, np.iinfo(np.int64).max, tns)  # NaT last
        self._cache: tuple[tuple[int, int], dict[str, np.ndarray]] | None = None  # see AlongTrackSource._band

    def close(self) -> None:
        self.ds.close()

    def read(self, names: Sequence[str], i0: int, i1: int) -> dict[str, np.ndarray]:
        """Variables ``names`` on the (time-sorted) index range ``[i0, i1)``, float64."""
        out = {}
        for v in names:
            if self.order is None:
                vals = self.ds[v][i0:i1].values
            else:
                vals = self.ds[v].values[self.order[i0:i1]]
            out[v] = np.asarray(vals, np.float64)
        return out

    def values(self, i0: int, i1: int) -> np.ndarray:
        """``sla + mdt - lwe`` on ``[i0, i1)``, and the sla alone (for the QC)."""
        names = [self.sla_var, MDT] + ([LWE] if self.lwe else [])
        v = self.read(names, i0, i1)
        ssh = v[self.sla_var] + v[MDT] - (v[LWE] if self.lwe else 0.0)
        return ssh, v[self.sla_var], (np.isfinite(v[LWE]) if self.lwe else np.ones(i1 - i0, bool))


# ------------------------------------------------------------------------------ grid
def _edges(c: np.ndarray) -> np.ndarray:
    c = np.asarray(c, np.float64)
    if c.size == 1:
        return np.array([c[0] - 0.5, c[0] + 0.5])
    mid = 0.5 * (c[1:] + c[:-1])
    return np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])


class AlongTrackSource:
    """L3 files as the daily gridded observations of an analysis grid (``infer``'s input).

    Same interface as :class:`oceanda.data.store.ObsSource`: ``shape``, ``lon``, ``lat``,
    ``time``, ``time_days``, ``ocean``, ``attrs``, ``read(box)``, ``count_observed()``.

    Args:
        paths: L3 files (see :func:`resolve_paths`).
        lon, lat: cell-centre coordinates of the analysis grid (increasing, degrees).
        ocean: ``(ny, nx)`` bool ocean mask (points in land cells are dropped).
        time: daily times (datetime64) of the analysis; None: every day the files span.
        opts: :class:`L3Options`.

    Raises:
        InputError: a file that is missing, unreadable, lacks a variable or has bad units
            (the message names the file and the variable); no file left after ``exclude``.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], lon: np.ndarray, lat: np.ndarray,
                 ocean: np.ndarray, time: np.ndarray | None = None, opts: L3Options | None = None) -> None:
        self.opts = opts or L3Options()
        self.paths = [Path(p) for p in paths]
        self.files: list[L3File] = []
        self.excluded: dict[str, int] = {}
        try:
            for p in self.paths:
                f = L3File(p, self.opts)
                if f.mission in self.opts.exclude:
                    self.excluded[f.mission] = self.excluded.get(f.mission, 0) + f.n
                    f.close()
                    continue
                self.files.append(f)
        except BaseException:
            self.close()
            raise
        unknown = set(self.opts.exclude) - set(self.excluded)
        if unknown:
            log.warning("obs_exclude: mission(s) %s not among the files", sorted(unknown))
        if not self.files:
            raise InputError(f"along-track input: every file was excluded (obs_exclude={list(self.opts.exclude)}; "
                             f"missions {sorted(self.excluded)})")
        self.lon = np.asarray(lon, np.float64)
        self.lat = np.asarray(lat, np.float64)
        self.ocean = np.asarray(ocean, bool)
        self._lon_edges, self._lat_edges = _edges(self.lon), _edges(self.lat)
        if time is None:
            if not any((~f.nat).any() for f in self.files):
                self.close()
                raise InputError(f"along-track input: no point with a valid time in {', '.join(map(str, self.paths))}")
            t0 = min(int(f.tns[~f.nat].min()) for f in self.files if (~f.nat).any())
            t1 = max(int(f.tns[~f.nat].max()) for f in self.files if (~f.nat).any())
            d0 = np.datetime64(t0, "ns").astype("datetime64[D]")
            d1 = np.datetime64(t1, "ns").astype("datetime64[D]")
            time = np.arange(d0, d1 + np.timedelta64(1, "D"), np.timedelta64(1, "D"))
        self.time = np.asarray(time).astype("datetime64[ns]")
        if self.time.size > 1 and (np.diff(self.time.astype(np.int64)) != _DAY_NS).any():
            raise ConfigError("along-track binning needs a daily time axis")
        self._t0 = int(self.time[0].astype(np.int64))
        self.shape = (int(self.time.size), int(self.lat.size), int(self.lon.size))
        self.attrs = {"source": "along-track L3 files", "missions": " ".join(self.missions)}
        self._qc: tuple[tuple[int, int], dict[str, dict[str, int]]] | None = None

    @property
    def missions(self) -> list[str]:
        return sorted({f.mission for f in self.files})

    @property
    def time_days(self) -> np.ndarray:
        return (self.time - self.time[0]) / np.timedelta64(1, "D")

    def close(self) -> None:
        for f in self.files:
            f.close()

    # -------------------------------------------------------------------- points
    def _range(self, f: L3File, t_lo: int, t_hi: int) -> tuple[int, int]:
        """Index range of ``f``'s points with time in ``[t_lo, t_hi)`` (ns)."""
        return int(np.searchsorted(f.tns, t_lo, "left")), int(np.searchsorted(f.tns, t_hi, "left"))

    def _cells(self, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(iy, ix, inside) of points: cells by edges; longitudes taken in the grid's convention."""
        e0 = self._lon_edges[0]
        lon_g = np.mod(lon - e0, 360.0) + e0
        ix = np.searchsorted(self._lon_edges, lon_g, "right") - 1
        iy = np.searchsorted(self._lat_edges, lat, "right") - 1
        inside = (ix >= 0) & (ix < self.lon.size) & (iy >= 0) & (iy < self.lat.size)
        return np.clip(iy, 0, self.lat.size - 1), np.clip(ix, 0, self.lon.size - 1), inside

    def _classify(self, f: L3File, i0: int, i1: int, lon: np.ndarray, lat: np.ndarray,
                  ssh: np.ndarray | None, sla: np.ndarray | None, lwe_ok: np.ndarray | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """QC code (index in :data:`QC_REASONS`) of the points ``[i0, i1)``; with ``ssh`` None
        the value rules are skipped (points outside the box never have their values read)."""
        t = f.tns[i0:i1]
        code = np.full(i1 - i0, QC_REASONS.index("used"), np.int8)
        t_end = self._t0 + self.shape[0] * int(_DAY_NS)
        iy, ix, inside = self._cells(lon, lat)
        dup = np.zeros(i1 - i0, bool)
        if i1 > i0:
            prev = f.tns[i0 - 1:i1 - 1] if i0 > 0 else np.concatenate([[np.iinfo(np.int64).min], t[:-1]])
            dup = (t == prev)
        land = inside & ~self.ocean[iy, ix]
        rules = [("land", land), ("outside_domain", ~inside), ("duplicate_time", dup)]
        if ssh is not None:
            finite = np.isfinite(lon) & np.isfinite(lat) & np.isfinite(ssh) & lwe_ok
            absurd = (np.abs(np.where(np.isfinite(sla), sla, 0)) > self.opts.max_abs_sla_m) | \
                     (np.abs(np.where(np.isfinite(ssh), ssh, 0)) > self.opts.max_abs_ssh_m) | \
                     (np.abs(np.where(np.isfinite(lat), lat, 0)) > 90)
            rules += [("absurd", absurd), ("missing", ~finite)]
        else:
            rules += [("missing", ~(np.isfinite(lon) & np.isfinite(lat)))]
        rules += [("outside_period", (t < self._t0) | (t >= t_end)), ("bad_time", f.nat[i0:i1])]
        for name, mask in rules:  # later rules win: applied in reverse order of QC_REASONS
            code[mask] = QC_REASONS.index(name)
        day = (t - self._t0) // _DAY_NS
        return code, day, iy, ix

    def _band(self, f: L3File, i0: int, i1: int) -> dict[str, np.ndarray]:
        """Every point of ``f`` on ``[i0, i1)`` read and classified (cached per file: the tiles
        of one time band share it)."""
        key = (i0, i1)
        if f._cache is not None and f._cache[0] == key:
            return f._cache[1]
        f._cache = None  # free the previous band first
        c = f.read((LON, LAT), i0, i1)
        ssh, sla, lwe_ok = f.values(i0, i1)
        code, day, iy, ix = self._classify(f, i0, i1, c[LON], c[LAT], ssh, sla, lwe_ok)
        used = np.flatnonzero(code == QC_REASONS.index("used"))
        # the kept points, stably sorted by longitude index: a box is a searchsorted range, and the
        # points of one cell keep their file order (so cell sums do not depend on the box)
        order = used[np.argsort(ix[used], kind="stable")]
        band = {"t": day[order], "iy": iy[order].astype(np.int32), "ix": ix[order].astype(np.int32),
                "ssh": ssh[order], "lon": c[LON][order], "lat": c[LAT][order], "time_ns": f.tns[i0:i1][order]}
        f._cache = (key, band)
        return band

    def points(self, box: tuple[tuple[int, int], ...] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """The QC'd points inside the global index ``box`` (None: the whole grid), file by file:
        ``{"mission", "t", "iy", "ix", "ssh", "time_ns", "lon", "lat"}``."""
        (b_t, b_y, b_x) = box or ((0, self.shape[0]), (0, self.shape[1]), (0, self.shape[2]))
        lo_t, hi_t = max(b_t[0], 0), min(b_t[1], self.shape[0])
        if hi_t <= lo_t:
            return
        for f in self.files:
            i0, i1 = self._range(f, self._t0 + lo_t * int(_DAY_NS), self._t0 + hi_t * int(_DAY_NS))
            if i1 <= i0:
                continue
            b = self._band(f, i0, i1)
            j0, j1 = np.searchsorted(b["ix"], [b_x[0], b_x[1]], "left")
            iy, t = b["iy"][j0:j1], b["t"][j0:j1]
            keep = (iy >= b_y[0]) & (iy < b_y[1]) & (t >= lo_t) & (t < hi_t)
            if not keep.any():
                continue
            yield {"mission": f.mission, **{k: v[j0:j1][keep] for k, v in b.items()}}

    def read(self, box: tuple[tuple[int, int], ...]) -> np.ndarray:
        """Daily cell means on the global index ``box`` as float64 (T, H, W); NaN where no
        point (and outside the grid)."""
        shape = tuple(hi - lo for lo, hi in box)
        flat, val = [], []
        for p in self.points(box):
            flat.append(np.ravel_multi_index((p["t"] - box[0][0], p["iy"] - box[1][0], p["ix"] - box[2][0]), shape))
            val.append(p["ssh"])
        out = np.full(shape, np.nan)
        if flat:
            # one pass over the points in file order: each cell's sum runs over its points in that order
            cells, inv = np.unique(np.concatenate(flat), return_inverse=True)
            s = np.bincount(inv, weights=np.concatenate(val), minlength=cells.size)
            n = np.bincount(inv, minlength=cells.size)
            out.flat[cells] = s / n
        return out

    # -------------------------------------------------------------------- QC pass
    def qc_counts(self, part: tuple[int, int] = (0, 1)) -> dict[str, dict[str, int]]:
        """Per mission, the number of points under each :data:`QC_REASONS`: one streaming pass in
        blocks of :data:`BLOCK` points (cached). ``part=(k, n)`` counts only the k-th of n equal
        index slices of every file (rank k of n ranks: each point is read by one rank;
        :func:`merge_qc` of the n parts is the whole count). Excluded missions appear with
        ``excluded`` only (in part 0)."""
        k, n = int(part[0]), int(part[1])
        if not 0 <= k < n:
            raise ValueError(f"part={part}: need 0 <= k < n")
        if self._qc is not None and self._qc[0] == (k, n):
            return self._qc[1]
        out: dict[str, dict[str, int]] = {}
        for f in self.files:
            cnt = out.setdefault(f.mission, dict.fromkeys(QC_REASONS, 0))
            lo, hi = f.n * k // n, f.n * (k + 1) // n
            for i0 in range(lo, hi, BLOCK):
                i1 = min(i0 + BLOCK, hi)
                c = f.read((LON, LAT), i0, i1)
                ssh, sla, lwe_ok = f.values(i0, i1)
                code, *_ = self._classify(f, i0, i1, c[LON], c[LAT], ssh, sla, lwe_ok)
                for key, v in zip(QC_REASONS, np.bincount(code, minlength=len(QC_REASONS))):
                    cnt[key] += int(v)
        if k == 0:
            for m, x in self.excluded.items():
                out[m] = {"excluded": x}
        counts = {m: out[m] for m in sorted(out)}
        self._qc = ((k, n), counts)
        return counts

    def count_observed(self) -> int:
        """Points kept by the QC over the whole window (see :meth:`qc_counts`)."""
        return sum(c.get("used", 0) for c in self.qc_counts().values())


def merge_qc(parts: Sequence[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    """Sum the per-mission QC counts of several parts (ranks)."""
    out: dict[str, dict[str, int]] = {}
    for p in parts:
        for m, c in p.items():
            acc = out.setdefault(m, {})
            for key, v in c.items():
                acc[key] = acc.get(key, 0) + v
    return {m: out[m] for m in sorted(out)}


def format_qc(counts: dict[str, dict[str, int]]) -> str:
    """A text table of :meth:`AlongTrackSource.qc_counts`."""
    cols = ["mission", "points", *QC_REASONS, "excluded"]
    rows = [cols]
    for m, c in counts.items():
        rows.append([m, str(sum(c.values())), *(str(c.get(k, 0)) for k in (*QC_REASONS, "excluded"))])
    w = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    return "\n".join("  ".join(x.ljust(w[i]) if i == 0 else x.rjust(w[i]) for i, x in enumerate(r)) for r in rows)


def read_points(paths: Sequence[str | os.PathLike], opts: L3Options | None = None,
                lon: np.ndarray | None = None, lat: np.ndarray | None = None,
                ocean: np.ndarray | None = None, time: np.ndarray | None = None
                ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, int]]]:
    """All QC'd points of ``paths`` on a grid (``lon``/``lat``/``ocean``; default a 1-degree
    global grid with no land): arrays ``time`` (datetime64[ns]), ``lon``, ``lat``, ``ssh``,
    ``mission`` (str), time-sorted, and the QC counts. For along-track references (one or a few
    missions): the points are held in memory."""
    if lon is None:
        lon, lat = np.arange(0.5, 360.0, 1.0), np.arange(-89.5, 90.0, 1.0)
        ocean = np.ones((lat.size, lon.size), bool)
    src = AlongTrackSource(paths, lon, lat, ocean if ocean is not None else np.ones((len(lat), len(lon)), bool),
                           time, opts)
    try:
        parts = list(src.points())
        counts = src.qc_counts()
    finally:
        src.close()
    if not parts:
        empty = np.zeros(0)
        return {"time": empty.astype("datetime64[ns]"), "lon": empty, "lat": empty, "ssh": empty,
                "mission": np.zeros(0, "<U1")}, counts
    t = np.concatenate([p["time_ns"] for p in parts])
    order = np.argsort(t, kind="stable")
    pts = {"time": t[order].astype("datetime64[ns]"),
           "lon": np.concatenate([p["lon"] for p in parts])[order],
           "lat": np.concatenate([p["lat"] for p in parts])[order],
           "ssh": np.concatenate([p["ssh"] for p in parts])[order],
           "mission": np.concatenate([np.full(p["ssh"].size, p["mission"]) for p in parts])[order]}
    return pts, counts


def analysis_grid(grid: Any, box: Sequence[float] | None = None):
    """The analysis grid for along-track input: ``grid`` a named domain (``gulfstream``,
    ``natl``, ... or a box mapping, :func:`oceanda.data.domains.get_domain`) or the path of a
    gridded store whose ``lat``, ``lon`` and ``ocean`` define it (e.g. an OSSE's truth.zarr);
    cut to ``box`` ``[lon_min, lon_max, lat_min, lat_max]`` when given.

    Raises:
        ConfigError: no grid given, unknown domain; InputError: unreadable store.
    """
    from oceanda.data.domains import DOMAINS, get_domain
    from oceanda.data.grid import Grid
    from oceanda.data.io import open_dataset

    if grid in (None, "", "???"):
        raise ConfigError("along-track observations need an analysis grid: set grid=NAME "
                          f"({', '.join(DOMAINS)}) or grid=PATH (a zarr / netCDF store with lat, lon, ocean)")
    if isinstance(grid, (str, os.PathLike)) and str(grid) not in DOMAINS and Path(os.path.expanduser(str(grid))).exists():
        path = Path(os.path.expanduser(str(grid)))
        ds = open_dataset(path, [N.OCEAN])
        g = Grid(lon=ds[N.LON].values, lat=ds[N.LAT].values, ocean=np.asarray(ds[N.OCEAN].values) > 0)
    else:
        g = get_domain(grid if not isinstance(grid, os.PathLike) else str(grid))
    if box is not None:
        b = [float(v) for v in box]
        if len(b) != 4:
            raise ConfigError(f"box must be [lon_min, lon_max, lat_min, lat_max], got {list(box)}")
        g = g.subset(*b)
    return g


def daily_period(period: Sequence[Any] | None) -> np.ndarray | None:
    """Daily datetime64 times of ``[start, end]`` (both included), or None."""
    if period is None:
        return None
    try:
        t0, t1 = (np.datetime64(str(p), "D") for p in period)
    except (ValueError, TypeError):
        raise ConfigError(f"period / dates={list(period)}: not [YYYY-MM-DD, YYYY-MM-DD]") from None
    if t1 < t0:
        raise ConfigError(f"period / dates={list(period)}: end before start")
    return np.arange(t0, t1 + np.timedelta64(1, "D"), np.timedelta64(1, "D"))


def gridded_dataset(paths: Any, grid: Any, period: Sequence[Any] | None = None,
                    opts: L3Options | None = None) -> xr.Dataset:
    """L3 files binned daily onto ``grid`` (see :func:`analysis_grid`; for training, the truth
    store) over ``period`` (default: the days the files span), in memory: a dataset with
    ``ssh_obs`` (time, lat, lon) and ``ocean``, as a gridded observation store."""
    g = analysis_grid(grid)
    src = AlongTrackSource(resolve_paths(paths), g.lon, g.lat, g.ocean, daily_period(period), opts)
    try:
        obs = src.read(tuple((0, n) for n in src.shape)).astype(np.float32)
    finally:
        src.close()
    return xr.Dataset({N.SSH_OBS: (N.FIELD_DIMS, obs), N.OCEAN: ((N.LAT, N.LON), g.ocean.astype(np.int8))},
                      coords={N.TIME: src.time, N.LAT: g.lat, N.LON: g.lon},
                      attrs={"source": "along-track L3 files", "missions": " ".join(src.missions)})
