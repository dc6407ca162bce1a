"""Open, validate and atomically write oceanda's datasets (zarr or netCDF).

Readers are lazy: variables come back as dask-backed :class:`xarray.DataArray` objects
with the store's own chunks, so a caller that selects a window reads only that window.
Every problem a user can cause with a file raises :class:`oceanda.errors.InputError`
naming the file and the problem, before any computation:

* the path does not exist or is neither a zarr store nor a netCDF file;
* a required variable is missing (the message lists the variables that are there);
* a dimension is not one of ``(time, lat, lon)`` (``member`` for ensembles), or a
  coordinate is missing, not 1-D, holds NaN, is duplicated or is not monotonic;
* a chunk of a store oceanda wrote is missing, truncated or overwritten (checked against its
  recorded digests as it is read, :mod:`oceanda.data.integrity`), or a chunk of another
  store is missing where it would read as a number (a fill value not declared missing);
* on reading the values (:func:`compute`, :func:`check_values`): a chunk that cannot be
  decoded, +-inf or a magnitude above :data:`SSH_LIMIT_M`;
* units: a field (``ssh``, ``ssh_obs``, ...) whose ``units`` attribute is not metres (e.g.
  ``cm``), a ``lon`` / ``lat`` whose ``units`` are not degrees or whose values lie outside
  ``[-180, 360]`` / ``[-90, 90]``, a numeric ``time`` without units (times must be datetimes,
  CF-encoded ``days since ...``, or day numbers with ``units: days``);
* dtypes: a field that is not floating point (strings, objects, integers that are not packed
  with a ``scale_factor``), an ``ocean`` mask that is not boolean or integer.

Conventions applied on reading (see :mod:`oceanda.data.names`): ``latitude`` and
``longitude`` are renamed ``lat`` and ``lon``; a strictly *decreasing* coordinate (common
for latitude in netCDF files) is reversed so that every coordinate increases; field
dimensions are transposed to ``(time, lat, lon)`` (``(member, time, lat, lon)``).

Writers never leave half an output behind: :func:`write_json_atomic`,
:func:`write_bytes_atomic` and :func:`atomic_zarr_write` write to a temporary sibling
path and rename it into place (a rename is atomic on POSIX file systems).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from oceanda.data import integrity
from oceanda.data import names as N
from oceanda.data.files import atomic_path, write_bytes_atomic
from oceanda.errors import InputError

#: alternative coordinate names renamed on reading
ALIASES = {"latitude": N.LAT, "longitude": N.LON}

#: ``units`` of SSH fields taken as metres (anything else is refused: oceanda does not convert)
METRES = ("m", "meter", "meters", "metre", "metres")

#: the coordinates' accepted value ranges (degrees; longitudes either -180..180 or 0..360)
COORD_RANGE = {N.LON: (-180.0, 360.0), N.LAT: (-90.0, 90.0)}

#: ``units`` of a numeric time coordinate read as day numbers
DAY_UNITS = ("d", "day", "days")

#: netCDF file suffixes; anything else is sniffed
NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf", ".cdf", ".h5", ".hdf5")


# --------------------------------------------------------------------------- opening


def _format_of(path: Path) -> str:
    """``"zarr"`` or ``"netcdf"`` from the suffix, else by sniffing the content."""
    suffix = path.suffix.lower()
    if path.is_dir():
        if any((path / f).exists() for f in ("zarr.json", ".zgroup", ".zattrs", ".zmetadata")):
            return "zarr"
        raise InputError(f"{path}: a directory that is not a zarr store (no zarr.json or .zgroup)")
    if suffix == ".zarr":
        raise InputError(f"{path}: a file, not a zarr store (a zarr store is a directory)")
    if suffix in NETCDF_SUFFIXES:
        return "netcdf"
    with open(path, "rb") as fh:
        magic = fh.read(8)
    if magic[:3] == b"CDF" or magic[:8] == b"\x89HDF\r\n\x1a\n":
        return "netcdf"
    raise InputError(f"{path}: neither a zarr store nor a netCDF file")


#: zarr metadata documents (v3, v2)
ZARR_METADATA = ("zarr.json", ".zgroup", ".zarray", ".zattrs", ".zmetadata")


def _check_zarr_metadata(path: Path) -> None:
    """Parse the metadata documents of the store and of its arrays before zarr does: zarr reads
    them concurrently, and one that is not JSON leaves its sibling reads pending (asyncio prints
    "Task was destroyed but it is pending!" after our error, at exit)."""
    for doc in (*(path / name for name in ZARR_METADATA), *(path.glob(f"*/{name}") for name in ZARR_METADATA)):
        for f in ([doc] if isinstance(doc, Path) else doc):
            if not f.is_file():
                continue
            try:
                json.loads(f.read_bytes())
            except (ValueError, OSError) as exc:
                where = f"variable '{f.parent.name}': " if f.parent != path else ""
                raise InputError(f"{path}: {where}cannot be read: its metadata {f.relative_to(path)} is not "
                                 f"valid JSON ({exc})") from None


def _open_raw(path: str | os.PathLike) -> xr.Dataset:
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    fmt = _format_of(p)
    if fmt == "zarr" and p.is_dir():
        _check_zarr_metadata(p)
    try:
        with warnings.catch_warnings():
            # zarr v3 stores written without consolidated metadata: xarray falls back
            # to reading the plain metadata and warns; that is fine for us.
            warnings.filterwarnings("ignore", message=".*consolidated metadata.*")
            if fmt == "zarr":  # a store oceanda wrote: every chunk checked as it is read
                verified = integrity.open_verified(p)
                return xr.open_dataset(p if verified is None else verified, engine="zarr", chunks={})
            return xr.open_dataset(p, engine="netcdf4", chunks={})
    except InputError:
        raise
    except Exception as exc:  # any reader failure is a bad file for the user
        raise InputError(f"{p}: cannot be read as {fmt} ({type(exc).__name__}: {exc})") from None


def _rename_aliases(ds: xr.Dataset) -> xr.Dataset:
    mapping = {k: v for k, v in ALIASES.items() if (k in ds.dims or k in ds.variables) and v not in ds.variables}
    return ds.rename(mapping) if mapping else ds


def _check_coord(ds: xr.Dataset, dim: str, where: str) -> xr.Dataset:
    """Validate the 1-D coordinate of ``dim``; reverse it if strictly decreasing."""
    if dim not in ds.coords:
        raise InputError(f"{where}: dimension '{dim}' has no coordinate values")
    coord = ds[dim]
    if coord.ndim != 1 or coord.dims != (dim,):
        raise InputError(f"{where}: coordinate '{dim}' must be 1-D along '{dim}', has dims {coord.dims}")
    values = np.asarray(coord.values)
    if values.size == 0:
        raise InputError(f"{where}: coordinate '{dim}' is empty")
    if np.issubdtype(values.dtype, np.datetime64):
        if np.isnat(values).any():
            raise InputError(f"{where}: coordinate '{dim}' holds missing (NaT) values")
        num = values.astype("datetime64[ns]").astype(np.int64).astype(np.float64)
    elif np.issubdtype(values.dtype, np.number):
        num = values.astype(np.float64)
        if not np.isfinite(num).all():
            raise InputError(f"{where}: coordinate '{dim}' holds NaN or infinite values")
        _check_coord_units(dim, num, coord.attrs.get("units"), where)
    else:
        raise InputError(f"{where}: coordinate '{dim}' is neither numeric nor datetime ({values.dtype})")
    if num.size > 1:
        step = np.diff(num)
        if (step == 0).any():
            i = int(np.flatnonzero(step == 0)[0])
            raise InputError(f"{where}: coordinate '{dim}' has duplicated values ({values[i]} at "
                             f"positions {i} and {i + 1})")
        if (step < 0).all():
            return ds.isel({dim: slice(None, None, -1)})
        if not (step > 0).all():
            i = int(np.flatnonzero(np.sign(step) != np.sign(step[0]))[0])
            raise InputError(f"{where}: coordinate '{dim}' is not monotonic (at position {i + 1}: "
                             f"{values[i]} then {values[i + 1]})")
    return ds


def _check_coord_units(dim: str, num: np.ndarray, units: Any, where: str) -> None:
    """Units and range of a numeric coordinate (see the module docstring)."""
    if dim == N.TIME:
        if units is None:
            raise InputError(f"{where}: coordinate 'time' holds numbers ({num.dtype}) without units: write "
                             "datetimes, CF units 'days since YYYY-MM-DD', or day numbers with units 'days'")
        if str(units).strip().lower() not in DAY_UNITS:
            raise InputError(f"{where}: coordinate 'time' has units {units!r} that are not dates "
                             "('days since YYYY-MM-DD') nor day numbers ('days')")
        return
    if dim not in COORD_RANGE:
        return
    if units is not None and not str(units).strip().lower().startswith("degree"):
        raise InputError(f"{where}: coordinate '{dim}' has units {units!r}; expected degrees "
                         f"({'degrees_east' if dim == N.LON else 'degrees_north'})")
    lo, hi = COORD_RANGE[dim]
    if num.min() < lo or num.max() > hi:
        raise InputError(f"{where}: coordinate '{dim}' spans {num.min():g}..{num.max():g}, outside "
                         f"[{lo:g}, {hi:g}] degrees")


def _check_variable(da: xr.DataArray, where: str) -> None:
    """dtype and units of a data variable (see the module docstring)."""
    name, dtype = da.name, da.dtype
    if name == N.OCEAN:
        if dtype.kind not in "biu":
            raise InputError(f"{where}: variable 'ocean' has dtype {dtype}; expected a boolean or integer "
                             "mask (1 ocean, 0 land)")
        return
    if str(name).startswith("track_"):
        return
    if dtype.kind != "f":
        hint = (" (integers are read only when packed, with a scale_factor attribute)" if dtype.kind in "iu"
                else "")
        raise InputError(f"{where}: variable '{name}' has dtype {dtype}; expected floating-point numbers "
                         f"in metres{hint}")
    units = da.attrs.get("units")
    if units is not None and str(units).strip().lower() not in METRES:
        raise InputError(f"{where}: variable '{name}' has units {units!r}; expected metres ('m'): "
                         "oceanda does not convert units")


def _expected_dims(da: xr.DataArray) -> tuple[str, ...]:
    """Dims a variable must have: ``ocean`` (lat, lon), along-track ``track_*`` (obs),
    ensembles (member, time, lat, lon), every other field (time, lat, lon)."""
    if da.name == N.OCEAN:
        return (N.LAT, N.LON)
    if str(da.name).startswith("track_"):
        return (N.OBS,)
    if N.MEMBER in da.dims or da.name == N.SSH_MEMBERS:
        return (N.MEMBER, *N.FIELD_DIMS)
    return N.FIELD_DIMS


def _validate(ds: xr.Dataset, variables: Sequence[str], where: str, optional: Sequence[str] = ()) -> xr.Dataset:
    ds = _rename_aliases(ds)
    missing = [v for v in variables if v not in ds.data_vars]
    if missing:
        have = ", ".join(sorted(map(str, ds.data_vars))) or "none"
        raise InputError(f"{where}: missing variable {', '.join(repr(m) for m in missing)} (variables: {have})")
    wanted = list(variables) + [v for v in optional if v in ds.data_vars and v not in variables]
    ds = ds[wanted]
    for name in wanted:
        da = ds[name]
        dims = _expected_dims(da)
        if set(da.dims) != set(dims):
            raise InputError(f"{where}: variable '{name}' has dims {da.dims}, expected {dims}")
        _check_variable(da, where)
    for dim in sorted(set().union(*(ds[v].dims for v in wanted))):
        if dim in N.FIELD_DIMS:
            ds = _check_coord(ds, dim, where)
    order = [d for d in (N.MEMBER, *N.FIELD_DIMS) if d in ds.dims]
    return ds.transpose(*order, ...)


def open_dataset(path: str | os.PathLike, variables: Sequence[str], optional: Sequence[str] = ()) -> xr.Dataset:
    """Open ``path`` (zarr or netCDF) lazily and validate ``variables``.

    Args:
        path: a zarr store (directory, usually ``*.zarr``) or a netCDF file.
        variables: names that must be there; fields must have dims ``(time, lat, lon)``
            (``member`` in front for ensembles), ``ocean`` ``(lat, lon)``, along-track
            ``track_*`` variables ``(obs,)``.
        optional: names validated and kept when present, ignored when absent.

    Returns:
        A dataset holding only those variables, dask-backed, with increasing, unique,
        finite 1-D coordinates and dims in ``(member, time, lat, lon)`` order.

    Raises:
        InputError: naming ``path`` and the problem (missing file or variable, bad dims,
            missing / duplicated / non-monotonic coordinates).
    """
    ds = _open_raw(path)
    where = str(Path(path).expanduser())
    ds = _validate(ds, list(variables), where, optional=optional)
    _check_absent_chunks(ds, Path(where))
    return ds


def _check_absent_chunks(ds: xr.Dataset, root: Path) -> None:
    """A zarr store without digests: refuse a field whose absent chunks would read as a
    constant number (:func:`oceanda.data.integrity.absent_field_chunks`)."""
    if not root.is_dir() or (root / integrity.DIGEST_FILE).is_file():
        return
    for name in ds.data_vars:
        if name == N.OCEAN or not np.issubdtype(ds[name].dtype, np.floating):
            continue
        absent = integrity.absent_field_chunks(root, str(name), ds[name].encoding)
        if absent:
            var, idx = integrity.describe_key(absent[0])
            fill = ds[name].encoding.get("fill_value")
            raise InputError(f"{root}: variable '{var}', chunk {idx} (file {absent[0]}) is missing"
                             f"{f' ({len(absent)} chunks missing)' if len(absent) > 1 else ''}: it "
                             f"would read as the fill value {fill}, which is not declared missing "
                             "(_FillValue / missing_value)")


def open_field(path: str | os.PathLike, var: str, required: bool = True) -> xr.DataArray | None:
    """One validated variable of ``path`` as a lazy DataArray (``None`` if absent and not required)."""
    if required:
        return open_dataset(path, [var])[var]
    ds = open_dataset(path, [], optional=[var])
    return ds[var] if var in ds else None


# --------------------------------------------------------------------------- checks

#: the largest |SSH| [m] accepted in observations, truths and analyses: sea-surface height
#: anomalies and absolute dynamic topography stay within a few metres; beyond this bound a
#: value is a fill value or a unit error (mm, cm), not a measurement
SSH_LIMIT_M = 100.0


def compute(obj: Any, where: str, what: str = "data") -> Any:
    """``obj.load()`` (a lazy DataArray or Dataset) or ``dask.compute(obj)`` (dask
    collections), a reader's failure (a chunk that cannot be decompressed or decoded)
    turned into :class:`InputError` naming ``where`` and ``what``."""
    try:
        if isinstance(obj, (xr.DataArray, xr.Dataset)):
            return obj.load()
        import dask

        return dask.compute(obj)[0]
    except InputError:
        raise
    except Exception as exc:  # zstd / blosc / HDF5 errors of a damaged file
        raise InputError(f"{where}: {what} cannot be read ({type(exc).__name__}: {exc}); "
                         "the file is damaged") from None


def check_values(da: xr.DataArray, where: str, limit: float = SSH_LIMIT_M) -> int:
    """The number of finite values of ``da`` (one pass over the data); :class:`InputError`
    naming ``where``, the variable and the first location when it holds +-inf or a value
    larger than ``limit`` (:data:`SSH_LIMIT_M`) in magnitude."""
    import dask.array

    data = da.data if isinstance(da.data, dask.array.Array) else dask.array.from_array(da.values)
    bad = ~(np.isnan(data) | (abs(data) <= limit))  # +-inf or huge
    n_ok, n_bad = compute((np.isfinite(data).sum(), bad.sum()), where, f"variable '{da.name}'")
    if n_bad:
        idx = []
        for axis in range(bad.ndim):  # the first bad index, one axis at a time
            sub = bad[tuple(idx)]
            rest = tuple(range(1, sub.ndim))
            first = np.flatnonzero(compute(sub.any(axis=rest) if rest else sub, where))[0]
            idx.append(int(first))
        value = float(compute(data[tuple(idx)], where))
        at = ", ".join(f"{d} {np.asarray(da[d].values)[i]}" if d in da.coords else f"{d} index {i}"
                       for d, i in zip(da.dims, idx))
        raise InputError(f"{where}: variable '{da.name}' holds {int(n_bad)} value(s) that are infinite or "
                         f"larger than {limit:g} m in magnitude (first {value:g} at {at}): not a sea "
                         "surface height; mark missing values as NaN")
    return int(n_ok)




def as_days(values: np.ndarray) -> np.ndarray:
    """Coordinate values as float64: datetimes in days since the epoch, numbers as is."""
    values = np.asarray(values)
    if np.issubdtype(values.dtype, np.datetime64):
        return values.astype("datetime64[ns]").astype(np.int64) / 86400e9
    return values.astype(np.float64)


def check_aligned(a: xr.DataArray | xr.Dataset, b: xr.DataArray | xr.Dataset, names: tuple[str, str] = ("truth", "analysis"),
                  dims: Iterable[str] = N.FIELD_DIMS, rtol: float = 1e-3) -> None:
    """Raise :class:`InputError` unless ``a`` and ``b`` share their coordinates on ``dims``.

    Two coordinates match when they have the same length and every value differs by at
    most ``rtol`` times the coordinate's median spacing (a thousandth of a cell by
    default; datetimes are compared in days). Grids that differ more must be regridded
    by the user: oceanda does not interpolate silently.
    """
    for dim in dims:
        if dim not in a.dims or dim not in b.dims:
            continue
        ca, cb = as_days(a[dim].values), as_days(b[dim].values)
        if ca.size != cb.size:
            raise InputError(f"coordinates of {names[0]} and {names[1]} do not match: '{dim}' has "
                             f"{ca.size} values in {names[0]} and {cb.size} in {names[1]} "
                             f"({_span(a[dim])} vs {_span(b[dim])})")
        spacing = float(np.median(np.diff(ca))) if ca.size > 1 else 1.0
        diff = np.abs(ca - cb)
        if (diff > rtol * abs(spacing)).any():
            i = int(np.argmax(diff > rtol * abs(spacing)))
            raise InputError(f"coordinates of {names[0]} and {names[1]} do not match: '{dim}'[{i}] is "
                             f"{a[dim].values[i]} in {names[0]} and {b[dim].values[i]} in {names[1]}")


def _span(coord: xr.DataArray) -> str:
    v = coord.values
    return f"{v[0]}..{v[-1]}" if v.size else "empty"


def require_complete(ds: xr.Dataset, where: str) -> None:
    """Refuse a dataset whose ``status`` attribute says its writer did not finish (an
    ``analysis.zarr`` of a killed or failed run); datasets without ``status`` pass."""
    status = ds.attrs.get("status")
    if status is not None and status != "complete":
        raise InputError(f"{where}: status '{status}': the run writing it did not finish (killed or "
                         "failed); rerun the same command to complete it before using it")


def require_finite(da: xr.DataArray, what: str) -> None:
    """Raise :class:`InputError` when ``da`` holds no finite value (reads the data)."""
    if not bool(np.isfinite(da).any().compute()):
        raise InputError(f"{what} is all NaN")


def select_window(ds: xr.Dataset | xr.DataArray, period: Sequence[Any] | None = None,
                  box: Sequence[float] | None = None, what: str = "dataset"):
    """Select ``period = [start, end]`` (inclusive; a plain end date includes its whole day)
    and ``box = [lon_min, lon_max, lat_min, lat_max]`` (inclusive).

    ``None`` keeps the whole extent. Raises :class:`InputError` when the window holds no
    time step or no grid cell, naming the window and the data's extent.
    """
    sel: dict[str, slice] = {}
    if period is not None:
        if len(period) != 2:
            raise InputError(f"period must be [start, end], got {list(period)}")
        start, end = _parse_time(period[0], ds[N.TIME]), _parse_time(period[1], ds[N.TIME], end=True)
        if start > end:
            raise InputError(f"period {list(period)}: start is after end")
        sel[N.TIME] = slice(start, end)
    if box is not None:
        box = [float(v) for v in box]
        if len(box) != 4 or box[0] > box[1] or box[2] > box[3]:
            raise InputError(f"box must be [lon_min, lon_max, lat_min, lat_max] with min <= max, got {box}")
        sel[N.LON] = slice(box[0], box[1])
        sel[N.LAT] = slice(box[2], box[3])
    out = ds.sel(sel) if sel else ds
    for dim in sel:
        if out.sizes.get(dim, 1) == 0:
            window = list(period) if dim == N.TIME else box
            raise InputError(f"empty evaluation window: {'period' if dim == N.TIME else 'box'} {window} "
                             f"holds no '{dim}' value of {what} (which covers {_span(ds[dim])})")
    return out


def _parse_time(value: Any, coord: xr.DataArray, end: bool = False):
    """A period bound; a plain date ``YYYY-MM-DD`` as an end bound includes that whole day."""
    if np.issubdtype(coord.dtype, np.datetime64):
        try:
            t = np.datetime64(str(value))
        except ValueError:
            raise InputError(f"period bound {value!r} is not a date (use YYYY-MM-DD)") from None
        if end and t.dtype == np.dtype("datetime64[D]"):
            return (t + np.timedelta64(1, "D")).astype("datetime64[ns]") - np.timedelta64(1, "ns")
        return t.astype("datetime64[ns]")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"period bound {value!r} is not a number (the time coordinate is numeric)") from None


# --------------------------------------------------------------------------- writing


def _json_default(obj: Any):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not math.isfinite(float(obj)):
        return None
    return obj


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (NaN and infinities become ``null``), atomically."""
    text = json.dumps(_nan_to_none(obj), indent=2, default=_json_default, allow_nan=False)
    return write_bytes_atomic(path, (text + "\n").encode())


