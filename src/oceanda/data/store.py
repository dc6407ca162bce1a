"""Distributed-inference I/O: lazy tile + halo reads of observations, chunk-aligned
region writes of the analysis.

Reading (:class:`ObsSource`): the observation dataset is opened lazily (xarray + dask, via
:func:`oceanda.data.io.open_dataset`); :meth:`ObsSource.read` loads one box of global
indices, so a rank reads only the tiles (and halos) it works on. Boxes may pass the
domain's edges: the outside is padding (NaN).

Writing (:class:`AnalysisStore`): rank 0 creates the store (coordinates, CF attributes,
provenance, every data variable filled with NaN, chunks = the tile shape) under a working
name (``analysis.zarr.incomplete`` in ``oceanda infer``); then each rank writes the tiles it
owns with :meth:`AnalysisStore.write_region`; once all are written, :meth:`AnalysisStore.finalize`
records the chunk digests (:mod:`oceanda.data.integrity`) and renames the store to its final
name, so ``analysis.zarr`` exists only complete. The region must cover whole chunks (and whole shards
when the array is sharded): :func:`check_region_aligned` raises otherwise. This is enforced,
not assumed: xarray and zarr accept misaligned region writes silently, and two ranks
writing parts of one chunk (or shard) lose each other's updates.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from oceanda.data import integrity, io
from oceanda.data import names as N
from oceanda.data.files import atomic_path
from oceanda.data.patches import Box
from oceanda.errors import InputError


class ObsSource:
    """Gridded observations ``ssh_obs`` (time, lat, lon) opened lazily.

    Args:
        path: zarr store or netCDF file written by ``oceanda generate`` (or alike).
        box: optional ``[lon_min, lon_max, lat_min, lat_max]`` sub-domain (inclusive).
        period: optional ``[start, end]`` dates (inclusive).

    Raises:
        InputError: missing file / variable, a box or period outside the data ("obs outside
            the domain"), or no observation at all in the window.
    """

    def __init__(self, path: str | os.PathLike, box: Sequence[float] | None = None,
                 period: Sequence[Any] | None = None) -> None:
        self.path = str(Path(path).expanduser())
        ds = io.open_dataset(self.path, [N.SSH_OBS], optional=[N.OCEAN])
        full = ds
        if box is not None:
            lon, lat = ds[N.LON].values, ds[N.LAT].values
            b = [float(v) for v in box]
            if len(b) != 4:
                raise InputError(f"domain box must be [lon_min, lon_max, lat_min, lat_max], got {list(box)}")
            if b[1] < lon[0] or b[0] > lon[-1] or b[3] < lat[0] or b[2] > lat[-1]:
                raise InputError(
                    f"observations {self.path} cover lon [{lon[0]:.3f}, {lon[-1]:.3f}] x lat "
                    f"[{lat[0]:.3f}, {lat[-1]:.3f}]: the domain box {b} lies outside them")
        ds = io.select_window(ds, period=period, box=box, what=f"observations {self.path}")
        self.ds = ds
        self.var = ds[N.SSH_OBS]
        self.shape = tuple(int(v) for v in self.var.shape)
        self.lon = np.asarray(ds[N.LON].values, np.float64)
        self.lat = np.asarray(ds[N.LAT].values, np.float64)
        self.time = ds[N.TIME].values
        if N.OCEAN in ds:
            self.ocean = np.asarray(ds[N.OCEAN].values) > 0
        else:
            warnings.warn(f"{self.path} has no '{N.OCEAN}' mask: every cell is treated as ocean",
                          stacklevel=2)
            self.ocean = np.ones(self.shape[1:], bool)
        self.attrs = dict(full.attrs)

    @property
    def time_days(self) -> np.ndarray:
        """Time as float days since the first day of the window."""
        t = self.time
        if np.issubdtype(t.dtype, np.datetime64):
            return (t - t[0]) / np.timedelta64(1, "D")
        return np.asarray(t, np.float64) - float(t[0])

    def count_observed(self) -> int:
        """Number of finite observations in the window (reads the window chunk by chunk);
        :class:`InputError` when one is infinite or absurd (:func:`oceanda.data.io.check_values`)."""
        return io.check_values(self.var, f"observations {self.path}")

    def read(self, box: Box) -> np.ndarray:
        """The observations on the global index ``box`` as float64 (T, H, W); NaN outside
        the domain and where unobserved. Only the chunks touching the box are read."""
        out = np.full(tuple(hi - lo for lo, hi in box), np.nan)
        inner = tuple(slice(max(lo, 0), min(hi, n)) for (lo, hi), n in zip(box, self.shape))
        if any(s.stop <= s.start for s in inner):
            return out
        vals = io.compute(self.var.isel({N.TIME: inner[0], N.LAT: inner[1], N.LON: inner[2]}),
                          f"observations {self.path}",
                          f"variable '{N.SSH_OBS}' in the box {[tuple(b) for b in box]} (time, lat, lon indices)"
                          ).values
        dst = tuple(slice(s.start - lo, s.stop - lo) for s, (lo, _) in zip(inner, box))
        out[dst] = vals
        return out


def extend_coord(values: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """``values`` on indices ``[lo, hi)``, extrapolated linearly with the edge spacing
    outside ``[0, len(values))`` (padding keeps regular coordinates)."""
    v = np.asarray(values, np.float64)
    n = len(v)
    idx = np.arange(lo, hi)
    d0 = v[1] - v[0] if n > 1 else 1.0
    d1 = v[-1] - v[-2] if n > 1 else 1.0
    out = np.where(idx < 0, v[0] + idx * d0, 0.0)
    out = np.where(idx >= n, v[-1] + (idx - n + 1) * d1, out)
    inside = (idx >= 0) & (idx < n)
    out[inside] = v[idx[inside]]
    return out


def check_region_aligned(region: Box, chunks: Sequence[int], shape: Sequence[int],
                         what: str = "analysis") -> None:
    """Raise ``ValueError`` unless every ``[lo, hi)`` of ``region`` starts on a chunk (or
    shard) boundary and ends on one or at the array's end."""
    for (lo, hi), c, n in zip(region, chunks, shape):
        if lo % c or (hi % c and hi != n) or not 0 <= lo < hi <= n:
            raise ValueError(f"{what}: region {region} is not aligned to chunks/shards {tuple(chunks)} "
                             f"of an array of shape {tuple(shape)}: concurrent writers would "
                             "lose updates")


class AnalysisStore:
    """The ``analysis.zarr`` output of distributed inference (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, final: str | os.PathLike | None = None) -> None:
        self.path = Path(path)
        self.final = None if final is None else Path(final)
        self._group = None

    @classmethod
    def create(cls, path: str | os.PathLike, *, time: np.ndarray, lat: np.ndarray,
               lon: np.ndarray, ocean: np.ndarray, chunks: Sequence[int],
               variables: Sequence[str] = (N.SSH,), dtype: str = "float32",
               attrs: dict[str, Any] | None = None) -> AnalysisStore:
        """Create the store (metadata, coordinates, ``ocean``; data variables all NaN) with
        chunks ``chunks`` (time, lat, lon); written to a temporary sibling then renamed."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = (len(time), len(lat), len(lon))
        chunks = tuple(int(c) for c in chunks)
        import dask.array as da

        data_vars = {}
        encoding = {}
        for name in variables:
            arr = da.full(shape, np.nan, dtype=dtype, chunks=chunks)
            data_vars[name] = ((N.TIME, N.LAT, N.LON), arr, dict(N.SSH_ATTRS))
            encoding[name] = {"chunks": chunks}
        if N.SSH_STD in data_vars:
            data_vars[N.SSH_STD][2].update(long_name="analysis standard deviation of sea surface height",
                                           standard_name="sea_surface_height_above_geoid standard_error")
        data_vars[N.OCEAN] = ((N.LAT, N.LON), np.asarray(ocean, np.int8),
                              {"long_name": "ocean mask", "flag_values": [0, 1],
                               "flag_meanings": "land ocean"})
        ds = xr.Dataset(data_vars, coords={
            N.TIME: (N.TIME, time, {"standard_name": "time", "axis": "T"}),
            N.LAT: (N.LAT, np.asarray(lat), dict(N.LAT_ATTRS)),
            N.LON: (N.LON, np.asarray(lon), dict(N.LON_ATTRS)),
        }, attrs={"Conventions": "CF-1.8", **(attrs or {}), "status": "incomplete"})
        with atomic_path(path, directory=True) as tmp:
            ds.to_zarr(tmp, mode="w", compute=False, encoding=encoding, consolidated=False)
        return cls(path)

    @property
    def group(self):
        if self._group is None:
            self._group = zarr.open_group(str(self.path), mode="r+")
        return self._group

    def array(self, name: str):
        return self.group[name]

    def ensure_outputs(self, spec: dict[str, tuple], tile_shape: Sequence[int]) -> None:
        """Add ``ssh_std`` (when ``"var"`` in ``spec``) and ``ssh_members`` (``"members"``:
        ``spec["members"] = (N,)``) to the store if missing, NaN-filled, chunked like ``ssh``
        (one chunk over members). Called by rank 0 before any rank writes them."""
        ssh = self.array(N.SSH)
        shape, dtype = ssh.shape, ssh.dtype
        wanted = {}
        if "var" in spec:
            wanted[N.SSH_STD] = ((N.TIME, N.LAT, N.LON), shape, tuple(tile_shape),
                                 {**N.SSH_ATTRS, "long_name": "standard deviation of the SSH analysis",
                                  "standard_name": "sea_surface_height_above_geoid standard_error"})
        if "members" in spec:
            n = int(spec["members"][0])
            wanted[N.SSH_MEMBERS] = ((N.MEMBER, N.TIME, N.LAT, N.LON), (n, *shape),
                                     (n, *tile_shape), {**N.SSH_ATTRS, "long_name":
                                                        "conditional ensemble members of SSH"})
        for name, (dims, shp, chunks, attrs) in wanted.items():
            if name in self.group:
                continue
            self.group.create_array(name=name, shape=shp, chunks=chunks, dtype=dtype,
                                    fill_value=np.nan, dimension_names=dims, attributes=attrs)

    def write_region(self, name: str, region: Box, data: np.ndarray) -> None:
        """Write ``data`` to the global index ``region`` of variable ``name``; the region
        must be chunk- (and shard-) aligned (:func:`check_region_aligned`)."""
        arr = self.array(name)
        grain = getattr(arr, "shards", None) or arr.chunks
        check_region_aligned(region, grain, arr.shape, what=f"{self.path}/{name}")
        if data.shape != tuple(hi - lo for lo, hi in region):
            raise ValueError(f"data of shape {data.shape} for region {region}")
        arr[tuple(slice(lo, hi) for lo, hi in region)] = data.astype(arr.dtype, copy=False)

    def finalize(self, attrs: dict[str, Any] | None = None) -> None:
        """Mark the store complete (attribute ``status``), consolidate its metadata (as
        xarray's ``to_zarr`` does by default, so that ``xr.open_zarr`` opens it quickly),
        record its chunk digests (:func:`oceanda.data.io.write_digests`) and rename
        it to its final name (when created with ``final``). A store already complete is
        only renamed (a run killed between its digests and its rename)."""
        if not (self.group.attrs.get("status") == "complete" and (self.path / integrity.DIGEST_FILE).is_file()):
            self.group.attrs.update({**(attrs or {}), "status": "complete"})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                zarr.consolidate_metadata(str(self.path))
            io.write_digests(self.path)
        self._group = None
        if self.final is not None and self.final != self.path:
            os.rename(self.path, self.final)
            self.path = self.final


def to_json_attr(obj: Any) -> str:
    """A JSON string for a zarr/netCDF attribute."""
    return json.dumps(obj, sort_keys=True, default=str)
