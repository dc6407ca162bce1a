"""Posterior mean by CG on the whitened normal equations.

In the whitened variable ``v`` (``x = mu + W v``, ``W = L^{-1} Sigma^{1/2}``,
:meth:`~oceanda.priors.spde.precision.SPDEPrecision.whiten`)::

    (I + W^T H^T R^{-1} H W) v = W^T H^T R^{-1} (y - H mu)

whose matrix has eigenvalues in ``[1, 1 + max prior variance / R]`` (well conditioned: the
prior acts as an exact preconditioner). Each iteration is one forward and one backward sweep
(``2 (T-1)`` sparse triangular solve pairs with the ``F_k`` factors, factorised once). Stops
at ``||r|| <= rtol ||b||`` on that system. Several right-hand sides: block CG
(:func:`~oceanda.linalg.sparse.block_cg`: the search space grows by ``k`` directions per
iteration, so Matheron ensembles need far fewer sweeps) or column by column, ``block_size``
at a time (``None``: about 8 arrays of ``T n block_size`` float64 in 1 GiB).
"""

from __future__ import annotations

import numpy as np

from oceanda.linalg.sparse import CGInfo, batched_pcg, block_cg
from oceanda.priors.spde.posterior.base import Options, Problem, solve_columns


def solve(problem: Problem, opts: Options) -> tuple[np.ndarray, CGInfo]:
    """Posterior means ``(k, T, ny, nx)`` by CG on the whitened system (module docstring)."""
    P = problem.prior
    Q = P.precision
    Ri, U, mu = problem.state_form()
    T, n, k = P.T, P.n, U.shape[-1]
    rtol, maxiter = opts.rtol, opts.maxiter
    b = Q.whiten_t(Ri * U)
    shp = b.shape

    def matvec(v):
        V = v.reshape(T, n, v.shape[-1])
        return (V + Q.whiten_t(Ri * Q.whiten(V))).reshape(v.shape)

    if opts.block_size is None:
        bs = max(1, int(2**30 // (8 * 8 * T * n)))
    else:
        bs = max(1, int(opts.block_size))
    cols = lambda Bc: batched_pcg(matvec, Bc, rtol=rtol, maxiter=maxiter)  # noqa: E731
    v, info = solve_columns(
        b.reshape(-1, k), bs, rtol,
        (lambda Bc: block_cg(matvec, Bc, rtol=rtol, maxiter=maxiter)) if opts.block else cols,
        cols)
    return problem.fields(Q.whiten(v.reshape(shp)) + mu), info
