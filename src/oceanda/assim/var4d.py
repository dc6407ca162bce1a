"""Weak-constraint 4D-Var by Gauss-Newton with Levenberg-Marquardt damping and line search.

Trajectory ``x`` ``(B, T, phi)`` (time-major, ``d = T*phi``), observations ``y`` with a
boolean ``mask`` of the same shape (``H`` a selection, varying per sample). The cost is

    J(x) = 1/2 |x_0 - xb|^2_{B^{-1}}
         + 1/2 sum_{t=1}^{T-1} |x_t - m(x_{t-1})|^2_{Qm^{-1}}
         + 1/2 sum_{observed} (x - y)^2 / R

(background on the first state, model-error term with the system's model-noise covariance
``Qm``, observation term; Tremolet 2007, Fisher et al. 2012; Blanke et al. 2024 Alg. 1).
With a :class:`MixtureBackground` the first term is ``-log sum_k w_k N(x_0; m_k, C_k)`` (plus a
constant that makes one component the Gaussian term above): a background that can follow a
multimodal climatology (the two lobes of Lorenz-63). Its Gauss-Newton block is the
responsibility-weighted precision ``sum_k r_k C_k^{-1}`` (``r_k`` the posterior probabilities of
the components at ``x_0``): the curvature of the EM bound of the term, positive definite.
Each Gauss-Newton step solves ``(G + lambda diag(G)) delta = -grad J`` where
``G = J_r^T J_r`` is the Gauss-Newton Hessian: block-tridiagonal in time (blocks
``phi x phi``), stored as a row-lower band with ``2*phi - 1`` sub-diagonals and solved by
:func:`oceanda.linalg.band_solve` (``G^{-1} b`` by banded Cholesky). A backtracking
(Armijo) line search on ``J`` follows; ``lambda`` is updated from the gain ratio
(actual / predicted decrease). With a linear model the first undamped step is the exact
Kalman smoother (Fisher et al. 2005, Bell & Cathey 1993).

Stopping, per window, after an accepted step: the Gauss-Newton model predicted a decrease
of ``J`` below ``decrement_tol`` for that step (``J`` is then within about ``decrement_tol``
of a local minimum: the analogue of the paper's "until the objective becomes lower than
0.05", whose absolute threshold has no meaning for our unnormalised cost), or a relative
decrease ``(J_k - J_{k+1}) < ftol J_{k+1}``, or ``J < cost_tol`` (when set); or
``max_iter``. The number of Gauss-Newton systems solved per window is returned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from oceanda.errors import InputError, NumericalError
from oceanda.priors.empirical import block_tridiagonal_to_band, markov_precision_blocks

StepJac = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Var4DResult:
    """Output of :meth:`WeakConstraint4DVar.solve`.

    ``x`` ``(B, T, phi)`` estimate; ``iters`` ``(B,)`` Gauss-Newton systems solved;
    ``cost`` ``(B,)`` final ``J``; ``converged`` ``(B,)`` stopped by a tolerance (not by
    ``max_iter``); ``history`` list of ``(B,)`` costs, entry ``k`` after ``k`` iterations
    (``nan`` once a window has stopped).
    """

    x: torch.Tensor
    iters: torch.Tensor
    cost: torch.Tensor
    converged: torch.Tensor
    history: list[torch.Tensor] = field(default_factory=list)


class MixtureBackground:
    """Gaussian-mixture background ``p(x_0) = sum_k w_k N(m_k, C_k)`` of 4D-Var (module docstring).

    ``weights`` ``(K,)`` (positive, normalised here), ``means`` ``(K, phi)``, ``covs`` ``(K, phi, phi)``
    (symmetric positive definite). :meth:`fit` estimates one from samples by EM.
    """

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, covs: torch.Tensor):
        K = weights.shape[0]
        if weights.dim() != 1 or means.dim() != 2 or means.shape[0] != K or covs.shape != (K, means.shape[1],
                                                                                              means.shape[1]):
            raise InputError(f"MixtureBackground: shapes weights {tuple(weights.shape)}, means {tuple(means.shape)}, "
                             f"covs {tuple(covs.shape)} are not (K,), (K, phi), (K, phi, phi)")
        if not bool((weights > 0).all()) or not bool(torch.isfinite(weights).all()):
            raise InputError(f"MixtureBackground: weights must be finite and > 0, got {weights.tolist()}")
        L, info = torch.linalg.cholesky_ex(covs.double())
        if bool((info != 0).any()):
            raise InputError("MixtureBackground: a component covariance is not positive definite")
        self.log_w = (weights / weights.sum()).double().log()
        self.means = means.double()
        self.chol = L  # Cholesky factors of the covariances
        self.prec = torch.cholesky_inverse(L)
        self.half_logdet = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)  # 1/2 log det C_k
        # so that one component gives exactly the Gaussian term 1/2 |x_0 - m|^2_{C^-1}
        self.offset = torch.logsumexp(self.log_w - self.half_logdet, 0)

    @property
    def phi(self) -> int:
        return self.means.shape[1]

    def _log_terms(self, x0: torch.Tensor):
        kw = dict(dtype=x0.dtype, device=x0.device)
        e = x0.unsqueeze(-2) - self.means.to(**kw)  # (B, K, phi)
        Pe = torch.einsum("kij,bkj->bki", self.prec.to(**kw), e)
        lt = (self.log_w - self.half_logdet).to(**kw) - 0.5 * (e * Pe).sum(-1)  # (B, K)
        return lt, Pe

    def cost(self, x0: torch.Tensor) -> torch.Tensor:
        """``-log p(x_0)`` up to the constant (module docstring), ``(B,)`` for ``x0`` ``(B, phi)``."""
        lt, _ = self._log_terms(x0)
        return self.offset.to(x0.dtype) - torch.logsumexp(lt, -1)

    def gradient_and_block(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient ``sum_k r_k C_k^{-1} (x_0 - m_k)`` ``(B, phi)`` and Gauss-Newton block
        ``sum_k r_k C_k^{-1}`` ``(B, phi, phi)``."""
        lt, Pe = self._log_terms(x0)
        r = torch.softmax(lt, -1)
        return (r.unsqueeze(-1) * Pe).sum(-2), torch.einsum("bk,kij->bij", r, self.prec.to(x0.dtype))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws ``(n, phi)`` of the mixture (float64): a component by its weight, then its Gaussian."""
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.phi, 1, generator=generator, dtype=torch.float64)
        return self.means[k] + (self.chol[k] @ z).squeeze(-1)

    @classmethod
    def fit(cls, x: torch.Tensor, n_components: int, iters: int = 200, seed: int = 0,
            reg: float = 1e-6, tol: float = 1e-10) -> MixtureBackground:
        """Maximum-likelihood mixture of ``n_components`` full-covariance Gaussians to samples
        ``x`` ``(N, phi)`` by EM (float64; means started at distinct random samples; ``reg``
        times the samples' mean variance added to each covariance; stops when the mean
        log-likelihood gains less than ``tol``)."""
        x = x.double()
        N, phi = x.shape
        K = int(n_components)
        if K < 1 or N < K * (phi + 1):
            raise InputError(f"MixtureBackground.fit: {N} samples are too few for {K} components in {phi} dims")
        g = torch.Generator().manual_seed(seed)
        means = x[torch.randperm(N, generator=g)[:K]].clone()
        eye = torch.eye(phi, dtype=torch.float64) * (reg * float(x.var(0).mean()))
        covs = torch.cov(x.T).expand(K, phi, phi).clone() + eye
        w = torch.full((K,), 1.0 / K, dtype=torch.float64)
        prev = -float("inf")
        for _ in range(iters):
            m = cls(w, means, covs)
            lt, _ = m._log_terms(x)
            ll = float((torch.logsumexp(lt, -1) - 0.5 * phi * torch.log(torch.tensor(2 * torch.pi))).mean())
            r = torch.softmax(lt, -1)  # (N, K)
            nk = r.sum(0).clamp_min(1e-12)
            w = nk / N
            means = (r.T @ x) / nk[:, None]
            e = x.unsqueeze(1) - means  # (N, K, phi)
            covs = torch.einsum("nk,nki,nkj->kij", r, e, e) / nk[:, None, None] + eye
            if ll - prev < tol:
                break
            prev = ll
        return cls(w, means, covs)


class WeakConstraint4DVar:
    """Weak-constraint 4D-Var on windows of ``T`` states of a ``phi``-dimensional model.

    Parameters
    ----------
    step_and_jacobian: ``x (..., phi) -> (m(x), dm/dx (..., phi, phi))``, the model step
        and its tangent-linear matrix (e.g. :func:`oceanda.dynamics.lorenz63.step_and_jacobian`).
    model_noise_cov: ``Qm`` ``(phi, phi)``.
    obs_var: ``R``, scalar or ``(phi,)`` (per component) observation-error variance.
    background_mean, background_cov: ``xb`` ``(phi,)`` and ``B`` ``(phi, phi)`` for ``x_0``.
    background: a :class:`MixtureBackground` that replaces the Gaussian one (module docstring).
    max_iter, ftol, cost_tol, decrement_tol: stopping rules (module docstring).
    lm_init: initial Levenberg-Marquardt ``lambda`` (relative to ``diag(G)``); ``0`` and
        ``adaptive=False`` give plain Gauss-Newton.
    """

    def __init__(
        self,
        step_and_jacobian: StepJac,
        model_noise_cov: torch.Tensor,
        obs_var: float | torch.Tensor,
        background_mean: torch.Tensor,
        background_cov: torch.Tensor,
        max_iter: int = 50,
        ftol: float = 1e-8,
        cost_tol: float | None = None,
        decrement_tol: float | None = 0.05,
        lm_init: float = 1e-3,
        lm_min: float = 1e-9,
        lm_max: float = 1e6,
        adaptive: bool = True,
        line_search_steps: int = 12,
        background: MixtureBackground | None = None,
    ):
        phi = model_noise_cov.shape[-1]
        if background_cov.shape != (phi, phi) or background_mean.shape != (phi,):
            raise InputError(f"WeakConstraint4DVar: background shapes {tuple(background_mean.shape)}, "
                             f"{tuple(background_cov.shape)} do not match phi={phi}")
        if max_iter < 1:
            raise InputError(f"WeakConstraint4DVar: max_iter must be >= 1, got {max_iter}")
        self.model = step_and_jacobian
        self.phi = phi
        self.Qm_inv = torch.linalg.inv(model_noise_cov)
        self.B_inv = torch.linalg.inv(background_cov)
        self.xb = background_mean
        if background is not None and background.phi != phi:
            raise InputError(f"WeakConstraint4DVar: the mixture background has phi={background.phi}, the model {phi}")
        self.background = background
        self.R = obs_var.detach().clone() if torch.is_tensor(obs_var) else torch.tensor(float(obs_var), dtype=torch.float64)
        self.max_iter = max_iter
        self.ftol = ftol
        self.cost_tol = cost_tol
        self.decrement_tol = decrement_tol
        self.lm_init, self.lm_min, self.lm_max = lm_init, lm_min, lm_max
        self.adaptive = adaptive
        self.line_search_steps = line_search_steps

    # ------------------------------------------------------------------ pieces
    def _consts(self, x: torch.Tensor):
        kw = dict(dtype=x.dtype, device=x.device)
        return self.Qm_inv.to(**kw), self.B_inv.to(**kw), self.xb.to(**kw), self.R.to(**kw)

    def cost(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``J(x)`` ``(B,)`` for ``x``, ``y``, ``mask`` ``(B, T, phi)``."""
        Qi, Bi, xb, R = self._consts(x)
        nxt, _ = self.model(x[:, :-1])
        return self._cost_terms(x, nxt, y, mask, Qi, Bi, xb, R)

    def _cost_terms(self, x, nxt, y, mask, Qi, Bi, xb, R):
        e = x[:, 1:] - nxt
        if self.background is None:
            e0 = x[:, 0] - xb
            jb = 0.5 * torch.einsum("bi,ij,bj->b", e0, Bi, e0)
        else:
            jb = self.background.cost(x[:, 0])
        jq = 0.5 * torch.einsum("bti,ij,btj->b", e, Qi, e)
        ro = torch.where(mask, x - y, torch.zeros_like(x))
        jo = 0.5 * (ro * ro / R).sum((-1, -2))
        return jb + jq + jo

    def linearise(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor):
        """Cost ``(B,)``, gradient ``(B, T, phi)`` and Gauss-Newton Hessian band
        ``(B, T*phi, 2*phi)`` at ``x``."""
        Qi, Bi, xb, R = self._consts(x)
        nxt, M = self.model(x[:, :-1])  # (B, T-1, phi), (B, T-1, phi, phi)
        J = self._cost_terms(x, nxt, y, mask, Qi, Bi, xb, R)
        e = x[:, 1:] - nxt
        Qe = e @ Qi.T
        g = torch.zeros_like(x)
        if self.background is None:
            g[:, 0] += (x[:, 0] - xb) @ Bi.T
        else:  # per window: the gradient and Gauss-Newton block of the mixture term
            gb, Bi = self.background.gradient_and_block(x[:, 0])
            g[:, 0] += gb
        g[:, 1:] += Qe
        g[:, :-1] -= (M.transpose(-1, -2) @ Qe.unsqueeze(-1)).squeeze(-1)
        obs_w = mask.to(x.dtype) / R
        g += torch.where(mask, (x - y), torch.zeros_like(x)) * obs_w
        D, S = markov_precision_blocks(M, Qi, Bi, x.shape[1])
        D = D + torch.diag_embed(obs_w)
        return J, g, D, S

    def hessian_band(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The Gauss-Newton Hessian ``G`` of ``J`` at ``x`` ``(B, T, phi)`` as a row-lower
        band ``(B, T*phi, 2*phi)`` (the precision of the Laplace approximation at a minimum)."""
        _, _, D, S = self.linearise(x, y, mask)
        return block_tridiagonal_to_band(D, S)

    def hessian_logdet(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``log det G`` ``(B,)`` of the Gauss-Newton Hessian at ``x`` ``(B, T, phi)`` (the
        curvature of ``J`` near a minimum, for Laplace weights); ``nan`` for a window whose
        ``G`` is not numerically positive definite (far off the attractor)."""
        from oceanda.linalg import band_logdet

        G = self.hessian_band(x, y, mask)
        try:
            return band_logdet(G)
        except NumericalError:  # one bad window: the others one by one
            out = torch.full(x.shape[:1], float("nan"), dtype=x.dtype, device=x.device)
            for i in range(x.shape[0]):
                try:
                    out[i] = band_logdet(G[i:i + 1])[0]
                except NumericalError:
                    pass
            return out

    # ------------------------------------------------------------------ solver
    def solve(
        self,
        x_init: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor,
        progress: Callable[[int, int], None] | None = None,
    ) -> Var4DResult:
        """Minimise ``J`` from ``x_init`` ``(B, T, phi)``; see :class:`Var4DResult`.

        ``progress(k, n_active)`` is called after each iteration when given.
        """
        from oceanda.linalg import band_solve

        if x_init.dim() != 3 or x_init.shape[-1] != self.phi:
            raise InputError(f"4D-Var: x_init must be (B, T, {self.phi}), got {tuple(x_init.shape)}")
        if y.shape != x_init.shape or mask.shape != x_init.shape:
            raise InputError(f"4D-Var: y {tuple(y.shape)} and mask {tuple(mask.shape)} must match "
                             f"x_init {tuple(x_init.shape)}")
        Bn, T, phi = x_init.shape
        x = x_init.clone()
        y = torch.where(mask, y, torch.zeros_like(y))
        lam = torch.full((Bn,), self.lm_init, dtype=x.dtype, device=x.device)
        iters = torch.zeros(Bn, dtype=torch.long, device=x.device)
        converged = torch.zeros(Bn, dtype=torch.bool, device=x.device)
        active = torch.ones(Bn, dtype=torch.bool, device=x.device)
        cost = self.cost(x, y, mask)
        history = [cost.clone()]
        if self.cost_tol is not None:
            converged |= cost < self.cost_tol
            active &= ~converged
        for k in range(self.max_iter):
            idx = active.nonzero().squeeze(-1)
            if idx.numel() == 0:
                break
            xa, ya, ma, la = x[idx], y[idx], mask[idx], lam[idx]
            J, g, D, S = self.linearise(xa, ya, ma)
            G = block_tridiagonal_to_band(D, S)
            A = G.clone()
            A[..., 0] = G[..., 0] * (1.0 + la.unsqueeze(-1))
            delta = -band_solve(A, g.reshape(len(idx), -1)).reshape(xa.shape)
            gd = (g * delta).sum((-1, -2))  # < 0: descent direction
            # predicted decrease of the quadratic model for the full step
            Gd = _band_symv(G, delta.reshape(len(idx), -1)).reshape(xa.shape)
            pred = -(gd + 0.5 * (delta * Gd).sum((-1, -2)))
            alpha = torch.ones_like(J)
            J_new = self.cost(xa + delta, ya, ma)
            rho = (J - J_new) / pred.clamp_min(torch.finfo(J.dtype).tiny)
            ok = J_new <= J + 1e-4 * alpha * gd
            for _ in range(self.line_search_steps):
                if bool(ok.all()):
                    break
                alpha = torch.where(ok, alpha, 0.5 * alpha)
                J_try = self.cost(xa + alpha.view(-1, 1, 1) * delta, ya, ma)
                J_new = torch.where(ok, J_new, J_try)
                ok = J_new <= J + 1e-4 * alpha * gd
            step_taken = ok & torch.isfinite(J_new)
            x_new = torch.where(step_taken.view(-1, 1, 1), xa + alpha.view(-1, 1, 1) * delta, xa)
            J_acc = torch.where(step_taken, J_new, J)
            if self.adaptive:
                la = torch.where(rho > 0.75, la / 3.0, la)
                la = torch.where((rho < 0.25) | ~step_taken, la * 4.0, la)
                la = la.clamp(self.lm_min, self.lm_max)
            iters[idx] += 1
            decrease = J - J_acc
            done = step_taken & (decrease <= self.ftol * J_acc.abs())
            if self.decrement_tol is not None:
                done |= step_taken & (alpha == 1.0) & (pred <= self.decrement_tol)
            if self.cost_tol is not None:
                done |= J_acc < self.cost_tol
            stuck = ~step_taken & (la >= self.lm_max)
            x[idx] = x_new
            lam[idx] = la
            cost[idx] = J_acc
            converged[idx] = done
            active[idx] = ~(done | stuck)
            h = torch.full_like(cost, float("nan"))
            h[idx] = J_acc
            history.append(h)
            if progress is not None:
                progress(k + 1, int(active.sum()))
        return Var4DResult(x=x, iters=iters, cost=cost, converged=converged, history=history)


def _band_symv(band: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``A v`` for a symmetric matrix in row-lower band storage ``(B, n, k+1)``."""
    n, k1 = band.shape[-2], band.shape[-1]
    out = band[..., 0] * v
    for j in range(1, k1):
        lo = band[..., j:, j]  # A[i, i-j] for i >= j
        out[..., j:] += lo * v[..., :-j]
        out[..., :-j] += lo * v[..., j:]
    return out
