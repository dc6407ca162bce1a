"""SPDE-prior 4DVarNet: the prior term is SPDEPrior.quad, closed-form gradients, gradchecks,
Matheron members with a linear solver are exact posterior draws, Theta never sees the truth,
training / checkpoints / bad checkpoints, and the registered method round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oceanda.assim.base import PatchBatch
from oceanda.assim.spde_fourdvarnet import (
    SPDECost,
    SPDEFourDVarNet,
    SPDEModelConfig,
    SPDEPrecisionBatch,
    read_spde_checkpoint,
    spde_conditional_members,
)
from oceanda.errors import ConfigError, InputError
from oceanda.priors.spde import SPDEPrior
from oceanda.train.loop import fit
from oceanda.train.spde_fourdvarnet import (
    SPDETrainConfig,
    TASK,
    crop_nll,
    save_spde_checkpoint,
    spde_loss_terms,
)


def tiny_cfg(**kw):
    d = dict(n_time=3, kappa0=0.5, gamma0=2.0, n_steps=3, lstm_hidden=4, theta_hidden=4, dropout=0.0,
             length_unit_m=1.0)
    d.update(kw)
    return SPDEModelConfig(**d)


def random_head(model, scale=0.3, seed=0):
    """Give the (zero-initialised) Theta head random weights so that Theta depends on its input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        h = model.theta_net.head
        h.weight.copy_(scale * torch.randn(h.weight.shape, generator=g, dtype=h.weight.dtype))


def tiny_batch(B=2, T=3, H=6, W=7, frac=0.3, seed=0, dtype=torch.float64, land=True):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(B, T, H, W, generator=g, dtype=dtype)
    obs[torch.rand(B, T, H, W, generator=g) > frac] = float("nan")
    ocean = torch.ones(B, H, W, dtype=torch.bool)
    if land:
        ocean[-1, :2, :3] = False
    dx = 1.0 + 0.2 * torch.rand(B, H, W, generator=g, dtype=dtype)
    dy = 1.0 + 0.2 * torch.rand(B, H, W, generator=g, dtype=dtype)
    return obs, ocean, dx, dy


# ----------------------------------------------------------------------------- prior term


@pytest.mark.parametrize("params,theta,init", [
    (["kappa", "std"], "patch", "stationary"),
    (["kappa", "std", "gamma", "m", "anisotropy"], "field", "white"),
    (["kappa", "std", "gamma", "anisotropy"], "field", "stationary"),
])
def test_prior_term_equals_spde_quad_and_its_gradient_is_2Qr(params, theta, init):
    torch.manual_seed(0)
    model = SPDEFourDVarNet(tiny_cfg(params=params, theta=theta, init=init)).double()
    random_head(model)
    obs, ocean, dx, dy = tiny_batch()
    th = model.predict_theta(obs, ocean)
    priors = model.priors(th, ocean, dx, dy)
    prec = SPDEPrecisionBatch(priors)
    x = torch.randn(obs.shape, dtype=torch.float64)
    ref = torch.stack([p.quad(x[b]) for b, p in enumerate(priors)])
    torch.testing.assert_close(prec.quad(x), ref, rtol=1e-12, atol=0)
    g_ref = torch.stack([2 * p.precision_matvec(x[b]) for b, p in enumerate(priors)])
    torch.testing.assert_close(prec.grad(x), g_ref, rtol=1e-10, atol=1e-10)
    # and against the dense precision
    Qd = priors[0].precision_dense()
    torch.testing.assert_close(prec.quad(x)[0], x[0].reshape(-1) @ Qd @ x[0].reshape(-1), rtol=1e-10, atol=0)


def test_cost_gradient_is_the_autograd_gradient_and_gradchecks():
    torch.manual_seed(1)
    model = SPDEFourDVarNet(tiny_cfg()).double()
    random_head(model)
    obs, ocean, dx, dy = tiny_batch(H=4, W=5)
    y, mask, ocean = model._inputs(obs, ocean)
    prec = SPDEPrecisionBatch(model.priors(model.predict_theta(obs, ocean), ocean, dx, dy))
    oc4 = ocean.double().unsqueeze(1)
    cost = SPDECost(prec, y, mask, oc4, torch.tensor(0.3, dtype=torch.float64))
    x = (torch.randn(obs.shape, dtype=torch.float64) * oc4).requires_grad_(True)
    (g_auto,) = torch.autograd.grad(cost.value(x).sum(), x)
    torch.testing.assert_close(cost.grad(x), g_auto * oc4, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z: cost.value(z), (x,))


@pytest.mark.parametrize("precond,update", [("prior", "subspace"), ("none", "subspace"), ("none", "anchor")])
def test_model_output_gradchecks_in_observations_and_parameters(precond, update):
    torch.manual_seed(2)
    model = SPDEFourDVarNet(tiny_cfg(n_time=2, n_steps=2, lstm_hidden=2, theta_hidden=2,
                                     precond=precond, update=update)).double().train()
    if update == "subspace":  # non-zero ConvLSTM output (it starts at zero)
        torch.nn.init.normal_(model.grad_mod.conv_out.weight, std=0.1)
    random_head(model)
    obs, ocean, dx, dy = tiny_batch(B=1, T=2, H=4, W=4, frac=0.3, land=False)
    mask = torch.isfinite(obs)
    vals = obs[mask].clone().requires_grad_(True)

    proj = torch.randn(3, *obs.shape, dtype=torch.float64)  # 3 random directions of the output

    def f_obs(v):
        o = torch.full_like(obs, float("nan")).masked_scatter(mask, v)
        return (proj * model(o, ocean, dx, dy)).sum((1, 2, 3, 4))

    assert torch.autograd.gradcheck(f_obs, (vals,), eps=1e-6, atol=1e-5)
    if precond == "none":  # with "prior" the preconditioner is held fixed w.r.t. Theta (by design)
        kappa = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
        std = torch.tensor([1.3], dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda k, s: (proj * model(obs, ocean, dx, dy, theta={"kappa": k, "std": s})).sum((1, 2, 3, 4)),
            (kappa, std), eps=1e-6, atol=1e-5)


def test_preconditioner_is_the_dense_prior_covariance_and_gradchecks():
    from oceanda.assim.spde_fourdvarnet import _PriorCovariance

    torch.manual_seed(8)
    model = SPDEFourDVarNet(tiny_cfg()).double()
    random_head(model)
    obs, ocean, dx, dy = tiny_batch(H=4, W=5)
    priors = model.priors(model.predict_theta(obs, ocean), ocean, dx, dy)
    g = (torch.randn(obs.shape, dtype=torch.float64) * ocean[:, None]).requires_grad_(True)
    Pg = _PriorCovariance.apply(g, priors)
    for b in range(2):
        ref = torch.linalg.solve(priors[b].precision_dense(), g[b].detach().reshape(-1))
        torch.testing.assert_close(Pg[b].detach().reshape(-1), ref, rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z: _PriorCovariance.apply(z, priors), (g,))


def test_untrained_subspace_solver_is_preconditioned_cg_and_reaches_the_exact_posterior_mean():
    n, T, R = 6, 3, 0.05
    cfg = tiny_cfg(n_time=T, kappa0=0.6, gamma0=20.0, n_steps=40, noise_std=R**0.5, learn_noise=False)
    model = SPDEFourDVarNet(cfg).double().eval()
    obs, ocean, dx, dy = tiny_batch(B=1, T=T, H=n, W=n, frac=0.3)
    dx, dy = 3 * dx, 3 * dy
    th = {"kappa": torch.tensor([0.5], dtype=torch.float64), "std": torch.tensor([1.2], dtype=torch.float64)}
    prior = model.priors(th, ocean, dx, dy)[0]
    mask = (torch.isfinite(obs) & ocean[:, None])[0]
    Hm = torch.diag(mask.reshape(-1).double())
    y = torch.nan_to_num(obs[0]).reshape(-1) * mask.reshape(-1)
    exact = torch.linalg.solve(prior.precision_dense() + Hm / R, y / R).reshape(T, n, n)
    errs = {}
    for k in (5, 40):
        model.step.n_steps = model.solver.n_steps = k
        with torch.no_grad():
            out = model(obs, ocean, dx, dy, theta=th)[0]
        errs[k] = float((out - exact * ocean[0]).abs().max() / exact.abs().max())
    assert errs[40] < 1e-4 and errs[40] < errs[5] / 100, errs


