"""4DVarNet model: cost gradient vs autograd / finite differences, land and observation
masking, the unrolled solver (shapes, dtypes, determinism, per-sample independence), and
agreement with an op-for-op re-implementation of the public starter."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from oceanda.assim import convlstm
from oceanda.assim.convlstm import ConvLSTMGradModulator, LSTMState
from oceanda.assim.fourdvarnet import (
    BilinAEPrior,
    FourDVarNet,
    UNetPrior,
    VariationalCost,
)
from oceanda.assim.unroll import UnrolledSolver, unroll

T, H, W = 3, 8, 8


def _data(B=2, dtype=torch.float64, seed=0, land=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, W, generator=g, dtype=dtype)
    y = torch.randn(B, T, H, W, generator=g, dtype=dtype)
    mask = torch.rand(B, T, H, W, generator=g) < 0.3
    ocean = torch.ones(B, H, W, dtype=torch.bool)
    if land:
        ocean[:, :2, :3] = False
        ocean[-1, 5:, 6:] = False
    return x, y, mask, ocean


def _priors(dtype):
    torch.manual_seed(3)
    return [BilinAEPrior(T, hidden=4).to(dtype), BilinAEPrior(T, hidden=4, quadratic=False).to(dtype),
            UNetPrior(T, hidden=4, depth=2).to(dtype)]


@pytest.mark.parametrize("k", [0, 1, 2])
def test_cost_gradient_matches_autograd_and_finite_differences(k):
    x, y, mask, ocean = _data()
    prior = _priors(torch.float64)[k]
    cost = VariationalCost(prior, lam=0.7, w_obs=1.3)
    m = mask & ocean.unsqueeze(1)
    oc4 = ocean.to(x.dtype).unsqueeze(1)
    # finite differences on J itself
    assert torch.autograd.gradcheck(lambda z: cost(z, y, mask, ocean), (x.clone().requires_grad_(),),
                                    eps=1e-6, atol=1e-6)
    xr = x.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(cost(xr, y, mask, ocean), xr)
    g = cost.grad(x, torch.where(m, y, 0.0), m, oc4)
    torch.testing.assert_close(g, g_ref * oc4, rtol=1e-10, atol=1e-12)


def test_cost_gradient_is_twice_differentiable_wrt_weights():
    """create_graph: d/dtheta of <v, grad_x J> matches finite differences (training path)."""
    x, y, mask, ocean = _data(B=1)
    prior = _priors(torch.float64)[0]
    cost = VariationalCost(prior, lam=1.0)
    m = mask & ocean.unsqueeze(1)
    oc4 = ocean.to(x.dtype).unsqueeze(1)
    v = torch.randn_like(x)
    w = prior.bilin.weight

    def f(weight):
        old = prior.bilin.weight
        del prior.bilin.weight
        prior.bilin.weight = weight
        try:
            return (cost.grad(x, torch.where(m, y, 0.0), m, oc4, create_graph=True) * v).sum()
        finally:
            prior.bilin.weight = old

    assert torch.autograd.gradcheck(f, (w.detach().clone().requires_grad_(),), eps=1e-6, atol=1e-6)


def test_land_cells_do_not_influence_cost_and_unobserved_cells_not_in_obs_term():
    x, y, mask, ocean = _data()
    cost = VariationalCost(_priors(torch.float64)[2], lam=1.0)
    land = ~ocean
    x2, y2 = x.clone(), y.clone()
    # change the observations on land and off the mask, and the state's obs term elsewhere
    y2[land.unsqueeze(1).expand_as(y2)] = 123.0
    y2[~mask] = -7.0
    j1 = cost(x * ocean.unsqueeze(1), y, mask, ocean)
    j2 = cost(x * ocean.unsqueeze(1), y2, mask, ocean)
    torch.testing.assert_close(j1, j2)
    # obs term alone: lambda = 0 -> exactly the masked mean of squares
    c0 = VariationalCost(_priors(torch.float64)[0], lam=0.0)
    m = mask & ocean.unsqueeze(1)
    ref = sum(((x[b] - y[b])[m[b]] ** 2).sum() / m[b].sum() for b in range(x.shape[0]))
    torch.testing.assert_close(c0(x, y, mask, ocean), ref)
    # the gradient vanishes on land
    g = cost.grad(x, torch.where(m, y, 0.0), m, ocean.to(x.dtype).unsqueeze(1))
    assert (g.permute(1, 0, 2, 3)[:, land] == 0).all()


def test_prior_term_ignores_land_values_of_phi_residual():
    """Land cells of the residual x - Phi(x) are excluded (only ocean cells are summed)."""
    x, y, mask, ocean = _data()
    prior = _priors(torch.float64)[0]
    cost = VariationalCost(prior, lam=1.0, w_obs=0.0)
    r = (x - prior(x)) * ocean.unsqueeze(1)
    ref = sum((r[b] ** 2).sum() / (T * ocean[b].sum()) for b in range(x.shape[0]))
    torch.testing.assert_close(cost(x, y, mask, ocean), ref)


def test_hand_vjp_matches_autograd_float64():
    torch.manual_seed(0)
    for prior in _priors(torch.float64)[:2]:
        x = torch.randn(2, T, H, W, dtype=torch.float64, requires_grad=True)
        r = torch.randn_like(x)
        phi, v = prior.forward_vjp(x.detach(), r)
        (v_ref,) = torch.autograd.grad(prior(x), x, grad_outputs=r)
        torch.testing.assert_close(phi, prior(x).detach())
        torch.testing.assert_close(v, v_ref)


def _model(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return FourDVarNet(T, prior_hidden=4, lstm_hidden=5, n_steps=3, **kw).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_shapes_dtypes_land_and_determinism(dtype):
    x, y, mask, ocean = _data(dtype=dtype)
    obs = torch.where(mask, y, torch.full_like(y, float("nan")))
    model = _model(dtype).eval()
    with torch.inference_mode():
        out = model(obs, ocean)
        out2 = model(obs, ocean)
    assert out.shape == obs.shape and out.dtype == dtype and out.device == obs.device
    assert torch.isfinite(out).all()
    assert (out.permute(1, 0, 2, 3)[:, ~ocean] == 0).all()
    torch.testing.assert_close(out, out2, rtol=0, atol=0)
    # same seed -> same weights -> same output
    with torch.inference_mode():
        out3 = _model(dtype).eval()(obs, ocean)
    torch.testing.assert_close(out, out3, rtol=0, atol=0)
    # the solver moved the state away from its initialisation
    assert (out - torch.nan_to_num(obs) * ocean.unsqueeze(1)).abs().max() > 1e-4


def test_batch_members_are_independent():
    """A patch's output does not depend on the other patches of its batch."""
    x, y, mask, ocean = _data(B=3, dtype=torch.float64)
    obs = torch.where(mask, y, torch.full_like(y, float("nan")))
    model = _model(torch.float64).eval()
    with torch.inference_mode():
        full = model(obs, ocean)
        one = model(obs[1:2], ocean[1:2])
    torch.testing.assert_close(full[1:2], one, rtol=1e-12, atol=1e-12)


