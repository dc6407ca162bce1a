"""Regular longitude/latitude grids with a land mask and metric factors.

A :class:`Grid` is cell-centred: ``lon[i] = lon_min + (i + 1/2) * res`` and
``lat[j] = lat_min + (j + 1/2) * res``; cell ``(j, i)`` covers
``[lon[i] - res/2, lon[i] + res/2] x [lat[j] - res/2, lat[j] + res/2]``.
Arrays on the grid have shape ``(ny, nx) = (len(lat), len(lon))`` (dims ``(lat, lon)``).

Metric factors are geodesic lengths on the WGS84 ellipsoid (:class:`pyproj.Geod`):

- ``dx_m[j, i]`` = length of the geodesic between the cell's west and east edges at the
  cell-centre latitude, i.e. ``~ N(phi) cos(phi) * dlambda`` (N the prime-vertical radius);
- ``dy_m[j, i]`` = length of the meridian arc between the cell's south and north edges,
  ``~ M(phi) * dphi`` (M the meridional radius of curvature).

At 1/20 deg this is ``dx ~ 5.57 km cos(lat)`` and ``dy ~ 5.55 km``.

The land mask is evaluated at cell centres with ``global_land_mask.globe.is_land``
(GLOBE 1 km land/sea mask; most lakes count as land).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from pyproj import CRS, Geod

from oceanda.errors import ConfigError

#: ellipsoid used for metric factors (same as the grid's CRS, EPSG:4326)
GEOD = Geod(ellps="WGS84")

#: a box must be a whole number of cells to within this fraction of a cell
_CELL_TOL = 1e-3


def _cache_dir() -> Path | None:
    root = os.environ.get("OCEANDA_CACHE_DIR")
    if root == "":
        return None  # caching disabled
    return Path(root) if root else Path.home() / ".cache" / "oceanda"


def land_mask(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Boolean land mask ``(ny, nx)`` at the points ``(lat[j], lon[i])`` (degrees).

    Longitudes are wrapped to ``[-180, 180)`` before the look-up in the GLOBE mask.
    Importing ``global_land_mask`` decompresses its whole 1 km mask (~0.9 GB, seconds),
    so masks are cached per grid in ``$OCEANDA_CACHE_DIR`` (default ``~/.cache/oceanda``;
    set it to an empty string to disable), keyed by a hash of the coordinates.
    """
    lon = np.asarray(lon, dtype=np.float64)
    lat = np.asarray(lat, dtype=np.float64)
    key = hashlib.sha1(b"globe-v1" + lon.tobytes() + b"|" + lat.tobytes()).hexdigest()[:20]
    if key in _MASKS:
        return _MASKS[key].copy()
    cache = _cache_dir()
    path = cache / "landmask" / f"{key}.npy" if cache is not None else None
    if path is not None and path.is_file():
        try:
            mask = np.load(path)
            if mask.shape == (lat.size, lon.size) and mask.dtype == bool:
                _MASKS[key] = mask
                return mask.copy()
        except (OSError, ValueError):
            pass
    from global_land_mask import globe  # decompresses the GLOBE mask: import on first use

    lon_w = (lon + 180.0) % 360.0 - 180.0
    lon2, lat2 = np.meshgrid(lon_w, lat)
    mask = np.asarray(globe.is_land(lat2, lon2), dtype=bool)
    _MASKS[key] = mask
    if path is not None:
        try:
            from oceanda.data.files import atomic_path

            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, mask)
        except OSError:
            pass  # a read-only home: no cache
    return mask.copy()


#: in-process cache of land masks by coordinate hash
_MASKS: dict[str, np.ndarray] = {}


