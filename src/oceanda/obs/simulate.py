"""One call from a daily truth to along-track and gridded observations (OSSE building)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from oceanda.obs.sampling import _axis, _times, cell_edges, grid_tracks, sample_daily_fields
from oceanda.obs.satellites import Satellite
from oceanda.obs.tracks import TrackTable, ground_tracks


@dataclass(frozen=True)
class Observations:
    """Observations of a daily truth.

    Attributes:
        tracks: along-track locations (rows over land, where the truth is NaN, removed).
        values: ``(n,)`` observed values [m] = truth interpolated at the rows + noise.
        gridded: ``(T, ny, nx)`` daily mean of ``values`` per grid cell, NaN unobserved.
    """

    tracks: TrackTable
    values: np.ndarray
    gridded: np.ndarray


def observe_daily_fields(
    satellites: Sequence[Satellite],
    fields,
    lon,
    lat,
    times,
    bbox: Sequence[float] | None = None,
    noise: bool = True,
    seed: int = 0,
    time_interp: str = "day",
    dtype=np.float32,
) -> Observations:
    """Ground tracks over the grid's days, the truth sampled along them, and gridded.

    Args:
        satellites: from :func:`oceanda.obs.constellation`.
        fields: ``(T, ny, nx)`` daily truth (NaN on land), read one day at a time.
        lon, lat: ``(nx,)``, ``(ny,)`` cell centres [deg]; times: ``(T,)`` datetime64 days.
        bbox: box of the tracks; default the grid's outer cell edges.
        noise: draw each satellite's noise model (else exact values).
        seed: orbit phases left unset and noise draws.
        time_interp: see :func:`oceanda.obs.sample_daily_fields`.
        dtype: dtype of ``gridded``.

    Tracks cover the calendar days of ``times`` (from the first day 00:00 to the end of
    the last day).
    """
    lonc, latc = _axis(lon, "lon"), _axis(lat, "lat")
    t = _times(times)
    if bbox is None:
        le, ae = cell_edges(lonc), cell_edges(latc)
        bbox = (le[0], le[-1], max(ae[0], -90.0), min(ae[-1], 90.0))
    days = t.astype("datetime64[D]")
    tracks = ground_tracks(satellites, days[0], days[-1] + np.timedelta64(1, "D"), bbox, seed=seed)
    values = sample_daily_fields(
        tracks, fields, lonc, latc, t, noise=list(satellites) if noise else None, seed=seed,
        time_interp=time_interp,
    )
    keep = np.isfinite(values)
    if not keep.all():
        tracks, values = tracks.subset(keep), values[keep]
    gridded = grid_tracks(tracks, values, lonc, latc, t, dtype=dtype)
    return Observations(tracks, values, gridded)