def test_unet_model_runs_in_inference_mode_and_training_graph_reaches_all_weights():
    x, y, mask, ocean = _data(dtype=torch.float32)
    obs = torch.where(mask, y, torch.full_like(y, float("nan")))
    torch.manual_seed(1)
    model = FourDVarNet(T, prior=UNetPrior(T, hidden=4, depth=1), lstm_hidden=5, n_steps=2)
    model.eval()
    with torch.inference_mode():
        out = model(obs, ocean)
    assert torch.isfinite(out).all()
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    loss = ((model(obs, ocean) - x) ** 2).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.prior.head.weight.grad.abs().sum() > 0


def test_inference_equals_training_forward_without_dropout():
    """inference_mode (hand-written gradients, no autograd) == the create_graph path."""
    x, y, mask, ocean = _data(dtype=torch.float64)
    obs = torch.where(mask, y, torch.full_like(y, float("nan")))
    model = _model(torch.float64, dropout=0.0)
    model.eval()
    with torch.inference_mode():
        a = model(obs, ocean)
    model.train()
    b = model(obs, ocean)
    assert b.requires_grad
    torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)


def test_unroll_combinator():
    calls = []

    def step(x, s, k, c, create_graph=False):
        calls.append(k)
        return x * c + k, s + 1

    x, xs = unroll(step, torch.tensor(1.0), 0, 3, 2.0, return_all=True)
    assert calls == [0, 1, 2]
    # x1 = 2, x2 = 5, x3 = 12
    assert [float(v) for v in xs] == [1.0, 2.0, 5.0, 12.0] and float(x) == 12.0
    with pytest.raises(ValueError):
        unroll(step, torch.tensor(1.0), 0, -1, 2.0)


