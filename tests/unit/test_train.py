"""4DVarNet training: patches, normalisation, augmentation, time split, losses, checkpoints,
resume, the CLI on tiny synthetic zarrs, and data-parallel equivalence under mpiexec."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from oceanda.errors import InputError
from oceanda.train.data import Normalisation, PatchDataset, patch_starts, time_split
from oceanda.train.fourdvarnet import (
    TASK,
    ModelConfig,
    TrainConfig,
    build_model,
    load_checkpoint,
    loss_terms,
    save_checkpoint,
    weighted_mse,
)
from oceanda.train.loop import fit, train_step, validate

NT, NY, NX = 30, 16, 20
SIZE = (5, 8, 8)


def synthetic(seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(NT)[:, None, None]
    y = np.arange(NY)[None, :, None]
    x = np.arange(NX)[None, None, :]
    truth = (0.3 * np.sin(0.4 * x + 0.1 * t) * np.cos(0.3 * y - 0.05 * t) + 0.5).astype(np.float32)
    ocean = np.ones((NY, NX), bool)
    ocean[:3, :4] = False
    truth = np.where(ocean, truth, np.nan).astype(np.float32)
    obs = np.full_like(truth, np.nan)
    for d in range(NT):  # one diagonal "track" per day
        c = (3 * d) % NX
        for i in range(NY):
            j = (c + i) % NX
            obs[d, i, j] = truth[d, i, j] + 0.01 * rng.standard_normal()
    obs[:, ~ocean] = np.nan
    return truth, obs, ocean


def small_model_cfg(**kw):
    d = dict(n_time=SIZE[0], prior_hidden=4, lstm_hidden=4, n_steps=2, dropout=0.0)
    d.update(kw)
    return ModelConfig(**d)


def dataset(mode="supervised", aug=0, days=None):
    truth, obs, ocean = synthetic()
    days = np.arange(NT) if days is None else days
    norm = Normalisation.fit(truth, ocean, days)
    w = np.ones(SIZE, np.float32)
    starts = patch_starts(days, ocean.shape, SIZE, (1, 8, 6))
    return PatchDataset(truth if mode == "supervised" else None, obs, ocean, starts, SIZE, w, norm,
                        aug=aug, mode=mode, seed=1), (truth, obs, ocean, norm)


def test_normalisation_uses_training_days_and_ocean_only():
    truth, obs, ocean = synthetic()
    days = np.arange(10)
    n = Normalisation.fit(truth, ocean, days)
    v = truth[:10][:, ocean]
    assert n.mean == pytest.approx(float(v.mean()), rel=1e-6)
    assert n.std == pytest.approx(float(v.std()), rel=1e-6)
    np.testing.assert_allclose(n.invert(n.apply(truth[0, ocean])), truth[0, ocean], rtol=1e-6)


def test_time_split_gap_and_patches_never_touch_validation():
    train, val = time_split(100, 40, 20, 7)
    assert val.min() == 40 and val.max() == 59
    assert set(train).isdisjoint(range(33, 67))
    st = patch_starts(train, (16, 20), (15, 8, 8), (1, 8, 6))
    for t0, y, x in st:
        days = set(range(t0, t0 + 15))
        assert days <= set(train.tolist())
        assert y + 8 <= 16 and x + 8 <= 20
    # every row / column covered, windows of each segment: 33-15+1 + 33-15+1
    assert len({(t, ) for t, _, _ in st}) == (33 - 15 + 1) + (100 - 67 - 15 + 1)
    assert {x for _, _, x in st} == {0, 6, 12}


def test_augmented_item_is_truth_through_another_windows_mask():
    ds, (truth, obs, ocean, norm) = dataset(aug=2)
    n = len(ds.starts)
    assert len(ds) == 3 * n
    it0, it1 = ds[0], ds[n]
    j = int(ds.perm[0])
    t, y, x = ds.starts[j]
    other = obs[t:t + SIZE[0], y:y + SIZE[1], x:x + SIZE[2]]
    t0, y0, x0 = ds.starts[0]
    tw = norm.apply(truth[t0:t0 + SIZE[0], y0:y0 + SIZE[1], x0:x0 + SIZE[2]])
    oc = ocean[y0:y0 + SIZE[1], x0:x0 + SIZE[2]]
    expect = np.where(np.isfinite(other) & oc, tw, np.nan)
    np.testing.assert_allclose(it1["obs"].numpy(), expect, rtol=1e-6)
    np.testing.assert_array_equal(it0["tgt"].numpy(), it1["tgt"].numpy())
    # the original item: the real observations
    np.testing.assert_allclose(it0["obs"].numpy(),
                               np.where(oc, norm.apply(obs[t0:t0 + 5, y0:y0 + 8, x0:x0 + 8]), np.nan), rtol=1e-6)


def test_semi_supervised_items_partition_the_observations():
    ds, (truth, obs, ocean, norm) = dataset(mode="semi")
    ds.holdout = 0.5
    it = ds[3]
    o, t = np.isfinite(it["obs"].numpy()), np.isfinite(it["tgt"].numpy())
    t0, y0, x0 = ds.starts[3]
    full = np.isfinite(obs[t0:t0 + 5, y0:y0 + 8, x0:x0 + 8])
    assert not (o & t).any()
    np.testing.assert_array_equal(o | t, full)
    assert t.any() and o.any()


def test_weighted_mse_matches_manual_and_ignores_nan_and_zero_weight():
    err = torch.tensor([[[[1.0, 2.0], [float("nan"), 4.0]]]])
    w = torch.tensor([[[[1.0, 0.5], [1.0, 0.0]]]])
    # counted cells: (1, w1), (2, w .5) -> (1 + 1) / 2
    torch.testing.assert_close(weighted_mse(err, w), torch.tensor([1.0]))


def test_training_reduces_loss_and_checkpoint_roundtrip(tmp_path):
    ds, (_, _, _, norm) = dataset()
    cfg = small_model_cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    tcfg = TrainConfig(epochs=4, batch_size=2, lr=1e-2, max_batches=6)
    b = {k: torch.stack([ds[i][k] for i in range(4)]) for k in ds[0]}
    with torch.no_grad():
        before = float(loss_terms(model.train(), b, tcfg)["total"])
    val = torch.utils.data.Subset(ds, range(8))
    hist = fit(TASK, model, cfg, ds, val, norm, tcfg, tmp_path / "ck.pt", progress=False)
    with torch.no_grad():
        after = float(loss_terms(model.train(), b, tcfg)["total"])
    assert after < before
    assert len(hist) == 4 and all(np.isfinite(h["val_rmse"]) for h in hist)
    ck = load_checkpoint(tmp_path / "ck.pt", expect=cfg)
    assert ck["epoch"] == 3 and ck["normalisation"] == norm
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ck["model"].state_dict()[k], v.cpu())
    assert (tmp_path / "best_ck.pt").is_file()


class _Interrupt(Exception):
    pass


def test_resume_continues_where_it_stopped(tmp_path):
    """Killed after epoch 1 of 2, resumed: the same weights as the uninterrupted run."""
    ds, (_, _, _, norm) = dataset()
    cfg = small_model_cfg()
    tcfg = TrainConfig(epochs=2, batch_size=2, lr=1e-2, max_batches=2)
    torch.manual_seed(0)
    m_full = build_model(cfg)
    fit(TASK, m_full, cfg, ds, None, norm, tcfg, tmp_path / "a.pt", progress=False)

    class Killed(PatchDataset):
        def set_epoch(self, epoch):
            if epoch == 1:
                raise _Interrupt
            super().set_epoch(epoch)

    ds.__class__ = Killed
    torch.manual_seed(0)
    with pytest.raises(_Interrupt):
        fit(TASK, build_model(cfg), cfg, ds, None, norm, tcfg, tmp_path / "b.pt", progress=False)
    assert load_checkpoint(tmp_path / "b.pt")["epoch"] == 0
    ds.__class__ = PatchDataset
    torch.manual_seed(123)  # other initial weights: they must be overwritten by the checkpoint
    m3 = build_model(cfg)
    hist = fit(TASK, m3, cfg, ds, None, norm, tcfg, tmp_path / "b.pt", resume=True, progress=False)
    assert [h["epoch"] for h in hist] == [0, 1]
    for k, v in m_full.state_dict().items():
        torch.testing.assert_close(m3.state_dict()[k], v, rtol=1e-6, atol=1e-7)


def test_bad_checkpoints_raise_input_error(tmp_path):
    ds, (_, _, _, norm) = dataset()
    cfg = small_model_cfg()
    model = build_model(cfg)
    p = save_checkpoint(tmp_path / "ok.pt", model, cfg, norm)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with pytest.raises(InputError, match="cannot be read"):
        load_checkpoint(bad)
    with pytest.raises(InputError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(InputError, match="does not fit the config"):
        load_checkpoint(p, expect=small_model_cfg(lstm_hidden=8))
    foreign = tmp_path / "foreign.pt"
    torch.save({"a": 1}, foreign)
    with pytest.raises(InputError, match="not an oceanda 4DVarNet checkpoint"):
        load_checkpoint(foreign)
    ck = torch.load(p, weights_only=True)
    ck["model_config"]["prior_hidden"] = 6  # weights no longer fit
    torch.save(ck, tmp_path / "mismatch.pt")
    with pytest.raises(InputError, match="weights do not match"):
        load_checkpoint(tmp_path / "mismatch.pt")
    ck = torch.load(p, weights_only=True)
    ck["norm"] = {"mean": 0.0, "std": 0.0}
    torch.save(ck, tmp_path / "norm.pt")
    with pytest.raises(InputError, match="normalisation"):
        load_checkpoint(tmp_path / "norm.pt")


def _write_zarrs(root: Path):
    import pandas as pd
    import xarray as xr

    truth, obs, ocean = synthetic()
    coords = {"time": pd.date_range("2012-10-01", periods=NT), "lat": 30 + 0.05 * np.arange(NY),
              "lon": -60 + 0.05 * np.arange(NX)}
    dims = ("time", "lat", "lon")
    xr.Dataset({"ssh": (dims, truth), "ocean": (("lat", "lon"), ocean.astype(np.int8))},
               coords=coords).to_zarr(root / "truth.zarr")
    xr.Dataset({"ssh_obs": (dims, obs), "ocean": (("lat", "lon"), ocean.astype(np.int8))},
               coords=coords).to_zarr(root / "obs.zarr")


CLI_ARGS = ["model=4dvarnet_small", "model.n_steps=2", "model.prior_hidden=4", "model.lstm_hidden=4",
            "patch.size=[5,8,8]", "patch.stride=[1,6,6]", "patch.crop=[1,1]", "gap_days=2",
            "train.epochs=1", "train.batch_size=2", "train.max_batches=2", "progress=false"]


def test_cli_train_writes_checkpoint_and_history(tmp_path):
    from oceanda.cli import main

    _write_zarrs(tmp_path)
    args = ["train", f"truth_path={tmp_path / 'truth.zarr'}", f"obs_path={tmp_path / 'obs.zarr'}",
            f"out_dir={tmp_path / 'run'}", *CLI_ARGS]
    assert main(args) == 0
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ck["model_cfg"].n_time == 5 and ck["extra"]["gap_days"] == 2
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(hist) == 1 and np.isfinite(hist[0]["val_rmse"])
    # a mismatching resume is refused with a clear error (exit 2)
    assert main(args + ["resume=true", "model.lstm_hidden=6"]) == 2


def test_cli_semi_supervised_without_truth(tmp_path):
    from oceanda.cli import main

    _write_zarrs(tmp_path)
    assert main(["train", "truth_path=null", f"obs_path={tmp_path / 'obs.zarr'}", f"out_dir={tmp_path / 'r'}",
                 "train.mode=semi", *CLI_ARGS]) == 0
    assert main(["train", "truth_path=null", f"obs_path={tmp_path / 'obs.zarr'}", f"out_dir={tmp_path / 'r2'}",
                 *CLI_ARGS]) == 2


def data_parallel_run(dist):
    """Two steps on patches [0, 5] (float64), split over ``dist.world`` ranks; rank 0's
    weights and last (all-reduced, clipped) gradients."""
    from oceanda.train.fourdvarnet import make_optimizer
    from oceanda.train.loop import _collate

    ds, _ = dataset()
    torch.manual_seed(0)
    model = build_model(small_model_cfg()).double()  # float64: Adam's first steps ~ lr sign(g)
    tcfg = TrainConfig(batch_size=2 // dist.world, lr=1e-2)
    opt = make_optimizer(model, tcfg)
    idx = np.array([0, 5])
    for _ in range(2):
        mine = idx[dist.rank * tcfg.batch_size:(dist.rank + 1) * tcfg.batch_size]
        b = {k: v.double() if v.is_floating_point() else v for k, v in _collate(ds, mine).items()}
        train_step(TASK, model, opt, b, tcfg, dist)
    state = dict(model.state_dict())
    state.update({"grad." + n: p.grad.clone() for n, p in model.named_parameters()})
    return state


MPI_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {testdir!r})
    from test_train import data_parallel_run
    from oceanda.train.loop import init_distributed, shutdown_distributed
    torch.set_num_threads(1)
    dist = init_distributed()
    assert dist.world == 2, dist
    state = data_parallel_run(dist)
    if dist.rank == 0:
        torch.save(state, sys.argv[1])
    shutdown_distributed()
""")


