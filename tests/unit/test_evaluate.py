"""``oceanda evaluate`` on small synthetic zarr stores: scores, outputs, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy.ndimage import correlate1d

from oceanda.cli import main
from oceanda.cli.evaluate import FIGURES, evaluate_paths, format_table
from oceanda.errors import InputError

DX = 0.05


def field(T=40, ny=6, nx=128, seed=0):
    """Periodic random-phase field, red spectrum in (time, lon), offset 0.3 m, std 0.1 m."""
    rng = np.random.default_rng(seed)
    kt = np.fft.fftfreq(T)[:, None, None]
    kx = np.fft.fftfreq(nx, d=DX)[None, None, :]
    spec = (1.0 + (kx / 0.2) ** 2 + (kt / 0.05) ** 2) ** -2.0
    s = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((T, ny, nx)), axes=(0, 2)) * np.sqrt(spec), axes=(0, 2)))
    return 0.3 + 0.1 * s / s.std()


def coords(T, ny, nx, start="2012-10-22", lon0=-62.0, lat0=36.0):
    return {"time": pd.date_range(start, periods=T), "lat": lat0 + DX * np.arange(ny), "lon": lon0 + DX * np.arange(nx)}


def write(path, ssh, crd, **extra):
    data = {"ssh": (("time", "lat", "lon"), ssh)}
    data.update(extra)
    xr.Dataset(data, coords=crd, attrs={"method": "synthetic"}).to_zarr(path, mode="w", consolidated=False)
    return str(path)


@pytest.fixture
def truth(tmp_path):
    s = field()
    ocean = np.ones(s.shape[1:], "i1")
    ocean[0, :8] = 0
    return write(tmp_path / "truth.zarr", s.astype("float32"), coords(*s.shape), ocean=(("lat", "lon"), ocean)), s


@pytest.fixture(autouse=True)
def _restore_log_handlers():
    """The CLI attaches a stderr handler once; drop it after each test (capsys closes streams)."""
    import logging

    logger = logging.getLogger("oceanda")
    before = list(logger.handlers)
    yield
    logger.handlers[:] = before


def run(*args):
    return main(["evaluate", *args])


def test_truth_against_itself(truth, tmp_path, capsys):
    path, _ = truth
    out = tmp_path / "eval"
    assert run(f"truth={path}", f"analysis={path}", f"out_dir={out}") == 0
    scores = json.loads((out / "scores.json").read_text())
    assert scores["mu"] == 1.0 and scores["rmse_m"] == 0.0
    assert scores["lambda_x_deg"] is None and scores["lambda_t_days"] is None
    assert any("all scales resolved" in n for n in scores["evaluation"]["notes"])
    assert sorted(p.name for p in out.iterdir()) == sorted(["scores.json", *FIGURES])
    printed = capsys.readouterr().out
    assert "lambda_x [deg]" in printed and "1.000" in printed


def test_smoothed_truth_gives_smoothing_scale(truth, tmp_path):
    path, s = truth
    sigma = 3.0  # cells
    n = np.arange(-12, 13)
    w = np.exp(-0.5 * (n / sigma) ** 2)
    w /= w.sum()
    ana = write(tmp_path / "smoothed.zarr", correlate1d(s, w, axis=2, mode="wrap"), coords(*s.shape))
    res = evaluate_paths(path, ana, figures=False)
    # transfer function H(k) = sum w_n cos(2 pi k n dx); PSD score 1 - (1 - H)^2 = 0.5 at H = 1 - 1/sqrt(2)
    k = np.linspace(1e-4, 0.5 / DX, 200_001)
    H = (w[:, None] * np.cos(2 * np.pi * k[None] * n[:, None] * DX)).sum(0)
    expected = 1.0 / k[np.argmax(1 - (1 - H) ** 2 < 0.5)]
    assert res["lambda_x_deg"] == pytest.approx(expected, rel=0.15)
    assert 0.9 < res["mu"] < 1.0
    # default out_dir: next to the analysis
    assert json.loads((tmp_path / "scores.json").read_text())["lambda_x_deg"] == res["lambda_x_deg"]


def test_ensemble_scores_in_json(truth, tmp_path):
    path, s = truth
    rng = np.random.default_rng(1)
    sigma = 0.02
    crd = coords(*s.shape)
    a_std = write(tmp_path / "std.zarr", s + sigma * rng.standard_normal(s.shape), crd,
                  ssh_std=(("time", "lat", "lon"), np.full(s.shape, sigma)))
    res = evaluate_paths(path, a_std, out_dir=tmp_path / "o1", figures=False)
    assert res["spread_skill"] == pytest.approx(1.0, abs=0.05)
    assert res["crps"] == pytest.approx(sigma / np.sqrt(np.pi), rel=0.05)
    centre = s + sigma * rng.standard_normal(s.shape)  # truth and members exchangeable around it
    members = centre[None] + sigma * rng.standard_normal((3, *s.shape))
    a_mem = write(tmp_path / "mem.zarr", members.mean(0), crd, ssh_members=(("member", "time", "lat", "lon"), members))
    res = evaluate_paths(path, a_mem, out_dir=tmp_path / "o2", figures=False)
    assert res["evaluation"]["ensemble"] == "members"
    assert res["spread_skill"] == pytest.approx(1.0, abs=0.05) and res["crps"] > 0


def test_window_defaults_and_explicit(truth, tmp_path):
    path, s = truth
    # data inside the challenge's box and period: clipped to the data
    res = evaluate_paths(path, path, out_dir=tmp_path / "a", figures=False)
    assert res["evaluation"]["period"] == ["2012-10-22", "2012-11-30"]
    assert "data challenge's" in res["evaluation"]["notes"][0]
    res = evaluate_paths(path, path, period=["2012-10-25", "2012-11-05"], box=[-61, -59, 35, 40],
                         out_dir=tmp_path / "b", figures=False)
    assert res["evaluation"]["shape"] == {"time": 12, "lat": 6, "lon": 41}
    # data elsewhere: the whole common extent, and the notes say so
    far = write(tmp_path / "far.zarr", s[:, :, :64], coords(40, 6, 64, start="2015-01-01", lon0=10.0, lat0=50.0))
    res = evaluate_paths(far, far, out_dir=tmp_path / "c", figures=False)
    assert res["evaluation"]["shape"] == {"time": 40, "lat": 6, "lon": 64}
    assert all("do not" in n for n in res["evaluation"]["notes"][:2])


def test_netcdf_analysis_on_a_larger_grid(truth, tmp_path):
    path, s = truth
    big = np.concatenate([s, s[:, :2]], axis=1)  # two more latitude rows: common extent is the truth's
    nc = tmp_path / "analysis.nc"
    xr.Dataset({"ssh": (("time", "lat", "lon"), big)}, coords=coords(*big.shape)).to_netcdf(nc)
    res = evaluate_paths(path, nc, out_dir=tmp_path / "o", figures=False)
    assert res["mu"] == pytest.approx(1.0) and res["evaluation"]["shape"]["lat"] == s.shape[1]


def _bad_cases(tmp_path, s):
    crd = coords(*s.shape)
    shuffled = dict(crd, lon=crd["lon"][np.r_[1, 0, 2:s.shape[2]]])
    shifted = dict(crd, lon=crd["lon"] + DX / 2)
    nan = np.full_like(s, np.nan)
    novar = tmp_path / "novar.zarr"
    xr.Dataset({"sla": (("time", "lat", "lon"), s)}, coords=crd).to_zarr(novar, mode="w", consolidated=False)
    return {
        "missing variable": (str(novar), "missing variable 'ssh'"),
        "non-monotonic": (write(tmp_path / "shuffled.zarr", s, shuffled), "'lon' is not monotonic"),
        "mismatched": (write(tmp_path / "shifted.zarr", s, shifted), "do not match: 'lon'"),
        "all NaN": (write(tmp_path / "nan.zarr", nan, crd), "is all NaN"),
        "missing file": (str(tmp_path / "absent.zarr"), "absent.zarr: no such file"),
    }


@pytest.mark.parametrize("case", ["missing variable", "non-monotonic", "mismatched", "all NaN", "missing file", "empty window"])
def test_bad_input_exit_2_and_nothing_written(truth, tmp_path, capsys, case):
    path, s = truth
    cases = _bad_cases(tmp_path, s)
    out = tmp_path / "out"
    if case == "empty window":
        args = [f"analysis={path}", "period=[2013-01-01,2013-02-01]"]
        match = "empty evaluation window: period"
    else:
        analysis, match = cases[case]
        args = [f"analysis={analysis}"]
    assert run(f"truth={path}", *args, f"out_dir={out}") == 2
    err = capsys.readouterr().err
    assert "oceanda evaluate: error:" in err and match in err
    assert "Traceback" not in err
    assert not out.exists()


def test_bad_config_values(truth, capsys):
    path, _ = truth
    assert run(f"truth={path}", f"analysis={path}", "box=[1,2]") == 2
    assert "box: expected a list of 4 values" in capsys.readouterr().err
    assert run(f"truth={path}", f"analysis={path}", "detrend=cubic") == 2


def test_help_and_table():
    assert main(["evaluate", "--help"]) == 0
    table = format_table([{"method": "oi", "mu": 0.83, "sigma_t": 0.04, "lambda_x_deg": 2.25, "lambda_t_days": None,
                           "rmse_m": 0.05}])
    head, row = table.splitlines()
    assert len(head) == len(row) and "2.25" in row and row.rstrip().endswith("0.0500") and " - " in row


def test_library_call_raises_input_error(truth, tmp_path):
    path, _ = truth
    with pytest.raises(InputError, match="missing variable 'ssh'"):
        evaluate_paths(path, _bad_cases(tmp_path, truth[1])["missing variable"][0], figures=False)
