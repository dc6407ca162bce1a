"""oceanda.linalg banded kernels against independent references.

References: dense torch.linalg (cholesky, solve, logdet, inv), scipy.linalg
(cholesky_banded, solveh_banded), explicit selection matrices H for MAP / BLUE, Monte-Carlo
moments with computed tolerances, torch.autograd.gradcheck (float64). Every numerical test
runs on both back-ends: numba (CPU default) and the log-depth torch scan (CUDA default,
forced here on CPU).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch.autograd import gradcheck

from oceanda.errors import InputError, NumericalError
from oceanda.linalg import (
    band_cholesky,
    band_from_dense,
    band_kalman,
    band_llt,
    band_logdet,
    band_lower_to_dense,
    band_map,
    band_matvec,
    band_sample,
    band_solve,
    band_to_dense,
    spd_band_from_raw,
)
from oceanda.linalg import _band_numba

BACKENDS = ["numba", "torch"]
D = torch.float64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def spd_band(batch, n, k, seed=0, dtype=D) -> torch.Tensor:
    """Random SPD band (diagonally dominant), built with numpy only."""
    rng = np.random.default_rng(seed)
    band = rng.uniform(-1.0, 1.0, size=(*batch, n, k + 1))
    i = np.arange(n)[:, None]
    j = np.arange(k + 1)[None, :]
    band = np.where(i >= j, band, 0.0)
    # |row sum| of off-diagonals of the symmetric matrix is at most 2k
    band[..., 0] = 2.0 * k + 0.5 + rng.uniform(0.0, 1.0, size=(*batch, n))
    return torch.tensor(band, dtype=dtype)


def dense_ref(band: torch.Tensor) -> torch.Tensor:
    """Dense symmetric matrix from the band with explicit loops (independent of the code)."""
    b = band.detach().numpy()
    n, k1 = b.shape[-2:]
    A = np.zeros((*b.shape[:-2], n, n))
    for i in range(n):
        for j in range(k1):
            if i - j >= 0:
                A[..., i, i - j] = b[..., i, j]
                A[..., i - j, i] = b[..., i, j]
    return torch.tensor(A, dtype=band.dtype)


def lapack_band(band2d: np.ndarray) -> np.ndarray:
    """scipy's lower band storage ab[t, j] = A[j + t, j] from row-lower storage."""
    n, k1 = band2d.shape
    ab = np.zeros((k1, n))
    for t in range(k1):
        ab[t, : n - t] = band2d[t:, t]
    return ab


SHAPES = [  # (batch, n, k)
    ((), 1, 0),
    ((3,), 7, 0),
    ((2,), 9, 1),
    ((), 25, 4),
    ((2, 3), 11, 3),
    ((5,), 4, 6),  # bandwidth wider than the matrix
    ((37,), 13, 2),  # tiled numba path with a partial tile
    ((1,), 40, 5),
]


# ----------------------------------------------------------------------- storage, matvec


def test_band_dense_roundtrip_and_matvec():
    band = spd_band((2, 3), 10, 3, seed=1)
    A = dense_ref(band)
    torch.testing.assert_close(band_to_dense(band), A, rtol=0, atol=0)
    torch.testing.assert_close(band_from_dense(A, 3), band, rtol=0, atol=0)
    x = torch.randn(2, 3, 10, dtype=D)
    torch.testing.assert_close(band_matvec(band, x), (A @ x.unsqueeze(-1)).squeeze(-1), rtol=1e-13, atol=1e-13)
    # entries before the start of the matrix (i - j < 0) are ignored, even NaN
    junk = band.clone()
    junk[..., 0, 1:] = float("nan")
    junk[..., 1, 2:] = float("inf")
    torch.testing.assert_close(band_to_dense(torch.where(torch.isfinite(junk), junk, 0.0)), A)
    torch.testing.assert_close(band_matvec(junk, x), band_matvec(band, x), rtol=0, atol=0)
    torch.testing.assert_close(band_solve(junk, x), band_solve(band, x), rtol=0, atol=0)


