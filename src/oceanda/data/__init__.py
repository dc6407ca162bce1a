"""Data layer: grids, named domains, OSSE building, DAW patches, xarray/zarr/netCDF I/O.

The only layer that imports xarray, zarr, netCDF4 and dask.
"""