def test_unrolled_solver_steps_and_detach():
    model = _model(torch.float64, dropout=0.0)
    x, y, mask, ocean = _data(dtype=torch.float64)
    m = mask & ocean.unsqueeze(1)
    oc4 = ocean.to(x.dtype).unsqueeze(1)
    y0 = torch.where(m, y, 0.0)
    solver = UnrolledSolver(model.step, 3)
    out, xs = solver(y0 * oc4, y0, m, oc4, return_all=True)
    assert len(xs) == 4 and not out.requires_grad
    # manual loop with the step reproduces it
    z, s = y0 * oc4, LSTMState()
    for k in range(3):
        z, s = model.step(z, s, k, y0, m, oc4)
    torch.testing.assert_close(out, z.detach())


def test_convlstm_gate_split_equals_single_conv_on_concatenation():
    """The modulator's split/sigmoid-tanh rewrite is the anchor's ConvLSTM cell."""
    torch.manual_seed(0)
    mod = ConvLSTMGradModulator(T, hidden=5, dropout=0.0).double()
    g = torch.randn(2, T, H, W, dtype=torch.float64)
    st = LSTMState()
    out1, st = mod(g, st)
    out2, st = mod(0.5 * g, st)
    # reference: one conv on cat(g / norm, h), chunk(4), sigmoid/tanh
    wt = torch.cat([mod.gates_x.weight, mod.gates_h.weight], 1)
    norm = g.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    h = torch.zeros(2, 5, H, W, dtype=torch.float64)
    c = torch.zeros_like(h)
    for gg in (g, 0.5 * g):
        gates = torch.nn.functional.conv2d(torch.cat([gg / norm, h], 1), wt, mod.gates_x.bias, padding=1)
        i, f, o, cc = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(cc)
        h = torch.sigmoid(o) * torch.tanh(c)
        ref = mod.conv_out(h)
    torch.testing.assert_close(out2, ref)


