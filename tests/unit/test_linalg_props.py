"""Property tests (hypothesis) of the banded kernels over random bands, batches and masks.

Each example draws a batch shape, size n, bandwidth k, a random SPD band, a per-sample
observation mask (rows forced all-observed / none-observed when drawn) and checks the
kernels against dense torch.linalg references on both back-ends.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oceanda.linalg import band_kalman, band_logdet, band_map, band_matvec, band_sample, band_solve, band_to_dense

D = torch.float64
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    batch = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=2)))
    n = draw(st.integers(1, 24))
    k = draw(st.integers(0, 7))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    # SPD: B B^T + c I restricted to a band is not SPD in general, so build from a factor
    Lraw = rng.normal(size=(*batch, n, k + 1))
    Lraw[..., 0] = 0.5 + np.abs(Lraw[..., 0])
    L = np.zeros((*batch, n, n))
    for i in range(n):
        for j in range(min(i, k) + 1):
            L[..., i, i - j] = Lraw[..., i, j]
    A = L @ np.swapaxes(L, -1, -2)
    band = np.zeros((*batch, n, k + 1))
    for i in range(n):
        for j in range(min(i, k) + 1):
            band[..., i, j] = A[..., i, i - j]
    density = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    mask = rng.random((*batch, n)) < density
    if batch and draw(st.booleans()):  # one sample all observed, another none observed
        flat = mask.reshape(-1, n)
        flat[0] = True
        flat[-1] = False
    R = 0.1 + rng.random((*batch, n))
    return (torch.tensor(band, dtype=D), torch.tensor(A, dtype=D), torch.tensor(mask), torch.tensor(R, dtype=D),
            torch.tensor(rng.normal(size=(*batch, n)), dtype=D), torch.tensor(rng.normal(size=(*batch, n)), dtype=D))


def rel_err(x, ref):
    return float((x - ref).abs().max() / (ref.abs().max() + 1e-300))


@SETTINGS
@given(problems(), st.sampled_from(["numba", "torch"]))
def test_solve_logdet_matvec(prob, backend):
    band, A, _, _, b, _ = prob
    cond = float(torch.linalg.cond(A).max()) if A.numel() else 1.0
    x = band_solve(band, b, backend=backend)
    ref = torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)
    assert rel_err(x, ref) < 1e-13 * cond + 1e-12
    assert rel_err(band_matvec(band, x), b) < 1e-13 * cond + 1e-12
    torch.testing.assert_close(band_logdet(band, backend=backend), torch.logdet(A), rtol=1e-10, atol=1e-9 * cond**0.5)
    torch.testing.assert_close(band_to_dense(band), A)


@SETTINGS
@given(problems(), st.sampled_from(["numba", "torch"]))
def test_solve_gradients_vs_dense_autograd(prob, backend):
    """Implicit gradients of sum(w * A^{-1} b) w.r.t. band and b == torch autograd through a
    dense solve (batches of 4+ systems take the numba tiled backward)."""
    band0, A, _, _, b0, w = prob
    band, b = band0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    (w * band_solve(band, b, backend=backend)).sum().backward()
    band_d, b_d = band0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    (w * torch.linalg.solve(band_to_dense(band_d), b_d.unsqueeze(-1)).squeeze(-1)).sum().backward()
    cond = float(torch.linalg.cond(A).max()) if A.numel() else 1.0
    assert rel_err(band.grad, band_d.grad) < 1e-13 * cond**2 + 1e-11
    assert rel_err(b.grad, b_d.grad) < 1e-13 * cond + 1e-12


@SETTINGS
@given(problems(), st.sampled_from(["numba", "torch"]))
def test_map_kalman_vs_dense(prob, backend):
    band, A, mask, R, mu, y = prob
    n = A.shape[-1]
    W = torch.diag_embed(torch.where(mask, 1.0 / R, 0.0))  # H^T R^{-1} H
    rhs = (A @ mu.unsqueeze(-1)).squeeze(-1) + torch.where(mask, y / R, 0.0)
    ref = torch.linalg.solve(A + W, rhs.unsqueeze(-1)).squeeze(-1)
    x = band_map(mu, band, torch.where(mask, y, float("nan")), mask, R, backend=backend)
    cond = float(torch.linalg.cond(A + W).max()) if n else 1.0
    assert rel_err(x, ref) < 1e-12 * cond + 1e-11
    # Kalman form with the covariance P = A (the same band read as a covariance), with an
    # explicit m x n selection H per sample: x = mu + P H^T (H P H^T + R)^{-1} (y - H mu)
    xk = band_kalman(mu, band, y, mask, R, backend=backend)
    Pf, muf, yf, mf, Rf = A.reshape(-1, n, n), mu.reshape(-1, n), y.reshape(-1, n), mask.reshape(-1, n), R.reshape(-1, n)
    for s, xs in enumerate(xk.reshape(-1, n)):
        H = torch.eye(n, dtype=D)[mf[s]]
        S = H @ Pf[s] @ H.T + torch.diag(Rf[s][mf[s]])
        ref_k = muf[s] + Pf[s] @ H.T @ torch.linalg.solve(S, yf[s][mf[s]] - H @ muf[s])
        cond_s = float(torch.linalg.cond(S)) if S.numel() else 1.0
        assert rel_err(xs, ref_k) < 1e-12 * cond_s * float(torch.linalg.cond(Pf[s])) ** 0.5 + 1e-11
    # unobserved samples keep the prior mean in both forms
    none = ~mask.any(dim=-1)
    torch.testing.assert_close(x[none], mu[none])
    torch.testing.assert_close(xk[none], mu[none])


@SETTINGS
@given(problems(), st.sampled_from(["numba", "torch"]))
def test_sample_is_whitening_inverse(prob, backend):
    """L^T (x - mu) = z, i.e. (x - mu)^T Q (x - mu) = |z|^2 for x = band_sample(mu, Q, z)."""
    band, A, _, _, mu, z = prob
    x = band_sample(mu, band, z, backend=backend)
    d = (x - mu).unsqueeze(-1)
    quad = (d.mT @ A @ d).squeeze(-1).squeeze(-1)
    cond = float(torch.linalg.cond(A).max()) if A.numel() else 1.0  # rounding grows with cond(A)
    torch.testing.assert_close(quad, (z * z).sum(-1), rtol=1e-13 * cond + 1e-10, atol=1e-10)
