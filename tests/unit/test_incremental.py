"""Neural band prior and incremental neural DA: MAP operator == dense reference solve,
implicit-diff gradients == dense autograd, Algorithm 2 updates, training beats z0."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oceanda.linalg import band_to_dense
from oceanda.assim.incremental import incremental_assimilation, temperature_levels
from oceanda.errors import ConfigError, InputError
from oceanda.priors.empirical import EmpiricalGaussian
from oceanda.priors.neural_band import NeuralBandPrior, sinusoidal_embedding
from oceanda.train.incremental import TrainSettings, level_loss, train_incremental

DT = torch.float64


def _dense_lower(raw, k):
    """Dense Cholesky factor L of spd_band_from_raw's contract (softplus diagonal)."""
    n = raw.shape[-2]
    L = torch.zeros(*raw.shape[:-2], n, n, dtype=raw.dtype)
    for j in range(k + 1):
        i = torch.arange(j, n)
        vals = raw[..., j:, j]
        L[..., i, i - j] = torch.nn.functional.softplus(vals) + 1e-2 if j == 0 else vals
    return L


def _dense_Q(L, ridge=1e-6):
    """The prior precision ``L L^T + ridge * diag(L L^T)`` (NeuralBandPrior's default ridge)."""
    LLt = L @ L.transpose(-1, -2)
    return LLt + ridge * torch.diag_embed(torch.diagonal(LLt, dim1=-2, dim2=-1))


def _dense_map(mu, Q, y, mask, R):
    """(Q + H^T R^-1 H)^-1 (Q mu + H^T R^-1 y) by a dense solve."""
    w = mask.to(mu.dtype) / R
    A = Q + torch.diag_embed(w)
    rhs = (Q @ mu.unsqueeze(-1)).squeeze(-1) + w * torch.where(mask, y, torch.zeros_like(y))
    return torch.linalg.solve(A, rhs.unsqueeze(-1)).squeeze(-1)


def _problem(T=6, phi=3, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    prior = NeuralBandPrior(T, phi, width=16).double()
    with torch.no_grad():  # non-trivial mean and precision networks
        for p in prior.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=DT))
    z = torch.randn(B, T * phi, generator=g, dtype=DT)
    y = torch.randn(B, T * phi, generator=g, dtype=DT)
    mask = torch.rand(B, T * phi, generator=g) < 0.3
    return prior, z, y, mask


def test_map_operator_equals_dense_reference_solve():
    prior, z, y, mask = _problem()
    s = torch.tensor([1.0, 0.8, 0.5, 0.2], dtype=DT)
    out = prior.assimilate(z, y, mask, 0.01, s)
    inp = prior._input(z, s)
    mu = z + prior.mean_net(inp)
    raw = prior.prec_net(inp).reshape(z.shape[0], prior.d, prior.k + 1)
    L = _dense_lower(raw, prior.k)
    ref = _dense_map(mu, _dense_Q(L), y, mask, 0.01)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    # the precision really is banded with bandwidth 2*phi and equals L L^T + ridge diag(L L^T)
    _, Qb = prior(z, s)
    assert Qb.shape == (4, prior.d, 2 * 3 + 1)
    torch.testing.assert_close(band_to_dense(Qb), _dense_Q(L), rtol=1e-10, atol=1e-10)