def test_subspace_step_survives_a_converged_or_degenerate_search_space():
    """Once the solver has converged (d = p = 0) or d is parallel to p, the 2 x 2 line-search
    system is singular: the step falls back to the first direction / zero instead of raising
    (``oceanda infer`` hit it on a patch without observations in float32)."""
    from oceanda.assim.spde_fourdvarnet import _solve2_or_first

    A = torch.tensor([[[4.0, 1.0], [1.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]], [[2.0, 2.0], [2.0, 2.0]]],
                     dtype=torch.float64)
    r = torch.tensor([[1.0, 2.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    ab = _solve2_or_first(A, r)
    torch.testing.assert_close(ab[0], torch.linalg.solve(A[0], r[0]))
    torch.testing.assert_close(ab[1], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(ab[2], torch.tensor([0.5, 0.0], dtype=torch.float64))
    # a patch without any observation, float32: the prior mean (0), finite, no error
    cfg = tiny_cfg(n_time=3, n_steps=4)
    model = SPDEFourDVarNet(cfg).eval()
    obs, ocean, dx, dy = tiny_batch(B=1, dtype=torch.float32, land=False)
    with torch.no_grad():
        out = model(torch.full_like(obs, float("nan")), ocean, dx, dy)
    assert torch.isfinite(out).all() and float(out.abs().max()) < 1e-6


# ----------------------------------------------------------------------------- ensembles


def test_matheron_members_with_the_exact_linear_solver_have_the_posterior_covariance():
    rng = np.random.default_rng(0)
    T, H, W = 2, 3, 4
    ocean = np.ones((H, W), bool)
    ocean[0, 0] = False
    prior = SPDEPrior(np.ones((H, W)), np.ones((H, W)), ocean, T=T, kappa=0.8, gamma=1.0, tau=1.5)
    mask = rng.random((T, H, W)) < 0.4
    mask[:, ~ocean] = False
    R = 0.2
    Q = prior.precision_dense().numpy()
    Hm = np.diag(mask.reshape(-1).astype(float))
    A = Q + Hm / R
    P_post = np.linalg.inv(A)

    def exact(Y):  # posterior mean (mu = 0), linear in Y
        Yz = np.nan_to_num(Y).reshape(len(Y), -1) * mask.reshape(-1)
        return np.linalg.solve(A, (Yz / R).T).T.reshape(Y.shape)

    y = np.where(mask, rng.standard_normal((T, H, W)), np.nan)
    N = 20000
    members, xm = spde_conditional_members(exact, prior, y, mask, R, N, rng=1)
    np.testing.assert_allclose(xm, exact(y[None])[0], rtol=1e-12)
    D = (members - members.mean(0)).reshape(N, -1)
    C = D.T @ D / (N - 1)
    d = np.diag(P_post)
    se = np.sqrt((np.outer(d, d) + P_post**2) / N)  # standard error of each covariance entry
    assert np.all(np.abs(C - P_post) <= 5 * se + 1e-12), np.max(np.abs(C - P_post) / se)
    np.testing.assert_allclose(members.mean(0), xm, atol=5 * np.sqrt(d.max() / N))


def test_model_members_use_the_predicted_theta_and_are_land_aware_and_seeded():
    torch.manual_seed(3)
    model = SPDEFourDVarNet(tiny_cfg()).eval()
    random_head(model)
    obs, ocean, dx, dy = tiny_batch(dtype=torch.float32)
    m1, mem1 = model.members(obs, ocean, dx, dy, 5, seeds=[1, 2])
    m2, mem2 = model.members(obs, ocean, dx, dy, 5, seeds=[1, 2])
    torch.testing.assert_close(mem1, mem2)
    assert mem1.shape == (2, 5, *obs.shape[1:]) and torch.isfinite(mem1).all()
    with torch.no_grad():
        torch.testing.assert_close(m1, model(obs, ocean, dx, dy), rtol=1e-5, atol=1e-5)
    assert (mem1[1][:, :, ~ocean[1]] == 0).all()
    assert mem1.std(dim=1)[:, :, ocean[0]].mean() > 0


# ----------------------------------------------------------------------------- truth


def _train_batch(seed=0):
    obs, ocean, dx, dy = tiny_batch(B=2, T=3, H=8, W=8, dtype=torch.float32, seed=seed, land=False)
    tgt = torch.randn(obs.shape, generator=torch.Generator().manual_seed(seed + 7))
    return {"obs": obs, "tgt": tgt, "weight": torch.ones_like(tgt), "ocean": ocean, "dx": dx, "dy": dy}


def test_theta_and_reconstruction_depend_on_observations_never_on_the_truth():
    torch.manual_seed(4)
    model = SPDEFourDVarNet(tiny_cfg()).eval()
    random_head(model)
    cfg = SPDETrainConfig(w_nll=1.0, nll_crop=4)
    b = _train_batch()
    t1 = spde_loss_terms(model, b, cfg)
    b2 = dict(b, tgt=b["tgt"] * 3.0 + 1.0)  # another truth, the same observations
    t2 = spde_loss_terms(model, b2, cfg)
    assert t1["theta_kappa"] == t2["theta_kappa"] and t1["theta_std"] == t2["theta_std"]
    assert t1["nll"] != t2["nll"] and t1["mse"] != t2["mse"]
    with torch.no_grad():
        o1 = model(b["obs"], b["ocean"], b["dx"], b["dy"])
        o3 = model(b["obs"] + 0.5, b["ocean"], b["dx"], b["dy"])
    th3 = model.predict_theta(b["obs"] + 0.5, b["ocean"])
    assert not torch.equal(o1, o3) and not torch.equal(th3["kappa"], model.predict_theta(b["obs"], b["ocean"])["kappa"])
    # the Theta that enters the loss has no autograd path from the truth
    tgt = b["tgt"].clone().requires_grad_(True)
    out, th = model(b["obs"], b["ocean"], b["dx"], b["dy"], return_theta=True)
    for v in th.values():
        assert torch.autograd.grad(v.sum() + 0 * tgt.sum(), tgt, allow_unused=True)[0].abs().max() == 0


def test_crop_nll_is_the_spde_nll_of_the_crop_and_skips_land():
    torch.manual_seed(5)
    model = SPDEFourDVarNet(tiny_cfg()).double()
    random_head(model)
    b = _train_batch()
    obs, ocean = b["obs"].double(), b["ocean"].clone()
    ocean[1, 3, 3] = False  # land inside patch 1's crop
    th = model.predict_theta(obs, ocean)
    nll = crop_nll(model, th, b["tgt"].double(), ocean, b["dx"].double(), b["dy"].double(), 4)
    ys, xs = slice(2, 6), slice(2, 6)
    p = SPDEPrior(b["dx"][0, ys, xs].double(), b["dy"][0, ys, xs].double(), None, T=3,
                  kappa=th["kappa"][0], gamma=2.0,
                  tau=th["std"][0] * torch.sqrt(8 * np.pi * 2.0 * th["kappa"][0] ** 2
                                                / (b["dx"][0, ys, xs].double() * b["dy"][0, ys, xs].double()).mean()))
    torch.testing.assert_close(nll[0], p.nll(b["tgt"][0, :, ys, xs].double()) / 48, rtol=1e-10, atol=0)
    assert nll[1] == 0


# ----------------------------------------------------------------------------- training, checkpoints


class _DS(torch.utils.data.Dataset):
    def __init__(self, n=4):
        self.items = [{k: v[i] for k, v in _train_batch(seed=s).items()} for s in range(n // 2) for i in range(2)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_fit_writes_checkpoints_and_resumes(tmp_path):
    torch.manual_seed(6)
    cfg = tiny_cfg()
    model = SPDEFourDVarNet(cfg)
    tc = SPDETrainConfig(epochs=1, batch_size=2, nll_crop=4, lr=1e-2)
    norm = {"mean": 0.1, "std": 2.0}
    h = fit(TASK, model, cfg, _DS(), _DS(2), norm, tc, tmp_path / "checkpoint.pt", progress=False)
    assert len(h) == 1 and np.isfinite(h[0]["train_total"]) and np.isfinite(h[0]["val_rmse"])
    assert (tmp_path / "best_checkpoint.pt").is_file()
    ck = read_spde_checkpoint(tmp_path / "checkpoint.pt", expect=cfg)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ck["model"].state_dict()[k], v)
    tc2 = SPDETrainConfig(epochs=2, batch_size=2, nll_crop=4, lr=1e-2)
    h2 = fit(TASK, SPDEFourDVarNet(cfg), cfg, _DS(), None, norm, tc2, tmp_path / "checkpoint.pt",
             resume=True, progress=False)
    assert [r["epoch"] for r in h2] == [0, 1]


def test_bad_checkpoints_and_configs_raise_clear_errors(tmp_path):
    cfg = tiny_cfg()
    model = SPDEFourDVarNet(cfg)
    good = save_spde_checkpoint(tmp_path / "good.pt", model, {"mean": 0.0, "std": 1.0})
    with pytest.raises(InputError, match="no such file"):
        read_spde_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(InputError, match="cannot be read"):
        read_spde_checkpoint(bad)
    ck = torch.load(good, weights_only=True)
    torch.save(dict(ck, format="oceanda-4dvarnet"), tmp_path / "other.pt")
    with pytest.raises(InputError, match="not an oceanda SPDE-4DVarNet"):
        read_spde_checkpoint(tmp_path / "other.pt")
    torch.save(dict(ck, norm={"mean": 0.0, "std": 0.0}), tmp_path / "norm.pt")
    with pytest.raises(InputError, match="normalisation"):
        read_spde_checkpoint(tmp_path / "norm.pt")
    torch.save(dict(ck, model_config=dict(ck["model_config"], lstm_hidden=6)), tmp_path / "shape.pt")
    with pytest.raises(InputError, match="weights do not match"):
        read_spde_checkpoint(tmp_path / "shape.pt")
    with pytest.raises(InputError, match="does not fit the config"):
        read_spde_checkpoint(good, expect=tiny_cfg(n_time=5))
    with pytest.raises(ConfigError, match="params"):
        SPDEModelConfig(params=["kappa"]).validate()
    with pytest.raises(ConfigError, match="unknown"):
        SPDETrainConfig.from_dict({"epochs": 1, "bogus": 2})


# ----------------------------------------------------------------------------- method


def _patch_batch(obs, ocean, dx_m):
    B, T, H, W = obs.shape
    return PatchBatch(obs=obs, ocean=ocean, lon=torch.arange(B, dtype=torch.float32)[:, None].expand(B, W),
                      lat=torch.zeros(B, H), time=torch.zeros(B, T), dx_m=dx_m, dy_m=dx_m)


def test_registered_method_round_trip_members_and_batch_independence(tmp_path):
    from oceanda.assim.registry import available, build_method

    assert "spde_4dvarnet" in available()
    torch.manual_seed(7)
    cfg = tiny_cfg(length_unit_m=1000.0)
    model = SPDEFourDVarNet(cfg).eval()
    random_head(model)
    norm = {"mean": 0.3, "std": 0.1}
    p = save_spde_checkpoint(tmp_path / "m.pt", model, norm)
    obs, ocean, dx, _ = tiny_batch(dtype=torch.float32)
    raw = obs * 0.1 + 0.3
    dx_m = dx * 1000.0
    method = build_method("spde_4dvarnet", checkpoint=str(p))
    res = method(_patch_batch(raw, ocean, dx_m))
    with torch.no_grad():
        ref = model((raw - 0.3) / 0.1, ocean, (dx_m / 1000.0).float(), (dx_m / 1000.0).float()) * 0.1 + 0.3
    torch.testing.assert_close(res.mean, ref, rtol=1e-5, atol=1e-6)
    assert res.std is None
    one = method(_patch_batch(raw[1:], ocean[1:], dx_m[1:]))  # patch 1 alone == in the batch
    torch.testing.assert_close(one.mean[0], res.mean[1], rtol=1e-4, atol=5e-5)  # float32 batch rounding
    ens = build_method("spde_4dvarnet", checkpoint=str(p), members=4, return_members=True)
    r2 = ens(_patch_batch(raw, ocean, dx_m))
    assert r2.std.shape == raw.shape and r2.members.shape == (2, 4, *raw.shape[1:])
    torch.testing.assert_close(r2.mean, res.mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r2.std, r2.members.std(dim=1), rtol=1e-4, atol=1e-6)
    with pytest.raises(InputError, match="patch length"):
        method(_patch_batch(raw[:, :2], ocean, dx_m))
    with pytest.raises(ConfigError, match="members"):
        build_method("spde_4dvarnet", checkpoint=str(p), members=1)
    with pytest.raises(ConfigError, match="spde_4dvarnet"):
        build_method("spde_4dvarnet", checkpoint=str(p), bogus=1)


# ----------------------------------------------------------------------------- entry point


def _write_zarrs(root):
    import pandas as pd
    import xarray as xr

    rng = np.random.default_rng(0)
    nt, ny, nx = 16, 10, 12
    t, y, x = np.mgrid[0:nt, 0:ny, 0:nx]
    truth = (0.3 * np.sin(0.4 * x + 0.1 * t) * np.cos(0.3 * y - 0.05 * t) + 0.5).astype(np.float32)
    ocean = np.ones((ny, nx), bool)
    ocean[:2, :3] = False
    truth = np.where(ocean, truth, np.nan).astype(np.float32)
    obs = np.where((rng.random(truth.shape) < 0.2) & ocean, truth, np.nan).astype(np.float32)
    coords = {"time": pd.date_range("2012-10-01", periods=nt), "lat": 30 + 0.05 * np.arange(ny),
              "lon": -60 + 0.05 * np.arange(nx)}
    dims = ("time", "lat", "lon")
    oc = (("lat", "lon"), ocean.astype(np.int8))
    xr.Dataset({"ssh": (dims, truth), "ocean": oc}, coords=coords).to_zarr(root / "truth.zarr")
    xr.Dataset({"ssh_obs": (dims, obs), "ocean": oc}, coords=coords).to_zarr(root / "obs.zarr")


def _tiny_train_cfg(root, model: dict, aug: int, train: dict):
    """The composed `oceanda train model=spde_4dvarnet` config of the tiny zarrs of :func:`_write_zarrs`
    (``model`` / ``train`` entries override the tiny defaults)."""
    from omegaconf import OmegaConf

    base = {"name": "spde_4dvarnet", "n_time": 3, "n_steps": 2, "lstm_hidden": 4, "theta_hidden": 4, "dropout": 0.0}
    return OmegaConf.create({
        "model": {**base, **model}, "patch": {"size": [3, 8, 8], "stride": [1, 4, 4], "crop": [1, 1]},
        "system": {"device": "cpu", "threads": 1},
        "truth_path": str(root / "truth.zarr"), "obs_path": str(root / "obs.zarr"),
        "out_dir": str(root / "run"), "box": None, "dates": None, "val_period": None,
        "val_fraction": 0.25, "gap_days": 2, "stride": None, "aug": aug, "holdout": 0.2,
        "resume": False, "progress": False,
        "train": {"epochs": 1, "batch_size": 2, "weight_decay": 0.0, "grad_clip": 0.5, "w_grad": 0.0,
                  "w_prior": 1.0, "mode": "supervised", "seed": 0, "nll_crop": 4, **train},
    })


def run_spde_training(cfg) -> int:
    """``oceanda train`` on a composed config: the typed config, then the app."""
    from oceanda.cli.schema import load
    from oceanda.cli.train import run

    return run(load("train", cfg))


def test_run_spde_training_reads_the_train_config_and_writes_a_loadable_checkpoint(tmp_path):
    import json

    from omegaconf import OmegaConf

    from oceanda.assim.registry import build_method

    _write_zarrs(tmp_path)
    cfg = _tiny_train_cfg(tmp_path, {}, aug=1, train={"lr": 1e-3, "w_mse": 50.0, "max_batches": 2})
    assert run_spde_training(cfg) == 0
    ck = read_spde_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ck["model_cfg"].n_time == 3 and ck["norm"]["std"] > 0
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(hist) == 1 and np.isfinite(hist[0]["val_rmse"]) and np.isfinite(hist[0]["train_nll"])
    method = build_method("spde_4dvarnet", checkpoint=str(tmp_path / "run" / "best_checkpoint.pt"))
    obs, ocean, dx, _ = tiny_batch(B=1, T=3, H=8, W=8, dtype=torch.float32)
    assert torch.isfinite(method(_patch_batch(obs, ocean, dx * 4500.0)).mean).all()
    # a second stage from these weights with the likelihood terms only: the solver is not run
    # (its weights are unchanged), Theta and R move
    stage2 = OmegaConf.merge(cfg, {"out_dir": str(tmp_path / "run2"), "aug": 0,
                                   "init_checkpoint": str(tmp_path / "run" / "checkpoint.pt"),
                                   "train": {"w_mse": 0.0, "w_nll": 1.0, "w_nll_obs": 1.0, "theta_grad": "nll",
                                             "lr": 1e-2}})
    assert run_spde_training(stage2) == 0
    ck2 = read_spde_checkpoint(tmp_path / "run2" / "checkpoint.pt")
    assert ck2["extra"]["init_checkpoint"] == str(tmp_path / "run" / "checkpoint.pt")
    s1, s2 = ck["state_dict"], ck2["state_dict"]
    for k in s1:
        if k.startswith("grad_mod."):
            assert torch.equal(s1[k], s2[k]), k
    assert not torch.equal(s1["log_noise"], s2["log_noise"])
    assert not torch.equal(s1["theta_net.head.bias"], s2["theta_net.head.bias"])
    cfg.model.lstm_hidden = 6
    with pytest.raises(InputError, match="does not fit"):
        run_spde_training(OmegaConf.merge(stage2, {"model": {"lstm_hidden": 6}, "out_dir": str(tmp_path / "run3")}))
    cfg.resume = True
    with pytest.raises(InputError, match="does not fit"):
        run_spde_training(cfg)


def test_observation_nll_is_minimised_by_the_empirical_noise_variance():
    model = SPDEFourDVarNet(tiny_cfg())
    b = {k: v[:1] for k, v in _train_batch().items()}
    m = torch.isfinite(b["obs"])
    r2 = ((b["obs"] - b["tgt"])[m] ** 2).double().mean()
    with torch.no_grad():
        model.log_noise.fill_(0.5 * float(torch.log(r2)))
    cfg = SPDETrainConfig(w_mse=0.0, w_nll=0.0, w_nll_obs=1.0)
    t = spde_loss_terms(model, b, cfg)
    (g,) = torch.autograd.grad(t["total"], model.log_noise)
    assert abs(float(g)) < 1e-4
    torch.testing.assert_close(t["nll_obs"].double(), 0.5 * (1 + torch.log(2 * np.pi * r2)), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- theta="global"


def test_global_theta_is_one_trained_value_independent_of_the_observations(tmp_path):
    from oceanda.train.spde_fourdvarnet import make_spde_optimizer

    cfg = tiny_cfg(theta="global", params=["kappa", "std", "gamma"])
    model = SPDEFourDVarNet(cfg).double()
    assert model.theta_net is None and model.theta_global.shape == (3,)
    obs, ocean, dx, dy = tiny_batch(B=3)
    th = model.predict_theta(obs, ocean)  # fresh: the reference values
    for k, ref in (("kappa", 0.5), ("std", 1.0), ("gamma", 2.0)):
        torch.testing.assert_close(th[k], torch.full((3,), ref, dtype=torch.float64))
    raw = torch.tensor([0.4, -0.7, 5.0], dtype=torch.float64)
    with torch.no_grad():
        model.theta_global.copy_(raw)
    th1 = model.predict_theta(obs, ocean)
    th2 = model.predict_theta(torch.randn_like(obs), ~ocean | True)  # other observations: same Theta
    bounded = 3 * np.tanh(raw.numpy() / 3)
    for i, (k, ref) in enumerate((("kappa", 0.5), ("std", 1.0), ("gamma", 2.0))):
        np.testing.assert_allclose(th1[k].detach().numpy(), ref * np.exp(bounded[i]), rtol=1e-12)
        assert torch.equal(th1[k], th2[k])
    # the reconstruction depends on theta_global (gradient reaches it) and it trains at lr * lr_theta
    out = model(obs, ocean, dx, dy)
    (g,) = torch.autograd.grad(out.pow(2).sum(), model.theta_global)
    assert torch.isfinite(g).all() and g.abs().max() > 0
    opt = make_spde_optimizer(model, SPDETrainConfig(lr=1e-3, lr_theta=7.0))
    fast = [g for g in opt.param_groups if any(p is model.theta_global for p in g["params"])]
    assert len(fast) == 1 and fast[0]["lr"] == pytest.approx(7e-3)
    # checkpoint round trip
    path = save_spde_checkpoint(tmp_path / "g.pt", model, {"mean": 0.0, "std": 1.0})
    ck = read_spde_checkpoint(path, expect=cfg)
    torch.testing.assert_close(ck["model"].theta_global.double(), raw)


def test_fit_theta_mle_is_the_maximum_likelihood_estimate():
    """fit_theta_mle (theta="global"): theta_global reaches the MLE of (kappa, std) computed
    independently (scipy on SPDEPrior.nll), near the generating parameters; R is the mean
    squared observation-minus-truth misfit."""
    from scipy.optimize import minimize

    from oceanda.train.spde_fourdvarnet import fit_theta_mle

    n, T, B, kappa, gamma = 6, 3, 4, 0.6, 2.0
    dx = torch.full((n, n), 1.0, dtype=torch.float64)

    def prior(k, s):
        tau = s * np.sqrt(8 * np.pi * gamma * k**2)
        return SPDEPrior(dx, dx, None, T=T, kappa=k, gamma=gamma, tau=tau)

    X = torch.as_tensor(prior(kappa, 1.0).sample(B, rng=np.random.default_rng(3)))
    g = torch.Generator().manual_seed(4)
    Y = torch.where(torch.rand(X.shape, generator=g, dtype=torch.float64) < 0.3,
                    X + 0.1 * torch.randn(X.shape, generator=g, dtype=torch.float64), float("nan"))
    items = [{"obs": Y[b], "tgt": X[b], "weight": torch.ones_like(X[b]), "ocean": torch.ones(n, n, dtype=torch.bool),
              "dx": dx, "dy": dx} for b in range(B)]
    model = SPDEFourDVarNet(tiny_cfg(theta="global", n_time=T, kappa0=0.3, gamma0=gamma)).double()
    with pytest.raises(ConfigError, match="theta=global"):
        fit_theta_mle(SPDEFourDVarNet(tiny_cfg()), items, SPDETrainConfig())
    res = fit_theta_mle(model, items, SPDETrainConfig(nll_crop=n))
    m = torch.isfinite(Y)
    torch.testing.assert_close(model.R.detach(), ((Y - X)[m] ** 2).mean())
    assert res["mle_noise_std"] == pytest.approx(float(model.R.sqrt()))

    def nll(z):
        return float(prior(float(np.exp(z[0])), float(np.exp(z[1]))).nll(X).sum())

    ref = minimize(nll, np.log([0.3, 1.0]), method="L-BFGS-B", options={"ftol": 1e-14, "gtol": 1e-7})
    k_mle, s_mle = np.exp(ref.x)
    np.testing.assert_allclose([res["mle_kappa"], res["mle_std"]], [k_mle, s_mle], rtol=2e-3)
    assert abs(k_mle / kappa - 1) < 0.3 and abs(s_mle - 1) < 0.3


def test_crop_nll_shares_one_prior_between_samples_of_equal_theta_and_metric():
    """theta="global" on a uniform grid: one prior (one log-determinant) for the batch; values
    and the gradient w.r.t. theta_global equal the per-sample SPDEPrior NLLs."""
    model = SPDEFourDVarNet(tiny_cfg(theta="global")).double()
    with torch.no_grad():
        model.theta_global.copy_(torch.tensor([0.3, -0.2]))
    B, T, n = 4, 3, 6
    dx = torch.full((B, n, n), 1.5, dtype=torch.float64)
    dx[3] = 1.7  # another metric: a second prior
    ocean = torch.ones(B, n, n, dtype=torch.bool)
    ocean[2, 3, 3] = False  # land in the crop: no term
    X = torch.randn(B, T, n, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    obs = torch.full_like(X, float("nan"))
    nll = crop_nll(model, model.predict_theta(obs, ocean), X, ocean, dx, dx, 4)
    (g,) = torch.autograd.grad(nll.sum(), model.theta_global)
    raw = model.theta_global.detach().clone().requires_grad_(True)
    k, s = 0.5 * torch.exp(3 * torch.tanh(raw[0] / 3)), torch.exp(3 * torch.tanh(raw[1] / 3))
    ref = []
    for b in range(B):
        if b == 2:
            ref.append(torch.zeros((), dtype=torch.float64))
            continue
        d = dx[b, 1:5, 1:5]
        p = SPDEPrior(d, d, None, T=T, kappa=k, gamma=2.0, tau=s * torch.sqrt(8 * np.pi * 2.0 * k**2 / (d * d).mean()))
        ref.append(p.nll(X[b, :, 1:5, 1:5]) / 48)
    ref = torch.stack(ref)
    torch.testing.assert_close(nll.detach(), ref.detach(), rtol=1e-10, atol=0)
    (g_ref,) = torch.autograd.grad(ref.sum(), raw)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("theta", ["global", "patch"])
def test_theta_grad_nll_trains_theta_and_R_by_the_likelihoods_only(theta):
    torch.manual_seed(9)
    model = SPDEFourDVarNet(tiny_cfg(theta=theta, n_steps=2)).double()
    if theta == "patch":
        random_head(model)
    b = {k: (v.double() if v.is_floating_point() else v) for k, v in _train_batch().items()}
    th_params = [model.theta_global] if theta == "global" else list(model.theta_net.parameters())

    def grads(cfg):
        t = spde_loss_terms(model, b, cfg)
        gs = torch.autograd.grad(t["total"], [*th_params, model.log_noise, model.grad_mod.conv_out.weight],
                                 allow_unused=True)
        return t, [torch.zeros(()) if g is None else g for g in gs]

    mse_only = dict(w_mse=1.0, w_nll=0.0, w_nll_obs=0.0)
    t_all, g_all = grads(SPDETrainConfig(**mse_only))
    t_nll, g_nll = grads(SPDETrainConfig(**mse_only, theta_grad="nll"))
    torch.testing.assert_close(t_all["mse"], t_nll["mse"])  # the same forward
    assert all(g.abs().max() > 0 for g in g_all[:-1])          # "all": the MSE reaches Theta and R
    assert all(g.abs().max() == 0 for g in g_nll[:-1])         # "nll": it does not
    assert g_nll[-1].abs().max() > 0                           # ... but still trains the solver
    with pytest.raises(ConfigError, match="theta_grad"):
        SPDETrainConfig.from_dict({"theta_grad": "mse"})
    with pytest.raises(ConfigError, match="nothing to train"):
        SPDETrainConfig.from_dict({"w_mse": 0.0, "w_nll": 0.0})
    # likelihood terms only (w_mse = w_grad = 0): the solver is not run; the terms and their
    # Theta / R gradients are those of the full loss in "nll" mode minus its MSE
    lik = dict(w_nll=1.0, w_nll_obs=1.0, nll_crop=4, theta_grad="nll")
    full, g_full = grads(SPDETrainConfig(w_mse=1.0, **lik))
    model.forward = None  # would fail if called
    only, g_only = grads(SPDETrainConfig(w_mse=0.0, **lik))
    del model.forward
    assert "mse" not in only
    for k in ("nll", "nll_obs"):
        torch.testing.assert_close(only[k], full[k])
    torch.testing.assert_close(only["total"], full["total"] - full["mse"])
    for u, v in zip(g_only[:-1], g_full[:-1]):
        assert u.abs().max() > 0
        torch.testing.assert_close(u, v)


# ----------------------------------------------------------------------------- mean="obs"


def test_obs_mean_prior_is_the_mean_of_the_observations_and_the_solver_reaches_its_posterior_mean():
    """mean="obs": mu = mean of the patch's observations (a Theta entry, so members and the crop
    NLL use it); the untrained solver converges to the dense posterior mean
    mu + (Q + H^T H / R)^{-1} H^T (y - H mu) / R."""
    n, T, R = 6, 3, 0.05
    cfg = tiny_cfg(n_time=T, kappa0=0.6, gamma0=20.0, n_steps=40, noise_std=R**0.5, learn_noise=False,
                   mean="obs")
    model = SPDEFourDVarNet(cfg).double().eval()
    obs, ocean, dx, dy = tiny_batch(B=1, T=T, H=n, W=n, frac=0.3)
    obs = obs + 2.0  # far from the zero mean
    dx, dy = 3 * dx, 3 * dy
    mask = (torch.isfinite(obs) & ocean[:, None])[0]
    mu = float(obs[0][mask].mean())
    th = model.predict_theta(obs, ocean)
    torch.testing.assert_close(th["mean"], torch.tensor([mu], dtype=torch.float64))
    prior = model.priors(th, ocean, dx, dy)[0]
    Hm = torch.diag(mask.reshape(-1).double())
    y = torch.nan_to_num(obs[0]).reshape(-1) * mask.reshape(-1)
    oc = ocean[0].expand(T, n, n).reshape(-1).double()
    exact = mu * oc + torch.linalg.solve(prior.precision_dense() + Hm / R, (y - mu * mask.reshape(-1)) / R)
    with torch.no_grad():
        out = model(obs, ocean, dx, dy)[0]
    torch.testing.assert_close(out.reshape(-1), exact * oc, rtol=0, atol=1e-4 * float(exact.abs().max()))
    # a zero-mean model of the same weights reconstructs something else
    zero = SPDEFourDVarNet(tiny_cfg(**{**cfg.__dict__, "mean": "zero"})).double().eval()
    with torch.no_grad():
        assert (zero(obs, ocean, dx, dy)[0] - out).abs().max() > 20e-4 * float(exact.abs().max())
    # Matheron members (prior draws around mu, the solver with the same Theta and mu) are
    # centred on the reconstruction
    m, mem = model.members(obs, ocean, dx, dy, 64, seeds=[0])
    sd = mem[0].std(0)
    assert ((mem[0].mean(0) - m[0]).abs() <= 5 * sd / 8 + 1e-9).all()
    with pytest.raises(ConfigError, match="model.mean"):
        tiny_cfg(mean="patch").validate()


# ----------------------------------------------------------------------------- spread calibration


def test_scaled_perturbations_are_the_matheron_members_of_the_prior_with_tau_c_and_noise_c():
    """With the exact (linear) posterior mean as the solver, x* + c (x_i - x*) equals, draw by draw,
    the Matheron members of the prior with tau c and noise std sqrt(R) c (same random numbers):
    the posterior mean is invariant under (Q, R) -> (Q / c^2, R c^2)."""
    from oceanda.assim.spde_fourdvarnet import scale_members

    rng = np.random.default_rng(4)
    T, H, W, R, c = 3, 4, 5, 0.1, 0.37
    ocean = np.ones((H, W), bool)
    ocean[0, :2] = False
    dx = 1.0 + 0.3 * rng.random((H, W))
    mask = (rng.random((T, H, W)) < 0.35) & ocean
    y = np.where(mask, rng.standard_normal((T, H, W)), np.nan)

    def ensemble(tau, Rv):
        prior = SPDEPrior(dx, dx, ocean, T=T, kappa=0.7, gamma=1.5, tau=tau)
        A = prior.precision_dense().numpy() + np.diag(mask.reshape(-1) / Rv)

        def exact(Y):  # exact posterior mean (mu = 0), dense solve
            Yz = np.nan_to_num(Y).reshape(len(Y), -1) * mask.reshape(-1)
            return np.linalg.solve(A, (Yz / Rv).T).T.reshape(Y.shape)

        return spde_conditional_members(exact, prior, y, mask, Rv, 6, rng=11)

    m1, x1 = ensemble(1.3, R)
    mc, xc = ensemble(1.3 * c, R * c * c)
    np.testing.assert_allclose(xc, x1, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(scale_members(x1, m1, c, axis=0), mc, rtol=1e-8, atol=1e-11)
    assert np.abs(m1 - x1).max() > 0.1  # a non-trivial check
    assert scale_members(x1, m1, 1.0, axis=0) is m1
    with pytest.raises(ConfigError, match="spread_scale"):
        scale_members(x1, m1, -1.0)


def test_fit_spread_scale_closed_forms_and_the_independent_spread_skill():
    from oceanda.metrics.ensemble import spread_skill_members as spread_skill
    from oceanda.assim.spde_fourdvarnet import scale_members
    from oceanda.train.spread import fit_spread_scale

    rng = np.random.default_rng(0)
    N, shape = 8, (30, 40)
    truth = rng.standard_normal(shape)
    centre = truth + 0.3 * rng.standard_normal(shape)
    mask = rng.random(shape) < 0.8
    # antithetic members (dbar = 0): c = rmse(centre) / sqrt(k V), k = (N + 1) / N
    d = rng.standard_normal((N // 2, *shape))
    mem = centre + 2.0 * np.concatenate([d, -d])
    V = (mem - centre).var(0, ddof=1)[mask].mean()
    A = ((centre - truth) ** 2)[mask].mean()
    out = fit_spread_scale(mem, centre, truth, mask)
    assert out["spread_scale"] == pytest.approx(np.sqrt(A / ((N + 1) / N * V)), rel=1e-12)
    assert out["n_cells"] == mask.sum() and out["n_members"] == N
    # general members: after scaling, the independently coded spread/skill (with its (N + 1) / N
    # correction) is 1 (k = (N + 1) / N) or sqrt((N + 1) / N) (k = 1), "before" the raw ensemble's
    mem = centre + 0.2 + 1.7 * rng.standard_normal((N, *shape))
    for fe, target in ((True, 1.0), (False, np.sqrt((N + 1) / N))):
        out = fit_spread_scale(mem, centre, truth, mask, finite_ensemble=fe)
        scaled = scale_members(centre, mem, out["spread_scale"], axis=0)
        assert spread_skill(scaled, truth, mask) == pytest.approx(target, rel=1e-10)
        assert out["spread_skill_after"] == pytest.approx(target, rel=1e-10)
        assert out["spread_skill_before"] == pytest.approx(spread_skill(mem, truth, mask), rel=1e-10)
    # exchangeable truth and members of spread sigma / c0 around the true centre: c -> c0
    c0, sigma, M = 0.4, 0.5, 200_000
    centre = rng.standard_normal(M)
    truth = centre + sigma * rng.standard_normal(M)
    mem = centre + (sigma / c0) * rng.standard_normal((10, M))
    assert fit_spread_scale(mem, centre, truth)["spread_scale"] == pytest.approx(c0, rel=0.02)
    with pytest.raises(InputError, match="no spread"):
        fit_spread_scale(np.repeat(centre[None] + 1.0, 3, 0), centre, truth)
    with pytest.raises(InputError, match="must be"):
        fit_spread_scale(mem, centre[:-1], truth)
    with pytest.raises(InputError, match="selects no"):
        fit_spread_scale(mem, centre, truth, np.zeros(M, bool))


def test_method_spread_scale_from_the_calibrated_checkpoint_old_checkpoints_and_overrides(tmp_path):
    from oceanda.assim.registry import build_method
    from oceanda.train.spread import calibrate_spde_checkpoint

    torch.manual_seed(2)
    model = SPDEFourDVarNet(tiny_cfg(length_unit_m=1000.0)).eval()
    random_head(model)
    norm = {"mean": 0.3, "std": 0.1}
    old = save_spde_checkpoint(tmp_path / "old.pt", model, norm)
    assert "spread_scale" not in torch.load(old, weights_only=True)  # the format before calibration
    assert read_spde_checkpoint(old)["spread_scale"] == 1.0
    obs, ocean, dx, _ = tiny_batch(dtype=torch.float32)
    batch = _patch_batch(obs * 0.1 + 0.3, ocean, dx * 1000.0)
    r1 = build_method("spde_4dvarnet", checkpoint=str(old), members=5, return_members=True)(batch)
    c = 0.45
    cal = calibrate_spde_checkpoint(old, tmp_path / "cal.pt", c, {"period": ["2013-01-01", "2013-02-01"],
                                                                  "n_cells": 10})
    ck = read_spde_checkpoint(cal)
    assert ck["spread_scale"] == c and ck["calibration"]["n_cells"] == 10
    torch.testing.assert_close(ck["state_dict"]["log_noise"], model.state_dict()["log_noise"])
    r2 = build_method("spde_4dvarnet", checkpoint=str(cal), members=5, return_members=True)(batch)
    torch.testing.assert_close(r2.mean, r1.mean)
    ref = r1.mean[:, None] + c * (r1.members - r1.mean[:, None])  # in metres: scaling commutes with the affine norm
    torch.testing.assert_close(r2.members, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r2.std, c * r1.std, rtol=1e-5, atol=1e-7)
    r3 = build_method("spde_4dvarnet", checkpoint=str(cal), members=5, return_members=True, spread_scale=1.0)(batch)
    torch.testing.assert_close(r3.members, r1.members)
    with pytest.raises(ConfigError, match="spread_scale"):
        build_method("spde_4dvarnet", checkpoint=str(cal), spread_scale=0.0)
    with pytest.raises(ConfigError, match="spread_scale"):
        calibrate_spde_checkpoint(old, tmp_path / "x.pt", float("nan"))
    assert not (tmp_path / "x.pt").exists()
    torch.save(dict(torch.load(cal, weights_only=True), spread_scale=-2.0), tmp_path / "neg.pt")
    with pytest.raises(InputError, match="spread_scale"):
        read_spde_checkpoint(tmp_path / "neg.pt")


def test_obs_std_spread_mode_scales_each_patch_by_its_observed_std_over_the_prior_std(tmp_path):
    """spread_mode="obs_std": patch b's factor is c sigma_y,b / sigma_Theta,b with sigma_y,b^2 =
    var(observations of b) - R (numpy reference), applied about the solver's mean."""
    from oceanda.assim.registry import build_method
    from oceanda.assim.spde_fourdvarnet import spread_factors
    from oceanda.train.spread import calibrate_spde_checkpoint

    torch.manual_seed(5)
    model = SPDEFourDVarNet(tiny_cfg(length_unit_m=1000.0, theta="field")).eval()
    random_head(model)
    norm = {"mean": 0.3, "std": 0.1}
    old = save_spde_checkpoint(tmp_path / "old.pt", model, norm)
    obs, ocean, dx, _ = tiny_batch(dtype=torch.float32, frac=0.5)
    obs[1] = 3.0 * obs[1]  # a more variable patch
    batch = _patch_batch(obs * 0.1 + 0.3, ocean, dx * 1000.0)
    c = 0.6
    cal = calibrate_spde_checkpoint(old, tmp_path / "cal.pt", c, spread_mode="obs_std")
    assert read_spde_checkpoint(cal)["spread_mode"] == "obs_std"
    assert read_spde_checkpoint(old)["spread_mode"] == "global"
    r1 = build_method("spde_4dvarnet", checkpoint=str(old), members=4, return_members=True)(batch)
    r2 = build_method("spde_4dvarnet", checkpoint=str(cal), members=4, return_members=True)(batch)
    R = float(model.R.detach())
    with torch.no_grad():
        sd = model.predict_theta(obs, ocean)["std"].double().numpy()  # (B, H, W): theta="field"
    r_refs = []
    for b in range(2):
        oc = ocean[b].numpy()
        v = obs[b].numpy()[:, oc]
        v = v[np.isfinite(v)].astype(np.float64)
        r_ref = c * np.sqrt(max(v.var(ddof=1) - R, R)) / sd[b][oc].mean()
        ref = r1.mean[b, None] + r_ref * (r1.members[b] - r1.mean[b, None])
        torch.testing.assert_close(r2.members[b], ref, rtol=1e-5, atol=1e-6)
        r_refs.append(r_ref)
    assert r_refs[1] > 2.0 * r_refs[0]  # the more variable patch gets the wider members
    torch.testing.assert_close(r2.mean, r1.mean)
    # global mode is ones; a patch without observations gets 1; bad modes are config errors
    f = spread_factors(torch.full((1, 2, 3, 3), float("nan")), torch.ones(1, 3, 3, dtype=torch.bool),
                       torch.ones(1), 0.1, "obs_std")
    assert f.tolist() == [1.0]
    assert spread_factors(obs, ocean, torch.ones(2), R, "global").tolist() == [1.0, 1.0]
    with pytest.raises(ConfigError, match="spread_mode"):
        build_method("spde_4dvarnet", checkpoint=str(cal), spread_mode="local")
    with pytest.raises(ConfigError, match="spread_mode"):
        calibrate_spde_checkpoint(old, tmp_path / "y.pt", 1.0, spread_mode="local")
    torch.save(dict(torch.load(cal, weights_only=True), spread_mode="bogus"), tmp_path / "bad.pt")
    with pytest.raises(InputError, match="spread_mode"):
        read_spde_checkpoint(tmp_path / "bad.pt")


# ----------------------------------------------------------------------------- mean="oi"


def _smooth_field(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    B, T, H, W = shape
    t, y, x = torch.meshgrid(torch.arange(T, dtype=dtype), torch.arange(H, dtype=dtype), torch.arange(W, dtype=dtype),
                             indexing="ij")
    a = torch.rand(B, 3, generator=g, dtype=dtype)
    return torch.stack([1.5 + a[b, 0] * torch.sin(0.5 * x + 0.2 * t) + a[b, 1] * torch.cos(0.4 * y) + a[b, 2] * 0.1 * t
                        for b in range(B)])


def test_oi_mean_prior_is_the_given_field_and_the_solver_reaches_its_posterior_mean():
    """mean="oi": mu is the given (B, T, H, W) field (the patches' OI analyses); the untrained solver
    converges to the dense posterior mean mu + (Q + H^T H / R)^{-1} H^T (y - H mu) / R, returns mu
    itself where the observations agree with it (a zero correction), and refuses a missing or
    misshapen mean, or a mean given to another model, naming model.mean."""
    n, T, R = 6, 3, 0.05
    cfg = tiny_cfg(n_time=T, kappa0=0.6, gamma0=20.0, n_steps=40, noise_std=R**0.5, learn_noise=False, mean="oi")
    model = SPDEFourDVarNet(cfg).double().eval()
    obs, ocean, dx, dy = tiny_batch(B=2, T=T, H=n, W=n, frac=0.3)
    dx, dy = 3 * dx, 3 * dy
    mu = _smooth_field(obs.shape)
    obs = obs + mu
    th = model.with_mean(model.predict_theta(obs, ocean), mu, tuple(obs.shape))
    assert "mean" not in model.predict_theta(obs, ocean) and th["mean"] is mu
    with torch.no_grad():
        out = model(obs, ocean, dx, dy, mean=mu)
    for b in range(2):
        prior = model.priors({k: v[b:b + 1] for k, v in th.items()}, ocean[b:b + 1], dx[b:b + 1], dy[b:b + 1])[0]
        mask = (torch.isfinite(obs[b]) & ocean[b]).reshape(-1)
        y = torch.nan_to_num(obs[b]).reshape(-1) * mask
        oc = ocean[b].expand(T, n, n).reshape(-1).double()
        m = mu[b].reshape(-1)
        exact = m + torch.linalg.solve(prior.precision_dense() + torch.diag(mask.double()) / R,
                                       (y - m * mask) / R)
        torch.testing.assert_close(out[b].reshape(-1), exact * oc, rtol=0, atol=1e-4 * float(exact.abs().max()))
    # observations equal to the prior mean: no correction, the output is the mean (the OI) on the ocean
    agree = torch.where(torch.isfinite(obs), mu, torch.nan)
    with torch.no_grad():
        same = model(agree, ocean, dx, dy, mean=mu)
    torch.testing.assert_close(same, mu * ocean[:, None], rtol=0, atol=1e-10)
    # members are centred on the reconstruction (prior draws around mu, the solver with the same mu)
    m1, mem = model.members(obs[:1], ocean[:1], dx[:1], dy[:1], 64, seeds=[0], mean=mu[:1])
    torch.testing.assert_close(m1, out[:1])
    assert ((mem[0].mean(0) - m1[0]).abs() <= 5 * mem[0].std(0) / 8 + 1e-9).all()
    with pytest.raises(InputError, match="model.mean=oi"):
        model(obs, ocean, dx, dy)
    with pytest.raises(InputError, match="model.mean=oi.*shape"):
        model(obs, ocean, dx, dy, mean=mu[:, :, :-1])
    zero = SPDEFourDVarNet(tiny_cfg(**{**cfg.__dict__, "mean": "zero"})).double()
    with pytest.raises(InputError, match="model.mean='zero'"):
        zero(obs, ocean, dx, dy, mean=mu)
    with pytest.raises(ConfigError, match="model.mean"):
        tiny_cfg(mean="patch").validate()
    with pytest.raises(ConfigError, match="model.oi_Lx_km"):
        SPDEModelConfig.from_dict({"mean": "oi", "oi_Lx_km": 0.0})


def test_crop_nll_with_a_prior_mean_is_the_nll_of_the_prior_with_that_mean():
    """The crop NLL with a mean field (mean="oi") or a per-patch constant (mean="obs") equals
    SPDEPrior(mean=...).nll of the truth's crop; with theta="global" the patches still share one
    prior (the residual truth - mean under the zero-mean prior), and Theta's gradient is the
    reference's."""
    B, T, n, c = 3, 3, 6, 4
    X = torch.randn(B, T, n, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dx = torch.full((B, n, n), 1.5, dtype=torch.float64)
    ocean = torch.ones(B, n, n, dtype=torch.bool)
    obs = torch.full_like(X, float("nan"))
    obs[:, :, 0, 0] = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)[:, None]
    mu_field = _smooth_field(X.shape, seed=3)
    ys = slice(1, 5)
    for mean in ("oi", "obs"):
        model = SPDEFourDVarNet(tiny_cfg(theta="global", mean=mean)).double()
        with torch.no_grad():
            model.theta_global.copy_(torch.tensor([0.2, -0.1]))
        th = model.with_mean(model.predict_theta(obs, ocean), mu_field if mean == "oi" else None, tuple(X.shape))
        calls = []
        orig = SPDEPrior.nll
        SPDEPrior.nll = lambda self, x: calls.append(1) or orig(self, x)
        try:
            nll = crop_nll(model, th, X + 0.0, ocean, dx, dx, c)
        finally:
            SPDEPrior.nll = orig
        assert len(calls) == 1  # one prior, one log-determinant, for the batch
        (g,) = torch.autograd.grad(nll.sum(), model.theta_global)
        raw = model.theta_global.detach().clone().requires_grad_(True)
        k, s = 0.5 * torch.exp(3 * torch.tanh(raw[0] / 3)), torch.exp(3 * torch.tanh(raw[1] / 3))
        ref = []
        for b in range(B):
            m = mu_field[b, :, ys, ys] if mean == "oi" else float(obs[b, 0, 0, 0])
            d = dx[b, ys, ys]
            p = SPDEPrior(d, d, None, T=T, kappa=k, gamma=2.0, mean=m,
                          tau=s * torch.sqrt(8 * np.pi * 2.0 * k**2 / (d * d).mean()))
            ref.append(p.nll(X[b, :, ys, ys]) / (T * c * c))
        ref = torch.stack(ref)
        torch.testing.assert_close(nll.detach(), ref.detach(), rtol=1e-10, atol=0)
        (g_ref,) = torch.autograd.grad(ref.sum(), raw)
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-12)


def test_fit_theta_mle_with_the_oi_mean_is_the_mle_of_the_residual():
    """theta_init=mle with mean="oi": Theta is the maximum-likelihood estimate of the prior of
    truth - x0 (the items' OI analyses; scipy on SPDEPrior(mean=x0).nll), and batch_theta carries x0
    as the prior mean."""
    from scipy.optimize import minimize

    from oceanda.train.spde_fourdvarnet import batch_theta, fit_theta_mle

    n, T, B, gamma = 6, 3, 4, 2.0
    dx = torch.full((n, n), 1.0, dtype=torch.float64)

    def prior(k, s, mean=0.0):
        return SPDEPrior(dx, dx, None, T=T, kappa=k, gamma=gamma, tau=s * np.sqrt(8 * np.pi * gamma * k**2), mean=mean)

    M = _smooth_field((B, T, n, n), seed=5)
    X = torch.as_tensor(prior(0.6, 0.5).sample(B, rng=np.random.default_rng(3))) + M
    g = torch.Generator().manual_seed(4)
    Y = torch.where(torch.rand(X.shape, generator=g, dtype=torch.float64) < 0.3,
                    X + 0.1 * torch.randn(X.shape, generator=g, dtype=torch.float64), float("nan"))
    items = [{"obs": Y[b], "tgt": X[b], "weight": torch.ones_like(X[b]), "ocean": torch.ones(n, n, dtype=torch.bool),
              "dx": dx, "dy": dx, "x0": M[b]} for b in range(B)]
    model = SPDEFourDVarNet(tiny_cfg(theta="global", n_time=T, kappa0=0.3, gamma0=gamma, mean="oi")).double()
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    assert batch_theta(model, batch)["mean"] is batch["x0"]
    res = fit_theta_mle(model, items, SPDETrainConfig(nll_crop=n))

    def nll(z):
        k, s = float(np.exp(z[0])), float(np.exp(z[1]))
        return float(sum(prior(k, s, M[b]).nll(X[b]) for b in range(B)))

    ref = minimize(nll, np.log([0.3, 1.0]), method="L-BFGS-B", options={"ftol": 1e-14, "gtol": 1e-7})
    np.testing.assert_allclose([res["mle_kappa"], res["mle_std"]], np.exp(ref.x), rtol=2e-3)
    assert abs(res["mle_std"] / 0.5 - 1) < 0.3  # the residual's std, not the field's (~1)
    with pytest.raises(InputError, match="model.mean=oi"):  # items without their OI analysis
        fit_theta_mle(model, [{k: v for k, v in it.items() if k != "x0"} for it in items], SPDETrainConfig(nll_crop=n))


def _lonlat_batch(obs, ocean, step_deg=0.05):
    B, T, H, W = obs.shape
    lon = (-60.0 + step_deg * torch.arange(W, dtype=torch.float64)).expand(B, W)
    lat = (35.0 + step_deg * torch.arange(H, dtype=torch.float64)).expand(B, H)
    time = torch.arange(T, dtype=torch.float64).expand(B, T) + 10.0
    dx_m = torch.full((B, H, W), 4500.0, dtype=obs.dtype)
    return PatchBatch(obs=obs, ocean=ocean, lon=lon, lat=lat, time=time, dx_m=dx_m, dy_m=dx_m * 1.2)


def test_method_with_the_oi_mean_corrects_the_oi_analysis_of_the_same_patch(tmp_path):
    """method=spde_4dvarnet with a mean="oi" checkpoint: the model run with the OI analysis of each
    patch (oi_patch, exact solver) as prior mean; with a negligible prior std the correction
    vanishes and the output is method=oi's analysis (the registered OI, same settings)."""
    from oceanda.assim.oi import oi_patch
    from oceanda.assim.registry import build_method

    torch.manual_seed(3)
    obs, ocean, _, _ = tiny_batch(B=2, T=3, H=8, W=8, dtype=torch.float64, frac=0.4)
    phys = 0.3 + 0.1 * (obs + _smooth_field(obs.shape, seed=1))
    batch = _lonlat_batch(phys, ocean)
    norm = {"mean": 0.3, "std": 0.1}
    oi_set = dict(oi_Lx_km=30.0, oi_Ly_km=40.0, oi_Lt_days=5.0, oi_noise_std=0.02)
    ref_oi = torch.stack([torch.as_tensor(oi_patch(phys[b].numpy(), batch.lon[b].numpy(), batch.lat[b].numpy(),
                                                   batch.time[b].numpy(), Lx_km=30.0, Ly_km=40.0, Lt_days=5.0,
                                                   R=0.02**2, solver="cholesky")) for b in range(2)])
    model = SPDEFourDVarNet(tiny_cfg(length_unit_m=1000.0, mean="oi", n_steps=8, **oi_set)).double().eval()
    p = save_spde_checkpoint(tmp_path / "m.pt", model, norm)
    res = build_method("spde_4dvarnet", checkpoint=str(p), oi_solver="cholesky")(batch)
    mu = (ref_oi - 0.3) / 0.1
    with torch.no_grad():
        ref = model((phys - 0.3) / 0.1, ocean, batch.dx_m / 1000.0, batch.dy_m / 1000.0, mean=mu) * 0.1 + 0.3
    torch.testing.assert_close(res.mean, ref, rtol=1e-5, atol=1e-6)
    oc = ocean[:, None].expand_as(ref)
    assert (res.mean - ref_oi)[oc].abs().max() > 1e-3  # a real correction of the OI
    ens = build_method("spde_4dvarnet", checkpoint=str(p), oi_solver="cholesky", members=3)(batch)
    torch.testing.assert_close(ens.mean, res.mean, rtol=1e-5, atol=1e-6)
    assert ens.std.shape == phys.shape
    # a negligible prior std: no correction, method=oi's analysis
    tight = SPDEFourDVarNet(tiny_cfg(length_unit_m=1000.0, mean="oi", n_steps=8, std0=1e-5, **oi_set)).double().eval()
    p2 = save_spde_checkpoint(tmp_path / "tight.pt", tight, norm)
    out = build_method("spde_4dvarnet", checkpoint=str(p2))(batch).mean
    oi = build_method("oi", Lx_km=30.0, Ly_km=40.0, Lt_days=5.0, noise_std=0.02)(batch).mean
    torch.testing.assert_close(out[oc], oi[oc], rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="oi_solver"):
        build_method("spde_4dvarnet", checkpoint=str(p), oi_solver="lu")


def test_oceanda_train_with_the_oi_mean_fits_the_residual_prior_and_infers_from_the_oi(tmp_path):
    """`oceanda train model=spde_4dvarnet model.mean=oi`: the ML fit and the validated start run on
    items carrying their OI analyses, the checkpoint keeps the OI settings, and method=spde_4dvarnet
    infers with the OI of the patch (oi_first_guess with those settings) as prior mean."""
    import json

    from oceanda.assim.registry import build_method

    _write_zarrs(tmp_path)
    model = {"theta": "global", "mean": "oi", "oi_Lx_km": 20.0, "oi_Ly_km": 20.0, "oi_Lt_days": 3.0,
             "oi_noise_std": 0.02}
    cfg = _tiny_train_cfg(tmp_path, model, aug=0, train={
        "lr": 1e-4, "w_mse": 1.0, "max_batches": 1, "w_nll": 0.0, "theta_init": "mle", "theta_grad": "nll",
        "mle_items": 4})
    assert run_spde_training(cfg) == 0
    run = tmp_path / "run"
    ck = read_spde_checkpoint(run / "best_checkpoint.pt")
    assert ck["model_cfg"].mean == "oi" and ck["model_cfg"].oi_Lx_km == 20.0
    assert np.isfinite(ck["extra"]["val_start"]["val_rmse"])
    hist = json.loads((run / "history.json").read_text())
    assert np.isfinite(hist[0]["val_rmse"])
    obs, ocean, _, _ = tiny_batch(B=1, T=3, H=8, W=8, dtype=torch.float64, frac=0.4)
    batch = _lonlat_batch(0.5 + 0.1 * obs, ocean)
    res = build_method("spde_4dvarnet", checkpoint=str(run / "best_checkpoint.pt"))(batch)
    from oceanda.assim.fourdvarnet import oi_first_guess

    m, s = ck["norm"]["mean"], ck["norm"]["std"]
    mu = (oi_first_guess(batch.obs, batch.lon, batch.lat, batch.time, ck["model_cfg"]).float() - m) / s
    with torch.no_grad():
        ref = ck["model"].eval()(((batch.obs - m) / s).float(), ocean, (batch.dx_m / 1000).float(),
                                 (batch.dy_m / 1000).float(), mean=mu) * s + m
    torch.testing.assert_close(res.mean.float(), ref, rtol=1e-5, atol=1e-6)
