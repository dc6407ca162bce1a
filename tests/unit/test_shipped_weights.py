"""The 4DVarNet weights shipped in ``oceanda.weights``: they load, fit their config, beat the
observations-only reconstruction on a synthetic case, and damaged or mismatched checkpoints
are refused with a clear error."""

from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from oceanda.assim.base import PatchBatch
from oceanda.assim.fourdvarnet import FourDVarNetMethod, ModelConfig, build_model, read_checkpoint
from oceanda.errors import ConfigError, InputError
from oceanda.weights import SHIPPED, default_checkpoint, resolve_checkpoint, shipped_checkpoint
from oceanda.weights.export import export_checkpoint

#: the architecture of the shipped Gulf Stream weights (src/oceanda/weights/README.md: the
#: `oceanda train` command's model.* overrides on configs/model/4dvarnet.yaml)
EXPECTED = ModelConfig(n_time=15, prior="bilin_ae", prior_hidden=32, prior_downsample=2,
                       lstm_hidden=32, lstm_downsample=2, n_steps=8, lr_grad=0.2, lam=1.0,
                       w_obs=1.0, dropout=0.1, init="oi", oi_Lx_km=100.0, oi_Ly_km=100.0,
                       oi_Lt_days=10.0, oi_noise_std=0.05)


def test_every_shipped_checkpoint_is_small_and_loads():
    for name in SHIPPED:
        p = shipped_checkpoint(name)
        assert p.stat().st_size < 2_000_000
        ck = read_checkpoint(p)
        assert ck["optimizer"] is None and ck["scheduler"] is None  # inference part only
    assert resolve_checkpoint(None) == str(default_checkpoint())
    assert resolve_checkpoint("default") == str(default_checkpoint())
    assert resolve_checkpoint("shipped:gulfstream_4nadirs") == str(shipped_checkpoint("gulfstream_4nadirs"))
    assert resolve_checkpoint("some/path.pt") == "some/path.pt"
    with pytest.raises(ConfigError, match="nope"):
        shipped_checkpoint("nope")


def test_default_checkpoint_matches_its_config_and_training_record():
    ck = read_checkpoint(default_checkpoint(), expect=EXPECTED)  # raises on any difference
    ref = build_model(EXPECTED).state_dict()
    assert set(ck["state_dict"]) == set(ref)
    for k, v in ck["state_dict"].items():
        assert v.shape == ref[k].shape and v.dtype == torch.float32 and torch.isfinite(v).all(), k
    # normalisation: SSH statistics of the Gulf Stream training period (metres)
    assert abs(ck["norm"]["mean"]) < 0.5 and 0.05 < ck["norm"]["std"] < 1.0
    # trained on n_time-day windows, with a held-out validation period, and it learned
    assert ck["extra"]["patch"]["size"][0] == EXPECTED.n_time
    # selected by the validation RMSE among the stage's untrained start and its epochs (validate_start)
    hist, start = ck["history"], ck["extra"]["val_start"]["val_rmse"]
    assert len(hist) == ck["epoch"] + 1
    best = min([start] + [h["val_rmse"] for h in hist])
    assert (hist[ck["epoch"]]["val_rmse"] if ck["epoch"] >= 0 else start) == best
    # validated on a held-out OSSE (another seed of the gyre truth; export keeps file names only)
    assert ck["extra"]["val_data"] is not None and "seed" in ck["extra"]["note"]


def test_qg_weights_record_their_training():
    ck = read_checkpoint(shipped_checkpoint("gulfstream_4nadirs"), expect=EXPECTED)
    hist = ck["history"]
    assert len(hist) == ck["epoch"] + 1
    assert hist[ck["epoch"]]["val_rmse"] == min(h["val_rmse"] for h in hist)  # the best epoch
    assert hist[ck["epoch"]]["val_rmse"] < hist[0]["val_rmse"]


def test_demo_runs_the_shipped_weights_on_their_training_patches():
    """`oceanda infer` (the demo) scores the shipped 4DVarNet on the patch geometry it was trained
    on (held-out lambda_x 1.17 deg there vs 1.24 deg on OI's 100 x 100 patches: README); a window
    every 5 days rather than every day (1.16 deg) keeps the demo short."""
    from omegaconf import OmegaConf

    from oceanda.cli import config_dir

    compare = OmegaConf.load(config_dir() / "infer.yaml").demo.compare
    net = [c for c in compare if c.method.name == "4dvarnet" and c.method.get("checkpoint") is None]
    assert len(net) == 1
    trained = read_checkpoint(default_checkpoint(), expect=EXPECTED)["extra"]["patch"]
    assert list(net[0].patch["size"]) == list(trained["size"])
    assert list(net[0].patch["crop"]) == list(trained["crop"])
    assert list(net[0].patch["stride"])[1:] == list(trained["stride"])[1:]  # in space


