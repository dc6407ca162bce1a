"""Posterior-mean solvers of an SPDE prior: one module each, one interface, one registry.

Every solver returns the exact posterior means ``(Q + D)^{-1} (Q mu + D y)``
(``D = H^T R^{-1} H``) of the right-hand sides of a :class:`~.base.Problem`, differing in
how (:mod:`.base` states the interface):

==============  ===========================================================================
``spectral``    representer CG with the exact spectral covariance (separable priors only)
``pcg``         CG on ``Q + D`` preconditioned by single-precision prior sweeps
``whitened``    (block) CG on the whitened system ``I + W^T D W``
``two_level``   PCG on ``Q + D`` with a coarse space-time space (``coarse=(h, ht)``)
``direct``      one sparse LDL^T of ``Q + D`` (small windows, reference)
==============  ===========================================================================

``"auto"`` is :func:`choose`.
"""

from __future__ import annotations

import numpy as np

from oceanda.errors import ConfigError, InputError
from oceanda.linalg.sparse import CGInfo
from oceanda.priors.spde.posterior import direct, pcg, spectral, two_level, whitened
from oceanda.priors.spde.posterior.base import Options, Problem, Solver

__all__ = ["SOLVERS", "Options", "Problem", "Solver", "choose", "solve_posterior"]

SOLVERS: dict[str, Solver] = {
    "spectral": spectral.solve,
    "pcg": pcg.solve,
    "whitened": whitened.solve,
    "two_level": two_level.solve,
    "direct": direct.solve,
}


def choose(prior, k: int, opts: Options) -> str:
    """The solver ``"auto"`` picks: ``two_level`` when ``coarse`` is given, else
    ``spectral`` for a separable prior, else ``pcg`` for one right-hand side (or several with
    ``block=False``) and ``whitened`` (block CG) for several."""
    if opts.coarse is not None:
        return "two_level"
    if prior.precision.spectrum() is not None:
        return "spectral"
    return "pcg" if (k == 1 or not opts.block) else "whitened"


def solve_posterior(prior, y, mask, R, *, solver: str = "auto", **options
                    ) -> tuple[np.ndarray, CGInfo]:
    """Validate the inputs, pick the solver (``"auto"``: :func:`choose`) and run it.

    Args:
        prior: an :class:`~oceanda.priors.spde.prior.SPDEPrior`.
        y: ``(T, ny, nx)`` or ``(k, T, ny, nx)`` observations (read where ``mask``).
        mask: ``(T, ny, nx)`` bool.
        R: observation-error variance, scalar or ``(T, ny, nx)`` (> 0 where observed).
        solver: a key of :data:`SOLVERS` or ``"auto"``.
        options: the fields of :class:`~.base.Options`.
    Returns:
        means of the shape of ``y`` (float64) and the :class:`CGInfo`.
    """
    y = np.asarray(y, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    grid = (prior.T, *prior.shape)
    if mask.shape != grid:
        raise InputError(f"mask must be (T, ny, nx) = {grid}, got {mask.shape}")
    single = y.ndim == 3
    Y = y[None] if single else y
    if Y.shape[1:] != grid:
        raise InputError(f"y must end with (T, ny, nx) = {grid}, got {y.shape}")
    Rv = np.broadcast_to(np.asarray(R, dtype=np.float64), grid)
    if not np.all(Rv[mask] > 0):
        raise InputError("observation-error variance R must be > 0")
    if solver != "auto" and solver not in SOLVERS:
        raise ConfigError(f"posterior_mean: solver must be 'auto' or one of "
                          f"{', '.join(map(repr, SOLVERS))}, got {solver!r}")
    opts = Options(**options)
    if opts.coarse is not None and solver not in ("auto", "two_level"):
        raise ConfigError(f"posterior_mean: coarse= is the option of solver='two_level', "
                          f"not {solver!r}")
    name = choose(prior, Y.shape[0], opts) if solver == "auto" else solver
    if opts.device is not None and name != "spectral":
        raise ConfigError("posterior_mean: device= runs the spectral solver only (a "
                          "separable prior); the sparse solvers are CPU")
    X, info = SOLVERS[name](Problem(prior, Y, mask, Rv), opts)
    return (X[0] if single else X), info
