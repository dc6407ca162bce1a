"""Dimension, variable and attribute names of oceanda's datasets (one place, no imports).

Datasets are CF-conventional xarray datasets stored as zarr (netCDF accepted on input):

``truth.zarr``     ``ssh`` (time, lat, lon) [m]; ``ocean`` (lat, lon) 1 = ocean, 0 = land.
``obs.zarr``       ``ssh_obs`` (time, lat, lon) [m], NaN where unobserved (daily gridded);
                   along-track table on dim ``obs``: ``track_time``, ``track_lon``,
                   ``track_lat``, ``track_ssh``, ``track_sat``; ``ocean`` as above.
``analysis.zarr``  ``ssh`` (time, lat, lon) [m]; optional ``ssh_std`` (time, lat, lon)
                   and ``ssh_members`` (member, time, lat, lon).

Coordinates: ``time`` datetime64 (daily), ``lat`` and ``lon`` 1-D, degrees, increasing.
"""

TIME = "time"
LAT = "lat"
LON = "lon"
MEMBER = "member"
OBS = "obs"

#: dims of a gridded field, in storage order
FIELD_DIMS = (TIME, LAT, LON)

SSH = "ssh"
SSH_OBS = "ssh_obs"
SSH_STD = "ssh_std"
SSH_MEMBERS = "ssh_members"
OCEAN = "ocean"

TRACK_TIME = "track_time"
TRACK_LON = "track_lon"
TRACK_LAT = "track_lat"
TRACK_SSH = "track_ssh"
TRACK_SAT = "track_sat"

#: CF attributes of the SSH variables
SSH_ATTRS = {
    "units": "m",
    "standard_name": "sea_surface_height_above_geoid",
    "long_name": "sea surface height",
}
LON_ATTRS = {"units": "degrees_east", "standard_name": "longitude", "axis": "X"}
LAT_ATTRS = {"units": "degrees_north", "standard_name": "latitude", "axis": "Y"}
