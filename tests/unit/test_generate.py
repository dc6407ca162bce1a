"""`oceanda generate` and oceanda.data.osse: streaming OSSE stores, CF attributes, errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

from oceanda.cli import main
from oceanda.data import names as N
from oceanda.data import osse
from oceanda.errors import ConfigError, InputError
from oceanda.plots.osse import quicklook

BOX = {"name": "box", "lon_min": -61.0, "lon_max": -59.0, "lat_min": 37.0, "lat_max": 39.0, "resolution": 0.1}
QG_TINY = {"kind": "qg", "dx_km": 20.0, "margin_km": 100.0, "spinup_days": 4, "spinup_fine_days": 1}
GAUSS = {"kind": "gaussian", "length_km": 60.0, "time_days": 3.0}
CLI_TINY = [
    "domain=box", "domain.lon_min=-61", "domain.lon_max=-59", "domain.lat_min=37", "domain.lat_max=39",
    "domain.resolution=0.1", "period=week", "progress=false",
]


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if ".tmp-" in p.name or ".old-" in p.name) if out.exists() else []


def test_generate_osse_writes_cf_stores(tmp_path):
    out = tmp_path / "osse"
    res = osse.generate_osse(BOX, "4nadirs", {"start": "2012-10-22", "end": "2012-10-28"}, out,
                             truth=QG_TINY, seed=3, figures=quicklook, progress=False, obs_noise=False, chunk_days=3)
    assert res["truth"] == out / "truth.zarr" and res["obs"] == out / "obs.zarr"
    truth = xr.open_zarr(res["truth"])
    obs = xr.open_zarr(res["obs"])
    assert truth[N.SSH].dims == N.FIELD_DIMS and truth[N.SSH].shape == (7, 20, 20)
    assert truth[N.SSH].encoding["chunks"][0] == 3
    np.testing.assert_array_equal(truth[N.TIME].values,
                                  np.arange("2012-10-22", "2012-10-29", dtype="datetime64[D]").astype("datetime64[ns]"))
    for ds in (truth, obs):
        assert ds.attrs["Conventions"].startswith("CF")
        assert ds.attrs["oceanda_version"]
        cfg = yaml.safe_load(ds.attrs["config"])
        assert cfg["truth"]["kind"] == "qg" and cfg["seed"] == 3
        assert ds[N.LON].attrs["units"] == "degrees_east" and ds[N.LAT].attrs["standard_name"] == "latitude"
        assert ds[N.OCEAN].dims == (N.LAT, N.LON) and int(ds[N.OCEAN].min()) in (0, 1)
    assert truth[N.SSH].attrs["units"] == "m"
    assert truth[N.SSH].attrs["standard_name"] == "sea_surface_height_above_geoid"
    ssh = truth[N.SSH].values
    assert np.isfinite(ssh).all() and 0.005 < ssh.std() < 1.0
    assert truth.attrs["ssh_std_m"] == pytest.approx(float(ssh.std()), rel=1e-4)
    # observations: gridded cells hold (noise-free) truth values, the table is consistent
    g = obs[N.SSH_OBS].values
    seen = np.isfinite(g)
    assert 0 < seen.mean() < 0.5
    err = np.abs(g[seen] - ssh[seen])
    assert err.mean() < 0.1 * ssh.std() + 1e-3
    n = obs.sizes[N.OBS]
    assert n == obs.attrs["n_track_points"] > 0
    for v in (N.TRACK_TIME, N.TRACK_LON, N.TRACK_LAT, N.TRACK_SSH, N.TRACK_SAT):
        assert obs[v].dims == (N.OBS,)
    t = obs[N.TRACK_TIME].values
    assert t.min() >= np.datetime64("2012-10-22") and t.max() < np.datetime64("2012-10-29")
    assert obs[N.TRACK_SAT].attrs["flag_meanings"].split() == obs.attrs["satellites"].split()
    assert obs.attrs["observed_fraction_daily_mean"] == pytest.approx(seen.mean(), rel=1e-6)
    figs = sorted(p.name for p in res["figures"].iterdir())
    assert figs == ["coverage.png", "obs_day.png", "spectrum.png", "truth.png"]
    assert _leftovers(out) == []


def test_streaming_does_not_depend_on_chunking_and_is_seeded(tmp_path):
    kw = dict(obs=None, period=("2012-10-22", "2012-10-30"), truth=GAUSS, figures=False, progress=False)
    a = osse.generate_osse(BOX, out_dir=tmp_path / "a", seed=1, chunk_days=2, **kw)
    b = osse.generate_osse(BOX, out_dir=tmp_path / "b", seed=1, chunk_days=9, **kw)
    c = osse.generate_osse(BOX, out_dir=tmp_path / "c", seed=2, chunk_days=9, **kw)
    xa, xb, xc = (xr.open_zarr(r["truth"])[N.SSH].values for r in (a, b, c))
    np.testing.assert_array_equal(xa, xb)
    assert np.abs(xa - xc).max() > 1e-3
    assert "obs" not in a and not (tmp_path / "a" / "obs.zarr").exists()


def test_land_is_nan_and_masked(tmp_path):
    box = {"lon_min": -77.0, "lon_max": -74.0, "lat_min": 34.0, "lat_max": 37.0, "resolution": 0.1}
    res = osse.generate_osse(box, None, ("2012-10-22", "2012-10-23"), tmp_path, truth=GAUSS,
                             figures=False, progress=False)
    ds = xr.open_zarr(res["truth"])
    ocean = ds[N.OCEAN].values.astype(bool)
    assert 0.2 < ocean.mean() < 0.9
    ssh = ds[N.SSH].values
    assert np.isnan(ssh[:, ~ocean]).all() and np.isfinite(ssh[:, ocean]).all()


def test_failure_midway_leaves_nothing_and_keeps_old_outputs(tmp_path):
    out = tmp_path / "osse"
    osse.generate_osse(BOX, None, ("2012-10-22", "2012-10-23"), out, truth=GAUSS, figures=False, progress=False)
    before = xr.open_zarr(out / "truth.zarr")[N.SSH].values

    def broken(grid, days, seed, params, device, progress):
        for d in range(days):
            if d == 3:
                raise RuntimeError("model crashed")
            yield np.zeros(grid.shape, np.float32)

    osse.register_truth("broken_test", broken)
    try:
        with pytest.raises(RuntimeError, match="crashed"):
            osse.generate_osse(BOX, "4nadirs", ("2012-10-22", "2012-10-31"), out, truth={"kind": "broken_test"},
                               figures=quicklook, progress=False, chunk_days=2, overwrite=True)
    finally:
        osse.TRUTH_KINDS.pop("broken_test")
    assert _leftovers(out) == []
    assert not (out / "obs.zarr").exists() and not (out / "figures").exists()
    np.testing.assert_array_equal(xr.open_zarr(out / "truth.zarr")[N.SSH].values, before)
    with pytest.raises(InputError, match="holds another OSSE"):  # another seed: refused by default
        osse.generate_osse(BOX, None, ("2012-10-22", "2012-10-23"), out, truth=GAUSS, progress=False, seed=5)
    # the same config again (overwrite=false by default): the same stores, rewritten
    osse.generate_osse(BOX, None, ("2012-10-22", "2012-10-23"), out, truth=GAUSS, figures=False, progress=False)
    np.testing.assert_array_equal(xr.open_zarr(out / "truth.zarr")[N.SSH].values, before)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(period={"start": "2012-10-22", "end": "2012-10-01"}), "period.end"),
        (dict(period={"start": "2012-13-45", "end": "2012-10-01"}), "period.start"),
        (dict(period={"start": "2012-10-22"}), "period.end"),
        (dict(truth={"kind": "fractal"}), "truth.kind"),
        (dict(truth={"kind": "qg", "jet_speed": 1.0}), "truth.jet_speed"),
        (dict(truth={"kind": "qg", "dx_km": -1.0}), "truth.dx_km"),
        (dict(truth={"kind": "gaussian", "length_km": 0.0}), "truth.length_km"),
        (dict(obs="9nadirs"), "9nadirs"),
        (dict(domain={"name": "box", "lon_min": 0, "lon_max": 1, "lat_min": 0, "lat_max": 1, "resolution": 0}),
         "resolution"),
        (dict(seed="abc"), "seed"),
        (dict(chunk_days=0), "chunk_days"),
    ],
)
def test_bad_inputs_raise_before_writing(tmp_path, kwargs, match):
    args = dict(domain=BOX, obs="4nadirs", period=("2012-10-22", "2012-10-23"), out_dir=tmp_path / "o",
                truth=GAUSS, progress=False)
    args.update(kwargs)
    with pytest.raises((ConfigError, InputError), match=match):
        osse.generate_osse(**args)
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []


def test_cli_generate_tiny(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["generate", *CLI_TINY, "truth=gaussian", f"out_dir={out}", "figures=false"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "truth.zarr" in text and "observed fraction" in text
    truth = xr.open_zarr(out / "truth.zarr")
    assert truth[N.SSH].shape == (7, 20, 20)
    cfg = yaml.safe_load(truth.attrs["config"])
    assert cfg["domain"]["lon_min"] == -61 and cfg["obs"]["name"] == "4nadirs" and cfg["period"]["name"] == "week"
    assert xr.open_zarr(out / "obs.zarr")[N.SSH_OBS].shape == (7, 20, 20)


@pytest.mark.parametrize(
    "override, match",
    [
        ("domain.resolution=0", "resolution"),
        ("domain.lon_min=-58", "lon_min"),
        ("period.end=2012-01-01", "period.end"),
        ("truth=nonexistent", "truth"),
        ("+truth.bogus=1", "truth.bogus"),
        ("obs=nonexistent", "obs"),
        ("figures=maybe", "figures"),
    ],
)
def test_cli_bad_input_exit_2(tmp_path, capsys, override, match):
    out = tmp_path / "bad"
    rc = main(["generate", *CLI_TINY, "truth=gaussian", f"out_dir={out}", override])
    assert rc == 2
    err = capsys.readouterr().err
    assert "oceanda generate: error:" in err and match in err
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("truth, kind, std, slope", [
    ([], "gyre", (0.3, 0.8), (-6.0, -3.5)),      # the default: the jet's mean step is in the std
    (["truth=qg"], "qg", (0.1, 0.3), (-5.5, -3.5)),
])
def test_cli_generate_default_gulfstream(tmp_path, capsys, truth, kind, std, slope):
    """The real default: gulfstream 200x200, 4nadirs, 72 days of the gyre truth, and the same
    with truth=qg (minutes on 2 cores each)."""
    out = tmp_path / "default"
    assert main(["generate", f"out_dir={out}", "progress=false", *truth]) == 0
    truth = xr.open_zarr(out / "truth.zarr")
    obs = xr.open_zarr(out / "obs.zarr")
    assert yaml.safe_load(truth.attrs["config"])["truth"]["kind"] == kind
    assert truth[N.SSH].shape == (72, 200, 200)
    assert std[0] <= truth.attrs["ssh_std_m"] <= std[1]
    assert slope[0] <= truth.attrs["spectral_slope_50_250km"] <= slope[1]
    assert 0.01 <= obs.attrs["observed_fraction_daily_mean"] <= 0.1
    assert os.path.isfile(out / "figures" / "spectrum.png")


@pytest.mark.parametrize("kind", ["qg", "gaussian", "gyre"])
def test_truth_configs_mirror_library_defaults(kind):
    from dataclasses import asdict

    from oceanda.dynamics.gaussian import GaussianFieldConfig
    from oceanda.dynamics.gyre import GyreTruthConfig
    from oceanda.dynamics.qg import QGTruthConfig

    path = Path(__file__).resolve().parents[2] / "configs" / "truth" / f"{kind}.yaml"
    cfg = yaml.safe_load(path.read_text())
    assert cfg.pop("kind") == kind
    cls = {"qg": QGTruthConfig, "gaussian": GaussianFieldConfig, "gyre": GyreTruthConfig}[kind]
    assert cfg == asdict(cls())


def test_the_default_truth_is_the_gyre_and_qg_stays_selectable():
    """`oceanda generate`, the library and the demo default to the double gyre; truth=qg the QG jet."""
    from oceanda.cli import compose
    from oceanda.cli.schema import DemoOSSE, GenerateConfig

    assert compose("generate", []).truth["kind"] == "gyre"
    assert compose("generate", ["truth=qg"]).truth["kind"] == "qg"
    assert GenerateConfig(domain="gulfstream", period={"start": "2012-10-01", "end": "2012-10-10"}, out_dir="o").truth == {"kind": "gyre"}
    assert osse.DEFAULT_TRUTH == {"kind": "gyre"}
    assert DemoOSSE().truth is None  # None: generate_osse's default, the gyre
    assert "truth" not in compose("infer", []).demo.generate  # the demo OSSE: the default truth