def _load_bench():
    """The 4dvarnet-starter re-implementation of ``tests/reference/``."""
    path = Path(__file__).resolve().parents[1] / "reference" / "fourdvarnet_starter.py"
    spec = importlib.util.spec_from_file_location("fourdvarnet_starter", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fourdvarnet_starter"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_same_outputs_as_the_starter_reimplementation():
    """Same weights -> same reconstruction and same training loss as the starter's model."""
    bench = _load_bench()
    ref, ours = bench.build_pair(n_time=5, prior_hidden=4, lstm_hidden=6, n_steps=3)
    obs, tgt = bench.synthetic_patch(n_time=5, size=16, frac_obs=0.2)
    ref.eval(), ours.eval()
    out_ref = ref(obs).detach()
    with torch.inference_mode():
        out = ours(obs)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- low precision


def _obs32(B=2, seed=0):
    x, y, mask, ocean = _data(B=B, dtype=torch.float32, seed=seed)
    return torch.where(mask, y, torch.full_like(y, float("nan"))), ocean, x


def test_lstm_cell_fusable_form_equals_eager_form_and_is_differentiable():
    """The fused-kernel form of the cell (plain tanh, arithmetic in the state dtype) is the
    eager form (sigmoid identity on pre-scaled rows) and the anchor's cell, with gradients."""
    from oceanda.assim.convlstm import _lstm_cell, _lstm_cell_fusable

    g = torch.Generator().manual_seed(5)
    n = 3
    z = torch.randn(2, 4 * n, 5, 4, generator=g, dtype=torch.float64)
    c0 = torch.randn(2, n, 5, 4, generator=g, dtype=torch.float64)
    scaled = z.clone()
    scaled[:, 3 * n:] *= 2.0  # the rows the modulator doubles
    for cell in (None, c0):
        h_e, c_e = _lstm_cell(scaled, cell, n, torch.float64)
        h_f, c_f = _lstm_cell_fusable(scaled, cell, n, torch.float64)
        i, f, o, cc = z.chunk(4, 1)
        c_ref = torch.sigmoid(i) * torch.tanh(cc) + (0 if cell is None else torch.sigmoid(f) * cell)
        torch.testing.assert_close(c_e, c_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c_f, c_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h_f, torch.sigmoid(o) * torch.tanh(c_ref), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h_e, h_f, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: _lstm_cell_fusable(a, b, n, torch.float64),
                                    (scaled.clone().requires_grad_(), c0.clone().requires_grad_()))


def test_bf16_precision_changes_only_the_arithmetic():
    """bf16: same state dict, output close to float32 (bf16 rounding, not garbage) but not
    identical (the bf16 kernels really run); float64 inputs ignore it (stay exact)."""
    obs, ocean, _ = _obs32()
    m32 = _model().eval()
    m16 = _model(precision="bf16").eval()
    assert m16.state_dict().keys() == m32.state_dict().keys()
    for a, b in zip(m16.state_dict().values(), m32.state_dict().values()):
        assert torch.equal(a, b) and a.dtype == torch.float32
    with torch.inference_mode():
        a, b = m32(obs, ocean), m16(obs, ocean)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert (b.permute(1, 0, 2, 3)[:, ~ocean] == 0).all()
    rel = float((a - b).norm() / a.norm())
    assert 0 < rel < 2e-2, rel
    # float64 input: the setting is ignored, bit-identical to the float32 setting
    m64a, m64b = _model(torch.float64).eval(), _model(torch.float64, precision="bf16").eval()
    with torch.inference_mode():
        torch.testing.assert_close(m64a(obs.double(), ocean), m64b(obs.double(), ocean), rtol=0, atol=0)
    # switching back restores the exact float32 arithmetic
    m16.set_precision("float32")
    with torch.inference_mode():
        torch.testing.assert_close(m16(obs, ocean), a, rtol=0, atol=0)


@pytest.mark.parametrize("prior", ["bilin_ae", "unet"])
def test_bf16_training_gradients_close_to_float32(prior):
    """The bf16 training graph (casts are differentiable) gives the float32 parameter
    gradients to bf16 accuracy, in float32, for every parameter."""
    obs, ocean, x = _obs32(seed=2)
    grads = {}
    for prec in ("float32", "bf16"):
        torch.manual_seed(0)
        p = UNetPrior(T, hidden=4, depth=1) if prior == "unet" else None
        model = FourDVarNet(T, prior=p, prior_hidden=4, lstm_hidden=5, n_steps=3, dropout=0.0,
                            precision=prec).train()
        loss = ((model(obs, ocean) - x) ** 2).mean() + model.prior_cost(x, ocean)
        loss.backward()
        grads[prec] = {k: v.grad for k, v in model.named_parameters()}
    for k, g32 in grads["float32"].items():  # per tensor: bf16 rounding (8-bit mantissa)
        g16 = grads["bf16"][k]
        assert g16.dtype == torch.float32, k
        assert 0 < float((g16 - g32).norm()) <= 0.1 * float(g32.norm()), k
    flat = {p: torch.cat([g.flatten() for g in grads[p].values()]) for p in grads}
    assert float((flat["bf16"] - flat["float32"]).norm()) <= 0.03 * float(flat["float32"].norm())


def test_precision_option_config_and_checkpoints(tmp_path):
    """precision / fuse_cell are validated, runtime-only (not compared with a checkpoint's
    architecture), a checkpoint without them (written before they existed) still loads, and
    the method can override them."""
    from dataclasses import asdict

    from oceanda.assim.fourdvarnet import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, FourDVarNetMethod,
                                           ModelConfig, build_model, read_checkpoint)
    from oceanda.assim.base import PatchBatch
    from oceanda.errors import ConfigError

    with pytest.raises(ConfigError, match="precision"):
        ModelConfig(precision="fp8")
    with pytest.raises(ConfigError, match="precision"):
        _model(precision="half")
    cfg = ModelConfig(n_time=T, prior_hidden=4, lstm_hidden=5, n_steps=2)
    torch.manual_seed(0)
    model = build_model(cfg)
    old = {k: v for k, v in asdict(cfg).items() if k not in ("precision", "fuse_cell")}
    path = tmp_path / "old.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model_config": old,
                "state_dict": model.state_dict(), "norm": {"mean": 0.5, "std": 2.0}}, path)
    ck = read_checkpoint(path, expect=ModelConfig(**{**asdict(cfg), "precision": "bf16"}))
    assert ck["model_cfg"].precision == "float32" and ck["model"].precision == "float32"
    obs, ocean, _ = _obs32()
    B = obs.shape[0]
    batch = PatchBatch(obs=obs, ocean=ocean, lon=torch.zeros(B, W), lat=torch.zeros(B, H),
                       time=torch.zeros(B, T), dx_m=torch.ones(B, H, W), dy_m=torch.ones(B, H, W))
    r32 = FourDVarNetMethod(str(path))(batch).mean
    meth = FourDVarNetMethod(str(path), precision="bf16")
    assert meth.model.precision == "bf16"
    r16 = meth(batch).mean
    assert 0 < float((r16 - r32).norm() / r32.norm()) < 2e-2


