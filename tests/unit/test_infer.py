"""``oceanda infer`` in one process: exact blending, OI vs brute force, restart, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from oceanda.cli import main
from oceanda.data import names as N
from oceanda.testing import synthetic_fields

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")

PATCH = ["patch.size=[5,16,16]", "patch.stride=[2,12,12]", "patch.crop=[2,2]", "tile=[6,16,20]",
         "progress=false"]


def write_osse(root: Path, shape=(12, 30, 40), seed=0) -> dict[str, Path]:
    f = synthetic_fields(shape, seed=seed)
    coords = {N.TIME: f["time"], N.LAT: f["lat"], N.LON: f["lon"]}
    ocean = ((N.LAT, N.LON), f["ocean"].astype(np.int8))
    paths = {"truth": root / "truth.zarr", "obs": root / "obs.zarr", "full": root / "full.zarr"}
    truth, obs = f["truth"].astype(np.float32), f["obs"].astype(np.float32)  # as oceanda generate
    xr.Dataset({N.SSH: (N.FIELD_DIMS, truth), N.OCEAN: ocean}, coords).to_zarr(paths["truth"])
    xr.Dataset({N.SSH_OBS: (N.FIELD_DIMS, obs), N.OCEAN: ocean}, coords).to_zarr(paths["obs"])
    xr.Dataset({N.SSH_OBS: (N.FIELD_DIMS, truth), N.OCEAN: ocean}, coords).to_zarr(paths["full"])
    return paths


@pytest.fixture(scope="module")
def osse(tmp_path_factory):
    return write_osse(tmp_path_factory.mktemp("osse"))


def test_identity_method_blends_back_the_input_exactly(osse, tmp_path):
    """float32 product (the default): bitwise equal; float64: equal to a few ulps (the
    float64 weighted mean sum_p w_p x / sum_p w_p is not exact in floating point)."""
    rc = main(["infer", f"obs_path={osse['full']}", f"out_dir={tmp_path}", "method=identity", *PATCH])
    assert rc == 0
    out = xr.open_zarr(tmp_path / "analysis.zarr")
    truth = xr.open_zarr(osse["truth"])
    a, t = out[N.SSH].values, truth[N.SSH].values
    assert a.dtype == np.float32 and t.dtype == np.float32
    ocean = truth[N.OCEAN].values.astype(bool)
    np.testing.assert_array_equal(a[:, ocean], t[:, ocean])
    assert main(["infer", f"obs_path={osse['full']}", f"out_dir={tmp_path / 'f64'}", "method=identity",
                 "dtype=float64", *PATCH]) == 0
    a64 = xr.open_zarr(tmp_path / "f64" / "analysis.zarr")[N.SSH].values
    np.testing.assert_allclose(a64[:, ocean], t[:, ocean], rtol=4 * np.finfo(float).eps, atol=0)
    assert np.isnan(a[:, ~ocean]).all()
    assert out.attrs["status"] == "complete" and out.attrs["method"] == "identity"
    assert out[N.SSH].attrs["units"] == "m"
    assert out[N.SSH].encoding["chunks"] == (6, 16, 20)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["patches_computed"] == summary["patches_total"] > 10
    assert (tmp_path / "logs" / "rank0000.log").exists()


def test_oi_blend_equals_brute_force_blend(osse, tmp_path):
    """Driver (tiles, halos, float64 accumulation) == direct sum over all patches."""
    from oceanda.assim.oi import oi_patch
    from oceanda.data.patches import PatchGeometry, make_patches
    from oceanda.data.store import extend_coord
    from oceanda.testing import _accumulate

    kw = ["method.Lx_km=30", "method.Lt_days=3"]
    assert main(["infer", f"obs_path={osse['obs']}", f"out_dir={tmp_path}", "method=oi",
                 "dtype=float64", *kw, *PATCH]) == 0
    got = xr.open_zarr(tmp_path / "analysis.zarr")[N.SSH].values
    ds = xr.open_zarr(osse["obs"])
    obs, ocean = ds[N.SSH_OBS].values, ds[N.OCEAN].values.astype(bool)
    lon, lat = ds[N.LON].values, ds[N.LAT].values
    days = np.arange(obs.shape[0], dtype=float)
    ps = make_patches(PatchGeometry(size=(5, 16, 16), stride=(2, 12, 12), crop=(2, 2)), obs.shape, ocean)
    pad = np.full(np.array(obs.shape) + 2 * 16, np.nan)
    pad[16:-16, 16:-16, 16:-16] = obs
    vals = []
    for i in range(len(ps)):
        (t0, t1), (y0, y1), (x0, x1) = ps.footprint(i)
        po = pad[t0 + 16:t1 + 16, y0 + 16:y1 + 16, x0 + 16:x1 + 16]
        v = oi_patch(po, extend_coord(lon, x0, x1), extend_coord(lat, y0, y1),
                     extend_coord(days, t0, t1), Lx_km=30.0, Ly_km=100.0, Lt_days=3.0, R=0.05**2)
        vals.append(v)
    num = _accumulate(ps, np.array(vals))
    den = _accumulate(ps)
    with np.errstate(invalid="ignore"):
        ref = num / den  # NaN outside the ocean (den = 0 on land-only cells)
    np.testing.assert_allclose(got[:, ocean], ref[:, ocean], rtol=0, atol=1e-12)
    # and OI beats the zero / mean field on the truth
    truth = xr.open_zarr(osse["truth"])[N.SSH].values
    err = np.sqrt(np.nanmean((got - truth)[:, ocean] ** 2))
    assert err < 0.5 * np.nanstd(truth[:, ocean])


def test_rerun_completed_run_recomputes_nothing_and_scores(osse, tmp_path):
    args = ["infer", f"obs_path={osse['obs']}", f"out_dir={tmp_path}", "method=identity", *PATCH]
    assert main(args) == 0
    before = xr.open_zarr(tmp_path / "analysis.zarr")[N.SSH].values
    assert main(args + [f"truth_path={osse['truth']}", "evaluate.figures=false"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["patches_computed"] == 0
    np.testing.assert_array_equal(xr.open_zarr(tmp_path / "analysis.zarr")[N.SSH].values, before)
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert {"mu", "sigma_t", "lambda_x_deg", "lambda_t_days", "rmse_m"} <= set(scores)


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case, extra, message", [
    ("outside", ["box=[10,20,0,5]"], "outside"),
    ("empty", ["period=[2030-01-01,2030-02-01]"], "period"),
    ("nan", [], "no observation"),
    ("big", ["patch.size=[5,64,16]"], "larger than the domain"),
    ("other_run", ["method.Lx_km=55"], "different run"),
])
def test_bad_inputs_exit_2_and_corrupt_nothing(osse, tmp_path, capsys, case, extra, message):
    obs = osse["obs"]
    if case == "nan":
        ds = xr.open_zarr(obs).load()
        ds[N.SSH_OBS][:] = np.nan
        obs = tmp_path / "nan.zarr"
        ds.to_zarr(obs)
    out = tmp_path / "out"
    base = ["infer", f"obs_path={obs}", f"out_dir={out}", "method=oi", *PATCH]
    if case == "other_run":
        assert main(base) == 0
    before = _tree(out) if out.exists() else {}
    capsys.readouterr()
    assert main(base + extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert (_tree(out) if out.exists() else {}) == before


def test_dry_run_prints_map_and_writes_nothing(osse, tmp_path, capsys):
    assert main(["infer", f"obs_path={osse['obs']}", f"out_dir={tmp_path / 'o'}", "dry_run=true", *PATCH]) == 0
    text = capsys.readouterr().out
    assert "rank 0:" in text and "tile" in text and "halo" in text
    assert not (tmp_path / "o").exists()


def test_region_writes_must_be_chunk_aligned(tmp_path):
    from oceanda.data.store import AnalysisStore

    store = AnalysisStore.create(tmp_path / "a.zarr", time=np.arange(10), lat=np.arange(20.0),
                                 lon=np.arange(20.0), ocean=np.ones((20, 20), bool), chunks=(4, 8, 8))
    store.write_region(N.SSH, ((8, 10), (16, 20), (0, 8)), np.ones((2, 4, 8)))  # ends at array end
    for bad in (((0, 4), (0, 8), (4, 12)), ((0, 3), (0, 8), (0, 8)), ((0, 4), (8, 12), (0, 8))):
        shape = tuple(hi - lo for lo, hi in bad)
        with pytest.raises(ValueError, match="not aligned"):
            store.write_region(N.SSH, bad, np.ones(shape))
    a = xr.open_zarr(tmp_path / "a.zarr", consolidated=False)[N.SSH].values
    assert np.nansum(a) == 2 * 4 * 8 and np.isnan(a[:8]).all()


def test_obs_source_reads_boxes_with_padding(osse):
    from oceanda.data.store import ObsSource

    src = ObsSource(osse["obs"])
    full = xr.open_zarr(osse["obs"])[N.SSH_OBS].values
    got = src.read(((-2, 3), (-1, 4), (38, 43)))
    assert got.shape == (5, 5, 5) and np.isnan(got[:2]).all() and np.isnan(got[:, 0]).all()
    np.testing.assert_array_equal(got[2:, 1:, :2], full[0:3, 0:4, 38:40])
    assert np.isnan(got[:, :, 2:]).all()


def test_device_binding_and_serial_comm(monkeypatch):
    import torch

    from oceanda.parallel.comm import SerialComm, get_comm
    from oceanda.parallel.device import bind_device, local_rank_from_env

    for var in ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert local_rank_from_env() == 0
    monkeypatch.setenv("MPI_LOCALRANKID", "2")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert local_rank_from_env() == 3  # srun's variable first
    assert bind_device(None, "cpu", threads=1) == torch.device("cpu")
    assert torch.get_num_threads() == 1
    comm = get_comm(use_mpi=False)
    assert isinstance(comm, SerialComm) and comm.size == 1 and comm.allgather(5) == [5]


@pytest.mark.gpu
def test_gpu_run_equals_cpu_run(osse, tmp_path):
    base = ["infer", f"obs_path={osse['obs']}", "method=oi", *PATCH]
    assert main(base + [f"out_dir={tmp_path / 'cpu'}", "system.device=cpu"]) == 0
    assert main(base + [f"out_dir={tmp_path / 'gpu'}", "system.device=cuda"]) == 0
    a = xr.open_zarr(tmp_path / "cpu" / "analysis.zarr")[N.SSH].values
    b = xr.open_zarr(tmp_path / "gpu" / "analysis.zarr")[N.SSH].values
    np.testing.assert_array_equal(a, b)  # OI solves in float64 numpy on the host either way


def test_truth_on_another_grid_is_refused_before_computing(osse, tmp_path, capsys):
    other = tmp_path / "other_truth.zarr"
    ds = xr.open_zarr(osse["truth"]).load()
    ds = ds.assign_coords({N.LON: ds[N.LON] + 0.025})
    ds.to_zarr(other)
    rc = main(["infer", f"obs_path={osse['obs']}", f"out_dir={tmp_path / 'o'}", f"truth_path={other}", *PATCH])
    assert rc == 2 and "grid differs" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_std_and_members_are_blended_and_written(osse, tmp_path):
    """std blends as sqrt(sum w s^2 / sum w) (a constant stays constant); members blend
    member by member (x + i step stays x + i step)."""
    assert main(["infer", f"obs_path={osse['full']}", f"out_dir={tmp_path}", "method=identity",
                 "+method.std=0.07", "+method.members=3", "dtype=float64", *PATCH]) == 0
    out = xr.open_zarr(tmp_path / "analysis.zarr")
    truth = xr.open_zarr(osse["truth"])
    ocean = truth[N.OCEAN].values.astype(bool)
    t = truth[N.SSH].values.astype(np.float64)
    std = out[N.SSH_STD].values
    np.testing.assert_allclose(std[:, ocean], 0.07, rtol=1e-14)
    assert np.isnan(std[:, ~ocean]).all()
    mem = out[N.SSH_MEMBERS].values
    assert out[N.SSH_MEMBERS].dims == (N.MEMBER, N.TIME, N.LAT, N.LON) and mem.shape[0] == 3
    for i in range(3):
        np.testing.assert_allclose(mem[i][:, ocean], t[:, ocean] + 0.01 * i, rtol=0, atol=1e-14)


def test_methods_get_the_grid_metric_factors(osse, tmp_path):
    """The cell sizes handed to a method (``dx_m``, ``dy_m``) are the domain grid's WGS84
    metric factors (:class:`oceanda.data.grid.Grid`) on the patch's cells."""
    from oceanda.assim.base import PatchResult
    from oceanda.assim.registry import register
    from oceanda.data.grid import Grid
    from oceanda.testing import IdentityMethod

    seen = []

    @register("_record_metrics")
    class Recorder(IdentityMethod):
        def __call__(self, batch):
            seen.append({k: getattr(batch, k).double().numpy().copy() for k in ("lon", "lat", "dx_m", "dy_m")})
            return PatchResult(mean=torch.nan_to_num(batch.obs))

    assert main(["infer", f"obs_path={osse['full']}", f"out_dir={tmp_path}", "method=identity",
                 "method.name=_record_metrics", *PATCH]) == 0
    truth = xr.open_zarr(osse["truth"])
    lon, lat = truth[N.LON].values, truth[N.LAT].values
    grid = Grid(lon=lon, lat=lat, ocean=truth[N.OCEAN].values.astype(bool))
    checked = 0
    for rec in seen:
        for b in range(rec["lon"].shape[0]):
            ix = np.searchsorted(lon, rec["lon"][b])
            iy = np.searchsorted(lat, rec["lat"][b])
            inx = (ix < lon.size) & np.isclose(lon[np.minimum(ix, lon.size - 1)], rec["lon"][b], rtol=0, atol=1e-9)
            iny = (iy < lat.size) & np.isclose(lat[np.minimum(iy, lat.size - 1)], rec["lat"][b], rtol=0, atol=1e-9)
            sub = np.ix_(iy[iny], ix[inx])
            np.testing.assert_allclose(rec["dx_m"][b][np.ix_(iny, inx)], grid.dx_m[sub], rtol=1e-9, atol=0)
            np.testing.assert_allclose(rec["dy_m"][b][np.ix_(iny, inx)], grid.dy_m[sub], rtol=1e-9, atol=0)
            checked += int(inx.sum() * iny.sum())
    assert checked > 0


