"""Multi-start 4D-Var: the local minima reached from several starts, combined by the 4D-Var objective.

4D-Var from one start ends in one local minimum of its cost ``J``; where the posterior is
multimodal (Lorenz-63 observed sparsely: whole lobes of the attractor fit the observations
almost equally well) a single minimum can be a lobe away from the truth, and choosing the
lowest-cost minimum does not help when the wrong lobe costs as little as the right one. The
weak-constraint cost is the negative log posterior of the trajectory, ``p(x | y) ∝ exp(-J(x))``
(true model, Gaussian model and observation noise, Gaussian background), so the minima
``x_k`` found from ``K`` starts define a Laplace mixture

    p(x | y) ≈ sum_k pi_k N(x; x_k, G_k^{-1}),   pi_k ∝ exp(-J(x_k)) det(G_k)^{-1/2}

(``G_k`` the Gauss-Newton Hessian at ``x_k``: the curvature of ``J``; Laplace's method per
basin), whose mean ``sum_k pi_k x_k`` approximates the minimum-RMSE estimate ``E[x | y]``.
Starts that end in the same minimum count once (:func:`distinct_minima`: candidates closer
than ``tol`` in RMS to a kept one of lower cost are dropped). Everything is selected by the
4D-Var objective of each window, never by a reference. :func:`lowest_cost` is the plain
selection (the single minimum of lowest cost).

The Laplace mixture is an approximation of the posterior; :func:`importance_mean` corrects
it: with the mixture ``q`` (optionally widened, covariances ``c^2 G_k^{-1}``) as the proposal
of self-normalised importance sampling, ``E[x | y] ~ sum_m w_m x_m`` over draws ``x_m ~ q``
with ``w_m ∝ exp(-J(x_m)) / q(x_m)``: a consistent estimate of the posterior mean whose
target is exactly ``exp(-J)`` (Owen 2013, "Monte Carlo theory, methods and examples",
Ch. 9), reported with its effective sample size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from oceanda.errors import InputError, NumericalError


def _check(x: torch.Tensor, cost: torch.Tensor, valid: torch.Tensor | None):
    if x.dim() != 3 or cost.shape != x.shape[:2]:
        raise InputError(f"multistart: x must be (K, B, d) and cost (K, B), got {tuple(x.shape)}, "
                         f"{tuple(cost.shape)}")
    ok = torch.isfinite(cost) & torch.isfinite(x).all(-1)
    if valid is not None:
        ok &= valid
    return ok


def distinct_minima(x: torch.Tensor, cost: torch.Tensor, tol: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``keep`` ``(K, B)`` bool: per window ``b``, the candidates ``x[k, b]`` ``(K, B, d)``
    visited in increasing ``cost[k, b]``, each kept when valid (finite, and ``valid`` where
    given) and farther than ``tol`` (root-mean-square over ``d``) from every candidate kept
    before it. The lowest-cost valid candidate is always kept; at least one per window when
    any is valid."""
    ok = _check(x, cost, valid)
    order = torch.where(ok, cost, torch.inf).argsort(0)  # (K, B), invalid last
    b = torch.arange(x.shape[1], device=x.device)
    keep_sorted = torch.zeros_like(ok)
    for a in range(x.shape[0]):
        xa = x[order[a], b]  # (B, d)
        fresh = ok[order[a], b].clone()
        for j in range(a):
            dist = (xa - x[order[j], b]).pow(2).mean(-1).sqrt()
            fresh &= ~(keep_sorted[j] & (dist <= tol))
        keep_sorted[a] = fresh
    keep = torch.zeros_like(ok)
    keep.scatter_(0, order, keep_sorted)
    return keep


def lowest_cost(x: torch.Tensor, cost: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, d)``: per window the candidate of lowest cost among the valid ones."""
    ok = _check(x, cost, valid)
    if not bool(ok.any(0).all()):
        raise NumericalError("multistart: a window has no valid candidate (every start non-finite)")
    k = torch.where(ok, cost, torch.inf).argmin(0)
    return x[k, torch.arange(x.shape[1], device=x.device)]


def laplace_weights(cost: torch.Tensor, logdet: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``pi`` ``(K, B)``: ``exp(-cost - logdet / 2)`` over the kept minima of each window,
    normalised to 1 (0 for the others); ``logdet`` ``(K, B)`` the log-determinant of the
    Hessian of the cost at each minimum."""
    if not bool(keep.any(0).all()):
        raise NumericalError("multistart: a window has no kept minimum")
    lw = torch.where(keep, -cost - 0.5 * logdet, -torch.inf)
    return torch.softmax(lw, 0)


