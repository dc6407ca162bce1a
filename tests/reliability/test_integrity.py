"""Data integrity and completeness, as a user meets them: damaged or replaced inputs, outputs
that appear only complete, absurd values, folders that hold another run.

Each case runs the app as a user would (:mod:`tests.reliability.harness`) and checks a clean
refusal (exit 2, the input named, nothing changed) or, for the positive cases, the result.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from oceanda.data import integrity, io
from oceanda.data import names as N
from tests.reliability.conftest import SMALL
from tests.reliability.harness import assert_refused, refuse, run_app, snapshot

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")

OI = ["method=oi", "method.Lx_km=40", "method.Lt_days=4"]


def _rewrite(src: Path, dst: Path, var: str, fn=None, chunks=(4, 40, 48), digests: bool = True) -> Path:
    """A copy of the store ``src`` with ``var`` chunked ``chunks`` (and changed by ``fn``),
    with the digest file oceanda writes (``digests``) or without it (a foreign store)."""
    ds = xr.open_zarr(src).load()
    if fn is not None:
        ds[var] = ds[var].copy(data=fn(ds[var].values.copy()))
    for v in ds.variables.values():
        v.encoding.clear()
    ds.to_zarr(dst, encoding={var: {"chunks": chunks}})
    if digests:
        io.write_digests(dst)
    return dst


@pytest.fixture(scope="module")
def stores(good_obs, tmp_path_factory):
    """``obs`` / ``truth`` as oceanda writes them (4-day chunks and digests)."""
    root = tmp_path_factory.mktemp("integrity")
    return {"obs": _rewrite(good_obs["obs"], root / "obs.zarr", N.SSH_OBS),
            "truth": _rewrite(good_obs["truth"], root / "truth.zarr", N.SSH), "root": root}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _infer(obs: Path, out: Path, *extra: str) -> list[str]:
    return [f"obs_path={obs}", f"out_dir={out}", *SMALL, *OI, *extra]


@pytest.mark.parametrize("damage, problem", [
    ("delete", "is missing"),
    pytest.param("truncate", "is corrupt", marks=pytest.mark.slow),  # also in tests/unit/test_integrity.py
])
def test_damaged_obs_chunk_is_refused_naming_store_variable_and_chunk(stores, tmp_path, damage, problem):
    obs = _copy(stores["obs"], tmp_path / "obs.zarr")
    chunk = obs / N.SSH_OBS / "c" / "2" / "0" / "0"
    if damage == "delete":  # was read as NaN: the run succeeded, off by up to 0.40 m
        chunk.unlink()
    else:  # was a zstd traceback
        chunk.write_bytes(chunk.read_bytes()[:25])
    out = tmp_path / "run"
    refuse("infer", _infer(obs, out), str(obs), f"variable '{N.SSH_OBS}'", "chunk (2, 0, 0)", problem,
           outputs=[out])


def test_truncated_chunk_of_a_foreign_store_is_refused_naming_it(good_obs, tmp_path):
    obs = _rewrite(good_obs["obs"], tmp_path / "foreign.zarr", N.SSH_OBS, digests=False)
    chunk = obs / N.SSH_OBS / "c" / "1" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:25])
    out = tmp_path / "run"
    refuse("infer", _infer(obs, out), str(obs), f"variable '{N.SSH_OBS}'", "cannot be read", outputs=[out])


@pytest.fixture(scope="module")
def infer_run(stores):
    """A finished ``oceanda infer`` run on its own copy of ``obs.zarr``."""
    obs = _copy(stores["obs"], stores["root"] / "own_obs.zarr")
    out = stores["root"] / "infer_run"
    first = run_app("infer", *_infer(obs, out))
    assert first.returncode == 0, first.describe()
    assert (out / "analysis.zarr").is_dir() and not (out / "analysis.zarr.incomplete").exists()
    return {"obs": obs, "out": out}


def test_obs_replaced_in_place_is_never_answered_with_the_old_analysis(stores, infer_run):
    obs, out = infer_run["obs"], infer_run["out"]
    shutil.rmtree(obs)  # the same path, other observations (a tenth shifted by 5 cm)
    _rewrite(stores["obs"], obs, N.SSH_OBS, fn=lambda v: np.where(np.arange(v.size).reshape(v.shape) % 10 == 0,
                                                                     v + 0.05, v))
    refuse("infer", _infer(obs, out), str(out), "other inputs", "obs", outputs=[out])


def test_analysis_appears_only_complete_and_evaluate_refuses_an_incomplete_one(stores, tmp_path):
    out = tmp_path / "run"
    args = _infer(stores["obs"], out, "tile=[8,20,24]")
    crash = run_app("infer", *args, env={"OCEANDA_FAIL_AFTER_TILES": "1"})
    assert crash.returncode == 17, crash.describe()  # the simulated kill
    assert not (out / "analysis.zarr").exists()
    partial = out / "analysis.zarr.incomplete"
    assert partial.is_dir()
    ev = tmp_path / "scores"
    refuse("evaluate", [f"analysis={partial}", f"truth={stores['truth']}", f"out_dir={ev}"],
           str(partial), "status 'incomplete'", outputs=[ev])
    done = run_app("infer", *args, f"truth_path={stores['truth']}", "evaluate.figures=false")
    assert done.returncode == 0, done.describe()
    assert (out / "analysis.zarr").is_dir() and not partial.exists()
    assert xr.open_zarr(out / "analysis.zarr").attrs["status"] == "complete"
    assert (out / "analysis.zarr" / integrity.DIGEST_FILE).is_file()
    integrity.check_recorded(out / "analysis.zarr")  # every chunk as recorded


@pytest.mark.parametrize("value, shown", [
    pytest.param(np.inf, "inf", marks=pytest.mark.slow),  # +-inf: also tests/unit/test_integrity.py
    pytest.param(-np.inf, "-inf", marks=pytest.mark.slow),
    (1e30, "1e+30"),
])
def test_infinite_or_absurd_observations_are_refused_naming_variable_and_place(stores, tmp_path, value, shown):
    def poke(v):
        v[3, 10, 12] = value
        return v

    obs = _rewrite(stores["obs"], tmp_path / "obs.zarr", N.SSH_OBS, fn=poke)
    out = tmp_path / "run"
    res = refuse("infer", _infer(obs, out), str(obs), f"variable '{N.SSH_OBS}'", shown, outputs=[out])
    assert "lat" in res.stderr and "lon" in res.stderr and "R too small" not in res.stderr


def test_evaluate_refuses_inf_truth_and_a_truth_on_another_grid(stores, tmp_path):
    def poke(v):
        v[2, 5, 5] = np.inf
        return v

    truth = _rewrite(stores["truth"], tmp_path / "inf.zarr", N.SSH, fn=poke)
    out = tmp_path / "scores"
    analysis = stores["truth"]  # a perfect analysis: only the truth's defects matter
    refuse("evaluate", [f"analysis={analysis}", f"truth={truth}", f"out_dir={out}"], str(truth),
           f"variable '{N.SSH}'", "inf", outputs=[out])
    coarse = tmp_path / "coarse.zarr"  # every other cell: a 1/10 deg truth for a 1/20 deg analysis
    xr.open_zarr(stores["truth"]).isel({N.LAT: slice(0, None, 2), N.LON: slice(0, None, 2)}).load().to_zarr(coarse)
    refuse("evaluate", [f"analysis={analysis}", f"truth={coarse}", f"out_dir={out}"], str(coarse),
           "different grids", outputs=[out])


@pytest.mark.slow  # three OSSE generations (tests/unit/test_generate.py covers it in-process)
def test_generate_refuses_a_folder_holding_another_osse_and_reruns_its_own(tmp_path):
    tiny = ["domain=box", "domain.lon_min=-61", "domain.lon_max=-60", "domain.lat_min=37",
            "domain.lat_max=38", "domain.resolution=0.1", "period.start=2012-10-22",
            "period.end=2012-10-24", "truth=gaussian", "figures=false", "progress=false"]
    out = tmp_path / "osse"
    first = run_app("generate", *tiny, f"out_dir={out}")
    assert first.returncode == 0, first.describe()
    data = xr.open_zarr(out / "obs.zarr")[N.SSH_OBS].values
    refuse("generate", [*tiny, "seed=1", f"out_dir={out}"], str(out), "another OSSE", "overwrite=true",
           outputs=[out])
    again = run_app("generate", *tiny, f"out_dir={out}")  # the same config: fine, same stores
    assert again.returncode == 0, again.describe()
    np.testing.assert_array_equal(xr.open_zarr(out / "obs.zarr")[N.SSH_OBS].values, data)


def test_train_refuses_an_infer_runs_folder(stores, infer_run):
    out = infer_run["out"]
    before = snapshot(out)
    res = run_app("train", f"truth_path={stores['truth']}", f"obs_path={stores['obs']}", f"out_dir={out}",
                  "patch.size=[5,16,16]", "patch.stride=[2,12,12]", "patch.crop=[2,2]", "train.epochs=1",
                  "progress=false")
    assert_refused(res, str(out), "infer run")
    assert snapshot(out) == before
