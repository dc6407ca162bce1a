"""Grid and named domains: cell counts, metric factors vs closed forms, land mask, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from oceanda.data.domains import DOMAINS, domain_spec, get_domain
from oceanda.data.grid import Grid
from oceanda.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# WGS84
A = 6378137.0
F = 1 / 298.257223563
E2 = F * (2 - F)


def test_gulfstream_cell_counts_and_centres():
    g = get_domain("gulfstream")
    assert g.shape == (200, 200)
    np.testing.assert_allclose(g.lon[[0, -1]], [-64.975, -55.025], rtol=0, atol=1e-9)
    np.testing.assert_allclose(g.lat[[0, -1]], [33.025, 42.975], rtol=0, atol=1e-9)
    assert g.resolution == pytest.approx(0.05, abs=1e-12)
    assert g.bounds == pytest.approx((-65, -55, 33, 43), abs=1e-9)
    assert get_domain("gulfstream_train").shape == (240, 240)
    natl = get_domain("natl")
    assert natl.shape == (740, 1640)
    assert natl.crs.to_epsg() == 4326


def test_metric_factors_against_closed_forms():
    g = Grid.regular(-60, -59, 20, 60, 0.05, land=False)
    phi = np.deg2rad(g.lat)
    dl = np.deg2rad(0.05)
    # spherical closed form quoted in the issue: dx ~ 5.56 km cos(lat) at 1/20 deg
    dx_sphere = 6371e3 * dl * np.cos(phi)
    np.testing.assert_allclose(g.dx_m[:, 0], dx_sphere, rtol=5e-3)
    # ellipsoidal closed forms: parallel arc N cos(phi) dl, meridian arc M dphi
    n = A / np.sqrt(1 - E2 * np.sin(phi) ** 2)
    m = A * (1 - E2) / (1 - E2 * np.sin(phi) ** 2) ** 1.5
    np.testing.assert_allclose(g.dx_m[:, 0], n * np.cos(phi) * dl, rtol=1e-5)
    np.testing.assert_allclose(g.dy_m[:, 0], m * dl, rtol=1e-5)
    assert g.dx_m.shape == g.dy_m.shape == g.shape
    # regular grid: metric factors do not depend on longitude
    np.testing.assert_allclose(g.dx_m, np.broadcast_to(g.dx_m[:, :1], g.shape), rtol=1e-10)


def test_land_mask_on_the_us_coast():
    # Cape Hatteras area: North Carolina mainland in the west, open ocean in the east
    g = Grid.regular(-78, -73, 33, 37, 0.05)
    j = np.searchsorted(g.lat, 35.8)
    assert not g.ocean[j, np.searchsorted(g.lon, -77.5)]  # inland NC
    assert g.ocean[j, np.searchsorted(g.lon, -74.0)]  # offshore
    assert 0.2 < g.ocean_fraction < 0.9
    assert Grid.regular(-78, -73, 33, 37, 0.05, land=False).ocean.all()
    # the data-challenge box is open ocean; the basin has substantial land
    assert get_domain("gulfstream").ocean.all()
    natl = get_domain({"name": "natl", "resolution": 0.5})
    assert 0.5 < natl.ocean_fraction < 0.95


def test_user_box_and_overrides():
    g = get_domain({"lon_min": -70, "lon_max": -60, "lat_min": 30, "lat_max": 35, "resolution": 0.25})
    assert g.shape == (20, 40)
    g2 = get_domain({"name": "gulfstream", "resolution": 0.1})
    assert g2.shape == (100, 100)
    # 1/12 deg is not exactly representable; whole cells are accepted within tolerance
    assert get_domain({"lon_min": 0, "lon_max": 1, "lat_min": 0, "lat_max": 1, "resolution": 1 / 12,
                       "land": False}).shape == (12, 12)
    spec = domain_spec("natl")
    assert spec["lon_min"] == -77 and spec["land"] is True


@pytest.mark.parametrize(
    "box, key",
    [
        (dict(lon_min=-60, lon_max=-65, lat_min=30, lat_max=35, resolution=0.1), "lon_min"),
        (dict(lon_min=-65, lon_max=-60, lat_min=35, lat_max=35, resolution=0.1), "lat_min"),
        (dict(lon_min=-65, lon_max=-60, lat_min=30, lat_max=35, resolution=0), "resolution"),
        (dict(lon_min=-65, lon_max=-60, lat_min=30, lat_max=35, resolution=-0.1), "resolution"),
        (dict(lon_min=-65, lon_max=-60, lat_min=30, lat_max=35, resolution=0.3), "resolution"),
        (dict(lon_min=-65, lon_max=-60, lat_min=80, lat_max=95, resolution=1), "lat_max"),
        (dict(lon_min=-65, lon_max=-60, lat_min=30, resolution=0.1), "domain.lat_max"),
        (dict(lon_min=-65, lon_max=-60, lat_min=30, lat_max=35, resolution=0.1, foo=1), "domain.foo"),
        (dict(lon_min="west", lon_max=-60, lat_min=30, lat_max=35, resolution=0.1), "lon_min"),
        ("atlantis", "atlantis"),
    ],
)
def test_bad_boxes_raise_config_error_naming_the_key(box, key):
    with pytest.raises(ConfigError, match=key):
        get_domain(box)


def test_subset_and_index_of():
    big = get_domain({"name": "gulfstream_train", "land": False})
    small = get_domain({"name": "gulfstream", "land": False})
    sl = big.index_of(small)
    np.testing.assert_array_equal(big.lon[sl[1]], small.lon)
    np.testing.assert_array_equal(big.lat[sl[0]], small.lat)
    sub = big.subset(-65, -55, 33, 43)
    assert sub.shape == (200, 200)
    with pytest.raises(ConfigError, match="no cell"):
        big.subset(0, 1, 0, 1)
    with pytest.raises(ConfigError):
        small.index_of(big)


def test_grid_validates_its_arrays():
    with pytest.raises(ConfigError, match="lon"):
        Grid(lon=np.array([0.0, 0.0]), lat=np.array([1.0]), ocean=np.ones((1, 2), bool))
    with pytest.raises(ConfigError, match="ocean"):
        Grid(lon=np.array([0.0, 1.0]), lat=np.array([1.0]), ocean=np.ones((2, 2), bool))
    g = Grid.from_coords([0.5, 1.5], [10.5], land=False)
    assert g.lon.flags.writeable is False
    assert g == Grid.from_coords([0.5, 1.5], [10.5], land=False)


@pytest.mark.parametrize("path", sorted((CONFIGS / "domain").glob("*.yaml")), ids=lambda p: p.stem)
def test_domain_configs_build_the_named_grids(path):
    spec = yaml.safe_load(path.read_text())
    if "???" in spec.values():  # a template for user boxes: fill it in
        spec = {**spec, "lon_min": -40, "lon_max": -30, "lat_min": 30, "lat_max": 40}
    grid = get_domain(spec)
    if spec.get("name") in DOMAINS:
        ref = DOMAINS[spec["name"]]
        assert grid.bounds == pytest.approx((ref["lon_min"], ref["lon_max"], ref["lat_min"], ref["lat_max"]))


def test_land_mask_cache_round_trip(tmp_path, monkeypatch):
    from global_land_mask import globe

    from oceanda.data import grid as grid_mod

    monkeypatch.setenv("OCEANDA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(grid_mod, "_MASKS", {})
    lon = np.arange(-78.0, -73.0, 0.1) + 0.05
    lat = np.arange(33.0, 37.0, 0.1) + 0.05
    first = grid_mod.land_mask(lon, lat)
    files = list((tmp_path / "landmask").glob("*.npy"))
    assert len(files) == 1
    monkeypatch.setattr(grid_mod, "_MASKS", {})
    second = grid_mod.land_mask(lon, lat)
    lon2, lat2 = np.meshgrid(lon, lat)
    np.testing.assert_array_equal(first, globe.is_land(lat2, lon2))
    np.testing.assert_array_equal(second, first)
    # a different grid gets its own entry
    grid_mod.land_mask(lon[:-1], lat)
    assert len(list((tmp_path / "landmask").glob("*.npy"))) == 2