# ----------------------------------------------------------------------------- 4DVarNet, shipped weights, demo

PATCH15 = ["patch.size=[15,16,16]", "patch.stride=[5,12,12]", "patch.crop=[2,2]", "tile=[20,32,32]",
           "progress=false", "evaluate.figures=false"]


@pytest.fixture(scope="module")
def osse20(tmp_path_factory):
    return write_osse(tmp_path_factory.mktemp("osse20"), shape=(20, 32, 32), seed=3)


def test_4dvarnet_without_checkpoint_runs_the_shipped_weights(osse20, tmp_path):
    from oceanda.assim.fourdvarnet import FourDVarNetMethod
    from oceanda.data.store import ObsSource
    from oceanda.weights import default_checkpoint

    assert main(["infer", f"obs_path={osse20['obs']}", f"out_dir={tmp_path}", "method=4dvarnet",
                 f"truth_path={osse20['truth']}", *PATCH15]) == 0
    out = xr.open_zarr(tmp_path / "analysis.zarr")
    assert json.loads(out.attrs["method_config"])["checkpoint"] == str(default_checkpoint())
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["method"] == "4dvarnet" and np.isfinite(scores["rmse_m"])
    # every ocean cell reconstructed, land left NaN, and the method built from the default
    # config is the shipped 15-day model
    src = ObsSource(osse20["obs"])
    m = FourDVarNetMethod(str(default_checkpoint()))
    assert m.cfg.n_time == 15
    a = out[N.SSH].values
    assert np.isfinite(a[:, src.ocean]).all() and np.isnan(a[:, ~src.ocean]).all()