def test_band_llt_matches_dense():
    L = torch.randn(3, 8, 3, dtype=D)
    Ld = band_lower_to_dense(torch.where(torch.arange(8)[:, None] >= torch.arange(3), L, 0.0))
    torch.testing.assert_close(band_to_dense(band_llt(L)), Ld @ Ld.mT, rtol=1e-13, atol=1e-13)


# ------------------------------------------------------------------- factor, solve, logdet


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,n,k", SHAPES)
def test_cholesky_solve_logdet_vs_dense(backend, batch, n, k):
    band = spd_band(batch, n, k, seed=n + k)
    A = dense_ref(band)
    b = torch.randn(*batch, n, dtype=D, generator=torch.Generator().manual_seed(3))
    L = band_cholesky(band, backend=backend)
    assert L.shape == band.shape
    torch.testing.assert_close(band_lower_to_dense(L), torch.linalg.cholesky(A), rtol=1e-12, atol=1e-12)
    x = band_solve(band, b, backend=backend)
    torch.testing.assert_close(x, torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1), rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(band_logdet(band, backend=backend), torch.logdet(A), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_against_scipy_banded(backend):
    """scipy.linalg.cholesky_banded / solveh_banded (LAPACK pbtrf / pbsv) per system."""
    band = spd_band((6,), 30, 4, seed=7)
    b = torch.randn(6, 30, dtype=D)
    L = band_cholesky(band, backend=backend)
    x = band_solve(band, b, backend=backend)
    for s in range(6):
        ab = lapack_band(band[s].numpy())
        c = scipy.linalg.cholesky_banded(ab, lower=True)
        np.testing.assert_allclose(lapack_band(L[s].numpy()), c, rtol=1e-12, atol=1e-12)
        xs = scipy.linalg.solveh_banded(ab, b[s].numpy(), lower=True)
        np.testing.assert_allclose(x[s].numpy(), xs, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_broadcasting(backend):
    band = spd_band((3, 1), 8, 2, seed=2)
    b = torch.randn(1, 4, 8, dtype=D)
    x = band_solve(band, b, backend=backend)
    assert x.shape == (3, 4, 8)
    A = dense_ref(band)  # (3, 1, 8, 8)
    torch.testing.assert_close(x, torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1), rtol=1e-11, atol=1e-12)


def test_numba_tiled_and_scalar_loops_agree():
    """Both numba loop families (and the fused no-factor path) give the same numbers."""
    band = spd_band((20,), 17, 3, seed=5)
    b = torch.randn(20, 17, dtype=D)
    assert _band_numba.use_tiles(20, 17, 3) and not _band_numba.use_tiles(2, 17, 3)
    x_tiles = band_solve(band, b)  # fused tiled path
    x_scalar = torch.cat([band_solve(band[s : s + 2], b[s : s + 2]) for s in range(0, 20, 2)])
    torch.testing.assert_close(x_tiles, x_scalar, rtol=1e-13, atol=1e-14)
    L_tiles = band_cholesky(band)
    L_scalar = torch.cat([band_cholesky(band[s : s + 2]) for s in range(0, 20, 2)])
    torch.testing.assert_close(L_tiles, L_scalar, rtol=1e-13, atol=1e-14)


def test_torch_scan_long_system():
    """Many blocks (log-depth scans over 150 blocks) against the numba row loop."""
    band = spd_band((2,), 450, 3, seed=11)
    b = torch.randn(2, 450, dtype=D)
    torch.testing.assert_close(band_cholesky(band, backend="torch"), band_cholesky(band), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(band_solve(band, b, backend="torch"), band_solve(band, b), rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(band_logdet(band, backend="torch"), band_logdet(band), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32(backend):
    band = spd_band((9,), 20, 3, seed=4)
    b = torch.randn(9, 20, dtype=D)
    x64 = band_solve(band, b, backend=backend)
    x32 = band_solve(band.float(), b.float(), backend=backend)
    assert x32.dtype == torch.float32
    torch.testing.assert_close(x32, x64.float(), rtol=1e-4, atol=1e-5)
    ld32 = band_logdet(band.float(), backend=backend)
    torch.testing.assert_close(ld32, band_logdet(band).float(), rtol=1e-5, atol=1e-4)
    L32 = band_cholesky(band.float(), backend=backend)
    torch.testing.assert_close(L32, band_cholesky(band).float(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_is_mu_plus_inverse_transpose_factor(backend):
    band = spd_band((2,), 12, 3, seed=8)
    mu = torch.randn(2, 12, dtype=D)
    z = torch.randn(2, 12, dtype=D)
    Ld = torch.linalg.cholesky(dense_ref(band))
    ref = mu + torch.linalg.solve_triangular(Ld.mT, z.unsqueeze(-1), upper=True).squeeze(-1)
    torch.testing.assert_close(band_sample(mu, band, z, backend=backend), ref, rtol=1e-12, atol=1e-12)


def test_sample_moments_monte_carlo():
    """Sample mean and covariance of N draws vs mu and the dense Q^{-1}, at 5 standard errors."""
    n, N = 6, 40_000
    band = spd_band((), n, 2, seed=9)
    band[..., 0] -= 3.0  # less diagonally dominant: non-trivial correlations (still SPD)
    Sigma = torch.linalg.inv(dense_ref(band))
    assert torch.linalg.eigvalsh(dense_ref(band)).min() > 0
    mu = torch.linspace(-1, 1, n, dtype=D)
    z = torch.randn(N, n, dtype=D, generator=torch.Generator().manual_seed(0))
    x = band_sample(mu, band, z)
    mean = x.mean(0)
    se_mean = torch.sqrt(torch.diagonal(Sigma) / N)
    assert torch.all((mean - mu).abs() < 5 * se_mean)
    C = torch.cov(x.T)
    # Var of a Gaussian sample covariance entry: (S_ii S_jj + S_ij^2) / (N - 1)
    se_cov = torch.sqrt((torch.outer(torch.diagonal(Sigma), torch.diagonal(Sigma)) + Sigma**2) / (N - 1))
    assert torch.all((C - Sigma).abs() < 5 * se_cov), float(((C - Sigma).abs() / se_cov).max())
    # the correlations tested are not trivial
    assert (Sigma - torch.diag(torch.diagonal(Sigma))).abs().max() > 10 * se_cov.max()


# ------------------------------------------------------------------------- MAP / BLUE


def dense_map(mu, A, y, mask, R):
    """Information form with an explicit m x n selection matrix H per sample."""
    out = []
    for s in range(mu.shape[0]):
        idx = torch.nonzero(mask[s]).flatten()
        H = torch.eye(mu.shape[1], dtype=D)[idx]
        Rs = R[s][idx] if R.ndim else R * torch.ones(len(idx), dtype=D)
        Ri = torch.diag(1.0 / Rs)
        lhs = A[s] + H.T @ Ri @ H
        rhs = A[s] @ mu[s] + H.T @ Ri @ y[s][idx]
        out.append(torch.linalg.solve(lhs, rhs))
    return torch.stack(out)


def dense_kalman(mu, P, y, mask, R):
    out = []
    for s in range(mu.shape[0]):
        idx = torch.nonzero(mask[s]).flatten()
        H = torch.eye(mu.shape[1], dtype=D)[idx]
        Rs = R[s][idx] if R.ndim else R * torch.ones(len(idx), dtype=D)
        S = H @ P[s] @ H.T + torch.diag(Rs)
        out.append(mu[s] + P[s] @ H.T @ torch.linalg.solve(S, y[s][idx] - H @ mu[s]))
    return torch.stack(out)


def obs_problem(B=4, n=10, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    band = spd_band((B,), n, k, seed=seed)
    mu = torch.randn(B, n, dtype=D, generator=g)
    y = torch.randn(B, n, dtype=D, generator=g)
    mask = torch.rand(B, n, generator=g) < 0.5
    mask[0] = True  # all observed
    mask[1] = False  # none observed
    y = torch.where(mask, y, float("nan"))  # unobserved entries are ignored, even NaN
    R = 0.2 + torch.rand(B, n, dtype=D, generator=g)
    return band, mu, y, mask, R


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scalar_R", [True, False])
def test_map_information_form_vs_dense(backend, scalar_R):
    band, mu, y, mask, R = obs_problem()
    R = torch.tensor(0.3, dtype=D) if scalar_R else R
    x = band_map(mu, band, y, mask, R, backend=backend)
    torch.testing.assert_close(x, dense_map(mu, dense_ref(band), y, mask, R), rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(x[1], mu[1])  # nothing observed: the prior mean


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scalar_R", [True, False])
def test_kalman_form_vs_dense_and_information_form(backend, scalar_R):
    P, mu, y, mask, R = obs_problem(seed=1)
    R = 0.3 if scalar_R else R
    x = band_kalman(mu, P, y, mask, R, backend=backend)
    Rt = torch.as_tensor(R, dtype=D)
    Pd = dense_ref(P)
    torch.testing.assert_close(x, dense_kalman(mu, Pd, y, mask, Rt), rtol=1e-11, atol=1e-12)
    # the two forms agree (information form with the dense precision Q = P^{-1})
    torch.testing.assert_close(x, dense_map(mu, torch.linalg.inv(Pd), y, mask, Rt), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(x[1], mu[1])


def test_map_obs_noise_limit():
    """R -> 0 on all rows: the MAP reproduces the observations."""
    band, mu, y, mask, _ = obs_problem()
    x = band_map(mu[0], band[0], y[0], mask[0], 1e-12)
    torch.testing.assert_close(x, y[0], rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------------------- gradients


def _req(*ts):
    return tuple(t.detach().clone().requires_grad_(True) for t in ts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_solve_logdet_cholesky(backend):
    band, b = _req(spd_band((2,), 7, 2, seed=3), torch.randn(2, 7, dtype=D))
    assert gradcheck(lambda a, r: band_solve(a, r, backend=backend), (band, b))
    assert gradcheck(lambda a: band_logdet(a, backend=backend), (band,))
    assert gradcheck(lambda a: band_cholesky(a, backend=backend), (band,))


def test_gradcheck_solve_tiled_loops():
    """Five systems: the numba tiled loops (fused factor + solve forward, fused backward)."""
    assert _band_numba.use_tiles(5, 7, 2)
    band, b = _req(spd_band((5,), 7, 2, seed=9), torch.randn(5, 7, dtype=D))
    assert gradcheck(band_solve, (band, b))
    assert gradcheck(lambda r: band_solve(band.detach(), r), (b,))  # w.r.t. b alone


@pytest.mark.parametrize(
    "B,n,k,dtype",
    [
        (37, 13, 2, D),  # generated kernel, a partial tile
        (70, 30, 6, D),  # generated kernel, several tiles, the benchmark's bandwidth
        (40, 20, 6, torch.float32),
        (9, 4, 6, D),  # generic tiled loops (batch under one tile), bandwidth wider than n
        (12, 11, 17, D),  # generic tiled loops (k > 16)
    ],
)
def test_solve_gradient_tiled_vs_dense_autograd(B, n, k, dtype):
    """The fused tiled backward (solve with the saved factor and the band gradient in one
    pass, written over the factor) == torch autograd through dense float64 solves."""
    assert _band_numba.use_tiles(B, n, k)
    g = torch.Generator().manual_seed(B + n + k)
    band0 = spd_band((B,), n, k, seed=B + k)
    b0, w = torch.randn(B, n, dtype=D, generator=g), torch.randn(B, n, dtype=D, generator=g)
    band_d, b_d = _req(band0, b0)
    xd = torch.linalg.solve(band_to_dense(band_d), b_d.unsqueeze(-1)).squeeze(-1)
    (w * xd).sum().backward()
    tol = dict(rtol=1e-11, atol=1e-12) if dtype == D else dict(rtol=1e-4, atol=1e-5)
    band, b = _req(band0.to(dtype), b0.to(dtype))
    (w.to(dtype) * band_solve(band, b)).sum().backward()
    torch.testing.assert_close(band.grad, band_d.grad.to(dtype), **tol)
    torch.testing.assert_close(b.grad, b_d.grad.to(dtype), **tol)
    (b,) = _req(b0.to(dtype))  # gradient w.r.t. b alone (no band gradient formed)
    (w.to(dtype) * band_solve(band0.to(dtype), b)).sum().backward()
    torch.testing.assert_close(b.grad, b_d.grad.to(dtype), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B", [2, 6])  # numba: scalar loops, tiled loops
def test_solve_backward_twice_through_retained_graph(backend, B):
    """The CPU backward writes the band gradient over the saved factor: a second pass
    through a retained graph must factorise again and give the same gradients."""
    band, b = _req(spd_band((B,), 9, 3, seed=13), torch.randn(B, 9, dtype=D))
    w = torch.randn(B, 9, dtype=D)
    loss = (w * band_solve(band, b, backend=backend)).sum()
    g1 = torch.autograd.grad(loss, (band, b), retain_graph=True)
    ref = torch.autograd.grad(
        (w * torch.linalg.solve(band_to_dense(band), b.unsqueeze(-1)).squeeze(-1)).sum(), (band, b)
    )
    for got, want in zip(g1, ref):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)
    g1[0].mul_(0.0)  # in place on the first gradient (the factor's memory)
    loss.backward(retain_graph=True)
    loss.backward()  # accumulates: twice the gradient
    torch.testing.assert_close(band.grad, 2 * ref[0], rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(b.grad, 2 * ref[1], rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_sample(backend):
    band, mu, z = _req(spd_band((2,), 6, 2, seed=4), torch.randn(2, 6, dtype=D), torch.randn(2, 6, dtype=D))
    assert gradcheck(lambda m, a, r: band_sample(m, a, r, backend=backend), (mu, band, z))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", [band_map, band_kalman])
def test_gradcheck_map_kalman(backend, form):
    band, mu, y, mask, R = obs_problem(B=3, n=6, k=2, seed=5)
    y = torch.where(mask, y, 0.0)
    band, mu, y, R = _req(band, mu, y, R)
    assert gradcheck(lambda m, a, yy, rr: form(m, a, yy, mask, rr, backend=backend), (mu, band, y, R))
    # scalar R
    r0 = torch.tensor(0.4, dtype=D, requires_grad=True)
    assert gradcheck(lambda a, rr: form(mu, a, y, mask, rr, backend=backend), (band, r0))


def test_gradcheck_spd_band_from_raw():
    raw = torch.randn(2, 6, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    raw[..., 0] += 1.0  # keep Q well conditioned for finite differences
    raw.requires_grad_(True)
    assert gradcheck(lambda r: spd_band_from_raw(r, 2), (raw,))
    assert gradcheck(lambda r: band_logdet(spd_band_from_raw(r, 2)), (raw,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_logdet_gradient_is_band_of_inverse(backend):
    band = spd_band((3,), 9, 3, seed=6).requires_grad_(True)
    band_logdet(band, backend=backend).sum().backward()
    inv = torch.linalg.inv(dense_ref(band.detach()))
    ref = band_from_dense(inv, 3)
    ref[..., 1:] *= 2.0  # each stored off-diagonal entry stands for two entries of A
    torch.testing.assert_close(band.grad, ref, rtol=1e-12, atol=1e-12)


def test_solve_gradient_matches_dense_autograd():
    """Implicit gradients == torch autograd through a dense solve of band_to_dense(band)."""
    band0 = spd_band((2,), 8, 2, seed=12)
    b0, w = torch.randn(2, 8, dtype=D), torch.randn(2, 8, dtype=D)
    band, b = _req(band0, b0)
    (w * band_solve(band, b)).sum().backward()
    band_d, b_d = _req(band0, b0)
    xd = torch.linalg.solve(band_to_dense(band_d), b_d.unsqueeze(-1)).squeeze(-1)
    (w * xd).sum().backward()
    torch.testing.assert_close(band.grad, band_d.grad, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(b.grad, b_d.grad, rtol=1e-11, atol=1e-12)


# ----------------------------------------------------------------------- construction


def test_spd_band_from_raw_is_spd_with_that_factor():
    raw = torch.randn(4, 12, 4, dtype=D, generator=torch.Generator().manual_seed(0))
    Q = spd_band_from_raw(raw, 3)
    i = torch.arange(12)[:, None] >= torch.arange(4)
    L_ref = torch.where(i, raw, 0.0)
    L_ref[..., 0] = torch.nn.functional.softplus(raw[..., 0]) + 1e-6
    Ld = band_lower_to_dense(L_ref)
    torch.testing.assert_close(dense_ref(Q), Ld @ Ld.mT, rtol=1e-13, atol=1e-13)
    # that L is the Cholesky factor of Q
    torch.testing.assert_close(band_cholesky(Q), L_ref, rtol=1e-9, atol=1e-9)
    # SPD even for extreme raw values (diagonal floor eps)
    Q2 = spd_band_from_raw(torch.full((5, 2), -800.0, dtype=D), 1)
    assert torch.isfinite(band_logdet(Q2))


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_not_spd_names_batch_element(backend):
    band = spd_band((2, 3), 10, 2, seed=13)
    band[1, 2, 5, 0] = -4.0  # indefinite
    b = torch.randn(2, 3, 10, dtype=D)
    for fn in (lambda: band_solve(band, b, backend=backend), lambda: band_cholesky(band, backend=backend),
               lambda: band_logdet(band, backend=backend), lambda: band_sample(0.0, band, b, backend=backend)):
        with pytest.raises(NumericalError, match=r"batch index \(1, 2\).*not symmetric positive definite"):
            fn()
    with pytest.raises(NumericalError, match=r"batch index \(1, 2\)"):
        band_solve(band.requires_grad_(True), b, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_names_batch_element(backend):
    band = spd_band((4,), 10, 2, seed=14)
    b = torch.randn(4, 10, dtype=D)
    bad = band.clone()
    bad[2, 7, 1] = float("nan")
    with pytest.raises(NumericalError, match=r"batch index \(2,\) contains NaN"):
        band_solve(bad, b, backend=backend)
    with pytest.raises(NumericalError, match=r"batch index \(2,\) contains NaN"):
        band_logdet(bad, backend=backend)
    bb = b.clone()
    bb[3, 0] = float("nan")
    with pytest.raises(NumericalError, match=r"batch index \(3,\).*not finite"):
        band_solve(band, bb, backend=backend)


def test_input_errors():
    band = spd_band((2,), 5, 1)
    with pytest.raises(InputError, match="b must have shape"):
        band_solve(band, torch.zeros(2, 4, dtype=D))
    with pytest.raises(InputError, match="dtype"):
        band_solve(band, torch.zeros(2, 5, dtype=torch.float32))
    with pytest.raises(InputError, match="float32 or float64"):
        band_logdet(band.to(torch.int64))
    with pytest.raises(InputError, match="mask must be a bool"):
        band_map(0.0, band, torch.zeros(2, 5, dtype=D), torch.ones(2, 5), 1.0)
    with pytest.raises(InputError, match="R must be > 0"):
        band_map(0.0, band, torch.zeros(2, 5, dtype=D), torch.ones(2, 5, dtype=torch.bool), 0.0)
    with pytest.raises(InputError, match="raw must have shape"):
        spd_band_from_raw(torch.zeros(5, 3, dtype=D), 1)
    with pytest.raises(InputError, match="backend"):
        band_solve(band, torch.zeros(2, 5, dtype=D), backend="cuda")


@pytest.mark.gpu
def test_cuda_matches_cpu():
    band = spd_band((64,), 96, 6, seed=15)
    b = torch.randn(64, 96, dtype=D)
    x = band_solve(band.cuda(), b.cuda()).cpu()
    torch.testing.assert_close(x, band_solve(band, b), rtol=1e-10, atol=1e-11)
    assert math.isclose(float(band_logdet(band.cuda()).sum()), float(band_logdet(band).sum()), rel_tol=1e-12)


def _adversarial_raw(B=8, n=96, k=6, scale=1e3, seed=0):
    """Raw precision-network output with off-diagonals of L ``scale`` times larger than its
    floored diagonal (1e-2): L L^T is then numerically singular in float64."""
    raw = scale * 1e-2 * torch.randn(B, n, k + 1, dtype=D, generator=torch.Generator().manual_seed(seed))
    raw[..., 0] = -50.0  # softplus(-50) + 1e-2 = the diagonal floor
    return raw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e3, 1e8])
def test_ridge_keeps_adversarial_posterior_precision_factorisable(backend, scale):
    """Huge off-diagonals of L: without the relative ridge the posterior precision
    L L^T + H^T R^{-1} H fails Cholesky (the failure of a training run, issue 14); with it the
    Cholesky succeeds, its factor reproduces the dense Q + W, the MAP matches a dense solve, and
    the band is L L^T + ridge diag(L L^T) exactly."""
    n, k, ridge = 96, 6, 1e-6
    raw = _adversarial_raw(n=n, k=k, scale=scale)
    mask = torch.zeros(raw.shape[0], n, dtype=torch.bool)
    mask[:, ::24] = True
    y = torch.randn(raw.shape[0], n, dtype=D)
    mu = torch.randn(raw.shape[0], n, dtype=D)
    R = 0.0025
    with pytest.raises(NumericalError, match="positive definite"):
        band_map(mu, spd_band_from_raw(raw, k, eps=1e-2), y, mask, R, backend=backend)
    Q = spd_band_from_raw(raw, k, eps=1e-2, ridge=ridge)
    L = torch.where(torch.arange(n)[:, None] >= torch.arange(k + 1), raw, 0.0)
    L[..., 0] = torch.nn.functional.softplus(raw[..., 0]) + 1e-2
    Ld = band_lower_to_dense(L)
    LLt = Ld @ Ld.mT
    Qd = LLt + ridge * torch.diag_embed(torch.diagonal(LLt, dim1=-2, dim2=-1))
    torch.testing.assert_close(dense_ref(Q), Qd, rtol=1e-12, atol=1e-14 * float(Qd.abs().max()))
    W = torch.diag_embed(mask.to(D) / R)
    post = torch.cat([Q[..., :1] + (mask.to(D) / R).unsqueeze(-1), Q[..., 1:]], dim=-1)
    C = band_lower_to_dense(band_cholesky(post, backend=backend))
    scale_q = Qd.abs().amax(dim=(-1, -2), keepdim=True)
    assert float(((C @ C.mT - (Qd + W)).abs() / scale_q).max()) < 1e-10  # backward error (torch scan: 1.3e-11)
    # the MAP against a dense solve (LU, independent of Cholesky) of the diagonally scaled system,
    # whose conditioning the ridge bounds (about 1/ridge)
    x = band_map(mu, Q, y, mask, R, backend=backend)
    A = Qd + W
    rhs = (Qd @ mu.unsqueeze(-1)).squeeze(-1) + torch.where(mask, y, 0.0) / R
    s = torch.diagonal(A, dim1=-2, dim2=-1).rsqrt()
    ref = s * torch.linalg.solve(s.unsqueeze(-1) * A * s.unsqueeze(-2), (s * rhs).unsqueeze(-1)).squeeze(-1)
    err = float(((x - ref) / s.reciprocal()).abs().max() / (ref / s.reciprocal()).abs().max())
    assert err < 1e-7, err


def test_gradcheck_spd_band_from_raw_with_ridge():
    raw = torch.randn(2, 6, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    raw[..., 0] += 1.0
    raw.requires_grad_(True)
    assert gradcheck(lambda r: spd_band_from_raw(r, 2, ridge=1e-2), (raw,))
    assert gradcheck(lambda r: band_logdet(spd_band_from_raw(r, 2, ridge=1e-2)), (raw,))
    with pytest.raises(InputError, match="ridge"):
        spd_band_from_raw(raw.detach(), 2, ridge=-1.0)