@pytest.mark.mpi
def test_data_parallel_step_equals_single_process_on_concatenated_batch(tmp_path):
    from oceanda.train.loop import DistContext

    script = tmp_path / "dp.py"
    script.write_text(MPI_SCRIPT.format(testdir=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([shutil.which("mpiexec"), "-n", "2", sys.executable, str(script), str(tmp_path / "two.pt")],
                         env=env, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, f"mpiexec -n 2 exited {run.returncode}:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    a, b = data_parallel_run(DistContext()), torch.load(tmp_path / "two.pt")
    assert any(k.startswith("grad.") for k in a) and a.keys() == b.keys()
    for k in a:  # weights after two steps and the last gradients
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-11)


def _patch_batch(obs, ocean):
    from oceanda.assim.base import PatchBatch

    B, T, H, W = obs.shape
    return PatchBatch(obs=obs, ocean=ocean, lon=torch.zeros(B, W), lat=torch.zeros(B, H),
                      time=torch.zeros(B, T), dx_m=torch.ones(B, H, W), dy_m=torch.ones(B, H, W))


def test_registered_4dvarnet_method_reproduces_the_model_in_physical_units(tmp_path):
    from oceanda.assim.registry import build_method

    ds, (truth, obs, ocean, norm) = dataset()
    cfg = small_model_cfg()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    p = save_checkpoint(tmp_path / "m.pt", model, cfg, norm)
    method = build_method("4dvarnet", checkpoint=str(p))
    raw = torch.from_numpy(obs[None, :SIZE[0], :8, :8].copy())
    oc = torch.from_numpy(ocean[None, :8, :8].copy())
    res = method(_patch_batch(raw, oc))
    with torch.inference_mode():
        ref = model(norm.apply(raw), oc) * norm.std + norm.mean
    torch.testing.assert_close(res.mean, ref)
    assert res.mean.shape == raw.shape
    with pytest.raises(InputError, match="patch length"):
        method(_patch_batch(torch.from_numpy(obs[None, :4, :8, :8].copy()), oc))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot be read"):
        build_method("4dvarnet", checkpoint=str(bad))


# ----------------------------------------------------------------------------- modes


def _geom(mode):
    from oceanda.data.patches import PatchGeometry

    kw = dict(size=SIZE, stride=(1, 6, 6), crop=(1, 1))
    if mode != "mapping":
        kw.update(anchor="end", time_weight="anchor", lead={"nrt": 0, "forecast2": 2}[mode])
    return PatchGeometry(**kw)


def mode_dataset(mode, kind="supervised", aug=0):
    truth, obs, ocean = synthetic()
    g = _geom(mode)
    norm = Normalisation.fit(truth, ocean)
    starts = patch_starts(np.arange(NT), ocean.shape, SIZE, (1, 8, 6))
    return PatchDataset(truth if kind == "supervised" else None, obs, ocean, starts, SIZE,
                        g.weights().full().astype(np.float32), norm, aug=aug, mode=kind, seed=1,
                        lead=g.lead)


def test_forecast_items_drop_the_last_lead_days_only():
    ref = mode_dataset("nrt", aug=1)
    ds = mode_dataset("forecast2", aug=1)
    assert len(ds) == len(ref)
    dropped = 0
    for i in range(0, len(ds), 3):  # real and augmented items
        a, b = ref[i], ds[i]
        np.testing.assert_array_equal(b["obs"][:3].numpy(), a["obs"][:3].numpy())
        assert torch.isnan(b["obs"][3:]).all()
        dropped += int(torch.isfinite(a["obs"][3:]).sum())
        for k in ("tgt", "weight", "ocean"):
            np.testing.assert_array_equal(b[k].numpy(), a[k].numpy())
    assert dropped > 0
    # the loss weight sits on the target (last) day only
    w = ds[0]["weight"].numpy()
    assert (w[:-1] == 0).all() and (w[-1] > 0).any()
    # semi-supervised: the dropped days' observations are all targets, never inputs
    semi = mode_dataset("forecast2", kind="semi")
    it = semi[2]
    t0, y0, x0 = semi.starts[2]
    _, obs, _ = synthetic()
    seen = np.isfinite(obs[t0:t0 + 5, y0:y0 + 8, x0:x0 + 8])
    np.testing.assert_array_equal(np.isfinite(it["tgt"][3:].numpy()), seen[3:])
    assert not torch.isfinite(it["obs"][3:]).any()


def test_mapping_items_unchanged_by_the_lead_option():
    """lead=0 is the default path: the same items bit for bit (mapping training as before)."""
    ds, _ = dataset(aug=1)
    truth, obs, ocean = synthetic()
    same = PatchDataset(truth, obs, ocean, ds.starts, SIZE, ds.weight, ds.norm, aug=1, seed=1, lead=0)
    for i in (0, len(ds.starts) + 1):
        for k in ds[i]:
            np.testing.assert_array_equal(same[i][k].numpy(), ds[i][k].numpy())
    with pytest.raises(Exception, match="lead=5"):
        PatchDataset(truth, obs, ocean, ds.starts, SIZE, ds.weight, ds.norm, lead=5)


def test_nrt_loss_ignores_the_target_before_the_last_day():
    ds = mode_dataset("nrt")
    b = {k: torch.stack([ds[i][k] for i in range(2)]) for k in ds[0]}
    torch.manual_seed(0)
    model = build_model(small_model_cfg()).eval()
    cfg = TrainConfig(w_prior=0.0)
    with torch.no_grad():
        ref = loss_terms(model, b, cfg)
        b2 = dict(b, tgt=b["tgt"].clone())
        b2["tgt"][:, :-1] += 5.0  # other days' truth does not enter an NRT loss
        same = loss_terms(model, b2, cfg)
        b2["tgt"][:, -1] += 1.0
        other = loss_terms(model, b2, cfg)
    torch.testing.assert_close(same["total"], ref["total"], rtol=0, atol=0)
    assert float(other["total"]) > float(ref["total"])


MODE_ARGS = {"nrt": ["patch.anchor=end", "patch.time_weight=anchor"],
             "forecast2": ["patch.anchor=end", "patch.time_weight=anchor", "patch.lead=2"]}


@pytest.mark.parametrize("mode", ["nrt", "forecast2"])
def test_cli_trains_each_mode_and_records_it(tmp_path, mode, capsys):
    from oceanda.cli import main
    from oceanda.train.fourdvarnet import checkpoint_mode

    _write_zarrs(tmp_path)
    args = ["train", f"truth_path={tmp_path / 'truth.zarr'}", f"obs_path={tmp_path / 'obs.zarr'}",
            f"out_dir={tmp_path / 'run'}", *CLI_ARGS, *MODE_ARGS[mode]]
    assert main(args) == 0
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert checkpoint_mode(ck) == _geom(mode).mode_record() | {"n_time": 5}
    assert np.isfinite(json.loads((tmp_path / "run" / "history.json").read_text())[0]["val_rmse"])
    # resuming with patches of another mode is refused, naming the checkpoint
    capsys.readouterr()
    other = [a for a in args if not a.startswith("patch.lead")] + (["patch.lead=1"] if mode == "nrt" else [])
    assert main(other + ["resume=true", "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt was trained for patch mode" in err and "Traceback" not in err


def test_checkpoint_mode_of_older_checkpoints(tmp_path):
    from oceanda.train.fourdvarnet import checkpoint_mode

    ds, (_, _, _, norm) = dataset()
    cfg = small_model_cfg()
    model = build_model(cfg)
    p = save_checkpoint(tmp_path / "a.pt", model, cfg, norm)
    assert checkpoint_mode(load_checkpoint(p)) is None
    p = save_checkpoint(tmp_path / "b.pt", model, cfg, norm, extra={"patch": {"size": [5, 8, 8], "stride": [1, 6, 6]}})
    assert checkpoint_mode(load_checkpoint(p))["mode"] == "mapping"


def test_checkpoint_normalisation_and_shape_errors(tmp_path, capsys):
    from oceanda.cli import main

    ds, (_, _, _, norm) = dataset()
    cfg = small_model_cfg()
    p = save_checkpoint(tmp_path / "ok.pt", build_model(cfg), cfg, norm)
    for name, change, message in [
        ("nonorm", lambda ck: ck.pop("norm"), "ck_nonorm.pt: missing 'norm'"),
        ("nanmean", lambda ck: ck["norm"].update(mean=float("nan")), "ck_nanmean.pt: bad normalisation"),
        ("nanstd", lambda ck: ck["norm"].update(std=float("nan")), "ck_nanstd.pt: bad normalisation"),
        ("nostd", lambda ck: ck["norm"].pop("std"), "ck_nostd.pt: bad normalisation"),
        ("nostate", lambda ck: ck.pop("state_dict"), "ck_nostate.pt: missing 'state_dict'"),
        ("hidden", lambda ck: ck["model_config"].update(lstm_hidden=6), "ck_hidden.pt: weights do not match"),
        ("ntime", lambda ck: ck["model_config"].update(n_time=7), "ck_ntime.pt: weights do not match"),
    ]:
        ck = torch.load(p, weights_only=True)
        change(ck)
        torch.save(ck, tmp_path / f"ck_{name}.pt")
        with pytest.raises(InputError, match=message):
            load_checkpoint(tmp_path / f"ck_{name}.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(InputError, match="garbage.pt: cannot be read"):
        load_checkpoint(garbage)
    # the model's window length must be the patch's (oceanda train)
    _write_zarrs(tmp_path)
    capsys.readouterr()
    assert main(["train", f"truth_path={tmp_path / 'truth.zarr'}", f"obs_path={tmp_path / 'obs.zarr'}",
                 f"out_dir={tmp_path / 'run'}", *CLI_ARGS, "model.n_time=4"]) == 2
    assert "model.n_time=4 differs from patch.size[0]=5" in capsys.readouterr().err


# ----------------------------------------------------------------------------- init = "oi"


def test_oi_first_guess_items_are_the_oi_of_what_each_item_observes():
    """With ``oi`` the items carry ``x0``: the normalised OI analysis (oi_patch in metres) of
    the item's own input observations, the real ones and the augmented (other mask) ones."""
    from oceanda.assim.oi import oi_patch

    truth, obs, ocean = synthetic()
    norm = Normalisation.fit(truth, ocean, np.arange(NT))
    lon, lat = -60 + 0.05 * np.arange(NX), 30 + 0.05 * np.arange(NY)
    kw = dict(Lx_km=20.0, Ly_km=25.0, Lt_days=3.0, R=1e-4)
    starts = patch_starts(np.arange(NT), ocean.shape, SIZE, (1, 8, 6))
    args = (truth, obs, ocean, starts, SIZE, np.ones(SIZE, np.float32), norm)
    ds = PatchDataset(*args, aug=1, seed=1, oi=kw, lon=lon, lat=lat)
    plain = PatchDataset(*args, aug=1, seed=1)
    n = len(starts)
    for idx in (3, n + 3):
        it = ds[idx]
        assert "x0" not in plain[idx]
        t, y, x = starts[idx % n]
        phys = norm.invert(it["obs"].numpy().astype(np.float64))
        ref = norm.apply(oi_patch(phys, lon[x:x + SIZE[2]], lat[y:y + SIZE[1]], np.arange(SIZE[0], dtype=float), **kw))
        np.testing.assert_allclose(it["x0"].numpy(), ref, rtol=1e-5, atol=1e-5)
        for k in ("obs", "tgt", "weight", "ocean"):
            np.testing.assert_array_equal(it[k].numpy(), plain[idx][k].numpy())
    assert not np.allclose(ds[3]["x0"].numpy(), ds[n + 3]["x0"].numpy())  # another mask, another OI
    cached = PatchDataset(*args, oi=kw, lon=lon, lat=lat, cache_oi=True)
    np.testing.assert_array_equal(cached[2]["x0"].numpy(), ds[2]["x0"].numpy())
    assert set(cached._oi_cache) == {2}
    np.testing.assert_array_equal(cached[2]["x0"].numpy(), ds[2]["x0"].numpy())  # from the cache
    with pytest.raises(InputError, match="lon and lat"):
        PatchDataset(*args, oi=kw)


def test_loss_starts_from_the_first_guess_and_fine_tuning_loads_weights(tmp_path):
    """loss_terms feeds ``x0`` to the solver: a zero-update model (lr_grad 0) outputs x0, so
    its MSE term is wmse(x0 - tgt); load_weights copies weights across init / oi_* changes
    and refuses another architecture."""
    from oceanda.train.fourdvarnet import load_weights

    ds, (_, _, _, norm) = dataset()
    b = {k: torch.stack([ds[i][k] for i in range(3)]) for k in ds[0]}
    b["x0"] = torch.nan_to_num(b["tgt"]) + 0.1 * torch.randn_like(b["tgt"])
    cfg = small_model_cfg(lr_grad=0.0, init="oi")
    torch.manual_seed(0)
    model = build_model(cfg).zero_update_().train()
    terms = loss_terms(model, b, TrainConfig(w_grad=0.0, w_prior=0.0))
    oc = b["ocean"][:, None].float()
    torch.testing.assert_close(terms["out"], b["x0"] * oc)
    torch.testing.assert_close(terms["mse"], weighted_mse(b["x0"] * oc - b["tgt"], b["weight"]).mean())
    src_cfg = small_model_cfg(lr_grad=0.0)  # init obs: weights still load
    torch.manual_seed(5)
    src = build_model(src_cfg)
    save_checkpoint(tmp_path / "src.pt", src, src_cfg, norm)
    load_weights(model, cfg, tmp_path / "src.pt")
    for k, v in src.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)
    with pytest.raises(InputError, match="lstm_hidden: config 6 vs checkpoint 4"):
        load_weights(build_model(small_model_cfg(lstm_hidden=6)), small_model_cfg(lstm_hidden=6), tmp_path / "src.pt")


def test_cli_trains_an_oi_initialised_model_from_other_weights(tmp_path):
    """`oceanda train model.init=oi init_checkpoint=... zero_update=true`: the checkpoint
    records init=oi and, trained with lr 0, holds exactly the given weights with a zeroed
    modulator output; a missing init_checkpoint is a clear error (exit 2)."""
    from oceanda.cli import main

    _write_zarrs(tmp_path)
    base = ["train", f"truth_path={tmp_path / 'truth.zarr'}", f"obs_path={tmp_path / 'obs.zarr'}", *CLI_ARGS]
    assert main(base + [f"out_dir={tmp_path / 'a'}"]) == 0
    args = base + [f"out_dir={tmp_path / 'b'}", "model.init=oi", "model.oi_Lx_km=20", "model.oi_Lt_days=3",
                   f"init_checkpoint={tmp_path / 'a' / 'checkpoint.pt'}", "zero_update=true",
                   "train.lr=0"]
    assert main(args) == 0
    ck = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert ck["model_cfg"].init == "oi" and ck["model_cfg"].oi_Lx_km == 20
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["state_dict"]
    for k, v in ck["state_dict"].items():
        if k.endswith(("grad_mod.conv_out.weight", "grad_mod.conv_out.bias")):
            assert not v.any()
        else:
            torch.testing.assert_close(v, a[k])
    assert main(base + [f"out_dir={tmp_path / 'c'}", "init_checkpoint=" + str(tmp_path / "nope.pt")]) == 2


def test_validate_start_keeps_the_start_when_training_makes_it_worse(tmp_path):
    """The selection rule: the untrained start competes for best_checkpoint. A learning rate far too
    large ruins the model: the selected weights are the start's (epoch -1), bit for bit, and the
    start's validation RMSE is recorded. With a sane rate an epoch that beats the start is selected."""
    ds, (_, _, _, norm) = dataset()
    cfg = small_model_cfg()
    val = torch.utils.data.Subset(ds, range(8))
    torch.manual_seed(0)
    model = build_model(cfg)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    bad = TrainConfig(epochs=2, batch_size=2, lr=0.5, grad_clip=0.0, max_batches=3)
    hist = fit(TASK, model, cfg, ds, val, norm, bad, tmp_path / "bad" / "ck.pt", progress=False,
               validate_start=True, snapshots=True)
    best = load_checkpoint(tmp_path / "bad" / "best_ck.pt", expect=cfg)
    v0 = best["extra"]["val_start"]["val_rmse"]
    assert v0 < min(h["val_rmse"] for h in hist)  # training made it worse on the validation patches
    assert best["epoch"] == -1
    for k, v in start.items():
        assert torch.equal(best["state_dict"][k], v), k
    assert [h["steps"] for h in hist] == [3, 6]
    snaps = sorted((tmp_path / "bad" / "snapshots").glob("epoch_*.pt"))
    assert [p.name for p in snaps] == ["epoch_000.pt", "epoch_001.pt"]
    assert (tmp_path / "bad" / "snapshots" / "start.pt").is_file()
    last = load_checkpoint(snaps[-1], expect=cfg)
    assert last["optimizer"] is None
    for k, v in model.state_dict().items():
        assert torch.equal(last["state_dict"][k], v), k
    # another rate: the selected weights are those of the best of the start and the epochs
    torch.manual_seed(0)
    model = build_model(cfg)
    good = TrainConfig(epochs=3, batch_size=2, lr=1e-2, max_batches=6)
    hist = fit(TASK, model, cfg, ds, val, norm, good, tmp_path / "good" / "ck.pt", progress=False,
               validate_start=True)
    best = load_checkpoint(tmp_path / "good" / "best_ck.pt", expect=cfg)
    rmses = [best["extra"]["val_start"]["val_rmse"]] + [h["val_rmse"] for h in hist]
    assert best["epoch"] == int(np.argmin(rmses)) - 1
    assert validate(TASK, best["model"], val, norm, "cpu")["val_rmse"] == pytest.approx(min(rmses), rel=1e-6)


def test_join_osses_never_lets_a_window_span_two_osses():
    from oceanda.train.data import join_osses

    truth, obs, ocean = synthetic()
    t2, o2, _ = synthetic(seed=1)
    parts = [(truth[:12], obs[:12], ocean), (t2 + 1.0, o2 + 1.0, ocean), (truth[12:20], obs[12:20], ocean)]
    jt, jo, joc, days = join_osses(parts, ["a", "b", "c"])
    assert [len(d) for d in days] == [12, NT, 8] and days[1][0] == 13 and days[2][0] == 13 + NT + 1
    for (t, o, _), d in zip(parts, days):
        np.testing.assert_array_equal(jt[d], t)
        np.testing.assert_array_equal(jo[d], o)
    assert np.isnan(jo[12]).all() and np.isnan(jt[12]).all()
    starts = patch_starts(np.concatenate(days), ocean.shape, SIZE, (1, 6, 6))
    part_of = np.full(len(jo), -1)
    for k, d in enumerate(days):
        part_of[d] = k
    for t in starts[:, 0]:
        assert len(set(part_of[t:t + SIZE[0]])) == 1 and part_of[t] >= 0
    # 12 - 5 + 1 windows in the first part, 30 - 5 + 1 in the second, 8 - 5 + 1 in the third (x 3 x 3 in space)
    assert len(starts) == (8 + 26 + 4) * 3 * 3
    other = ocean.copy()
    other[5, 5] = False
    with pytest.raises(InputError, match="c: its grid / ocean mask"):
        join_osses(parts[:2] + [(truth, obs, other)], ["a", "b", "c"])


def test_cli_trains_on_several_osses_and_validates_on_a_held_out_one(tmp_path, capsys):
    import xarray as xr

    from oceanda.cli import main

    for name in ("s1", "s2", "v"):
        (tmp_path / name).mkdir()
        _write_zarrs(tmp_path / name)
    args = ["train", f"truth_path={tmp_path / 's1/truth.zarr'}", f"obs_path={tmp_path / 's1/obs.zarr'}",
            f"out_dir={tmp_path / 'run'}", f"extra_train=[[{tmp_path / 's2/truth.zarr'},{tmp_path / 's2/obs.zarr'}]]",
            f"val_truth_path={tmp_path / 'v/truth.zarr'}", f"val_obs_path={tmp_path / 'v/obs.zarr'}",
            "val_period=[2012-10-11,2012-10-20]", *CLI_ARGS]
    assert main(args) == 0
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    # validation: the 10 days of val_period of the held-out OSSE; training: every day of both others
    assert ck["extra"]["val_data"] == [str(tmp_path / "v/truth.zarr"), str(tmp_path / "v/obs.zarr")]
    assert ck["extra"]["val_days"][1] - ck["extra"]["val_days"][0] == 9
    assert ck["extra"]["val_days"][0] == 2 * (NT + 1)
    assert np.isfinite(ck["extra"]["val_start"]["val_rmse"])
    # an OSSE on another grid is refused, naming it
    for name in ("truth", "obs"):
        ds = xr.open_zarr(tmp_path / f"v/{name}.zarr").load()
        ds.assign_coords(lat=ds.lat + 1.0).to_zarr(tmp_path / f"moved_{name}.zarr")
    capsys.readouterr()
    bad = [a for a in args if not a.startswith("val_")] + [
        f"val_truth_path={tmp_path / 'moved_truth.zarr'}", f"val_obs_path={tmp_path / 'moved_obs.zarr'}",
        f"out_dir={tmp_path / 'run_bad'}"]
    assert main(bad) == 2
    assert "moved_obs.zarr: its grid" in capsys.readouterr().err
    assert not (tmp_path / "run_bad").exists()