@pytest.mark.slow
def test_fused_cell_compiled_matches_eager_forward_and_training():
    """The torch.compile'd cell (one kernel) == the eager cell: inference output and training
    gradients, float32 (compiles on first use: slow)."""
    obs, ocean, x = _obs32(seed=3)
    res = {}
    for fuse in (False, True):
        model = _model(dropout=0.0, fuse_cell=fuse)
        model.eval()
        with torch.inference_mode():
            out = model(obs, ocean)
        model.train()
        loss = ((model(obs, ocean) - x) ** 2).mean()
        loss.backward()
        res[fuse] = (out, {k: v.grad for k, v in model.named_parameters()})
    torch.testing.assert_close(res[True][0], res[False][0], rtol=1e-5, atol=1e-5)
    for k, g in res[False][1].items():
        torch.testing.assert_close(res[True][1][k], g, rtol=1e-4, atol=1e-5)


def test_method_auto_precision_and_fused_cell_fallback(tmp_path, monkeypatch):
    """method precision='auto' picks bf16 exactly where the device runs it natively; a bad
    value is a ConfigError; a fused cell whose compilation fails warns and runs the eager
    cell (same result as fuse_cell=False)."""
    from dataclasses import asdict

    import oceanda.assim.fourdvarnet as fdv
    from oceanda.assim.base import PatchBatch
    from oceanda.errors import ConfigError

    cfg = fdv.ModelConfig(n_time=T, prior_hidden=4, lstm_hidden=5, n_steps=2)
    torch.manual_seed(0)
    model = fdv.build_model(cfg)
    path = tmp_path / "m.pt"
    torch.save({"format": fdv.CHECKPOINT_FORMAT, "version": fdv.CHECKPOINT_VERSION,
                "model_config": asdict(cfg), "state_dict": model.state_dict(),
                "norm": {"mean": 0.0, "std": 1.0}}, path)
    obs, ocean, _ = _obs32()
    B = obs.shape[0]
    batch = PatchBatch(obs=obs, ocean=ocean, lon=torch.zeros(B, W), lat=torch.zeros(B, H),
                       time=torch.zeros(B, T), dx_m=torch.ones(B, H, W), dy_m=torch.ones(B, H, W))
    with pytest.raises(ConfigError, match="precision"):
        fdv.FourDVarNetMethod(str(path), precision="int8")
    meth = fdv.FourDVarNetMethod(str(path), precision="auto")
    meth(batch)
    assert meth.model.precision == ("bf16" if fdv.native_bf16("cpu") else "float32")

    def broken():
        def f(*a):
            raise RuntimeError("no C++ compiler")
        return f

    monkeypatch.setattr(convlstm, "_fused_lstm_cell", broken)
    monkeypatch.setattr(convlstm, "_FUSED_CELL_WORKS", False)
    fused = fdv.FourDVarNetMethod(str(path), fuse_cell=True)
    with pytest.warns(RuntimeWarning, match="fuse_cell"):
        a = fused(batch).mean
    assert fused.model.grad_mod.fused_cell is False
    b = fdv.FourDVarNetMethod(str(path))(batch).mean
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------- init = "oi"


def _geo_batch(B=2, seed=0):
    """A PatchBatch in metres on a 1/20 deg grid (OI needs real coordinates)."""
    from oceanda.assim.base import PatchBatch

    obs, ocean, _ = _obs32(B=B, seed=seed)
    obs = 0.1 * obs + 0.3
    lon = (-60.0 + 0.05 * torch.arange(W, dtype=torch.float64)).expand(B, W)
    lat = (35.0 + 0.05 * torch.arange(H, dtype=torch.float64)).expand(B, H)
    time = torch.arange(T, dtype=torch.float64).expand(B, T)
    return PatchBatch(obs=obs, ocean=ocean, lon=lon, lat=lat, time=time,
                      dx_m=torch.ones(B, H, W), dy_m=torch.ones(B, H, W))


