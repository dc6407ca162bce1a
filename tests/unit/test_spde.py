"""SPDE prior: stencil operator, trajectory precision, log-det, sampling, posterior solve,
gradients; each against an independent dense reference on small grids (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from oceanda.errors import ConfigError, InputError
from oceanda.linalg.sparse import (SPDFactor, SquarePlusIdentityFactor, batched_pcg,
                                   block_cg, stencil_to_csr)
from oceanda.linalg.stencil import Stencil, diffusion_advection, power
from oceanda.priors.spde import SPDEPrior, tau_for_std

NY, NX, T = 6, 7, 4


def _grid(ny=NY, nx=NX, seed=0):
    g = torch.Generator().manual_seed(seed)
    dx = 1.0 + 0.3 * torch.rand(ny, nx, generator=g, dtype=torch.float64)
    dy = 1.0 + 0.3 * torch.rand(ny, nx, generator=g, dtype=torch.float64)
    ocean = torch.ones(ny, nx, dtype=torch.bool)
    ocean[2, 3] = False
    ocean[0, 0] = False
    return dx, dy, ocean


def _reference_A(dx, dy, ocean, kappa, gamma, beta, vx, vy, mx, my):
    """Cell-by-cell dense assembly of the documented finite-volume formula (loops)."""
    dx, dy, oc = dx.numpy(), dy.numpy(), ocean.numpy()
    ny, nx = dx.shape
    n = ny * nx
    idx = lambda i, j: i * nx + j  # noqa: E731
    inside = lambda i, j: 0 <= i < ny and 0 <= j < nx  # noqa: E731
    is_open = lambda i, j, i2, j2: inside(i2, j2) and oc[i, j] and oc[i2, j2]  # noqa: E731
    H = lambda i, j: (gamma + beta * vx * vx, gamma + beta * vy * vy, beta * vx * vy)  # noqa

    def grad_face_rows(i, j, i2, j2, d):  # row vector of (u_2 - u_1)/d on an open face
        r = np.zeros(n)
        if is_open(i, j, i2, j2):
            r[idx(i2, j2)] += 1 / d
            r[idx(i, j)] -= 1 / d
        return r

    def gy_c(i, j):
        r = np.zeros(n)
        if is_open(i, j, i + 1, j):
            r += 0.5 * grad_face_rows(i, j, i + 1, j, 0.5 * (dy[i, j] + dy[i + 1, j]))
        if is_open(i - 1, j, i, j) and inside(i - 1, j):
            r += 0.5 * grad_face_rows(i - 1, j, i, j, 0.5 * (dy[i, j] + dy[i - 1, j]))
        return r

    def gx_c(i, j):
        r = np.zeros(n)
        if is_open(i, j, i, j + 1):
            r += 0.5 * grad_face_rows(i, j, i, j + 1, 0.5 * (dx[i, j] + dx[i, j + 1]))
        if inside(i, j - 1) and is_open(i, j - 1, i, j):
            r += 0.5 * grad_face_rows(i, j - 1, i, j, 0.5 * (dx[i, j] + dx[i, j - 1]))
        return r

    def flux_e(i, j):  # outward flux through the east face of (i, j)
        if not is_open(i, j, i, j + 1):
            return np.zeros(n)
        d = 0.5 * (dx[i, j] + dx[i, j + 1])
        length = 0.5 * (dy[i, j] + dy[i, j + 1])
        hxx, _, hxy = H(i, j)
        return length * (hxx * grad_face_rows(i, j, i, j + 1, d)
                         + hxy * 0.5 * (gy_c(i, j) + gy_c(i, j + 1)))

    def flux_n(i, j):
        if not is_open(i, j, i + 1, j):
            return np.zeros(n)
        d = 0.5 * (dy[i, j] + dy[i + 1, j])
        length = 0.5 * (dx[i, j] + dx[i + 1, j])
        _, hyy, hxy = H(i, j)
        return length * (hyy * grad_face_rows(i, j, i + 1, j, d)
                         + hxy * 0.5 * (gx_c(i, j) + gx_c(i + 1, j)))

    A = np.zeros((n, n))
    for i in range(ny):
        for j in range(nx):
            p = idx(i, j)
            row = np.zeros(n)
            row[p] += kappa**2
            div = flux_e(i, j) + flux_n(i, j)
            if inside(i, j - 1):
                div -= flux_e(i, j - 1)
            if inside(i - 1, j):
                div -= flux_n(i - 1, j)
            row -= div / (dx[i, j] * dy[i, j])
            if oc[i, j]:
                if mx > 0 and is_open(i, j - 1, i, j) and inside(i, j - 1):
                    row += mx * grad_face_rows(i, j - 1, i, j, 0.5 * (dx[i, j] + dx[i, j - 1]))
                if mx < 0 and is_open(i, j, i, j + 1):
                    row += mx * grad_face_rows(i, j, i, j + 1, 0.5 * (dx[i, j] + dx[i, j + 1]))
                if my > 0 and inside(i - 1, j) and is_open(i - 1, j, i, j):
                    row += my * grad_face_rows(i - 1, j, i, j, 0.5 * (dy[i, j] + dy[i - 1, j]))
                if my < 0 and is_open(i, j, i + 1, j):
                    row += my * grad_face_rows(i, j, i + 1, j, 0.5 * (dy[i, j] + dy[i + 1, j]))
            A[p] = row
    return A


PARAMS = dict(kappa=0.6, gamma=1.2, beta=0.5, vx=0.6, vy=0.8, mx=0.3, my=-0.2)


def test_operator_matches_cell_by_cell_assembly():
    dx, dy, oc = _grid()
    A = diffusion_advection(dx, dy, oc, **PARAMS)
    ref = _reference_A(dx, dy, oc, **PARAMS)
    np.testing.assert_allclose(A.to_dense().numpy(), ref, rtol=0, atol=1e-12)
    # scipy assembly and matrix-free apply agree with the dense matrix
    np.testing.assert_allclose(stencil_to_csr(A.offsets, A.coef.numpy()).toarray(), ref,
                               rtol=0, atol=1e-12)
    x = torch.randn(3, NY, NX, dtype=torch.float64)
    np.testing.assert_allclose(A.apply(x).reshape(3, -1).numpy(),
                               x.reshape(3, -1).numpy() @ ref.T, rtol=0, atol=1e-12)


def test_operator_conservation_and_constants():
    dx, dy, oc = _grid()
    A = diffusion_advection(dx, dy, oc, **PARAMS).to_dense()
    # constants: diffusion and advection of a constant vanish
    np.testing.assert_allclose(A @ torch.ones(NY * NX, dtype=torch.float64),
                               torch.full((NY * NX,), 0.36, dtype=torch.float64), atol=1e-12)
    # conservation: sum_P a_P (div H grad u)_P = 0 with no-flux boundaries
    p = dict(PARAMS, mx=0.0, my=0.0)
    Ad = diffusion_advection(dx, dy, oc, **p).to_dense() - 0.36 * torch.eye(NY * NX,
                                                                           dtype=torch.float64)
    a = (dx * dy).reshape(-1)
    assert float((a @ Ad).abs().max()) < 1e-12
    # isotropic, no advection: a * A is symmetric, spectrum >= kappa^2
    Ai = diffusion_advection(dx, dy, oc, kappa=0.6, gamma=1.2).to_dense()
    S = a[:, None] * Ai
    assert float((S - S.T).abs().max()) < 1e-12
    assert float(torch.linalg.eigvals(Ai).real.min()) > 0.36 - 1e-9


def test_stencil_algebra_matches_dense():
    g = torch.Generator().manual_seed(3)
    offs = ((-1, 0), (0, 0), (0, 1), (1, 1))
    s1 = Stencil(offs, torch.randn(4, 5, 4, generator=g, dtype=torch.float64)).pruned()
    s2 = Stencil(((0, -1), (0, 0), (1, 0)),
                 torch.randn(4, 5, 3, generator=g, dtype=torch.float64)).pruned()
    d1, d2 = s1.to_dense(), s2.to_dense()
    torch.testing.assert_close((s1 @ s2).to_dense(), d1 @ d2, rtol=0, atol=1e-12)
    torch.testing.assert_close(s1.T.to_dense(), d1.T, rtol=0, atol=0)
    torch.testing.assert_close((s1 + s2).to_dense(), d1 + d2, rtol=0, atol=0)
    torch.testing.assert_close(power(s1, 2).to_dense(), d1 @ d1, rtol=0, atol=1e-12)


def _prior(alpha=2, init="stationary", advect=True, **kw):
    dx, dy, oc = _grid()
    p = dict(PARAMS) if advect else dict(PARAMS, mx=0.0, my=0.0)
    p.update(kw)
    return SPDEPrior(dx, dy, oc, T=T, dt=0.5, alpha=alpha, tau=0.8, init=init, mean=0.3, **p)


def _dense_reference_Q(P: SPDEPrior) -> np.ndarray:
    """``L^T Sigma^{-1} L`` from dense blocks (F_k = I + dt A^alpha from the dense A)."""
    dx, dy, oc = P.dx, P.dy, P.ocean
    n = P.n
    kw = {k: float(v) for k, v in P.params.items() if k != "tau"}
    A = _reference_A(dx, dy, oc, **kw)
    F = np.eye(n) + P.dt * np.linalg.matrix_power(A, P.alpha)
    tau = float(P.params["tau"])
    a = (dx * dy).numpy().reshape(-1)
    s = tau**2 * P.dt * a[oc.numpy().reshape(-1)].mean() / a
    Si = np.diag(1 / s)
    Q0 = (F.T @ Si @ F - Si) if P.init == "stationary" else np.eye(n) / P.init_std**2
    G0 = np.linalg.cholesky(Q0).T
    L = np.zeros((P.T * n, P.T * n))
    L[:n, :n] = G0
    Sig = np.ones(P.T * n)
    for k in range(1, P.T):
        L[k * n:(k + 1) * n, (k - 1) * n:k * n] = -np.eye(n)
        L[k * n:(k + 1) * n, k * n:(k + 1) * n] = F
        Sig[k * n:(k + 1) * n] = s
    return L.T @ (L / Sig[:, None])


@pytest.mark.parametrize("alpha", [1, 2])
@pytest.mark.parametrize("init", ["stationary", "white"])
def test_precision_logdet_logprob_against_dense(alpha, init):
    P = _prior(alpha, init)
    Qref = _dense_reference_Q(P)
    Q = P.precision_dense().numpy()
    np.testing.assert_allclose(Q, Qref, rtol=1e-10, atol=1e-9 * np.abs(Qref).max())
    np.testing.assert_allclose(P.precision.csr().toarray(), Qref, rtol=1e-10,
                               atol=1e-9 * np.abs(Qref).max())
    x = torch.randn(2, T, NY, NX, dtype=torch.float64)
    np.testing.assert_allclose(P.precision_matvec(x).reshape(2, -1).numpy(),
                               x.reshape(2, -1).numpy() @ Qref, rtol=1e-10,
                               atol=1e-9 * np.abs(Qref).max())
    _, ld = np.linalg.slogdet(Qref)
    assert abs(P.logdet() - ld) < 1e-8 * abs(ld)
    assert abs(float(P.logdet_torch()) - ld) < 1e-8 * abs(ld)
    cov = np.linalg.inv(Qref)
    ref = multivariate_normal(mean=np.full(Q.shape[0], 0.3), cov=0.5 * (cov + cov.T)).logpdf(
        x.reshape(2, -1).numpy())
    np.testing.assert_allclose(P.log_prob(x), ref, rtol=1e-9)
    np.testing.assert_allclose(-P.nll(x).detach().numpy(), ref, rtol=1e-9)


def test_stationary_initial_state_is_stationary():
    # isotropic, no advection, uniform tau (F S-self-adjoint): every frame has the same
    # marginal covariance
    P = _prior(2, "stationary", advect=False, beta=0.0)
    C = np.linalg.inv(P.precision_dense().numpy())
    n = P.n
    for k in range(1, T):
        np.testing.assert_allclose(C[k * n:(k + 1) * n, k * n:(k + 1) * n], C[:n, :n],
                                   rtol=0, atol=1e-9 * np.abs(C).max())


def test_marginal_std_formula_uniform_grid():
    # tau_for_std: std ~= 1 in the interior of a large uniform grid (continuum limit)
    ny = nx = 60
    kappa, gamma = 0.2, 1.0  # range sqrt(8)/kappa = 14 cells, dt kappa^4 = 2e-4
    tau = tau_for_std(1.0, kappa, gamma, 1.0)
    P = SPDEPrior(np.ones((ny, nx)), np.ones((ny, nx)), T=1, dt=0.1, alpha=2,
                  kappa=kappa, gamma=gamma, tau=tau)
    # exact variance at the centre: e^T Q_0^{-1} e
    e = np.zeros(P.n)
    e[(ny // 2) * nx + nx // 2] = 1.0
    var = P.precision.Q0_factor().solve(e) @ e
    assert abs(math.sqrt(var) - 1.0) < 0.02, var  # measured 1.0043


def test_sample_covariance_matches_dense_within_mc_error():
    dx, dy, oc = _grid(4, 5)
    P = SPDEPrior(dx, dy, oc, T=3, dt=0.7, alpha=2, kappa=0.7, tau=1.1, gamma=1.0, beta=0.4,
                  vx=1.0, vy=0.3, mx=0.2, my=0.1, mean=0.5)
    N = 40000
    X = P.sample(N, rng=0).reshape(N, -1)
    C = np.linalg.inv(P.precision_dense().numpy())
    # mean: standard error sqrt(C_ii / N)
    z_mean = (X.mean(0) - 0.5) / np.sqrt(np.diag(C) / N)
    # covariance entries: Var(hat C_ij) = (C_ii C_jj + C_ij^2) / N for Gaussians
    Ch = np.cov(X.T)
    se = np.sqrt((np.outer(np.diag(C), np.diag(C)) + C**2) / N)
    z_cov = (Ch - C) / se
    # 60 means, 1830 distinct covariances: |z| < 5 has probability ~1 - 1e-3 overall
    assert np.abs(z_mean).max() < 5, np.abs(z_mean).max()
    assert np.abs(z_cov).max() < 5.5, np.abs(z_cov).max()


def test_spd_factor_and_pcg_against_dense():
    rng = np.random.default_rng(1)
    M = rng.standard_normal((30, 30))
    A = M @ M.T + 30 * np.eye(30)
    import scipy.sparse as sp
    f = SPDFactor(sp.csr_matrix(A))
    assert abs(f.logdet() - np.linalg.slogdet(A)[1]) < 1e-10
    z = rng.standard_normal((30, 2))
    # G^T G = A: G^{-1} z has covariance A^{-1}; check G^{-1} G^{-T} = A^{-1}
    np.testing.assert_allclose(f.solve_G(f.solve_Gt(z)), np.linalg.solve(A, z), atol=1e-12)
    Gd = f.G(np.eye(30))
    np.testing.assert_allclose(Gd.T @ Gd, A, atol=1e-12)
    np.testing.assert_allclose(f.Gt(np.eye(30)), Gd.T, atol=1e-14)
    b = rng.standard_normal((30, 3))
    x, info = batched_pcg(lambda v: A @ v, b, rtol=1e-12)
    np.testing.assert_allclose(x, np.linalg.solve(A, b), rtol=1e-9)
    # block CG: same solutions, far fewer iterations when k directions resolve the
    # k largest eigenvalues (40 large + 260 small eigenvalues, 30 right-hand sides)
    U, _ = np.linalg.qr(rng.standard_normal((300, 300)))
    ev = 1 + np.r_[1e4 * rng.random(40), 10 * rng.random(260)]
    A2 = (U * ev) @ U.T
    B2 = rng.standard_normal((300, 30))
    xb, ib = block_cg(lambda v: A2 @ v, B2, rtol=1e-10)
    xc, ic = batched_pcg(lambda v: A2 @ v, B2, rtol=1e-10)
    ref = np.linalg.solve(A2, B2)
    np.testing.assert_allclose(xb, ref, rtol=0, atol=1e-8 * np.abs(ref).max())
    np.testing.assert_allclose(xc, ref, rtol=0, atol=1e-8 * np.abs(ref).max())
    assert ib.iterations < ic.iterations / 5, (ib.iterations, ic.iterations)  # 13 vs 236
    not_spd = sp.csr_matrix(np.diag([1.0, -1.0]))
    with pytest.raises(Exception, match="not positive definite"):
        SPDFactor(not_spd)


def test_nll_gradcheck_scalar_and_field_parameters():
    dx, dy, oc = _grid(3, 4)
    x = torch.randn(3, 3, 4, dtype=torch.float64)

    def f(kappa, tau, gamma, beta):
        P = SPDEPrior(dx, dy, oc, T=3, dt=0.5, alpha=2, kappa=kappa, tau=tau, gamma=gamma,
                      beta=beta, vx=0.8, vy=0.6, mx=0.1)
        return P.nll(x)

    args = [torch.tensor(v, dtype=torch.float64, requires_grad=True)
            for v in (0.7, 0.9, 1.1, 0.3)]
    assert torch.autograd.gradcheck(f, args)
    kf = (0.6 + 0.3 * torch.rand(3, 4, dtype=torch.float64)).requires_grad_()

    def g(kfield):
        return SPDEPrior(dx, dy, oc, T=3, dt=0.5, alpha=1, kappa=kfield, tau=1.0,
                         gamma=1.0).nll(x)

    assert torch.autograd.gradcheck(g, (kf,))


@pytest.mark.parametrize("bad, match", [
    (dict(kappa=0.0), "kappa"), (dict(kappa=-1.0), "kappa"), (dict(tau=0.0), "tau"),
    (dict(dt=0.0), "dt"), (dict(dt=-1.0), "dt"), (dict(gamma=0.0), "gamma"),
    (dict(beta=-0.1), "beta"), (dict(alpha=3), "alpha"), (dict(T=0), "T"),
    (dict(kappa=float("nan")), "kappa"), (dict(init="cold"), "init"),
])
def test_bad_parameters_raise_config_error(bad, match):
    kw = dict(T=3, dt=1.0, alpha=2, kappa=0.5, tau=1.0, gamma=1.0)
    kw.update(bad)
    with pytest.raises(ConfigError, match=match):
        SPDEPrior(np.ones((3, 4)), np.ones((3, 4)), **kw)


def test_bad_inputs_raise_input_error():
    P = SPDEPrior(np.ones((3, 4)), np.ones((3, 4)), T=2, kappa=0.5)
    with pytest.raises(InputError, match="mask"):
        P.posterior_mean(np.zeros((2, 3, 4)), np.zeros((2, 3, 5), bool), 1.0)
    with pytest.raises(InputError, match="R"):
        P.posterior_mean(np.zeros((2, 3, 4)), np.ones((2, 3, 4), bool), 0.0)
    with pytest.raises(InputError, match="trajectory"):
        P.nll(torch.zeros(3, 3, 4, dtype=torch.float64))


@pytest.mark.gpu
def test_stencil_and_nll_on_cuda_match_cpu():
    dx, dy, oc = _grid(5, 6)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    kw = dict(T=3, dt=0.5, alpha=2, kappa=0.7, tau=0.9, gamma=1.1, beta=0.3, vx=0.8, vy=0.6)
    cpu = SPDEPrior(dx, dy, oc, **kw)
    gpu = SPDEPrior(dx.cuda(), dy.cuda(), oc.cuda(), device="cuda", **kw)
    torch.testing.assert_close(gpu.precision_matvec(x.cuda()).cpu(), cpu.precision_matvec(x))
    torch.testing.assert_close(gpu.nll(x.cuda()).cpu(), cpu.nll(x))


def test_space_time_varying_parameters():
    dx, dy, oc = _grid(4, 5)
    g = torch.Generator().manual_seed(5)
    kap = 0.5 + 0.4 * torch.rand(3, 4, 5, generator=g, dtype=torch.float64)  # (T, ny, nx)
    tau = 0.7 + 0.5 * torch.rand(4, 5, generator=g, dtype=torch.float64)     # (ny, nx)
    P = SPDEPrior(dx, dy, oc, T=3, dt=0.4, alpha=2, kappa=kap, tau=tau, gamma=1.0, mx=0.2,
                  init="white", init_std=0.8)
    n = P.n
    # reference: frame k uses the operator built from the parameters of frame k
    L = np.zeros((3 * n, 3 * n))
    L[:n, :n] = np.eye(n) / 0.8
    sig = np.ones(3 * n)
    a = (dx * dy).numpy().reshape(-1)
    w = a[oc.numpy().reshape(-1)].mean() / a
    for k in (1, 2):
        A = _reference_A(dx, dy, oc, 0.0, 1.0, 0.0, 0.0, 0.0, 0.2, 0.0) + np.diag(
            kap[k].numpy().reshape(-1) ** 2)
        L[k * n:(k + 1) * n, (k - 1) * n:k * n] = -np.eye(n)
        L[k * n:(k + 1) * n, k * n:(k + 1) * n] = np.eye(n) + 0.4 * A @ A
        sig[k * n:(k + 1) * n] = tau.numpy().reshape(-1) ** 2 * 0.4 * w
    Qref = L.T @ (L / sig[:, None])
    np.testing.assert_allclose(P.precision_dense().numpy(), Qref, rtol=1e-10,
                               atol=1e-10 * np.abs(Qref).max())
    ld = np.linalg.slogdet(Qref)[1]
    assert abs(P.logdet() - ld) < 1e-9 * abs(ld)
    rng = np.random.default_rng(2)
    mask = rng.random((3, 4, 5)) < 0.4
    y = rng.standard_normal((3, 4, 5))
    D = np.diag(mask.reshape(-1) / 0.1)
    ref = np.linalg.solve(Qref + D, D @ y.reshape(-1))
    x = P.posterior_mean(y, mask, 0.1, rtol=1e-11)
    assert np.abs(x.reshape(-1) - ref).max() < 1e-8 * np.abs(ref).max()


def test_square_plus_identity_factor_matches_dense():
    # F = I + c A^2 through the complex first-order factor, A non-symmetric sparse
    import scipy.sparse as sp
    rng = np.random.default_rng(3)
    A = sp.random(40, 40, density=0.1, random_state=4) + sp.diags(rng.random(40) + 1.0)
    Ad = A.toarray()
    F = np.eye(40) + 0.7 * Ad @ Ad
    f = SquarePlusIdentityFactor(sp.csr_matrix(A), 0.7)
    b = rng.standard_normal((40, 3))
    np.testing.assert_allclose(f.solve(b), np.linalg.solve(F, b), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(f.solve(b[:, 0]), np.linalg.solve(F, b[:, 0]), rtol=1e-11,
                               atol=1e-12)
    np.testing.assert_allclose(f.solve_t(b), np.linalg.solve(F.T, b), rtol=1e-11, atol=1e-12)
    assert abs(f.logabsdet() - np.linalg.slogdet(F)[1]) < 1e-10 * abs(np.linalg.slogdet(F)[1])


@pytest.mark.parametrize("init", ["stationary", "white"])
def test_sparse_logdet_value_and_gradients_match_dense(init):
    # value from sparse factors; scalar-parameter gradient exact (complex step), field
    # gradient by coloured probing (exact once every cell has its own colour)
    dx, dy, oc = _grid(5, 6)
    mx = 0.0 if init == "stationary" else 0.3

    def run(method, field, p=6):
        kap = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        gam = torch.tensor(1.1, dtype=torch.float64, requires_grad=True)
        tau = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
        m = torch.tensor(mx, dtype=torch.float64, requires_grad=True)
        kf = (0.2 * torch.rand(5, 6, generator=torch.Generator().manual_seed(1),
                               dtype=torch.float64)).requires_grad_()
        P = SPDEPrior(dx, dy, oc, T=3, dt=0.5, alpha=2, kappa=kap * torch.exp(kf) if field
                      else kap, tau=tau, gamma=gam, beta=0.3, vx=0.8, vy=0.6, mx=m, init=init)
        ld = P.logdet_torch(method, probe_spacing=p)
        ld.backward()
        g = [kap.grad, gam.grad, tau.grad, m.grad if m.grad is not None else torch.zeros(())]
        return float(ld.detach()), torch.stack(g).numpy(), kf.grad.numpy() if field else None

    v0, g0, _ = run("dense", False)
    v1, g1, _ = run("sparse", False)
    assert abs(v1 - v0) < 1e-10 * abs(v0)
    np.testing.assert_allclose(g1, g0, rtol=1e-8, atol=1e-9 * np.abs(g0).max())
    v0, g0, f0 = run("dense", True)
    v1, g1, f1 = run("sparse", True, p=6)
    np.testing.assert_allclose(g1, g0, rtol=1e-8, atol=1e-9 * np.abs(g0).max())
    np.testing.assert_allclose(f1, f0, rtol=1e-8, atol=1e-9 * np.abs(f0).max())
    # coarser colouring: unbiased random estimate (differs, same order of magnitude)
    _, _, f2 = run("sparse", True, p=2)
    assert not np.allclose(f2, f0) and np.abs(f2).max() < 50 * np.abs(f0).max()
    with pytest.raises(ConfigError, match="method"):
        SPDEPrior(dx, dy, oc, T=2, kappa=0.5).logdet_torch("lu")


def test_sparse_nll_gradcheck_scalars():
    dx, dy, oc = _grid(4, 5)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)

    def f(kappa, tau, gamma):
        P = SPDEPrior(dx, dy, oc, T=3, dt=0.5, alpha=2, kappa=kappa, tau=tau, gamma=gamma,
                      beta=0.2, vx=0.6, vy=0.8)
        return P.nll(x, logdet_method="sparse")

    args = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.7, 0.9, 1.1)]
    assert torch.autograd.gradcheck(f, args)


def test_bad_factor_option():
    with pytest.raises(ConfigError, match="factor"):
        SPDEPrior(np.ones((3, 4)), np.ones((3, 4)), T=2, kappa=0.5, factor="qr")
    with pytest.raises(ConfigError, match="alpha"):
        SPDEPrior(np.ones((3, 4)), np.ones((3, 4)), T=2, kappa=0.5, alpha=1, factor="complex")


# ---------------------------------------------------------------- grid LU / prior-preconditioned CG
def _grid_matrices(ny=9, nx=13):
    """First-order complex ``C = I - i sqrt(c) A`` (anisotropic, advective 9-point ``A``) and
    the 25-point SPD ``Q_0`` of an SPDE prior on a ``(ny, nx)`` grid, as scipy matrices."""
    dx, dy, oc = _grid(ny, nx)
    P = SPDEPrior(dx, dy, oc, T=2, dt=0.5, tau=0.8, **PARAMS)
    A = stencil_to_csr(P._Ak(1).offsets, P._Ak(1).coef.numpy())
    import scipy.sparse as sp
    C = sp.eye(ny * nx) - 1j * np.sqrt(0.5) * A
    Q0 = stencil_to_csr(P._Q0_stencil().offsets, P._Q0_stencil().coef.numpy())
    return C, 0.5 * (Q0 + Q0.T), (ny, nx)


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_grid_lu_matches_dense(parts):
    from oceanda.linalg.sparse import GridLU
    C, Q0, shape = _grid_matrices()
    Cd, Qd = C.toarray(), Q0.toarray()
    rng = np.random.default_rng(parts)
    for k in (1, 3):
        b = rng.standard_normal((C.shape[0], k))
        g = GridLU(C, shape, parts=parts)
        assert g.parts == parts
        np.testing.assert_allclose(g.solve(b), np.linalg.solve(Cd, b), rtol=0, atol=1e-12)
        np.testing.assert_allclose(g.solve_t(b), np.linalg.solve(Cd.T, b), rtol=0, atol=1e-12)
        np.testing.assert_allclose(g.solve(b[:, 0]), np.linalg.solve(Cd, b[:, 0]), atol=1e-12)
        g32 = GridLU(C, shape, parts=parts, dtype=np.complex64)
        ref = np.linalg.solve(Cd, b)
        assert np.abs(g32.solve(b) - ref).max() < 1e-5 * np.abs(ref).max()
        s = GridLU(Q0, shape, parts=parts, spd=True)
        np.testing.assert_allclose(s.solve(b), np.linalg.solve(Qd, b), rtol=1e-9,
                                   atol=1e-9 * np.abs(np.linalg.solve(Qd, b)).max())
        # G^T G = Q_0 through the one-sweep solves: G^{-1} G^{-T} = Q_0^{-1}
        np.testing.assert_allclose(s.solve_G(s.solve_Gt(b)), s.solve(b), rtol=1e-10,
                                   atol=1e-12)
    Ginv = s.solve_G(np.eye(Q0.shape[0]))
    np.testing.assert_allclose(Ginv.T @ Qd @ Ginv, np.eye(Q0.shape[0]), atol=1e-8)
    assert abs(GridLU(C, shape, parts=parts).logabsdet() - np.linalg.slogdet(Cd)[1]) < 1e-10
    assert abs(s.logdet() - np.linalg.slogdet(Qd)[1]) < 1e-9 * abs(np.linalg.slogdet(Qd)[1])
    # strips never reference each other: rows of strip r use only columns of strip r
    ip, ix = g._L[0], g._L[1]
    for r in range(g.parts):
        lo, hi = g.bounds[r], g.bounds[r + 1]
        cols = ix[ip[lo]:ip[hi]]
        assert cols.size == 0 or (cols.min() >= lo and cols.max() < hi)
    with pytest.raises(Exception, match="not positive definite"):
        GridLU(-Q0, shape, parts=parts, spd=True)


def test_spd_factor_grid_backend_keeps_the_same_G():
    # numba solves on SuperLU's own factor: G (hence every prior draw) unchanged
    C, Q0, shape = _grid_matrices()
    a, b = SPDFactor(Q0), SPDFactor(Q0, grid_shape=shape)
    z = np.random.default_rng(0).standard_normal((Q0.shape[0], 2))
    np.testing.assert_allclose(b.solve_G(z), a.solve_G(z), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b.solve_Gt(z), a.solve_Gt(z), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b.G(b.solve_G(z)), z, atol=1e-10)
    assert abs(a.logdet() - b.logdet()) < 1e-10 * abs(a.logdet())


def test_preconditioned_norm_pcg_against_dense():
    # M-norm stopping and flexible updates with an approximate (perturbed) preconditioner
    rng = np.random.default_rng(5)
    U_, _ = np.linalg.qr(rng.standard_normal((80, 80)))
    A = (U_ * (1 + 100 * rng.random(80))) @ U_.T
    Minv = np.linalg.inv(A + 5 * np.eye(80))
    Minv32 = Minv.astype(np.float32)
    b = rng.standard_normal((80, 2))
    for prec in (lambda r: Minv @ r, lambda r: (Minv32 @ r.astype(np.float32)).astype(float)):
        x, info = batched_pcg(lambda v: A @ v, b, precond=prec, rtol=1e-10,
                              norm="preconditioned", flexible=True)
        ref = np.linalg.solve(A, b)
        assert np.abs(x - ref).max() < 1e-8 * np.abs(ref).max()
        r = b - A @ x
        mres = np.sqrt(np.einsum("ij,ij->j", r, Minv @ r) / np.einsum("ij,ij->j", b, Minv @ b))
        assert info.converged and np.all(mres < 1e-9), mres
    # preconditioned block CG (metric = inverse preconditioner): same solutions as the dense
    # solve and as column-wise PCG. (Its iteration count depends on rounding: with 1 BLAS thread
    # it needed far fewer iterations than column-wise PCG here, with 2 threads not; not asserted.)
    from oceanda.linalg.sparse import block_pcg
    ev = 1 + np.r_[1e4 * rng.random(40), 10 * rng.random(260)]
    U2, _ = np.linalg.qr(rng.standard_normal((300, 300)))
    A2 = (U2 * ev) @ U2.T
    C2 = np.diag(np.diag(A2))  # Jacobi preconditioner C^{-1} = diag(A)^{-1}
    B2 = rng.standard_normal((300, 30))
    xb, ib = block_pcg(lambda v: A2 @ v, B2, precond=lambda r: r / np.diag(C2)[:, None],
                       metric=lambda y: C2 @ y, rtol=1e-10)
    xc, ic = batched_pcg(lambda v: A2 @ v, B2, precond=lambda r: r / np.diag(C2)[:, None],
                         rtol=1e-10, norm="preconditioned")
    ref = np.linalg.solve(A2, B2)
    assert np.abs(xb - ref).max() < 1e-8 * np.abs(ref).max()
    assert np.abs(xc - ref).max() < 1e-8 * np.abs(ref).max()
    assert ib.converged and ic.converged


def test_bad_backend_option():
    dx, dy, oc = _grid()
    with pytest.raises(ConfigError, match="backend"):
        SPDEPrior(dx, dy, oc, T=T, backend="cholmod")


# ----------------------------------------------------------------------------------------------
# Posterior means: problems x solvers, one tolerance per pair (max |x - x_dense| / max |x_dense|,
# x_dense the dense solve of (Q + D) x = Q mu + D y, float64)

ISO = dict(kappa=0.7, gamma=1.3)


def _lat_grid(ny=8, nx=6):
    """A regular lon/lat grid without land (dx varies with latitude only): a separable prior."""
    lat = np.linspace(33.0, 43.0, ny)
    return (np.repeat((5.566 * np.cos(np.deg2rad(lat)))[:, None], nx, 1),
            np.full((ny, nx), 5.55), None)


# name -> (grid, prior keywords); every prior has T frames unless T is given
PROBLEMS = {
    "aniso_a2": (_grid, dict(alpha=2, **PARAMS)),
    "aniso_a1": (_grid, dict(alpha=1, **PARAMS)),
    "iso_a2_numba2": (_grid, dict(alpha=2, backend="numba", threads=2, **ISO)),
    "iso_a1_numba2": (_grid, dict(alpha=1, backend="numba", threads=2, **ISO)),
    "white_a2_lu": (_grid, dict(alpha=2, init="white", factor="lu", **PARAMS)),
    "aniso_a2_numba2": (_grid, dict(alpha=2, backend="numba", threads=2, **PARAMS)),
    "aniso_a2_numba3_lu": (_grid, dict(alpha=2, backend="numba", threads=3, factor="lu",
                                       **PARAMS)),
    "sep_a2": (_lat_grid, dict(alpha=2, kappa=0.3, gamma=20.0, tau=2.0, dt=1.0)),
    "sep_a1": (_lat_grid, dict(alpha=1, kappa=0.3, gamma=20.0, tau=2.0, dt=1.0)),
    "sep_a2_T1": (_lat_grid, dict(alpha=2, kappa=0.3, gamma=20.0, tau=2.0, dt=1.0, T=1)),
}

# (problem, solver) -> tolerance; solver names of oceanda.priors.spde.posterior.SOLVERS, with
# the two-level solver's coarse spacing after a colon
TOLERANCES = {
    ("aniso_a2", "pcg"): 1e-8,
    ("aniso_a2", "whitened"): 1e-8,
    ("aniso_a2", "two_level:3,2"): 1e-8,
    ("aniso_a2", "direct"): 1e-10,
    ("aniso_a1", "pcg"): 1e-8,
    ("aniso_a1", "two_level:2,1"): 1e-8,
    ("iso_a2_numba2", "pcg"): 1e-8,
    ("iso_a1_numba2", "pcg"): 1e-8,
    ("white_a2_lu", "pcg"): 1e-8,
    ("white_a2_lu", "whitened"): 1e-8,
    ("aniso_a2_numba2", "pcg"): 1e-8,
    ("aniso_a2_numba3_lu", "pcg"): 1e-8,
    ("sep_a2", "spectral"): 1e-9,
    ("sep_a2", "pcg"): 1e-9,
    ("sep_a1", "spectral"): 1e-9,
    ("sep_a2_T1", "spectral"): 1e-9,
}
RTOL = {"spectral": 1e-12}  # the solvers' own relative residual (others: 1e-11)


def _problem(name, **override):
    grid, kw = PROBLEMS[name]
    kw = dict(dict(T=T, dt=0.5, tau=0.8, mean=0.3), **kw)
    kw.update(override)
    dx, dy, oc = grid()
    return SPDEPrior(dx, dy, oc, **kw)


def _observations(P, k=3, seed=0):
    """``k`` right-hand sides (NaN where unobserved: never read), the mask, per-cell R and
    the dense reference means ``(k, T, ny, nx)``."""
    rng = np.random.default_rng(seed)
    grid = (P.T, *P.shape)
    mask = rng.random(grid) < 0.3
    y = np.where(mask[None], rng.standard_normal((k, *grid)), np.nan)
    R = np.where(rng.random(grid) < 0.5, 0.05, 0.2)
    Q = P.precision_dense().numpy()
    D = np.diag(mask.reshape(-1) / R.reshape(-1))
    mu = np.full(Q.shape[0], 0.3)
    ref = np.linalg.solve(Q + D, (Q @ mu)[:, None] + D @ np.nan_to_num(y).reshape(k, -1).T).T
    return y, mask, R, ref.reshape(k, *grid)


@pytest.mark.parametrize("problem, solver", list(TOLERANCES))
def test_posterior_mean_against_dense(problem, solver):
    tol = TOLERANCES[problem, solver]
    name, _, coarse = solver.partition(":")
    opts = dict(solver=name, rtol=RTOL.get(name, 1e-11))
    if coarse:
        opts["coarse"] = tuple(int(c) for c in coarse.split(","))
    P = _problem(problem)
    y, mask, R, ref = _observations(P)
    scale = np.abs(ref).max()
    # one right-hand side: one field
    x, info = P.posterior_mean(y[0], mask, R, return_info=True, **opts)
    assert x.shape == ref.shape[1:]
    assert np.abs(x - ref[0]).max() <= tol * scale, info
    assert info.converged and info.rel_residual.shape == (1,)
    # several: in one block, and column by column in chunks of two
    for kw in (dict(block=True), dict(block=False, block_size=2)):
        X, info = P.posterior_mean(y, mask, R, return_info=True, **opts, **kw)
        assert np.abs(X - ref).max() <= tol * scale, (kw, info)
        assert info.converged and info.rel_residual.shape == (3,)


def test_every_problem_s_precision_operator_and_solver_choice():
    """Per problem: the factor chosen, log det Q, Q X by sparse products, the preconditioner's
    Q_0^{-1} (self-adjoint case), draws independent of factor / back-end / threads, and what
    ``solver="auto"`` picks; bad solver names and options."""
    from oceanda.priors.spde.posterior import Options, choose

    for name, (_, kw) in PROBLEMS.items():
        P = _problem(name)
        assert P.factor == ("lu" if kw.get("factor") == "lu" or P.alpha == 1 else "complex")
        Q = P.precision_dense().numpy()
        ld = np.linalg.slogdet(Q)[1]
        assert abs(P.logdet() - ld) < 1e-9 * abs(ld), name
        V = np.random.default_rng(2).standard_normal((P.T, P.n, 2))
        np.testing.assert_allclose(P.precision.apply(V).reshape(-1, 2), Q @ V.reshape(-1, 2),
                                   rtol=0, atol=1e-12 * np.abs(Q).max() * np.abs(V).max())
        isotropic = "beta" not in kw
        if P.init == "stationary":
            # S^{-1} A symmetric exactly for isotropic H without advection (FV on the grid)
            assert P.precision.q0_selfadjoint() == isotropic, name
            if isotropic:  # the single-precision preconditioner's Q_0^{-1} is Q_0's inverse
                Q0 = P._Q0_stencil().to_dense().numpy()
                z = np.random.default_rng(1).standard_normal((P.n, 2))
                ref0 = np.linalg.solve(Q0, z)
                assert np.abs(P.precision.Q0_precondition(z) - ref0).max() \
                    < 1e-3 * np.abs(ref0).max(), name
        ref = _problem(name, backend="superlu", threads=1, factor="lu")
        np.testing.assert_allclose(P.sample(2, rng=3), ref.sample(2, rng=3), rtol=1e-9,
                                   atol=1e-11, err_msg=name)
        sep = name.startswith("sep")
        assert (P.precision.spectrum() is not None) == sep, name
        assert choose(P, 1, Options()) == ("spectral" if sep else "pcg")
        assert choose(P, 3, Options()) == ("spectral" if sep else "whitened")
        assert choose(P, 3, Options(block=False)) == ("spectral" if sep else "pcg")
        assert choose(P, 1, Options(coarse=(2, 2))) == "two_level"
    y, mask, R, _ = _observations(P, k=1)
    with pytest.raises(ConfigError, match="solver"):
        P.posterior_mean(y[0], mask, R, solver="cholesky")
    with pytest.raises(ConfigError, match="two_level"):
        P.posterior_mean(y[0], mask, R, solver="pcg", coarse=(2, 2))
    with pytest.raises(ConfigError, match="coarse"):
        P.posterior_mean(y[0], mask, R, solver="two_level")
    with pytest.raises(ConfigError, match="device"):
        P.posterior_mean(y[0], mask, R, solver="pcg", device="cpu")
