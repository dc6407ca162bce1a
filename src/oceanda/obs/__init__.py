"""Observations: nadir altimeters and SWOT swaths from orbital mechanics, noise models,
sampling a truth along tracks, daily gridding.

Typical use (the OSSE ``generate`` app)::

    from oceanda import obs
    sats = obs.constellation("4nadirs_swot")            # or a configs/obs/*.yaml dict
    tracks = obs.ground_tracks(sats, "2012-10-01", "2013-10-01",
                               bbox=(-65, -55, 33, 43))  # TrackTable, seconds per year
    y = obs.sample_daily_fields(tracks, ssh, lon, lat, days, noise=sats, seed=0)
    gridded = obs.grid_tracks(tracks, y, lon, lat, days)   # (T, ny, nx), NaN unobserved

Modules: :mod:`~oceanda.obs.orbit` (J2 circular orbits, exact repeat), :mod:`~oceanda.obs.
satellites` (presets, constellations), :mod:`~oceanda.obs.tracks` (ground tracks, swath
geometry), :mod:`~oceanda.obs.noise`, :mod:`~oceanda.obs.sampling`,
:mod:`~oceanda.obs.simulate` (:func:`observe_daily_fields`:
all of the above in one call, for a daily truth on a grid).
"""

from oceanda.obs.noise import ar1_segments, noise_values
from oceanda.obs.orbit import Orbit, repeat_semi_major_axis
from oceanda.obs.sampling import bilinear, cell_edges, grid_tracks, sample, sample_daily_fields
from oceanda.obs.satellites import (
    CONSTELLATIONS,
    PRESETS,
    Instrument,
    NoiseModel,
    OrbitSpec,
    Satellite,
    constellation,
    satellite,
    with_noise,
)
from oceanda.obs.simulate import Observations, observe_daily_fields
from oceanda.obs.tracks import TrackTable, ground_tracks, iter_ground_tracks, orbits_for

__all__ = [
    "CONSTELLATIONS",
    "PRESETS",
    "Instrument",
    "NoiseModel",
    "Observations",
    "Orbit",
    "OrbitSpec",
    "Satellite",
    "TrackTable",
    "ar1_segments",
    "bilinear",
    "cell_edges",
    "constellation",
    "grid_tracks",
    "ground_tracks",
    "iter_ground_tracks",
    "noise_values",
    "observe_daily_fields",
    "orbits_for",
    "repeat_semi_major_axis",
    "sample",
    "sample_daily_fields",
    "satellite",
    "with_noise",
]