def write_digests(root: str | os.PathLike) -> dict[str, Any]:
    """Hash every chunk of the finished zarr store ``root`` and write
    :data:`oceanda.data.integrity.DIGEST_FILE` into it (atomically); returns the record.
    Call it once nothing more is written to the store."""
    record = integrity.store_record(root)
    write_json_atomic(Path(root) / integrity.DIGEST_FILE, record)
    return record


def write_file_digests(folder: str | os.PathLike, files: Iterable[str | os.PathLike]) -> dict[str, str]:
    """Record the digests of ``files`` (plain files in ``folder``) in its
    :data:`oceanda.data.integrity.DIGEST_FILE`; returns ``{name: digest}``."""
    record = integrity.files_record(files)
    write_json_atomic(Path(folder) / integrity.DIGEST_FILE, record)
    return record["files"]


def write_outputs(out: Path, pngs: dict[str, bytes], json_name: str, result: dict[str, Any], what: str) -> None:
    """Write the rendered figures, then the JSON ``result`` (each atomically) into ``out``;
    :class:`InputError` naming ``what`` and ``out`` when it cannot be written (a full device,
    say), after removing what this call wrote (and ``out`` if it made it): all or nothing."""
    out = Path(out)
    made = not out.exists()
    written: list[Path] = []
    try:
        for fname, data in pngs.items():
            written.append(write_bytes_atomic(out / fname, data))
        write_json_atomic(out / json_name, result)
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        if made:
            shutil.rmtree(out, ignore_errors=True)
        raise InputError(f"cannot write the {what} to {out}: {exc}") from None


def atomic_zarr_write(ds: xr.Dataset, path: str | os.PathLike, **to_zarr_kwargs: Any) -> Path:
    """Write ``ds`` to the zarr store ``path`` so that readers never see half a store.

    The store is written to a temporary sibling directory, then renamed into place; an
    existing store at ``path`` is replaced (moved aside first, deleted after the rename).
    Meant for outputs small enough to write in one go; chunk-parallel writers use
    region writes instead.
    """
    # (zarr 3 warns that consolidated metadata is not in its spec)
    with atomic_path(path, directory=True) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        ds.to_zarr(tmp, mode="w", **to_zarr_kwargs)
    return Path(path)