def _synthetic_patch(seed: int, size: int = 64, length_km: float = 80.0):
    """A Gaussian SSH field (Matern 3/2, std 0.2 m like the Gulf Stream OSSE, correlation
    ``length_km``, 15 days) on a 1/20 deg patch, seen along 2 straight tracks a day (~1.3 %
    of the cells, like 4 nadirs)."""
    from oceanda.dynamics.gaussian import GaussianFieldConfig, gaussian_truth

    lon = -60.0 + 0.05 * np.arange(size)
    lat = 36.0 + 0.05 * np.arange(size)
    cfg = GaussianFieldConfig(std_m=0.2, length_km=length_km, time_days=15.0)
    truth = np.stack(list(gaussian_truth(lon, lat, 15, seed=seed, cfg=cfg))).astype(np.float64)
    rng = np.random.default_rng(seed)
    obs = np.full(truth.shape, np.nan)
    rows = np.arange(size)
    for d in range(15):
        for _ in range(2):
            cols = np.round(rng.integers(-size, size)
                            + rng.choice([-1.0, 1.0]) * rng.uniform(0.7, 1.5) * rows).astype(int)
            ok = (cols >= 0) & (cols < size)
            obs[d, rows[ok], cols[ok]] = truth[d, rows[ok], cols[ok]]
    ocean = np.ones((size, size), bool)
    ocean[: size // 4, : size // 4] = False  # a land corner
    obs[:, ~ocean] = np.nan
    batch = PatchBatch(obs=torch.as_tensor(obs, dtype=torch.float32)[None], ocean=torch.as_tensor(ocean)[None],
                       lon=torch.as_tensor(lon)[None], lat=torch.as_tensor(lat)[None],
                       time=torch.arange(15, dtype=torch.float64)[None],
                       dx_m=torch.full((1, size, size), 5e3), dy_m=torch.full((1, size, size), 5e3))
    return batch, truth, ocean


@pytest.mark.parametrize("seed, length_km", [(0, 60.0), (1, 100.0)])
def test_shipped_weights_reconstruct_better_than_the_observations_alone(seed, length_km):
    """The shipped 4DVarNet must beat the observations-only reconstruction (observed cells =
    observations, elsewhere the training mean: the solver's starting point) on the
    unobserved ocean cells by a clear margin (measured with the first, init="obs" weights:
    0.53-0.60 of its RMSE), give NaN-free ocean output, and be deterministic."""
    method = FourDVarNetMethod(str(default_checkpoint()))
    batch, truth, ocean = _synthetic_patch(seed, length_km=length_km)
    out = method(batch).mean[0].numpy().astype(np.float64)
    obs = batch.obs[0].numpy().astype(np.float64)
    unobserved = ~np.isfinite(obs) & ocean[None]
    base = np.where(np.isfinite(obs), obs, method.mean)
    rmse = np.sqrt(np.mean((out - truth)[unobserved] ** 2))
    rmse_base = np.sqrt(np.mean((base - truth)[unobserved] ** 2))
    assert np.isfinite(out[:, ocean]).all()
    assert rmse < 0.75 * rmse_base, (rmse, rmse_base)
    again = method(batch).mean[0].numpy()
    np.testing.assert_array_equal(again, out.astype(np.float32))


def test_corrupted_checkpoint_is_refused(tmp_path):
    data = default_checkpoint().read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated.pt.*cannot be read"):
        read_checkpoint(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(InputError, match="junk.pt.*cannot be read"):
        FourDVarNetMethod(str(junk))
    with pytest.raises(InputError, match="no such file"):
        read_checkpoint(tmp_path / "missing.pt")


def test_mismatched_checkpoint_is_refused(tmp_path):
    path = default_checkpoint()
    with pytest.raises(InputError, match="does not fit the config.*lstm_hidden: config 48 vs checkpoint 32"):
        read_checkpoint(path, expect=replace(EXPECTED, lstm_hidden=48))
    ck = torch.load(path, map_location="cpu", weights_only=True)
    # weights of another shape than the stored config says
    bad = dict(ck, model_config=dict(ck["model_config"], lstm_hidden=48))
    torch.save(bad, tmp_path / "shapes.pt")
    with pytest.raises(InputError, match="shapes.pt: weights do not match its model config"):
        read_checkpoint(tmp_path / "shapes.pt")
    # a normalisation that cannot be applied
    torch.save(dict(ck, norm={"mean": 0.0, "std": 0.0}), tmp_path / "norm.pt")
    with pytest.raises(InputError, match="norm.pt: bad normalisation"):
        read_checkpoint(tmp_path / "norm.pt")
    # not ours
    torch.save({"state_dict": ck["state_dict"]}, tmp_path / "foreign.pt")
    with pytest.raises(InputError, match="not an oceanda 4DVarNet checkpoint"):
        read_checkpoint(tmp_path / "foreign.pt")


def test_export_keeps_the_weights_and_drops_the_optimizer(tmp_path):
    from oceanda.train.data import Normalisation
    from oceanda.train.fourdvarnet import TrainConfig, make_optimizer, save_checkpoint

    cfg = replace(EXPECTED, prior_hidden=4, lstm_hidden=4, n_steps=2)
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = make_optimizer(model, TrainConfig())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TrainConfig().epochs)
    src = save_checkpoint(tmp_path / "ck.pt", model, cfg, Normalisation(0.1, 0.2), TrainConfig(), opt, sched,
                          epoch=0, history=[{"epoch": 0, "val_rmse": 0.1}],
                          extra={"truth": str(tmp_path / "truth.zarr"),
                                 "extra_train": [[str(tmp_path / "s2" / "truth.zarr"), str(tmp_path / "s2" / "obs.zarr")]]})
    dst = export_checkpoint(src, tmp_path / "out" / "w.pt", note="test")
    ck = read_checkpoint(dst, expect=cfg)
    assert ck["optimizer"] is None and ck["extra"] == {"truth": "truth.zarr", "note": "test",
                                                        "extra_train": [["truth.zarr", "obs.zarr"]]}
    assert dst.stat().st_mode & 0o444 == 0o444  # readable by everyone (package data)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ck["state_dict"][k], v, rtol=0, atol=0)
    assert asdict(ck["model_cfg"]) == asdict(cfg)
    (tmp_path / "bad.pt").write_bytes(b"x")
    with pytest.raises(InputError, match="bad.pt"):
        export_checkpoint(tmp_path / "bad.pt", tmp_path / "never.pt")
    assert not (tmp_path / "never.pt").exists()


@pytest.mark.parametrize("seed, length_km", [(0, 60.0), (1, 100.0)])
def test_shipped_weights_start_from_and_stay_close_to_the_oi(seed, length_km):
    """The shipped weights are init="oi": the solver corrects the exact per-patch OI analysis
    (oceanda.assim.oi, the checkpoint's scales). On a synthetic Gaussian patch (not the QG
    fields it was trained on; OI is near-optimal there) the correction stays bounded: RMSE on
    the unobserved ocean below 1.4 x the OI's (measured when shipped: 0.96 x at 60 km, 1.23 x
    at 100 km correlation), and it is a real correction (not the OI itself)."""
    from oceanda.assim.oi import OptimalInterpolation

    method = FourDVarNetMethod(str(default_checkpoint()))
    cfg = method.cfg
    assert cfg.init == "oi"
    batch, truth, ocean = _synthetic_patch(seed, length_km=length_km)
    oi = OptimalInterpolation(Lx_km=cfg.oi_Lx_km, Ly_km=cfg.oi_Ly_km, Lt_days=cfg.oi_Lt_days,
                              noise_std=cfg.oi_noise_std)(batch).mean[0].numpy().astype(np.float64)
    out = method(batch).mean[0].numpy().astype(np.float64)
    unobserved = ~np.isfinite(batch.obs[0].numpy()) & ocean[None]
    rmse = np.sqrt(np.mean((out - truth)[unobserved] ** 2))
    rmse_oi = np.sqrt(np.mean((oi - truth)[unobserved] ** 2))
    assert rmse < 1.4 * rmse_oi, (rmse, rmse_oi)
    assert np.abs(out - oi)[:, ocean].max() > 1e-3