def test_map_gradients_implicit_diff_match_dense_autograd():
    """Parameter gradients through the banded solve (implicit differentiation) equal those
    through a dense torch.linalg.solve of the same system."""
    prior, z, y, mask = _problem(seed=1)
    target = torch.randn(z.shape, generator=torch.Generator().manual_seed(9), dtype=DT)

    def loss_kernel():
        return (prior.assimilate(z, y, mask, 0.05, 0.5) - target).pow(2).sum()

    def loss_dense():
        inp = prior._input(z, 0.5)
        mu = z + prior.mean_net(inp)
        L = _dense_lower(prior.prec_net(inp).reshape(z.shape[0], prior.d, prior.k + 1), prior.k)
        return (_dense_map(mu, _dense_Q(L), y, mask, 0.05) - target).pow(2).sum()

    g1 = torch.autograd.grad(loss_kernel(), list(prior.parameters()))
    g2 = torch.autograd.grad(loss_dense(), list(prior.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_map_gradcheck_wrt_input_and_observations():
    prior, z, y, mask = _problem(T=4, phi=2, B=2, seed=2)
    z = z.requires_grad_(True)
    y = y.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: prior.assimilate(a, b, mask, 0.1, 0.3), (z, y),
                                    eps=1e-6, atol=1e-6)


def test_temperature_levels():
    assert temperature_levels(0) == [1.0]
    lv = temperature_levels(5)
    assert len(lv) == 6 and lv[0] == 1.0
    assert lv == pytest.approx([1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6], abs=1e-15)
    with pytest.raises(ConfigError):
        temperature_levels(-1)


class _Oracle(NeuralBandPrior):
    """A 'perfect' operator returning the truth; records the z it is called with."""

    def __init__(self, x, T, phi):
        super().__init__(T, phi)
        self.x, self.seen = x, []

    def assimilate(self, z, y, mask, R, s):
        self.seen.append((z.clone(), float(s)))
        return self.x


def test_cold_update_follows_interpolation_path_with_perfect_operator():
    """With x_k = x, the cold-diffusion update visits exactly z_k = s_k z0 + (1 - s_k) x (3.4)."""
    T, phi = 4, 3
    x = torch.randn(2, T * phi, dtype=DT)
    z0 = torch.randn(2, T * phi, dtype=DT)
    lv = temperature_levels(5)
    oracle = _Oracle(x, T, phi)
    out = incremental_assimilation(oracle, z0, x, torch.zeros_like(x, dtype=torch.bool), 1.0, lv, update="cold")
    for (z, s), s_ref in zip(oracle.seen, lv):
        assert s == s_ref
        torch.testing.assert_close(z, s * z0 + (1 - s) * x, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, x)
    # the update as printed leaves that path after the first step
    oracle2 = _Oracle(x, T, phi)
    incremental_assimilation(oracle2, z0, x, torch.zeros_like(x, dtype=torch.bool), 1.0, lv, update="printed")
    z2, s2 = oracle2.seen[2]
    assert float((z2 - (s2 * z0 + (1 - s2) * x)).abs().max()) > 1e-3
    with pytest.raises(ConfigError):
        incremental_assimilation(oracle, z0, x, x > 0, 1.0, lv, update="nope")


def test_unconditional_ignores_observations():
    prior, z, y, mask = _problem(seed=3)
    lv = temperature_levels(3)
    a = incremental_assimilation(prior, z, y, mask, 0.01, lv, conditional=False)
    b = incremental_assimilation(prior, z, y + 10.0, ~mask, 0.01, lv, conditional=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = incremental_assimilation(prior, z, y + 10.0, mask, 0.01, lv, conditional=True)
    assert float((c - incremental_assimilation(prior, z, y, mask, 0.01, lv)).abs().max()) > 1e-3


def test_level_loss_is_objective_3_5():
    prior, z, y, mask = _problem(seed=4)
    x = torch.randn(z.shape, dtype=DT)
    lv = [1.0, 0.5, 0.25]
    ref = torch.stack([(prior.assimilate(s * z + (1 - s) * x, y, mask, 0.1, s) - x).pow(2).mean() for s in lv]).mean()
    torch.testing.assert_close(level_loss(prior, x, z, y, mask, 0.1, lv), ref, rtol=1e-10, atol=0)


def test_embedding_and_shape_errors():
    e = sinusoidal_embedding(torch.tensor([0.0, 0.5, 1.0]), 16)
    assert e.shape == (3, 16)
    assert float((e[0] - e[2]).abs().max()) > 0.1  # levels distinguishable
    prior = NeuralBandPrior(4, 3)
    with pytest.raises(InputError, match="z must be"):
        prior.mean(torch.zeros(2, 11), 0.5)
    with pytest.raises(InputError, match="bandwidth"):
        NeuralBandPrior(2, 3, bandwidth=6)
    with pytest.raises(ConfigError, match="epochs"):
        TrainSettings(epochs=0).check()


def test_tiny_trained_model_beats_first_guess_on_held_out_processes():
    """Fast version of the validation claim: a few epochs on a small L63 set already beat
    the empirical-Gaussian first guess on held-out trajectories and observation processes."""
    from oceanda.validation.data import make_lorenz63

    torch.manual_seed(0)
    data = make_lorenz63(48, 16, spinup_steps=300, seed=1)
    one = data.train.process == 0
    emp = EmpiricalGaussian.fit(data.train.x[one].reshape(int(one.sum()), -1))
    xtr, ytr, mtr = data.train.flat()
    xte, yte, mte = data.test.flat()
    z0tr, z0te = emp.map(ytr, mtr, data.R_norm), emp.map(yte, mte, data.R_norm)
    lv = temperature_levels(2)
    prior = NeuralBandPrior(data.T, 3)  # seeded by torch.manual_seed(0) above
    f = lambda a: a.float()  # noqa: E731
    hist = train_incremental(prior, f(xtr), f(z0tr), f(ytr), mtr, data.R_norm, lv,
                             TrainSettings(epochs=6, batch_size=16, lr=5e-3))
    assert hist.loss[-1] < hist.loss[0]
    xh = incremental_assimilation(prior, f(z0te), f(yte), mte, data.R_norm, lv).double()
    err_nn = float((xh - xte).pow(2).mean().sqrt())
    err_z0 = float((z0te - xte).pow(2).mean().sqrt())
    assert set(map(tuple, data.processes_test)).isdisjoint(map(tuple, data.processes_train))
    assert err_nn < 0.8 * err_z0, (err_nn, err_z0)  # measured: 0.46 vs 0.76


def test_plain_mean_is_the_network_output_and_residual_adds_z():
    torch.manual_seed(0)
    z = torch.randn(3, 12, dtype=DT)
    plain = NeuralBandPrior(4, 3, width=8, residual=False).double()
    res = NeuralBandPrior(4, 3, width=8, residual=True).double()
    res.load_state_dict(plain.state_dict())  # same weights, two parametrisations
    inp = torch.cat((z, sinusoidal_embedding(torch.full((3,), 0.5, dtype=DT), 16)), -1)
    torch.testing.assert_close(plain.mean(z, 0.5), plain.mean_net(inp), rtol=0, atol=0)
    torch.testing.assert_close(res.mean(z, 0.5), z + plain.mean_net(inp), rtol=0, atol=0)
    torch.testing.assert_close(plain(z, 0.5)[0], plain.mean(z, 0.5), rtol=0, atol=0)
    # a fresh residual prior starts at mu = z (zero read-out), a plain one does not
    torch.testing.assert_close(NeuralBandPrior(4, 3, width=8).double().mean(z, 1.0), z, rtol=0, atol=0)
    assert float((NeuralBandPrior(4, 3, width=8, residual=False).double().mean(z, 1.0) - z).abs().max()) > 0.1


@pytest.mark.parametrize("maker", ["lorenz63", "pendulum"])
def test_process_families_heldout_and_all(maker):
    """processes="heldout": the test phases are never trained on; "all": training and test
    both pair their trajectories with every phase (new noise on the test), the split kept as
    the indices of the phases a diagnostic model leaves out."""
    from oceanda.validation import data as vdata

    make = vdata.make_lorenz63 if maker == "lorenz63" else vdata.make_pendulum
    kw = dict(spinup_steps=50) if maker == "lorenz63" else {}
    held = make(6, 4, seed=3, **kw)
    every = 8 if maker == "lorenz63" else 10
    T, phi = held.T, held.phi
    phases = {tuple(range(p, T, every)) for p in range(every)}
    assert set(map(tuple, held.processes_test)).isdisjoint(map(tuple, held.processes_train))
    assert set(map(tuple, held.processes_test)) | set(map(tuple, held.processes_train)) == phases
    assert len(held.test) == 4 * 3 and held.processes_heldout == [] and held.test_seen is not None

    full = make(6, 4, seed=3, processes="all", **kw)
    assert full.processes_train == full.processes_test and set(map(tuple, full.processes_train)) == phases
    assert len(full.train) == 6 * every and len(full.test) == 4 * every and full.test_seen is None
    # the diagnostic split is the held-out family's: same phases left out
    assert [full.processes_train[i] for i in full.processes_heldout] == held.processes_test
    # same trajectories in both families; each test window observes exactly its process's times
    torch.testing.assert_close(full.test.x[:4], held.test.x[:4], rtol=0, atol=0)
    for i in range(len(full.test)):
        times = full.processes_test[int(full.test.process[i])]
        expect = torch.zeros(T, phi, dtype=torch.bool)
        expect[times, 0] = True
        assert torch.equal(full.test.mask[i], expect)
    obs = full.test.mask
    assert float((full.test.y[obs] - full.test.x[obs]).std()) > 0  # noisy observations
    with pytest.raises(ConfigError, match="processes"):
        make(6, 4, processes="some", **kw)


def test_early_stopping_keeps_the_epoch_of_lowest_validation_rmse():
    """With validation pairs the prior ends at its best validation epoch: its validation RMSE,
    recomputed from scratch as the root of the mean squared MAP error, is the minimum of the
    record, reached at ``best_epoch``; a high learning rate makes later epochs worse."""
    from oceanda.train.incremental import validation_rmse
    from oceanda.validation.data import make_lorenz63

    torch.manual_seed(0)
    data = make_lorenz63(24, 2, spinup_steps=200, seed=2)
    x, y, m = data.train.flat()
    emp = EmpiricalGaussian.fit(x[data.train.process == 0])
    z0 = emp.map(y, m, data.R_norm)
    f = lambda a: a.float()  # noqa: E731
    val = data.train.traj >= 20
    fit = ~val
    prior = NeuralBandPrior(data.T, 3, width=16)
    lv = temperature_levels(0)
    rec = train_incremental(prior, f(x[fit]), f(z0[fit]), f(y[fit]), m[fit], data.R_norm, lv,
                            TrainSettings(epochs=8, batch_size=32, lr=2e-2, lr_final=2e-2),
                            val=(f(x[val]), f(z0[val]), f(y[val]), m[val]))
    assert len(rec.val_rmse) == len(rec.loss) == 8
    assert rec.best_epoch == int(np.argmin(rec.val_rmse))
    assert rec.val_rmse[-1] > min(rec.val_rmse)  # the last epoch is worse: restoring is exercised (0.66 vs 0.45)
    est = incremental_assimilation(prior, f(z0[val]), f(y[val]), m[val], data.R_norm, lv).double()
    again = float((est - x[val]).pow(2).mean().sqrt())
    assert again == pytest.approx(min(rec.val_rmse), rel=1e-5)
    assert validation_rmse(prior, (f(x[val]), f(z0[val]), f(y[val]), m[val]), data.R_norm, lv, chunk=7) == \
        pytest.approx(min(rec.val_rmse), rel=1e-5)
    with pytest.raises(ConfigError):
        TrainSettings(val_fraction=1.0).check()


def _skip_problem():
    from oceanda.validation.data import make_lorenz63

    torch.manual_seed(0)
    data = make_lorenz63(8, 2, spinup_steps=100, seed=4)
    x, y, m = data.train.flat()
    z0 = EmpiricalGaussian.fit(x[data.train.process == 0]).map(y, m, data.R_norm)
    return data, x.float(), z0.float(), y.float(), m


def test_a_non_finite_step_is_skipped_counted_and_leaves_the_weights_unchanged():
    """A minibatch whose loss is not finite or whose banded solve fails is skipped: the weights and Adam's state after training equal those of a run
    on the other minibatches alone; the steps are counted, and too many is an error."""
    from oceanda.errors import NumericalError

    data, x, z0, y, m = _skip_problem()
    lv = temperature_levels(0)
    bad = torch.full_like(x, 1e30)  # huge targets (float32): the MAP is fine, the squared error is inf

    def run(xx, zz, yy, mm, settings):
        torch.manual_seed(1)
        prior = NeuralBandPrior(data.T, 3, width=8)
        before = {k: v.clone() for k, v in prior.state_dict().items()}
        return prior, before, train_incremental(prior, xx, zz, yy, mm, data.R_norm, lv, settings)

    # one step whose loss is NaN: skipped, weights unchanged by it
    one = TrainSettings(epochs=1, batch_size=x.shape[0], lr=1e-2, max_skip_fraction=1.0)
    prior, before, rec = run(bad, z0, y, m, one)
    assert [(e, b) for e, b, _ in rec.skipped] == [(0, 0)] and "loss inf" in rec.skipped[0][2]
    for k, v in prior.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    # the same with a solve that fails (NumericalError inside the MAP)
    orig = NeuralBandPrior.assimilate

    def failing(self, *a, **k):
        raise NumericalError("band_solve: the band matrix at batch index (0,) is not symmetric positive definite")

    NeuralBandPrior.assimilate = failing
    try:
        prior, before, rec = run(x, z0, y, m, one)
    finally:
        NeuralBandPrior.assimilate = orig
    assert len(rec.skipped) == 1 and "positive definite" in rec.skipped[0][2]
    for k, v in prior.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    # too many skipped steps: an error naming the setting
    with pytest.raises(NumericalError, match="max_skip_fraction"):
        run(bad, z0, y, m, TrainSettings(epochs=1, batch_size=4, lr=1e-2, max_skip_fraction=0.2))
    with pytest.raises(ConfigError, match="max_skip_fraction"):
        TrainSettings(max_skip_fraction=1.5).check()

