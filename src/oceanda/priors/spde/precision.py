"""The trajectory precision ``Q = L^T Sigma^{-1} L`` of an SPDE prior, as one operator.

Notation (:mod:`oceanda.priors.spde.prior`): frames ``x_0 .. x_{T-1}`` of ``n`` cells,
``F_k = I + dt A_k^alpha``, ``S_k = diag(s_k)`` the noise variance of step ``k``, ``Q_0`` the
precision of ``x_0``, ``L`` block-bidiagonal (block rows ``[G_0]``, ``[-I, F_1]``, ..;
``Q_0 = G_0^T G_0``), ``Sigma = diag(I, S_1, .., S_{T-1})`` and the whitening operator
``W = L^{-1} Sigma^{1/2}`` (``Q^{-1} = W W^T``). Each operation says which operator it applies:

=====================================  ==========================================================
:func:`precision_product`               ``Q x`` (torch or numpy; the only place its formula lives)
:meth:`SPDEPrecision.apply`             ``Q X`` from sparse products, no solve
:meth:`SPDEPrecision.whiten`            ``W V = L^{-1} Sigma^{1/2} V`` (forward sweep, by
                                        :meth:`~SPDEPrecision.initial` and
                                        :meth:`~SPDEPrecision.step`)
:meth:`SPDEPrecision.whiten_t`          ``W^T U = Sigma^{1/2} L^{-T} U`` (backward sweep)
:meth:`SPDEPrecision.solve`             ``Q^{-1} R = W W^T R`` (both sweeps)
:meth:`SPDEPrecision.precondition`      ``M R ~ Q^{-1} R`` (the sweeps with cheaper factors)
:meth:`SPDEPrecision.logdet`            ``log det Q`` from the factors
:meth:`SPDEPrecision.sample`            draws of ``N(mu, Q^{-1})``: ``mu + W z``
:meth:`SPDEPrecision.csr`               the assembled sparse ``Q``
:meth:`SPDEPrecision.spectrum`          the exact spectral factors when ``Q`` is separable
=====================================  ==========================================================

For ``alpha = 2`` every solve with ``F_k`` is one complex solve with the first-order
``I - i sqrt(dt) A_k`` (``F_k^{-1} b = Re((I - i sqrt(dt) A_k)^{-1} b)``,
:class:`~oceanda.linalg.sparse.SquarePlusIdentityFactor`; ``factor="complex"``), else a real
LU of ``F_k`` (``factor="lu"``). The factor sizes and solve times of both are printed by
``hpc/bench/spde.py`` (rows ``F solve lu`` / ``F solve complex``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import scipy.sparse as sp
import torch

from oceanda.errors import NumericalError
from oceanda.linalg.sparse import LUFactor, SPDFactor, SquarePlusIdentityFactor, stencil_to_csr
from oceanda.linalg.stencil import Stencil
from oceanda.priors.spde.spectral import SeparableSpectrum, separable_spectrum

if TYPE_CHECKING:
    from oceanda.priors.spde.prior import SPDEPrior

def precision_product(x, F: Callable, Ft: Callable, Q0: Callable, sinv):
    """``Q x`` for trajectories ``x`` ``(..., T, a, b)`` (frames on axis ``-3``; torch or numpy)::

        e_k = S_k^{-1} (F_k x_k - x_{k-1}),   (Q x)_0 = Q_0 x_0 - e_1,
        (Q x)_k = F_k^T e_k - e_{k+1}   (k = 1 .. T-1, e_T = 0)

    Args:
        x: the trajectories.
        F, Ft: ``F_k`` and ``F_k^T`` applied to the frames ``x_1 .. x_{T-1}`` at once
            (``(..., T-1, a, b)`` -> the same shape).
        Q0: ``Q_0`` applied to ``x[..., :1, :, :]`` (the shape kept).
        sinv: ``S_k^{-1}`` broadcastable to the frames ``1 .. T-1``.
    Returns:
        ``Q x`` of the shape of ``x`` (numpy: assembled in place; torch: by concatenation, so
        autograd flows through every term).
    """
    head = Q0(x[..., :1, :, :])
    if x.shape[-3] == 1:
        return head
    E = (F(x[..., 1:, :, :]) - x[..., :-1, :, :]) * sinv
    FtE = Ft(E)
    if isinstance(x, np.ndarray):
        out = np.empty(x.shape, dtype=np.result_type(head, FtE))
        out[..., :1, :, :] = head
        out[..., 1:, :, :] = FtE
        out[..., :-1, :, :] -= E
        return out
    return torch.cat([head, FtE], dim=-3) - torch.cat([E, torch.zeros_like(head)], dim=-3)


@dataclass(frozen=True)
class _DiagFactor:
    """``Q_0 = G^T G`` with ``G = diag(g)`` (white initial state)."""

    g: np.ndarray

    def solve_G(self, z):
        """``G^{-1} z``."""
        return z / (self.g if z.ndim == 1 else self.g[:, None])

    def solve_Gt(self, b):
        """``G^{-T} b``."""
        return self.solve_G(b)

    def solve(self, b):
        """``Q_0^{-1} b``."""
        return self.solve_G(self.solve_G(b))

    def logdet(self) -> float:
        """``log det Q_0``."""
        return float(2.0 * np.sum(np.log(self.g)))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _csr(st: Stencil) -> sp.csr_matrix:
    return stencil_to_csr(st.offsets, _np(st.coef))


class SPDEPrecision:
    """The scipy (float64, CPU) side of an :class:`~oceanda.priors.spde.prior.SPDEPrior`'s
    ``Q``: sparse products, factors of ``F_k`` and ``Q_0`` (built on first use, cached) and
    the spectral factors when ``Q`` is separable. Arrays of trajectories are ``(T, n, k)``
    (frame, row-major cell, column). Obtained as ``prior.precision``.

    Args:
        prior: the prior (its stencils ``A_k``, ``F_k``, ``s_k``, ``Q_0`` and the options
            ``factor``, ``backend``, ``threads``; see :class:`~oceanda.priors.spde.prior.
            SPDEPrior`).
    """

    spectral_max_bytes = 2**30  # the eigenvectors (8 nx ny^2 bytes) beyond which not to go

    def __init__(self, prior: SPDEPrior):
        self.prior = prior
        self.T, self.n, self.shape = prior.T, prior.n, prior.shape
        self.threads, self.backend = prior.threads, prior.backend
        self._cache: dict = {}

    def _cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def _s(self, k: int) -> np.ndarray:
        """``s_k`` ``(n,)``."""
        return _np(self.prior._sk(k)).reshape(-1)

    def _grid(self, threads: bool = True) -> dict:
        if self.backend != "numba":
            return {}
        return dict(grid_shape=self.shape, threads=self.threads) if threads \
            else dict(grid_shape=self.shape)

    # ------------------------------------------------------------------ products
    def _ops(self):
        """Sparse ``(F_k, F_k^T)`` per distinct frame, symmetrised ``Q_0`` and ``1 / s_k``
        ``(T-1, n, 1)``."""
        def build():
            P = self.prior
            F = {}
            for k in range(1, self.T):
                i = P._pidx(k)
                if i not in F:
                    m = _csr(P._Fk(k))
                    F[i] = (m, m.T.tocsr())
            Q0m = _csr(P._Q0_stencil())
            sinv = np.stack([1.0 / self._s(k) for k in range(1, self.T)])[..., None] \
                if self.T > 1 else None
            return F, sp.csr_matrix(0.5 * (Q0m + Q0m.T)), sinv
        return self._cached("ops", build)

    def apply(self, X: np.ndarray) -> np.ndarray:
        """``Q X`` for ``X`` ``(T, n, k)`` from sparse products (:func:`precision_product`);
        no solve."""
        F, Q0, sinv = self._ops()
        n, k = X.shape[1], X.shape[2]

        def frames(j, Y):  # F_k Y_k (j = 0) or F_k^T Y_k (j = 1) for all frames
            if len(F) == 1:  # one sparse product with (n, m k) columns
                ((pair),) = F.values()
                m = Y.shape[0]
                Z = pair[j] @ np.ascontiguousarray(Y.transpose(1, 0, 2)).reshape(n, m * k)
                return Z.reshape(n, m, k).transpose(1, 0, 2)
            P = self.prior
            return np.stack([F[P._pidx(t + 1)][j] @ Y[t] for t in range(Y.shape[0])])

        return precision_product(X, lambda Y: frames(0, Y), lambda Y: frames(1, Y),
                                 lambda X0: (Q0 @ X0[0])[None], sinv)

    def csr(self) -> sp.csr_matrix:
        """Assembled sparse ``Q`` ``(T n, T n)`` (block-tridiagonal)::

            Q_00 = Q_0 + S_1^{-1},  Q_kk = F_k^T S_k^{-1} F_k + S_{k+1}^{-1},
            Q_{k-1,k} = -S_k^{-1} F_k
        """
        def build():
            P = self.prior
            blocks = [[None] * self.T for _ in range(self.T)]
            blocks[0][0] = _csr(P._Q0_stencil())
            for k in range(1, self.T):
                F = _csr(P._Fk(k))
                Si = sp.diags(1.0 / self._s(k))
                blocks[k - 1][k - 1] = blocks[k - 1][k - 1] + Si
                blocks[k][k] = F.T @ Si @ F
                blocks[k - 1][k] = -Si @ F
                blocks[k][k - 1] = -(F.T @ Si)
            return sp.bmat(blocks, format="csr") if self.T > 1 else sp.csr_matrix(blocks[0][0])
        return self._cached("csr", build)

    # ------------------------------------------------------------------ factors
    def _make_F_factor(self, k: int, single: bool):
        P = self.prior
        grid = self._grid()
        for kw in ((grid, {}) if grid else ({},)):
            try:
                if P.factor == "complex":
                    return SquarePlusIdentityFactor(_csr(P._Ak(k)), P.dt, single=single, **kw)
                return LUFactor(_csr(P._Fk(k)), single=single, **kw)
            except NumericalError:
                if not kw:
                    raise
                continue  # the strip LU needs no pivoting: fall back to SuperLU's solves
        raise AssertionError("unreachable")  # pragma: no cover

    def F_factor(self, k: int, single: bool = False):
        """Factor of ``F_k`` (``solve``: ``F_k^{-1} b``, ``solve_t``: ``F_k^{-T} b``,
        ``logabsdet``), cached per distinct ``F_k``; single precision if ``single`` (for
        the preconditioner)."""
        return self._cached(("F", self.prior._pidx(k), single),
                            lambda: self._make_F_factor(k, single))

    def Q0_factor(self):
        """Factor ``Q_0 = G_0^T G_0`` (``solve_G``: ``G_0^{-1} z``, ``solve_Gt``: ``G_0^{-T}
        b``, ``solve``: ``Q_0^{-1} b``, ``logdet``)."""
        def build():
            P = self.prior
            if P.init == "white":
                return _DiagFactor(np.full(self.n, 1.0 / P.init_std))
            M = _csr(P._Q0_stencil())
            M = 0.5 * (M + M.T)
            name = ("SPDE initial precision Q_0 (init='stationary'; advection too strong? "
                    "use init='white')")
            grid = self._grid(threads=False)
            try:
                return SPDFactor(M, name=name, **grid)
            except NumericalError:
                if not grid:
                    raise
                return SPDFactor(M, name=name)
        return self._cached("Q0", build)

    def q0_selfadjoint(self) -> bool:
        """Whether ``S_1^{-1} A_1`` is symmetric (isotropic / symmetric ``H``, no advection,
        uniform ``tau``): then ``Q_0 = S^{-1}(F^2 - I)`` exactly."""
        def build():
            P = self.prior
            k = 1 if self.T > 1 else 0
            K = sp.diags(1.0 / self._s(k)) @ _csr(P._Ak(k))
            asym = abs(K - K.T).max() if K.nnz else 0.0
            return bool(asym <= 1e-10 * abs(K).max())
        return self._cached("Q0sa", build)

    def Q0_precondition(self, U: np.ndarray, single: bool = True) -> np.ndarray:
        """``~ Q_0^{-1} U`` for the preconditioner: ``init="white"``: exact; stationary with
        ``S^{-1} A`` symmetric: ``(F^2 - I)^{-1} S U = (dt B)^{-1} (2 I + dt B)^{-1} S U``
        (``B = A^alpha``; equal to ``Q_0^{-1}`` up to rounding) from factors of ``A`` and of
        ``I + (dt/2) B`` (for ``alpha = 2`` the complex first-order one) in single
        (``single``) or double precision, much cheaper than ``Q_0``'s 25-point factor;
        otherwise that factor."""
        P = self.prior
        if P.init == "white":
            return U * P.init_std**2
        if not self.q0_selfadjoint():
            return self.Q0_factor().solve(U)

        def build():
            k = 1 if self.T > 1 else 0
            Am = _csr(P._Ak(k))
            grid = self._grid()
            try:
                Ainv = LUFactor(Am, single=single, **grid)
                if P.alpha == 2:
                    half = SquarePlusIdentityFactor(Am, 0.5 * P.dt, single=single, **grid)
                else:
                    half = LUFactor(sp.eye(self.n) + 0.5 * P.dt * Am, single=single, **grid)
            except NumericalError:  # pivoting needed: use Q_0's own factor
                return None
            return Ainv, half, self._s(k).reshape(-1, 1)

        pre = self._cached(("Q0pre", single), build)
        if pre is None:
            return self.Q0_factor().solve(U)
        Ainv, half, s = pre
        Y = 0.5 * half.solve(s * U)
        for _ in range(P.alpha):
            Y = Ainv.solve(Y)
        return Y / P.dt

    # ------------------------------------------------------------------ sweeps
    def _by_columns(self, fn, V: np.ndarray) -> np.ndarray:
        """``fn(V)`` for ``V`` ``(T, n, k)`` with the ``k`` columns split over ``threads``
        (``fn`` acts column-wise; SuperLU back-end only, see ``threads``)."""
        k = V.shape[-1]
        nt = min(self.threads, k)
        if nt <= 1 or self.backend != "superlu":
            return fn(V)
        parts = np.array_split(np.arange(k), nt)
        out = np.empty(V.shape, dtype=np.float64)
        with ThreadPoolExecutor(nt) as ex:
            res = list(ex.map(lambda idx: fn(np.ascontiguousarray(V[..., idx])), parts))
        for idx, r in zip(parts, res):
            out[..., idx] = r
        return out

    def initial(self, z: np.ndarray) -> np.ndarray:
        """``x_0 = G_0^{-1} z`` (``z`` ``(n,)`` or ``(n, k)``): a draw of ``N(0, Q_0^{-1})``
        for white ``z``."""
        return self.Q0_factor().solve_G(z)

    def step(self, k: int, x: np.ndarray, z: np.ndarray) -> np.ndarray:
        """One SPDE step ``x_k = F_k^{-1} (x_{k-1} + S_k^{1/2} z)`` (``x``, ``z`` ``(n,)`` or
        ``(n, k)``)."""
        sq = np.sqrt(self._s(k)).reshape((-1,) + (1,) * (z.ndim - 1))
        return self.F_factor(k).solve(x + sq * z)

    def whiten(self, V: np.ndarray) -> np.ndarray:
        """``W V = L^{-1} Sigma^{1/2} V`` for ``V`` ``(T, n, k)``: the forward sweep
        ``x_0 = G_0^{-1} v_0`` (:meth:`initial`), ``x_k = F_k^{-1} (x_{k-1} + S_k^{1/2} v_k)``
        (:meth:`step`; ``x = mu + W z`` with white ``z`` is a prior draw)."""
        def sweep(V):
            X = np.empty_like(V)
            X[0] = self.initial(V[0])
            for k in range(1, self.T):
                X[k] = self.step(k, X[k - 1], V[k])
            return X
        return self._by_columns(sweep, V)

    def whiten_t(self, U: np.ndarray) -> np.ndarray:
        """``W^T U = Sigma^{1/2} L^{-T} U`` for ``U`` ``(T, n, k)`` (backward sweep:
        ``w_{T-1} = F_{T-1}^{-T} u_{T-1}``, ``w_k = F_k^{-T}(u_k + w_{k+1})``,
        ``w_0 = G_0^{-T}(u_0 + w_1)``, then scaling by ``S_k^{1/2}``)."""
        def sweep(U):
            Wt = np.empty_like(U)
            nxt = None
            for k in range(self.T - 1, 0, -1):
                nxt = self.F_factor(k).solve_t(U[k] if nxt is None else U[k] + nxt)
                Wt[k] = np.sqrt(self._s(k))[:, None] * nxt
            Wt[0] = self.Q0_factor().solve_Gt(U[0] if nxt is None else U[0] + nxt)
            return Wt
        return self._by_columns(sweep, U)

    def solve(self, R: np.ndarray) -> np.ndarray:
        """``Q^{-1} R = W W^T R`` for ``R`` ``(T, n, k)`` (exact, both sweeps)."""
        return self.whiten(self.whiten_t(R))

    def precondition(self, R: np.ndarray, single: bool = True) -> np.ndarray:
        """``M R ~ Q^{-1} R = L^{-1} Sigma L^{-T} R`` for ``R`` ``(T, n, k)``: backward sweep
        ``w_{T-1} = F^{-T} r_{T-1}``, ``w_k = F_k^{-T}(r_k + w_{k+1})``, then
        ``x_0 = ~Q_0^{-1}(r_0 + w_1)`` (:meth:`Q0_precondition`), forward ``x_k = F_k^{-1}
        (x_{k-1} + S_k w_k)``; single-precision factors if ``single``."""
        X = np.empty_like(R)
        nxt = None
        for k in range(self.T - 1, 0, -1):
            rhs = R[k] if nxt is None else R[k] + nxt
            nxt = self.F_factor(k, single).solve_t(rhs)
            X[k] = nxt * self._s(k).reshape(-1, 1)
        X[0] = self.Q0_precondition(R[0] if nxt is None else R[0] + nxt, single)
        for k in range(1, self.T):
            X[k] = self.F_factor(k, single).solve(X[k - 1] + X[k])
        return X

    # ------------------------------------------------------------------ log-det, draws
    def logdet(self) -> float:
        """Exact ``log det Q`` (float) from sparse LU factors of the blocks::

            log det Q_0 + sum_{k=1}^{T-1} (2 log|det F_k| - sum log s_k)
        """
        total = self.Q0_factor().logdet()
        for k in range(1, self.T):
            total += 2.0 * self.F_factor(k).logabsdet() - float(np.log(self._s(k)).sum())
        return total

    def spectrum(self) -> SeparableSpectrum | None:
        """The exact spectral factors of ``Q`` (:mod:`oceanda.priors.spde.spectral`) when the
        prior is separable (no land, stationary initial state, time-invariant parameters
        constant along rows, isotropic, no advection) and its eigenvectors take at most
        ``spectral_max_bytes`` (1 GiB: grids up to ~500 x 500), else ``None``. Cached."""
        def build():
            P = self.prior
            ny, nx = self.shape
            if (8 * nx * ny * ny <= self.spectral_max_bytes
                    and P.init == "stationary" and P.A.coef.shape[0] == 1
                    and P.s.shape[0] == 1 and bool(P.ocean.all())):
                return separable_spectrum(_csr(P._Ak(0)), _np(P._sk(0)), self.shape, T=self.T,
                                          dt=P.dt, alpha=P.alpha, workers=self.threads)
            return None
        return self._cached("spectrum", build)

    def sample(self, n_samples: int, rng: np.random.Generator, method: str = "simulate",
               mean: np.ndarray | None = None) -> np.ndarray:
        """Draws ``mean + W z`` of ``N(mean, Q^{-1})`` as ``(n_samples, T, ny, nx)``:
        ``method="simulate"``: ``W z`` by :meth:`whiten` (``z`` ``(T, n, n_samples)``);
        ``"spectral"``: ``W z = S^{1/2} U Lhat^{-T} D^{-1/2} z`` in the modes of
        :meth:`spectrum` (the noise drawn directly in the modes: other draws than the
        simulation's for the same seed). ``mean`` ``(T, n)`` (None: zero)."""
        T, shape = self.T, self.shape
        if method == "spectral":
            return self.spectrum().sample_fields(
                rng=rng, k=int(n_samples), mean=None if mean is None else mean.reshape(T, *shape))
        Z = rng.standard_normal((T, self.n, n_samples))
        X = self.whiten(Z)
        if mean is not None:
            X = X + mean[:, :, None]
        return np.moveaxis(X, -1, 0).reshape(n_samples, T, *shape)

