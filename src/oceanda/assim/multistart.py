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
"""

from __future__ import annotations

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
