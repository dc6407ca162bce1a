"""Transfer and modes through the distributed runtime.

* A 4DVarNet trained on a Gulf-Stream-like box runs, unchanged, on a North-Atlantic sub-box
  with real land (global-land-mask, coarse 1/4 deg so the test stays small): land-only
  patches skipped, land NaN in the output, the output equal to a brute-force blend of the
  model applied patch by patch, and ``mpiexec -n 1`` / ``-n 2`` equal to the serial run.
* Forecast patches: no observation later than (target day - lead) reaches the method
  (a probe method records what it sees; poisoning later observations with huge values
  leaves every forecast that may not see them bitwise unchanged).
* A checkpoint trained for another mode or window length is refused with a clear error.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from oceanda.assim.base import PatchBatch, PatchResult
from oceanda.assim.registry import build_method, register
from oceanda.cli import main
from oceanda.data import names as N
from oceanda.data.patches import PatchGeometry, make_patches
from oceanda.errors import ConfigError
from oceanda.testing import _accumulate, synthetic_fields

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")

#: North-Atlantic sub-box (inside the `natl` domain -77..5 x 27..64): Gulf of Maine, Nova
#: Scotia, Gulf of St Lawrence; about half of it land
NATL_BOX = (-76.0, -60.0, 36.0, 52.0)
RES = 0.25
NT = 8
SIZE = (5, 16, 16)
MAPPING = ["patch.size=[5,16,16]", "patch.stride=[2,12,12]", "patch.crop=[2,2]"]
FORECAST = ["patch=forecast2", "patch.size=[5,16,16]", "patch.stride=[1,12,12]", "patch.crop=[2,2]",
            "patch.taper=2"]
COMMON = ["tile=[4,32,32]", "dtype=float64", "progress=false"]


def _waves(shape, seed):
    rng = np.random.default_rng(seed)
    T, Y, X = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    f = np.zeros(shape)
    for _ in range(4):
        kx, ky = rng.uniform(0.05, 0.3, 2)
        om, ph, a = rng.uniform(0.05, 0.3), rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.2)
        f += a * np.cos(kx * X + ky * Y - om * T + ph)
    return f


def _tracks(truth, seed, n_tracks=4):
    rng = np.random.default_rng(seed)
    nt, ny, nx = truth.shape
    obs = np.full(truth.shape, np.nan)
    for d in range(nt):
        for _ in range(n_tracks):
            off, slope = rng.integers(-nx, nx), rng.choice([-1.0, 1.0]) * rng.uniform(0.7, 1.5)
            cols = np.round(off + slope * np.arange(ny)).astype(int)
            ok = (cols >= 0) & (cols < nx)
            obs[d, np.arange(ny)[ok], cols[ok]] = truth[d, np.arange(ny)[ok], cols[ok]]
    return obs


def _train_checkpoint(path: Path, geometry: PatchGeometry) -> Path:
    """A small 4DVarNet trained (briefly) on a Gulf-Stream-like box (lon -65.., lat 33..)."""
    from oceanda.train.data import Normalisation, PatchDataset, patch_starts
    from oceanda.train.fourdvarnet import TASK, ModelConfig, TrainConfig, build_model
    from oceanda.train.loop import fit

    f = synthetic_fields((20, 32, 32), seed=5, n_tracks=4)
    truth = (f["truth"] + 0.4).astype(np.float32)
    obs = (f["obs"] + 0.4).astype(np.float32)
    norm = Normalisation.fit(truth, f["ocean"])
    starts = patch_starts(np.arange(20), f["ocean"].shape, geometry.size, (1, 8, 8))
    ds = PatchDataset(truth, obs, f["ocean"], starts, geometry.size,
                      geometry.weights().full().astype(np.float32), norm, lead=geometry.lead)
    cfg = ModelConfig(n_time=geometry.size[0], prior_hidden=4, lstm_hidden=4, n_steps=2, dropout=0.0)
    torch.manual_seed(0)
    model = build_model(cfg)
    fit(TASK, model, cfg, ds, None, norm, TrainConfig(epochs=1, batch_size=2, lr=1e-2, max_batches=3), path,
        progress=False, extra={"mode": geometry.mode_record()})
    return path


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from oceanda.data.grid import Grid

    root = tmp_path_factory.mktemp("transfer")
    grid = Grid.regular(*NATL_BOX, RES, land=True)
    ocean = grid.ocean
    truth = np.where(ocean[None], 0.4 + _waves((NT, *grid.shape), 1), np.nan)
    obs = np.where(ocean[None], _tracks(truth, 2), np.nan)
    coords = {N.TIME: np.datetime64("2013-01-01") + np.arange(NT).astype("timedelta64[D]"),
              N.LAT: grid.lat, N.LON: grid.lon}
    oc = ((N.LAT, N.LON), ocean.astype(np.int8))
    paths = {"obs": root / "obs.zarr", "poisoned": root / "poisoned.zarr"}
    xr.Dataset({N.SSH_OBS: (N.FIELD_DIMS, obs.astype(np.float32)), N.OCEAN: oc}, coords).to_zarr(paths["obs"])
    bad = obs.copy()
    bad[POISON_AFTER + 1:] = np.where(np.isfinite(bad[POISON_AFTER + 1:]), 90.0, np.nan)
    xr.Dataset({N.SSH_OBS: (N.FIELD_DIMS, bad.astype(np.float32)), N.OCEAN: oc}, coords).to_zarr(paths["poisoned"])
    mapping = PatchGeometry(size=SIZE, stride=(2, 12, 12), crop=(2, 2))
    forecast = PatchGeometry(size=SIZE, stride=(1, 12, 12), crop=(2, 2), anchor="end", time_weight="anchor",
                             space_weight="taper", taper=2, lead=2)
    paths["mapping_ck"] = _train_checkpoint(root / "mapping.pt", mapping)
    paths["forecast_ck"] = _train_checkpoint(root / "forecast.pt", forecast)
    return {"paths": paths, "ocean": ocean, "obs": obs, "mapping": mapping, "forecast": forecast, "root": root}


#: the poisoned observations hold 90 m on every day after this one (absurd for SSH, yet under
#: the 100 m beyond which oceanda refuses a value: oceanda.data.io.SSH_LIMIT_M)
POISON_AFTER = 4


def _infer(obs, out, ck, patch, *extra):
    # float32: compared with a float32 patch-by-patch reference to 2e-5 m (the default
    # precision=auto runs bf16 convolutions on CPUs that have them)
    return main(["infer", f"obs_path={obs}", f"out_dir={out}", "method=4dvarnet",
                 f"method.checkpoint={ck}", "method.precision=float32", *patch, *COMMON, *extra])


def _ssh(out):
    return xr.open_zarr(Path(out) / "analysis.zarr")[N.SSH].values


@pytest.fixture(scope="module")
def serial(case):
    out = case["root"] / "serial"
    assert _infer(case["paths"]["obs"], out, case["paths"]["mapping_ck"], MAPPING) == 0
    return out


def test_transfer_to_north_atlantic_land_aware(case, serial):
    """Gulf-Stream-trained weights on the North-Atlantic sub-box: land skipped and NaN,
    ocean = the brute-force blend of the model applied patch by patch."""
    got = _ssh(serial)
    ocean = case["ocean"]
    assert 0.3 < ocean.mean() < 0.8  # real land in the box
    assert np.isnan(got[:, ~ocean]).all() and np.isfinite(got[:, ocean]).all()
    summary = json.loads((serial / "summary.json").read_text())
    geo = case["mapping"]
    full = np.prod([len(geo.starts_1d(a, n)) for a, n in enumerate((NT, *ocean.shape))])
    assert summary["patches_computed"] == summary["patches_total"] < full  # land-only patches skipped
    # reference: every patch through the method, blended by brute force (float64)
    ps = make_patches(geo, (NT, *ocean.shape), ocean)
    assert len(ps) == summary["patches_total"]
    method = build_method("4dvarnet", checkpoint=str(case["paths"]["mapping_ck"]))
    T, H, W = SIZE
    pad = np.full((NT + 2 * T, ocean.shape[0] + 2 * H, ocean.shape[1] + 2 * W), np.nan)
    pad[T:-T, H:-H, W:-W] = case["obs"].astype(np.float32)
    opad = np.zeros(pad.shape[1:], bool)
    opad[H:-H, W:-W] = ocean
    vals = []
    for i in range(len(ps)):
        (t0, t1), (y0, y1), (x0, x1) = ps.footprint(i)
        o = torch.from_numpy(pad[None, t0 + T:t1 + T, y0 + H:y1 + H, x0 + W:x1 + W].copy())
        oc = torch.from_numpy(opad[None, y0 + H:y1 + H, x0 + W:x1 + W].copy())
        batch = PatchBatch(obs=o, ocean=oc, lon=torch.zeros(1, W, dtype=o.dtype), lat=torch.zeros(1, H, dtype=o.dtype),
                           time=torch.zeros(1, T, dtype=o.dtype), dx_m=torch.ones(1, H, W, dtype=o.dtype),
                           dy_m=torch.ones(1, H, W, dtype=o.dtype))
        v = method(batch).mean[0].double().numpy()
        vals.append(np.where(oc[0].numpy()[None], v, 0.0))
    ref = _accumulate(ps, np.array(vals)) / np.where(ocean[None], _accumulate(ps), 1.0)
    np.testing.assert_allclose(got[:, ocean], ref[:, ocean], rtol=0, atol=2e-5)
    # the trained model, not a copy of its input: the ocean away from the tracks is filled
    obs = case["obs"]
    assert np.isfinite(obs[:, ocean]).mean() < 0.2


def _mpi(k, case, out):
    cmd = [shutil.which("mpiexec"), "-n", str(k), sys.executable, "-m", "oceanda", "infer",
           f"obs_path={case['paths']['obs']}", f"out_dir={out}", "method=4dvarnet",
           f"method.checkpoint={case['paths']['mapping_ck']}", "method.precision=float32", *MAPPING, *COMMON]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.mpi
@pytest.mark.parametrize("k", [1, 2])
def test_transfer_under_mpiexec_equals_serial(case, serial, tmp_path, k):
    res = _mpi(k, case, tmp_path / "run")
    assert res.returncode == 0, f"mpiexec -n {k}: {res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert f"on {k} rank(s)" in res.stdout
    np.testing.assert_array_equal(_ssh(tmp_path / "run"), _ssh(serial))  # bitwise, NaN on land


# ----------------------------------------------------------------------------- forecast


class _Probe:
    """Records, per patch, its target (last) day and its last observed day; returns the
    window mean of the observations everywhere (so any observation reaching the method
    changes the output)."""

    seen: list[tuple[float, float]] = []

    def __init__(self, fill: float = 0.0) -> None:
        self.fill = fill

    def __call__(self, batch: PatchBatch) -> PatchResult:
        obs = batch.obs
        has = torch.isfinite(obs).flatten(2).any(-1)  # (B, T)
        for b in range(obs.shape[0]):
            days = batch.time[b][has[b]]
            type(self).seen.append((float(batch.time[b, -1]), float(days.max()) if len(days) else -np.inf))
        mean = torch.nan_to_num(obs, nan=0.0).sum((1, 2, 3)) / torch.isfinite(obs).sum((1, 2, 3)).clamp_min(1)
        return PatchResult(mean=mean[:, None, None, None].expand_as(obs).clone())


register("_transfer_probe")(_Probe)
PROBE = ["method=identity", "method.name=_transfer_probe"]


@pytest.mark.parametrize("lead", [0, 2])
def test_forecast_method_never_sees_later_observations(case, tmp_path, lead):
    _Probe.seen.clear()
    patch = [*FORECAST, f"patch.lead={lead}"]
    base = ["infer", f"out_dir={tmp_path / 'a'}", *PROBE, *patch, *COMMON]
    assert main(base + [f"obs_path={case['paths']['obs']}"]) == 0
    gaps = np.array([t - last for t, last in _Probe.seen if np.isfinite(last)])
    assert len(gaps) > 50
    assert gaps.min() == lead  # exactly: nothing after target - lead, target - lead itself kept
    clean = _ssh(tmp_path / "a")
    assert main(["infer", f"out_dir={tmp_path / 'b'}", *PROBE, *patch, *COMMON,
                 f"obs_path={case['paths']['poisoned']}"]) == 0
    poisoned = _ssh(tmp_path / "b")
    ok = POISON_AFTER + lead  # forecasts of these days only use days <= POISON_AFTER
    np.testing.assert_array_equal(poisoned[:ok + 1], clean[:ok + 1])
    assert np.nanmax(np.abs(poisoned[ok + 1:] - clean[ok + 1:])) > 50.0  # the poison does arrive later


def test_forecast_4dvarnet_through_the_driver_ignores_later_observations(case, tmp_path):
    ck = case["paths"]["forecast_ck"]
    assert _infer(case["paths"]["obs"], tmp_path / "a", ck, FORECAST) == 0
    assert _infer(case["paths"]["poisoned"], tmp_path / "b", ck, FORECAST) == 0
    clean, poisoned = _ssh(tmp_path / "a"), _ssh(tmp_path / "b")
    ok = POISON_AFTER + 2
    np.testing.assert_array_equal(poisoned[:ok + 1], clean[:ok + 1])
    assert np.isfinite(clean[:, case["ocean"]]).all()
    assert not np.array_equal(poisoned[ok + 1:], clean[ok + 1:])


# ----------------------------------------------------------------------------- wrong checkpoint


@pytest.mark.parametrize("ck, patch, message", [
    ("mapping_ck", FORECAST, "was trained for mapping"),
    ("forecast_ck", [*FORECAST, "patch.lead=0"], "was trained for forecast"),
    ("forecast_ck", MAPPING, "use patch=forecast2"),
    ("mapping_ck", ["patch.size=[7,16,16]", "patch.stride=[2,12,12]", "patch.crop=[2,2]"],
     "5-day windows"),
])
def test_infer_refuses_a_checkpoint_of_another_mode(case, tmp_path, capsys, ck, patch, message):
    capsys.readouterr()
    assert _infer(case["paths"]["obs"], tmp_path / "o", case["paths"][ck], patch) == 2
    err = capsys.readouterr().err
    assert message in err and str(case["paths"][ck]) in err and "Traceback" not in err
    assert "patch" in err  # names the setting to change
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_mode_mismatch_allowed_when_told(case):
    from oceanda.parallel.driver import check_method, trained_mode

    method = build_method("4dvarnet", checkpoint=str(case["paths"]["mapping_ck"]))
    assert trained_mode(method) == case["mapping"].mode_record()
    with pytest.raises(ConfigError, match="allow_mode_mismatch=true"):
        check_method(method, case["forecast"])
    diffs = check_method(method, case["forecast"], allow_mode_mismatch=True)
    assert len(diffs) == 1 and "mapping" in diffs[0] and "forecast" in diffs[0]
    assert check_method(method, case["mapping"]) == []
    assert check_method(build_method("identity"), case["forecast"]) == []  # no checkpoint: any mode
