"""Open, validate and atomically write oceanda's datasets (zarr or netCDF).

Readers are lazy: variables come back as dask-backed :class:`xarray.DataArray` objects
with the store's own chunks, so a caller that selects a window reads only that window.
Every problem a user can cause with a file raises :class:`oceanda.errors.InputError`
naming the file and the problem, before any computation:

* the path does not exist or is neither a zarr store nor a netCDF file;
* a required variable is missing (the message lists the variables that are there);
* a dimension is not one of ``(time, lat, lon)`` (``member`` for ensembles), or a
  coordinate is missing, not 1-D, holds NaN, is duplicated or is not monotonic;
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
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from oceanda.data import names as N
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
            if fmt == "zarr":
                return xr.open_dataset(p, engine="zarr", chunks={})
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
    return _validate(ds, list(variables), str(Path(path).expanduser()), optional=optional)


def open_field(path: str | os.PathLike, var: str, required: bool = True) -> xr.DataArray | None:
    """One validated variable of ``path`` as a lazy DataArray (``None`` if absent and not required)."""
    if required:
        return open_dataset(path, [var])[var]
    ds = open_dataset(path, [], optional=[var])
    return ds[var] if var in ds else None


# --------------------------------------------------------------------------- checks


def _as_days(values: np.ndarray) -> np.ndarray:
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
        ca, cb = _as_days(a[dim].values), _as_days(b[dim].values)
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


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (NaN and infinities become ``null``), atomically."""
    text = json.dumps(_nan_to_none(obj), indent=2, default=_json_default, allow_nan=False)
    return write_bytes_atomic(path, (text + "\n").encode())


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        with warnings.catch_warnings():  # zarr 3 warns that consolidated metadata is not in its spec
            warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
            ds.to_zarr(tmp, mode="w", **to_zarr_kwargs)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            old.rmdir()
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not path.exists():
            os.rename(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path
