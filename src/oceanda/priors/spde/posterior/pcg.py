"""Posterior mean by CG on ``(Q + D) d = D (y - mu)`` preconditioned by the prior covariance.

``x = mu + d``, ``D = H^T R^{-1} H``. The preconditioner is the prior covariance
``M = L^{-1} Sigma L^{-T} ~ Q^{-1}`` (:meth:`~oceanda.priors.spde.precision.SPDEPrecision.
precondition`) and CG stops on the ``M``-norm of the residual, ``sqrt(r^T M r) <= rtol
sqrt(b^T M b)`` (with ``M = Q^{-1}`` exactly this is the residual of the whitened system of
:mod:`~oceanda.priors.spde.posterior.whitened`: the same iterations and stopping rule).
Because ``M`` only preconditions, it need not be exact, which buys three savings at no loss
of exactness (the operator ``Q + D`` is applied exactly by sparse products,
:meth:`~oceanda.priors.spde.precision.SPDEPrecision.apply`, no solve):

(i) the sweeps use single-precision factors (complex64 for the first-order factor: half the
memory traffic; double precision when ``rtol < 1e-7``, where the single-precision rounding
costs iterations); (ii) ``Q_0^{-1}`` is applied as ``(F^2 - I)^{-1} S`` through factors of
``A`` and ``I + (dt/2) A^alpha`` (exact when ``S^{-1} A`` is symmetric: isotropic or
symmetric ``H``, no advection, uniform ``tau``; otherwise ``Q_0``'s own factor), so
``Q_0``'s 25-point factor is never built; (iii) ``Q_0`` appears once per iteration instead
of twice. Flexible (Polak-Ribiere) updates absorb the single-precision rounding.

Several right-hand sides: column by column (:func:`~oceanda.linalg.sparse.batched_pcg`), or
with ``block`` the preconditioned block CG :func:`~oceanda.linalg.sparse.block_pcg` (Gram
matrices of the split variables from sparse ``Q`` products), ``block_size`` at a time
(``None``: about 10 arrays of ``T n block_size`` float64 in 1 GiB). ``hpc/bench/spde.py
--solver pcg`` times it.
"""

from __future__ import annotations

import numpy as np

from oceanda.linalg.sparse import CGInfo, batched_pcg, block_pcg
from oceanda.priors.spde.posterior.base import Options, Problem, solve_columns


def solve(problem: Problem, opts: Options) -> tuple[np.ndarray, CGInfo]:
    """Posterior means ``(k, T, ny, nx)`` by prior-preconditioned CG (module docstring)."""
    P = problem.prior
    Q = P.precision
    Ri, U, mu = problem.state_form()
    T, n, k = P.T, P.n, U.shape[-1]
    N = T * n
    rtol, maxiter = opts.rtol, opts.maxiter
    single = rtol >= 1e-7  # below, the single-precision rounding would cost iterations

    def matvec(v):
        V = v.reshape(T, n, -1)
        return (Q.apply(V) + Ri * V).reshape(v.shape)

    def prec(r):
        return Q.precondition(r.reshape(T, n, -1), single).reshape(r.shape)

    def metric(y):
        return Q.apply(y.reshape(T, n, -1)).reshape(y.shape)

    B = (Ri * U).reshape(N, k)
    if opts.block_size is None:  # memory: about 10 arrays of T n block_size float64
        bs = k if not opts.block else max(1, int(2**30 // (10 * 8 * N)))
    else:
        bs = max(1, int(opts.block_size))

    def cols(Bc):
        return batched_pcg(matvec, Bc, precond=prec, rtol=rtol, maxiter=maxiter,
                           norm="preconditioned", flexible=True)

    def blk(Bc):
        return block_pcg(matvec, Bc, precond=prec, metric=metric, rtol=rtol, maxiter=maxiter)

    X, info = solve_columns(B, bs, rtol, blk if opts.block else cols, cols)
    return problem.fields(X.reshape(T, n, k) + mu), info