@pytest.mark.parametrize("extra, message", [
    (["method.checkpoint={bad}"], "cannot be read"),
    (["method.checkpoint={missing}"], "no such file"),
    (["patch.size=[5,16,16]"], "trained on 15-day windows"),
])
def test_4dvarnet_bad_checkpoint_or_window_exit_2_and_write_nothing(osse20, tmp_path, capsys, extra, message):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02garbage" * 100)
    extra = [e.format(bad=bad, missing=tmp_path / "missing.pt") for e in extra]
    out = tmp_path / "out"
    rc = main(["infer", f"obs_path={osse20['obs']}", f"out_dir={out}", "method=4dvarnet", *PATCH15, *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_demo_scores_oi_and_4dvarnet_side_by_side(tmp_path, capsys):
    """The README's `oceanda infer` path on a tiny demo OSSE (a 32 x 32 box, 20 days,
    Gaussian truth): OI, then 4DVarNet with the shipped weights, both scored, one table."""
    demo = ["demo.dir=" + str(tmp_path / "demo"), "+demo.generate.truth={kind: gaussian}",
            "demo.generate.domain={name: box, lon_min: -60, lon_max: -58.4, lat_min: 35, lat_max: 36.6,"
            " resolution: 0.05, land: false}",
            'demo.generate.period={start: "2012-10-01", end: "2012-10-20"}', "demo.generate.figures=false"]
    small = "{size: [15,16,16], stride: [1,12,12], crop: [2,2]}"  # the default's 64 x 64: too big here
    compare = f"demo.compare=[{{method: {{name: 4dvarnet, checkpoint: null}}, patch: {small}}}]"
    assert main(["infer", *demo, *PATCH15, compare]) == 0
    text = capsys.readouterr().out
    side = text.split("side by side")[1].splitlines()
    assert side[1].split()[:2] == ["method", "mu"]
    assert side[2].split()[0] == "oi" and side[3].split()[0] == "4dvarnet"
    for name in ("oi", "4dvarnet"):
        scores = json.loads((tmp_path / "demo" / f"infer_{name}" / "scores.json").read_text())
        assert scores["method"] == name
        assert f"{scores['mu']:.3f}" in (side[2] if name == "oi" else side[3])
    # OI alone, as before: demo.compare=[]
    assert main(["infer", *demo, *PATCH15, "demo.compare=[]"]) == 0
    assert "side by side" not in capsys.readouterr().out


@pytest.mark.parametrize("compare, message", [
    ("[{name: 4dvarnet}]", "expected {method: {name:"),
    ("[{method: {name: 4dvarnet}, patch: {sizes: [15,16,16]}}]", "demo.compare[0].patch.sizes"),
    ("[{method: {name: 4dvarnet}, extra: 1}]", "unknown key"),
    ("[{method: {name: nosuchmethod}}]", "unknown method 'nosuchmethod'"),
    ("[{method: {name: 4dvarnet, checkpoint: NOFILE.pt}}]", "checkpoint NOFILE.pt: no such file"),
])
def test_demo_compare_errors_before_anything_runs(tmp_path, capsys, compare, message):
    rc = main(["infer", f"demo.dir={tmp_path / 'demo'}", f"demo.compare={compare}", *PATCH15])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "demo").exists()


def test_demo_regenerates_its_osse_when_its_config_changes(tmp_path, monkeypatch):
    """The demo reuses its OSSE only if it was made from the same demo config (the default truth
    resolved): an older demo folder, or another truth, is regenerated and its analyses dropped."""
    from oceanda.cli import compose, infer
    from oceanda.cli.schema import load
    from oceanda.data import osse
    from oceanda.parallel.comm import SerialComm

    made = []

    def fake_generate(out_dir, truth=None, **kw):  # records the call, writes two empty stores
        made.append(truth)
        for name in ("obs.zarr", "truth.zarr"):
            (Path(out_dir) / name).mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(osse, "generate_osse", fake_generate)
    monkeypatch.setattr("oceanda.cli.generate.register_truths", lambda: None)
    root = tmp_path / "demo"

    def paths(*over):
        cfg = load("infer", compose("infer", [f"demo.dir={root}", *over]))
        return infer._demo_paths(cfg, SerialComm())

    paths()
    assert made == [None]
    paths()
    assert made == [None]  # same config: reused
    (root / "infer_oi").mkdir()
    paths("+demo.generate.truth={kind: qg}")
    assert made == [None, {"kind": "qg"}] and not (root / "infer_oi").exists()
    (root / "osse" / "demo_osse.json").unlink()  # a folder from before the record: regenerated
    paths("+demo.generate.truth={kind: qg}")
    assert len(made) == 3
