"""Posterior mean in observation space with the exact spectral prior covariance.

For a separable prior (:meth:`~oceanda.priors.spde.precision.SPDEPrecision.spectrum`: no
land, parameters constant in time and along rows, isotropic, no advection, stationary initial
state; e.g. any open-ocean patch of a regular lon/lat grid) the prior covariance is applied
exactly in the prior's modes, ``Sigma = Q^{-1} = S^{1/2} U W W^T U^T S^{1/2}`` (``U`` = DCT in
``x`` then per-mode eigenvectors in ``y``, ``W`` per-mode bidiagonal in time;
:mod:`oceanda.priors.spde.spectral`): two DCTs and two batched ``ny x ny`` products, nothing
factorised. The solve is in observation space (the representer form, Bennett 1992)::

    x = mu + Sigma H^T R^{-1/2} w,
    (I + R^{-1/2} H Sigma H^T R^{-1/2}) w = R^{-1/2} (y - H mu)

by CG on ``m``-vectors (``m`` observations; the matrix has the eigenvalues of the whitened
system above 1, so the same convergence), stopping at ``||r|| <= rtol ||b||`` on that system.
With several right-hand sides block CG (``block``) costs ``O(m k^2)`` per iteration beyond the
``k`` covariance products, so Matheron ensembles solve all ``N + 1`` right-hand sides in one
block (``block_size=None``); the products go through the transforms ``2^28 / (8 T n)``
columns at a time. ``device``: the covariance products run in torch there
(:class:`~oceanda.priors.spde.spectral.TorchSeparableSpectrum`, e.g. ``"cuda"``); the CG on
the ``m``-vectors is the same. ``hpc/bench/spde.py`` times it against the sparse solvers.
"""

from __future__ import annotations

import numpy as np
import torch

from oceanda.errors import ConfigError
from oceanda.linalg.sparse import CGInfo, batched_pcg, block_cg
from oceanda.priors.spde.posterior.base import Options, Problem, solve_columns
from oceanda.priors.spde.spectral import TorchSeparableSpectrum


def solve(problem: Problem, opts: Options) -> tuple[np.ndarray, CGInfo]:
    """Posterior means ``(k, T, ny, nx)`` in the representer form (module docstring)."""
    prior = problem.prior
    spec = prior.precision.spectrum()
    if spec is None:
        raise ConfigError("posterior_mean: solver='spectral' needs a separable prior (no "
                          "land, stationary init, isotropic diffusion, no advection, "
                          "parameters constant in time and along rows)")
    Y, mask, Rv, device = problem.Y, problem.mask, problem.Rv, opts.device
    rtol, maxiter, block = opts.rtol, opts.maxiter, opts.block
    T, n, k = prior.T, prior.n, Y.shape[0]
    ny, nx = prior.shape
    mean = prior._mean_np().reshape(T, ny, nx)
    # representer form: x - mu = Sigma H^T R^{-1/2} w, (I + B B^T) w = R^{-1/2} (y - H mu),
    # B = R^{-1/2} H S^{1/2} U W (m x T n): CG on m-vectors, so block CG with many
    # right-hand sides costs O(m k^2), not O(T n k^2)
    obs = np.flatnonzero(mask.reshape(-1))
    m = obs.size
    X = np.empty((k, T, ny, nx))
    X[:] = mean[None]
    if m == 0:
        return X, CGInfo(0, np.zeros(k), True)
    rs = 1.0 / np.sqrt(Rv.reshape(-1)[obs])[:, None]  # R^{-1/2} per observation
    # S^{1/2} per cell
    sq = np.sqrt(prior._sk(0).detach().to("cpu", torch.float64).numpy().reshape(-1))
    coef = rs * sq[obs % n][:, None]  # S^{1/2} H^T R^{-1/2}: one value per observation
    chunk = max(1, int(2**28 // (8 * T * n)))  # columns per transform (~256 MB arrays)
    ot, oi, oj = obs // n, (obs % n) // nx, obs % nx
    xo = (oj * ny + oi) * T + ot  # the observations' rows in the x-major layout
    if device is None:
        work: dict = {}  # buffers reused by every product

        def core(w):  # U Qhat^{-1} U^T S^{1/2} H^T R^{-1/2} w, x-major (nx, ny, T, c)
            P = work.get("P")
            if P is None or P.shape[1] != w.shape[1]:
                P = work["P"] = np.zeros((nx * ny * T, w.shape[1]))
            else:
                P.fill(0.0)
            P[xo] = coef * w
            # may share memory with P: every caller consumes it before the next product
            return spec.covariance_xmajor(P.reshape(nx, ny, T, -1), work)

        def at_obs(F):  # (m, c) values of x-major fields at the observations
            return F.reshape(-1, F.shape[-1])[xo]

        to_np = np.asarray
    else:
        ts = TorchSeparableSpectrum(spec, device=device)
        xo_t = torch.as_tensor(xo, device=ts.device)

        def core(w):  # the same on the device (fields stay there)
            P = torch.zeros((nx * ny * T, w.shape[1]), dtype=ts.dtype, device=ts.device)
            P[xo_t] = torch.as_tensor(coef * w, dtype=ts.dtype, device=ts.device)
            return ts.covariance_xmajor(P.reshape(nx, ny, T, -1))

        def at_obs(F):  # gathered on the device: only m values per column come back
            return F.reshape(-1, F.shape[-1])[xo_t].cpu().numpy()

        def to_np(F):
            return F.cpu().numpy()

    def matvec(w):
        out = np.empty_like(w)
        for c0 in range(0, w.shape[1], chunk):
            wc = w[:, c0:c0 + chunk]
            out[:, c0:c0 + chunk] = wc + coef * at_obs(core(wc))
        return out

    c = rs * (Y.reshape(k, T * n)[:, obs] - mean.reshape(-1)[obs]).T  # (m, k)
    bs = k if opts.block_size is None else max(1, int(opts.block_size))
    cols = lambda Bc: batched_pcg(matvec, Bc, rtol=rtol, maxiter=maxiter)  # noqa: E731
    Wsol, info = solve_columns(
        c, bs, rtol,
        (lambda Bc: block_cg(matvec, Bc, rtol=rtol, maxiter=maxiter)) if block else cols, cols)
    sqf = sq.reshape(ny, nx)
    for c0 in range(0, k, chunk):
        X[c0:c0 + chunk] += to_np(core(Wsol[:, c0:c0 + chunk])).transpose(3, 2, 1, 0) * sqf
    return X, info