def _check_axis(name: str, values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ConfigError(f"grid {name}: expected a non-empty 1-D array, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ConfigError(f"grid {name}: contains NaN or infinite values")
    if values.size > 1 and not np.all(np.diff(values) > 0):
        raise ConfigError(f"grid {name}: must be strictly increasing")
    return values


def box_shape(lon_min: Any, lon_max: Any, lat_min: Any, lat_max: Any, resolution: Any) -> tuple[int, int]:
    """``(nx, ny)`` of the regular grid on a box (see :meth:`Grid.regular`), without building it.

    Raises:
        ConfigError: naming the bad key (not a number, not finite, empty or reversed box,
            latitudes outside [-90, 90], spans that are not a whole number of cells).
    """
    try:
        lon_min, lon_max, lat_min, lat_max, resolution = (
            float(v) for v in (lon_min, lon_max, lat_min, lat_max, resolution)
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"grid box: lon_min, lon_max, lat_min, lat_max, resolution must be numbers ({exc})") from None
    for key, v in (("lon_min", lon_min), ("lon_max", lon_max), ("lat_min", lat_min),
                   ("lat_max", lat_max), ("resolution", resolution)):
        if not math.isfinite(v):
            raise ConfigError(f"grid {key}={v}: must be finite")
    if resolution <= 0:
        raise ConfigError(f"grid resolution={resolution}: must be > 0 (degrees)")
    if lon_min >= lon_max:
        raise ConfigError(f"grid lon_min={lon_min} must be < lon_max={lon_max}")
    if lat_min >= lat_max:
        raise ConfigError(f"grid lat_min={lat_min} must be < lat_max={lat_max}")
    if lat_min < -90 or lat_max > 90:
        raise ConfigError(f"grid lat_min={lat_min}, lat_max={lat_max}: must lie in [-90, 90]")
    if lon_max - lon_min > 360:
        raise ConfigError(f"grid lon_min={lon_min}, lon_max={lon_max}: span more than 360 deg")
    if lon_min < -360 or lon_max > 360:
        raise ConfigError(f"grid lon_min={lon_min}, lon_max={lon_max}: must lie in [-360, 360]")
    shape = []
    for key, span in (("lon", lon_max - lon_min), ("lat", lat_max - lat_min)):
        n = span / resolution
        if abs(n - round(n)) > _CELL_TOL or round(n) < 1:
            raise ConfigError(
                f"grid resolution={resolution}: the {key} span {span:g} deg is not a whole "
                f"number of cells ({n:.4f}); adjust {key}_min/{key}_max or resolution"
            )
        shape.append(int(round(n)))
    return shape[0], shape[1]


@dataclass(frozen=True, eq=False)
class Grid:
    """A regular (or at least rectilinear) lon/lat grid, cell-centred, in degrees.

    Attributes:
        lon: ``(nx,)`` cell-centre longitudes, strictly increasing, float64 degrees east.
        lat: ``(ny,)`` cell-centre latitudes, strictly increasing, float64 degrees north.
        ocean: ``(ny, nx)`` bool, True for ocean cells.
        crs: coordinate reference system of ``lon``/``lat`` (EPSG:4326).
    """

    lon: np.ndarray
    lat: np.ndarray
    ocean: np.ndarray
    crs: CRS = field(default_factory=lambda: CRS.from_epsg(4326))

    def __post_init__(self) -> None:
        lon = _check_axis("lon", self.lon)
        lat = _check_axis("lat", self.lat)
        if np.any(np.abs(lat) > 90.0):
            raise ConfigError("grid lat: latitudes must lie in [-90, 90]")
        ocean = np.asarray(self.ocean, dtype=bool)
        if ocean.shape != (lat.size, lon.size):
            raise ConfigError(
                f"grid ocean: shape {ocean.shape} does not match (len(lat), len(lon)) = "
                f"{(lat.size, lon.size)}"
            )
        for name, arr in (("lon", lon), ("lat", lat), ("ocean", ocean)):
            arr = np.array(arr, copy=True)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    # ------------------------------------------------------------------ builders
    @classmethod
    def regular(
        cls,
        lon_min: float,
        lon_max: float,
        lat_min: float,
        lat_max: float,
        resolution: float,
        land: bool = True,
    ) -> Grid:
        """Regular cell-centred grid covering the box ``[lon_min, lon_max] x [lat_min, lat_max]``.

        ``nx = (lon_max - lon_min) / resolution`` and ``ny = (lat_max - lat_min) / resolution``
        must be whole numbers (to 1e-3 cell). With ``land=True`` the ocean mask comes from
        the GLOBE land mask at cell centres; with ``land=False`` every cell is ocean.

        Raises:
            ConfigError: naming the bad key (``lon_min``/``lon_max``, ``lat_min``/``lat_max``,
                ``resolution``).
        """
        nx, ny = box_shape(lon_min, lon_max, lat_min, lat_max, resolution)
        lon_min, lat_min, resolution = float(lon_min), float(lat_min), float(resolution)
        lon = lon_min + (np.arange(nx) + 0.5) * resolution
        lat = lat_min + (np.arange(ny) + 0.5) * resolution
        ocean = ~land_mask(lon, lat) if land else np.ones((ny, nx), dtype=bool)
        return cls(lon=lon, lat=lat, ocean=ocean)

    @classmethod
    def from_coords(cls, lon: Any, lat: Any, ocean: Any | None = None, land: bool = True) -> Grid:
        """Grid from given cell-centre coordinates; ``ocean`` defaults to the GLOBE mask
        (or all ocean when ``land=False``)."""
        lon = _check_axis("lon", lon)
        lat = _check_axis("lat", lat)
        if ocean is None:
            ocean = ~land_mask(lon, lat) if land else np.ones((lat.size, lon.size), dtype=bool)
        return cls(lon=lon, lat=lat, ocean=np.asarray(ocean, dtype=bool))

    # ---------------------------------------------------------------- properties
    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)``."""
        return (self.lat.size, self.lon.size)

    @property
    def nx(self) -> int:
        return self.lon.size

    @property
    def ny(self) -> int:
        return self.lat.size

    @property
    def resolution(self) -> float:
        """Grid spacing in degrees (mean longitude spacing; latitude spacing if nx == 1)."""
        if self.lon.size > 1:
            return float((self.lon[-1] - self.lon[0]) / (self.lon.size - 1))
        if self.lat.size > 1:
            return float((self.lat[-1] - self.lat[0]) / (self.lat.size - 1))
        raise ConfigError("grid has a single cell: its resolution is undefined")

    @property
    def dlon(self) -> np.ndarray:
        """``(nx,)`` cell widths in degrees (from midpoints; ends extrapolated)."""
        return _widths(self.lon, self.resolution)

    @property
    def dlat(self) -> np.ndarray:
        """``(ny,)`` cell heights in degrees."""
        return _widths(self.lat, self.resolution)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(lon_min, lon_max, lat_min, lat_max)`` of the cell edges."""
        dlon, dlat = self.dlon, self.dlat
        return (float(self.lon[0] - dlon[0] / 2), float(self.lon[-1] + dlon[-1] / 2),
                float(self.lat[0] - dlat[0] / 2), float(self.lat[-1] + dlat[-1] / 2))

    @cached_property
    def dx_m(self) -> np.ndarray:
        """``(ny, nx)`` zonal cell size [m]: geodesic length between the west and east
        cell edges at the cell-centre latitude (WGS84)."""
        lon2, lat2 = np.meshgrid(self.lon, self.lat)
        half = np.broadcast_to(self.dlon / 2, lon2.shape)
        _, _, dist = GEOD.inv(lon2 - half, lat2, lon2 + half, lat2)
        out = np.asarray(dist, dtype=np.float64).reshape(self.shape)
        out.setflags(write=False)
        return out

    @cached_property
    def dy_m(self) -> np.ndarray:
        """``(ny, nx)`` meridional cell size [m]: meridian arc between the south and north
        cell edges (WGS84)."""
        lon2, lat2 = np.meshgrid(self.lon, self.lat)
        half = np.broadcast_to(self.dlat[:, None] / 2, lon2.shape)
        south = np.clip(lat2 - half, -90.0, 90.0)
        north = np.clip(lat2 + half, -90.0, 90.0)
        _, _, dist = GEOD.inv(lon2, south, lon2, north)
        out = np.asarray(dist, dtype=np.float64).reshape(self.shape)
        out.setflags(write=False)
        return out

    @property
    def ocean_fraction(self) -> float:
        return float(self.ocean.mean())

    # ------------------------------------------------------------------- helpers
    def subset(self, lon_min: float, lon_max: float, lat_min: float, lat_max: float) -> Grid:
        """Cells whose centres lie in the box (inclusive); raises ConfigError when empty."""
        ix = np.flatnonzero((self.lon >= lon_min) & (self.lon <= lon_max))
        iy = np.flatnonzero((self.lat >= lat_min) & (self.lat <= lat_max))
        if ix.size == 0 or iy.size == 0:
            raise ConfigError(
                f"box lon {lon_min}..{lon_max}, lat {lat_min}..{lat_max} holds no cell of the grid "
                f"(grid covers {self.bounds})"
            )
        return Grid(lon=self.lon[ix], lat=self.lat[iy], ocean=self.ocean[np.ix_(iy, ix)], crs=self.crs)

    def index_of(self, other: Grid) -> tuple[slice, slice]:
        """``(lat_slice, lon_slice)`` such that ``self`` cropped by them equals ``other``
        (``other`` must be a contiguous sub-grid of ``self``)."""
        sl = []
        for name, mine, theirs in (("lat", self.lat, other.lat), ("lon", self.lon, other.lon)):
            i0 = int(np.argmin(np.abs(mine - theirs[0])))
            tol = 1e-6 * max(self.resolution, 1e-9)
            if i0 + theirs.size > mine.size or not np.allclose(mine[i0:i0 + theirs.size], theirs, rtol=0, atol=tol):
                raise ConfigError(f"grid {name}: the requested grid is not a sub-grid of this one")
            sl.append(slice(i0, i0 + theirs.size))
        return sl[0], sl[1]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Grid):
            return NotImplemented
        return (self.shape == other.shape and np.array_equal(self.lon, other.lon)
                and np.array_equal(self.lat, other.lat) and np.array_equal(self.ocean, other.ocean))

    def __hash__(self) -> int:
        return hash((self.shape, self.bounds))

    def __repr__(self) -> str:
        lo0, lo1, la0, la1 = self.bounds
        return (f"Grid({self.ny}x{self.nx}, lon {lo0:g}..{lo1:g}, lat {la0:g}..{la1:g}, "
                f"res {self.resolution:g} deg, ocean {100 * self.ocean_fraction:.1f}%)")


def _widths(x: np.ndarray, default: float) -> np.ndarray:
    if x.size == 1:
        return np.array([default])
    mid = (x[1:] + x[:-1]) / 2
    edges = np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])
    return np.diff(edges)