def laplace_mixture_mean(x: torch.Tensor, cost: torch.Tensor, logdet: torch.Tensor, keep: torch.Tensor):
    """``(mean (B, d), pi (K, B))``: the mean of the Laplace mixture of the kept minima
    (module docstring)."""
    pi = laplace_weights(cost, logdet, keep)
    return (pi.unsqueeze(-1) * torch.where(keep.unsqueeze(-1), x, torch.zeros_like(x))).sum(0), pi


def importance_mean(x: torch.Tensor, hessian: torch.Tensor, logdet: torch.Tensor, pi: torch.Tensor,
                    log_target: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n_samples: int,
                    generator: torch.Generator | None = None, widen: float = 1.0,
                    max_rows: int = 1 << 14) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-normalised importance sampling of the mean of ``p(x) ∝ exp(log_target(x))`` per
    window, with the Laplace mixture ``q(x) = sum_k pi_k N(x; x_k, widen^2 G_k^{-1})`` as the
    proposal (module docstring).

    ``x`` ``(K, B, d)`` component means (the minima), ``hessian`` ``(K, B, d, kb+1)`` their
    precisions ``G_k`` (row-lower bands), ``logdet`` ``(K, B)`` = ``log det G_k``, ``pi``
    ``(K, B)`` mixture weights (0 for components not used, each column summing to 1);
    ``log_target(xs, b)`` the unnormalised log density of draws ``xs`` ``(R, d)`` of windows
    ``b`` ``(R,)`` (e.g. ``-J``). ``n_samples`` draws per window, evaluated ``max_rows`` at a
    time. Returns ``(mean (B, d), ess (B,))``, ``ess = 1 / sum_m w_m^2`` (``n_samples`` when
    the proposal is the target). Raises :class:`NumericalError` for a window none of whose
    draws has a finite target density.
    """
    from oceanda.linalg import band_matvec, band_sample

    K, B, d = x.shape
    if hessian.shape[:3] != (K, B, d) or logdet.shape != (K, B) or pi.shape != (K, B):
        raise InputError(f"importance_mean: shapes x {tuple(x.shape)}, hessian {tuple(hessian.shape)}, "
                         f"logdet {tuple(logdet.shape)}, pi {tuple(pi.shape)} do not match")
    if n_samples < 1 or not widen > 0:
        raise InputError(f"importance_mean: n_samples must be >= 1 and widen > 0, got {n_samples}, {widen}")
    use = pi > 0
    logpi = torch.where(use, pi, 1.0).log()
    mean = torch.empty(B, d, dtype=x.dtype, device=x.device)
    ess = torch.empty(B, dtype=x.dtype, device=x.device)
    per = max(1, max_rows // n_samples)
    for lo in range(0, B, per):
        b = torch.arange(lo, min(B, lo + per), device=x.device)
        nb = b.numel()
        comp = torch.multinomial(pi[:, b].T, n_samples, replacement=True, generator=generator)  # (nb, M)
        bb = b.unsqueeze(1).expand(nb, n_samples)
        z = torch.randn(nb, n_samples, d, generator=generator, dtype=x.dtype, device=x.device)
        xs = band_sample(x[comp, bb], hessian[comp, bb], widen * z)  # (nb, M, d)
        # log q(xs) up to the constant -d/2 log(2 pi) (it cancels in the normalisation)
        terms = []
        for k in range(K):
            diff = xs - x[k, b].unsqueeze(1)
            quad = (diff * band_matvec(hessian[k, b].unsqueeze(1), diff)).sum(-1) / widen ** 2
            t = logpi[k, b].unsqueeze(1) + 0.5 * logdet[k, b].unsqueeze(1) - d * math.log(widen) - 0.5 * quad
            terms.append(torch.where(use[k, b].unsqueeze(1), t, -torch.inf))
        logq = torch.logsumexp(torch.stack(terms), 0)
        lp = log_target(xs.reshape(nb * n_samples, d), bb.reshape(-1)).reshape(nb, n_samples)
        lw = torch.where(torch.isfinite(lp), lp - logq, -torch.inf)
        dead = ~torch.isfinite(lw).any(-1)
        if bool(dead.any()):
            raise NumericalError(f"importance_mean: no draw of window {int(b[dead][0])} has a finite target density")
        w = torch.softmax(lw, -1)
        mean[b] = (w.unsqueeze(-1) * xs).sum(1)
        ess[b] = 1.0 / w.pow(2).sum(-1)
    return mean, ess