def _save(model, cfg, path, norm=(0.2, 0.15), drop=()):
    from dataclasses import asdict

    from oceanda.assim.fourdvarnet import CHECKPOINT_FORMAT, CHECKPOINT_VERSION

    mc = {k: v for k, v in asdict(cfg).items() if k not in drop}
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model_config": mc,
                "state_dict": model.state_dict(), "norm": {"mean": norm[0], "std": norm[1]}}, path)
    return path


def test_oi_init_with_zero_update_returns_the_oi_analysis(tmp_path):
    """init="oi": the solver starts from the exact OI analysis of the same patch. With the
    gradient modulator's output zeroed and lr_grad = 0 the solver makes no move, so the
    method returns method=oi's analysis (same scales) on the ocean to float32 rounding; with
    the anchor's lr_grad the raw gradient of J moves it by O(1/n_obs) only."""
    from oceanda.assim.fourdvarnet import FourDVarNetMethod, ModelConfig, build_model
    from oceanda.assim.oi import OptimalInterpolation

    batch = _geo_batch()
    oi = OptimalInterpolation(Lx_km=30.0, Ly_km=40.0, Lt_days=2.0, noise_std=0.02)(batch).mean
    ocean = batch.ocean[:, None].expand_as(oi)
    for lr_grad, tol in ((0.0, 1e-6), (0.2, 2e-2)):
        cfg = ModelConfig(n_time=T, prior_hidden=4, lstm_hidden=5, n_steps=3, lr_grad=lr_grad, init="oi",
                          oi_Lx_km=30.0, oi_Ly_km=40.0, oi_Lt_days=2.0, oi_noise_std=0.02)
        torch.manual_seed(0)
        model = build_model(cfg).zero_update_()
        out = FourDVarNetMethod(str(_save(model, cfg, tmp_path / f"oi{lr_grad}.pt")))(batch).mean
        err = float((out - oi)[ocean].abs().max() / oi[ocean].abs().max())
        assert err < tol, (lr_grad, err)
        if lr_grad:
            assert err > 0  # it does move (not a copy of x0)
    # a trained (non-zero) update changes the OI, and the first guess matters
    torch.manual_seed(0)
    cfg_obs = ModelConfig(n_time=T, prior_hidden=4, lstm_hidden=5, n_steps=3)
    model = build_model(cfg_obs)
    a = FourDVarNetMethod(str(_save(model, cfg_obs, tmp_path / "obs.pt")))(batch).mean
    cfg_oi = ModelConfig(**{**cfg_obs.__dict__, "init": "oi"})
    b = FourDVarNetMethod(str(_save(model, cfg_oi, tmp_path / "oi.pt")))(batch).mean
    assert float((a - b).abs().max()) > 1e-3


def test_old_checkpoint_without_init_loads_and_starts_from_the_observations(tmp_path):
    """A checkpoint written before init / oi_* existed loads as init="obs" and the method
    equals the model run on the normalised observations without a first guess."""
    from oceanda.assim.fourdvarnet import FourDVarNetMethod, ModelConfig, build_model, read_checkpoint
    from oceanda.errors import ConfigError

    cfg = ModelConfig(n_time=T, prior_hidden=4, lstm_hidden=5, n_steps=3)
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    path = _save(model, cfg, tmp_path / "old.pt",
                 drop=("init", "oi_Lx_km", "oi_Ly_km", "oi_Lt_days", "oi_noise_std", "precision", "fuse_cell"))
    ck = read_checkpoint(path, expect=cfg)
    assert ck["model_cfg"].init == "obs"
    batch = _geo_batch(seed=2)
    got = FourDVarNetMethod(str(path))(batch).mean
    with torch.inference_mode():
        ref = model((batch.obs - 0.2) / 0.15, batch.ocean) * 0.15 + 0.2
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="model.init='analysis'"):
        ModelConfig(init="analysis")
    with pytest.raises(ConfigError, match="oi_Lt_days"):
        ModelConfig(init="oi", oi_Lt_days=0.0)
