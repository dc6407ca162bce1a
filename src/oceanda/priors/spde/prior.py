"""SPDE Gaussian prior over a data-assimilation window (4DVarNet-Gen prior).

Spatial operator (finite volumes on the lon/lat grid, see
:func:`oceanda.linalg.stencil.diffusion_advection`)::

    A = kappa^2 - div(H grad) + m . grad,   H = gamma I + beta v v^T,   B = A^alpha

(``alpha`` in {1, 2}; the paper's anchor uses 2). Implicit Euler in time over the DAW
frames ``x_0 .. x_{T-1}`` (``n = ny * nx`` cells each)::

    F_k x_k = x_{k-1} + e_k,   F_k = I + dt B_k,   e_k ~ N(0, S_k),   k = 1 .. T-1
    S_k = tau_k^2 dt W,        W = diag(abar / a_p)

(``a_p`` cell areas, ``abar`` their mean over ocean cells: white noise per unit area, so
refining the grid keeps the field's statistics). In the paper's notation
``x_k = M_k x_{k-1} + T_k z`` with ``M_k = F_k^{-1}`` and ``T_k = F_k^{-1} S_k^{1/2}``.
Because the noise is scaled by ``dt``, the stationary variance does not depend on ``dt``:
for spatially uniform parameters on a uniform grid and ``alpha = 2`` the marginal variance
is about ``tau^2 a / (8 pi gamma kappa^2)`` (continuum limit, ``dt kappa^4 << 1``, away from
boundaries; :func:`tau_for_std`). For ``alpha = 1`` it grows like ``log(1/(kappa^2 a))``.

Initial state ``x_0 ~ N(mu_0, Q_0^{-1})``:

- ``init="stationary"``: ``Q_0 = F_1^T S_1^{-1} F_1 - S_1^{-1}``, the exact stationary
  precision of the recursion when ``F_1`` is self-adjoint in the ``S_1`` inner product
  (isotropic ``H``, no advection and uniform ``tau``: then ``P = M (P + S) M^T`` holds
  for ``P = (F^2 - I)^{-1} S``; the anisotropic cross terms of the stencil are not exactly
  self-adjoint, which makes it approximate, 3e-4 relative on the test grid). Otherwise
  (advection, varying tau) a symmetric approximation that must be positive definite
  (a :class:`~oceanda.errors.NumericalError` says so when it is not).
- ``init="white"``: ``Q_0 = I / init_std^2``.

Trajectory precision (``x`` time-major, ``N = T n``): ``Q = L^T Sigma^{-1} L`` with
``L`` block-bidiagonal (block rows ``[G_0]``, ``[-I, F_1]``, ``[-I, F_2]``, ...;
``Q_0 = G_0^T G_0``) and ``Sigma = diag(I, S_1, .., S_{T-1})``, i.e. block-tridiagonal::

    Q_00 = Q_0 + S_1^{-1},  Q_kk = F_k^T S_k^{-1} F_k + S_{k+1}^{-1},  Q_{k-1,k} = -S_k^{-1} F_k

``log det Q = log det Q_0 + sum_k (2 log|det F_k| - log det S_k)`` (differentiable at patch
scale through sparse factors, :meth:`SPDEPrior.logdet_torch`). Samples are drawn by
simulating the SPDE (``x = mu + L^{-1} Sigma^{1/2} z``, one sparse solve per step) and
posterior means by CG on the whitened normal equations (:meth:`SPDEPrior.posterior_mean`).
For ``alpha = 2`` every solve with ``F_k = I + dt A_k^2`` is one complex solve with the
first-order ``I - i sqrt(dt) A_k`` (``F_k^{-1} b = Re((I - i sqrt(dt) A_k)^{-1} b)``,
:class:`~oceanda.linalg.sparse.SquarePlusIdentityFactor`): 3.5x fewer factor entries than a
real LU of ``F_k`` (200 x 200: 1.95 M vs 6.84 M).

Reference: Lindgren, Rue & Lindstrom (2011), JRSS-B 73(4); Beauchamp et al. (2024),
"Bridging data assimilation & SPDE with a generative extension of 4DVarNet schemes".
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from oceanda.errors import ConfigError, InputError, NumericalError
from oceanda.linalg.sparse import (CGInfo, LUFactor, SPDFactor, SquarePlusIdentityFactor,
                                   batched_pcg, block_cg, block_pcg, stencil_to_csr)
from oceanda.linalg.stencil import Stencil, diffusion_advection, power
from oceanda.priors.spde.spectral import (SeparableSpectrum, TorchSeparableSpectrum,
                                          separable_spectrum)

PARAM_NAMES = ("kappa", "tau", "gamma", "beta", "vx", "vy", "mx", "my")


def tau_for_std(std: float, kappa: float, gamma: float, cell_area: float) -> float:
    """``tau`` giving marginal standard deviation ``std`` for ``alpha = 2`` (uniform
    parameters, continuum limit): ``std^2 = tau^2 a / (8 pi gamma kappa^2)``."""
    return float(std * math.sqrt(8.0 * math.pi * gamma * kappa**2 / cell_area))


def _check_positive(name: str, value, strict: bool = True) -> None:
    t = torch.as_tensor(value).detach()
    if not torch.isfinite(t).all():
        raise ConfigError(f"SPDE parameter {name} must be finite")
    bad = (t <= 0) if strict else (t < 0)
    if bad.any():
        rel = ">" if strict else ">="
        raise ConfigError(f"SPDE parameter {name} must be {rel} 0 everywhere "
                          f"(min {float(t.min()):.4g})")


@dataclass(frozen=True)
class _DiagFactor:
    """``Q_0 = G^T G`` with ``G = diag(g)`` (white initial state)."""

    g: np.ndarray

    def solve_G(self, z):
        return z / (self.g if z.ndim == 1 else self.g[:, None])

    def solve_Gt(self, b):
        return self.solve_G(b)

    def logdet(self) -> float:
        return float(2.0 * np.sum(np.log(self.g)))


def _solve_columns(B: np.ndarray, bs: int, rtol: float, solve_block, solve_cols
                   ) -> tuple[np.ndarray, CGInfo]:
    """Solve the right-hand sides ``B`` ``(N, k)`` ``bs`` columns at a time: ``solve_block``
    (block CG) for chunks of several columns, ``solve_cols`` (column-wise CG) for single
    ones, both ``Bc -> (Xc, CGInfo)``; one :class:`CGInfo` for all (most iterations, every
    column's residual, converged within ``10 rtol``)."""
    N, k = B.shape
    X = np.empty((N, k))
    its, rels = 0, []
    for c0 in range(0, k, bs):
        c1 = min(k, c0 + bs)
        solve = solve_block if c1 - c0 > 1 else solve_cols
        xc, inf = solve(np.ascontiguousarray(B[:, c0:c1]))
        X[:, c0:c1] = xc
        its = max(its, inf.iterations)
        rels.append(inf.rel_residual)
    rel = np.concatenate(rels)
    return X, CGInfo(its, rel, bool(np.all(rel <= 10 * rtol)))


class SPDEPrior:
    """Gaussian prior ``N(mu, Q^{-1})`` of a DAW trajectory defined by the SPDE above.

    Args:
        dx, dy: ``(ny, nx)`` cell sizes (length unit of the parameters).
        ocean: ``(ny, nx)`` bool (land cells: no-flux boundaries, decoupled) or ``None``.
        T: number of frames in the window (``T >= 1``).
        dt: time step between frames (> 0).
        alpha: 1 or 2 (``B = A^alpha``).
        kappa, tau, gamma, beta, vx, vy, mx, my: scalars, ``(ny, nx)`` fields or
            ``(T, ny, nx)`` space-time fields (frame ``k`` uses entry ``k``; ``Q_0`` uses
            frame 1 for ``"stationary"``). torch tensors keep their autograd graph
            (for :meth:`nll`).
        init: ``"stationary"`` or ``"white"`` (see the module docstring).
        init_std: standard deviation of the white initial state.
        mean: prior mean ``mu``: scalar or ``(T, ny, nx)``.
        dtype, device: of the torch tensors (the scipy path is float64 CPU).
        factor: how the scipy path factorises ``F_k``: ``"complex"`` (``alpha = 2`` only:
            one complex LU of the first-order ``I - i sqrt(dt) A_k``, ``F_k^{-1} b =
            Re((I - i sqrt(dt) A_k)^{-1} b)``, :class:`~oceanda.linalg.sparse.
            SquarePlusIdentityFactor`), ``"lu"`` (real LU of ``F_k``) or ``"auto"``
            (complex for ``alpha = 2``).
        threads: threads for the sparse sweeps. ``backend="numba"``: every triangular
            solve runs its grid strips on this many threads (:class:`~oceanda.linalg.sparse.
            GridLU`), also for a single right-hand side; ``"superlu"``: the columns of
            several right-hand sides are split between threads (scipy 1.17's SuperLU solve
            was measured to hold the GIL: no gain). For separable priors (:meth:`spectrum`)
            the DCT workers and the compiled per-mode loops use this many threads (the
            ``ny x ny`` products use BLAS's own, ``OMP_NUM_THREADS``). ``None``: 1.
        backend: ``"superlu"`` (SuperLU's own solves; ``"auto"`` with one thread) or
            ``"numba"`` (``"auto"`` with ``threads > 1``; the same
            SuperLU factors, or for more than one thread factors ordered strip by strip,
            with triangular solves compiled by numba that release the GIL, so
            ``threads`` strips of the grid are solved concurrently; identical draws).
            Measured (``hpc/bench/spde.py``, 200 x 200 x 15 posterior, rtol 1e-5, factors
            included, 2-core machine nearly idle): SuperLU on one thread 16.96 s; numba on
            two threads 14.05 s wall (21.3 CPU-s: SuperLU's supernodal solve is faster per
            factor entry, the strips run concurrently); the previous default (whitened CG,
            one thread) 23.08 s. Many right-hand sides favour numba more: 200 Matheron members
            of 60 x 60 x 15 (block CG, 201 right-hand sides) took 13.2 CPU-s / 21.5 s wall
            on two numba threads vs 26.2 CPU-s / 70.9 s wall with SuperLU on one (machine
            at load ~2.5; members equal to 2.9e-5).
    """

    def __init__(self, dx, dy, ocean=None, *, T: int, dt: float = 1.0, alpha: int = 2,
                 kappa=0.1, tau=1.0, gamma=1.0, beta=0.0, vx=0.0, vy=0.0, mx=0.0, my=0.0,
                 init: str = "stationary", init_std: float = 1.0, mean=0.0,
                 dtype=torch.float64, device=None, factor: str = "auto",
                 threads: int | None = None, backend: str = "auto"):
        if int(T) != T or T < 1:
            raise ConfigError(f"SPDE window length T must be an integer >= 1, got {T}")
        if not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
            raise ConfigError(f"SPDE time step dt must be > 0, got {dt}")
        if alpha not in (1, 2):
            raise ConfigError(f"SPDE alpha must be 1 or 2, got {alpha}")
        if init not in ("stationary", "white"):
            raise ConfigError(f"SPDE init must be 'stationary' or 'white', got {init!r}")
        if init == "white" and not init_std > 0:
            raise ConfigError(f"SPDE init_std must be > 0, got {init_std}")
        if factor not in ("auto", "complex", "lu"):
            raise ConfigError(f"SPDE factor must be 'auto', 'complex' or 'lu', got {factor!r}")
        if factor == "complex" and alpha != 2:
            raise ConfigError("SPDE factor='complex' needs alpha = 2 (F = I + dt A^2)")
        self.factor = ("complex" if alpha == 2 else "lu") if factor == "auto" else factor
        self.threads = 1 if threads is None else max(1, int(threads))
        if backend not in ("auto", "numba", "superlu"):
            raise ConfigError(f"SPDE backend must be 'auto', 'numba' or 'superlu', got "
                              f"{backend!r}")
        if backend == "auto":  # measured: SuperLU on one thread, numba strips on several
            backend = "numba" if self.threads > 1 else "superlu"
        self.backend = backend
        self.T, self.dt, self.alpha, self.init = int(T), float(dt), int(alpha), init
        self.init_std = float(init_std)
        self.dtype = dtype
        self.dx = torch.as_tensor(dx, dtype=dtype, device=device)
        self.dy = torch.as_tensor(dy, dtype=dtype, device=device)
        if self.dx.ndim != 2 or self.dy.shape != self.dx.shape:
            raise InputError(f"SPDE dx, dy must be (ny, nx) arrays of one shape, got "
                             f"{tuple(self.dx.shape)} and {tuple(self.dy.shape)}")
        _check_positive("dx", self.dx)
        _check_positive("dy", self.dy)
        self.shape = tuple(self.dx.shape)
        self.n = self.shape[0] * self.shape[1]
        if ocean is None:
            ocean = torch.ones(self.shape, dtype=torch.bool)
        self.ocean = torch.as_tensor(ocean, device=self.dx.device).to(torch.bool)
        if tuple(self.ocean.shape) != self.shape:
            raise InputError(f"SPDE ocean mask shape {tuple(self.ocean.shape)} != grid "
                             f"{self.shape}")
        params = dict(kappa=kappa, tau=tau, gamma=gamma, beta=beta, vx=vx, vy=vy, mx=mx, my=my)
        self.params = {}
        self._exact_max = 16  # parameter elements with an exact (complex-step) log-det gradient
        self.time_varying = False
        for name, v in params.items():
            t = v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=dtype)
            t = t.to(dtype=dtype, device=self.dx.device)
            if t.ndim not in (0, 2, 3) or (t.ndim >= 2 and tuple(t.shape[-2:]) != self.shape) \
                    or (t.ndim == 3 and t.shape[0] != self.T):
                raise ConfigError(f"SPDE parameter {name} must be a scalar, (ny, nx) = "
                                  f"{self.shape} or (T, ny, nx); got {tuple(t.shape)}")
            self.time_varying |= t.ndim == 3
            self.params[name] = t
        _check_positive("kappa", self.params["kappa"])
        _check_positive("tau", self.params["tau"])
        _check_positive("gamma", self.params["gamma"])
        _check_positive("beta", self.params["beta"], strict=False)
        m = torch.as_tensor(mean, dtype=dtype, device=self.dx.device)
        if m.ndim not in (0, 3) or (m.ndim == 3 and tuple(m.shape) != (self.T, *self.shape)):
            raise InputError(f"SPDE mean must be a scalar or (T, ny, nx), got {tuple(m.shape)}")
        self.mean = m
        area = self.dx * self.dy
        abar = area[self.ocean].mean() if self.ocean.any() else area.mean()
        self.w = abar / area  # (ny, nx)
        self._build_torch()
        self._np_cache: dict = {}

    # ------------------------------------------------------------------ torch operators
    def _build_torch(self) -> None:
        A = diffusion_advection(self.dx, self.dy, self.ocean,
                                **{k: v for k, v in self.params.items() if k != "tau"})
        if A.coef.ndim == 3:
            A = Stencil(A.offsets, A.coef[None])  # (Tp, ny, nx, K)
        self.A = A
        dt = self.dt
        B = power(A, self.alpha)
        eye = Stencil.identity(self.shape, self.dtype, self.dx.device)
        self.F = eye + B.scale(dt)  # (Tp, ny, nx, K) F_k = I + dt B_k
        tau = self.params["tau"]
        tau = tau.expand(self.shape) if tau.ndim == 0 else tau
        if tau.ndim == 2:
            tau = tau[None]
        self.s = tau**2 * dt * self.w  # (Tp, ny, nx) diagonal of S_k
        self.Tp = self.F.coef.shape[0]

    def _pidx(self, k: int) -> int:
        """Index of frame ``k``'s operators in the (Tp, ...) stacks."""
        return k if self.Tp > 1 else 0

    def _Fk(self, k: int) -> Stencil:
        i = self._pidx(k)
        return Stencil(self.F.offsets, self.F.coef[i])

    def _sk(self, k: int) -> torch.Tensor:
        return self.s[self._pidx(k) if self.s.shape[0] > 1 else 0]

    def _Q0_stencil(self) -> Stencil:
        """Stencil of ``Q_0`` (``stationary``: ``F_1^T S_1^{-1} F_1 - S_1^{-1}``)."""
        if self.init == "white":
            return Stencil.diag(torch.full(self.shape, 1.0 / self.init_std**2,
                                           dtype=self.dtype, device=self.dx.device))
        k = 1 if self.T > 1 else 0
        F, s = self._Fk(k), self._sk(k)
        return (F.T @ F.scale(1.0 / s) - Stencil.diag(1.0 / s)).pruned()

    def precision_matvec(self, x: torch.Tensor) -> torch.Tensor:
        """``Q x`` (matrix free) for ``x`` ``(..., T, ny, nx)``."""
        self._check_traj(x)
        out = [None] * self.T
        out[0] = self._Q0_stencil().apply(x[..., 0, :, :])
        for k in range(1, self.T):
            e = (self._Fk(k).apply(x[..., k, :, :]) - x[..., k - 1, :, :]) / self._sk(k)
            out[k] = self._Fk(k).T.apply(e)
            out[k - 1] = out[k - 1] - e
        return torch.stack(out, dim=-3)

    def quad(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mu)^T Q (x - mu)`` for ``x`` ``(..., T, ny, nx)`` -> ``(...)``."""
        self._check_traj(x)
        r = x - self.mean
        x0 = r[..., 0, :, :]
        if self.init == "white":
            q = (x0**2).sum((-2, -1)) / self.init_std**2
        else:
            k = 1 if self.T > 1 else 0
            F, s = self._Fk(k), self._sk(k)
            q = ((F.apply(x0) ** 2) / s).sum((-2, -1)) - (x0**2 / s).sum((-2, -1))
        for k in range(1, self.T):
            e = self._Fk(k).apply(r[..., k, :, :]) - r[..., k - 1, :, :]
            q = q + (e**2 / self._sk(k)).sum((-2, -1))
        return q

    def logdet_torch(self, method: str = "auto", probe_spacing: int = 16) -> torch.Tensor:
        """``log det Q`` as a differentiable torch scalar.

        ``method="dense"``: dense ``slogdet`` of each ``n x n`` block (exact value and
        gradient; ``n <= 6000``). ``"sparse"``: exact value from sparse factors of the blocks
        (``log det Q_0 + sum_k (2 log|det F_k| - sum log s_k)``, the ``s`` term by torch
        autograd). Gradient of the factored part, ``d log|det M| = tr(M^{-1} dM)``:

        - when the parameters requiring grad hold at most 16 numbers in all (stationary
          parameters): *exact*, by the complex step ``tr(M^{-1} dM) = Im log det(M + i h dM)
          / h`` (``h = 1e-30``: no cancellation, error ``O(h^2)``), with ``dM`` the forward-mode
          derivative of the block (double-vector-Jacobian product through the stencil
          construction) and one complex sparse LU per number and distinct block
          (100 x 100 x 15, 3 parameters: 2.7 s CPU for the NLL and its gradient; dense is
          out of reach there);
        - otherwise (fields): an *unbiased random estimate* ``E[u^T dM z]``, ``u = M^{-T} z``,
          ``z`` coloured Rademacher probes (random signs on the cells of one colour of a
          ``p x p`` tiling, ``p = probe_spacing``: ``p^2`` probes, one multi-RHS solve per
          block), exact when ``p >= max(ny, nx)``. Its variance is small for ``F_k`` (short
          range inverse) but large for the stationary ``Q_0`` (long-range inverse): for
          field parameters on large grids prefer ``init="white"`` or dense log-dets on crops.
        ``"auto"``: dense for ``n <= 6000`` cells, sparse above.
        """
        if method not in ("auto", "dense", "sparse"):
            raise ConfigError(f"logdet_torch: method must be 'auto', 'dense' or 'sparse', "
                              f"got {method!r}")
        if method == "sparse" or (method == "auto" and self.n > 6000):
            return self._logdet_sparse_torch(int(probe_spacing))
        if self.n > 6000:
            raise InputError(f"dense log-det of {self.n}-cell blocks is too large; use "
                             "logdet() (sparse, no gradient) on grids this size")
        if self.init == "white":
            sign, ld0 = torch.ones((), dtype=self.dtype), -2.0 * self.n * torch.log(
                torch.as_tensor(self.init_std, dtype=self.dtype))
        else:  # dense Q_0 = F^T S^{-1} F - S^{-1} from the dense F (cheaper than composing)
            k = 1 if self.T > 1 else 0
            Fd, s = self._Fk(k).to_dense(), self._sk(k).reshape(-1)
            Q0 = Fd.T @ (Fd / s[:, None]) - torch.diag(1.0 / s)
            sign, ld0 = torch.linalg.slogdet(0.5 * (Q0 + Q0.T))
        if sign <= 0:
            raise NumericalError("SPDE initial precision Q_0 is not positive definite "
                                 "(advection too strong for init='stationary'?)")
        total = ld0
        cache: dict[int, torch.Tensor] = {}
        for k in range(1, self.T):
            i = self._pidx(k)
            if i not in cache:  # one dense LU per distinct F_k
                cache[i] = torch.linalg.slogdet(self._Fk(k).to_dense())[1]
            total = total + 2.0 * cache[i] - torch.log(self._sk(k)).sum()
        return total

    def _logdet_sparse_torch(self, p: int, seed: int = 0) -> torch.Tensor:
        if p < 1:
            raise ConfigError(f"logdet_torch: probe_spacing must be >= 1, got {p}")
        names = tuple(k for k, v in self.params.items() if v.requires_grad)
        core = _SparseLogdetFn.apply(self, names, p, seed, *[self.params[k] for k in names])
        for k in range(1, self.T):
            core = core - torch.log(self._sk(k)).sum()
        return core

    def _ops(self, params: dict) -> tuple[Stencil, Stencil, torch.Tensor]:
        """``(A, F, s)`` stacks (leading ``Tp`` dim) of the parameters ``params``."""
        A = diffusion_advection(self.dx, self.dy, self.ocean,
                                **{k: v for k, v in params.items() if k != "tau"})
        if A.coef.ndim == 3:
            A = Stencil(A.offsets, A.coef[None])
        eye = Stencil.identity(self.shape, self.dtype, self.dx.device)
        F = eye + power(A, self.alpha).scale(self.dt)
        tau = params["tau"]
        tau = tau.expand(self.shape) if tau.ndim == 0 else tau
        if tau.ndim == 2:
            tau = tau[None]
        return A, F, tau**2 * self.dt * self.w

    def _complex_parts(self, F: Stencil, s: torch.Tensor, dF: Stencil, ds: torch.Tensor,
                       h: float) -> float:
        """``d/dh [log det Q_0 + 2 sum_k log|det F_k|]`` at ``h = 0`` along ``(dF, ds)`` by the
        complex step: ``Im log det(M + i h dM) / h`` (exact to rounding, no cancellation)."""

        def csr(st, i):
            c = st.coef[i if st.coef.shape[0] > 1 else 0]
            return stencil_to_csr(st.offsets, c.detach().to("cpu", torch.float64).numpy())

        def im_logdet(Mc, spd=False):
            # SPD + i h (.): symmetric mode, no pivoting (keeps the fill-reducing order;
            # partial pivoting on Q_0 grew the factor 20x)
            opts = dict(diag_pivot_thresh=0.0, options=dict(SymmetricMode=True)) if spd else {}
            lu = spla.splu(sp.csc_matrix(Mc), permc_spec="MMD_AT_PLUS_A", **opts)
            u = lu.U.diagonal()
            return float(np.sum(u.imag / u.real))  # arg(u) - arg(Re u), |Im u| ~ h

        def sv(t, i):
            return t[i if t.shape[0] > 1 else 0].detach().to("cpu", torch.float64).numpy()

        out = 0.0
        done: dict[int, float] = {}
        for k in range(1, self.T):
            i = self._pidx(k)
            if i not in done:
                dFi = csr(dF, i)
                done[i] = 0.0 if dFi.count_nonzero() == 0 else im_logdet(
                    csr(F, i) + 1j * h * dFi) / h
            out += 2.0 * done[i]
        if self.init == "stationary":
            k = 1 if self.T > 1 else 0
            i = self._pidx(k)
            Fc = csr(F, i) + 1j * h * csr(dF, i)
            sc = (sv(s, i) + 1j * h * sv(ds, i)).reshape(-1)
            Q0c = Fc.T @ sp.diags(1.0 / sc) @ Fc - sp.diags(1.0 / sc)
            out += im_logdet(0.5 * (Q0c + Q0c.T), spd=True) / h
        return out

    def _logdet_grad_complex_step(self, tensors: dict) -> list[torch.Tensor]:
        """Exact gradient of ``log det Q_0 + 2 sum_k log|det F_k|`` with respect to each
        element of ``tensors`` (a few scalars): forward-mode derivative of the blocks (by the
        double-vector-Jacobian trick) and one complex sparse LU per element and distinct
        block."""
        base = {k: v.detach() for k, v in self.params.items()}
        out = []
        for name, t in tensors.items():
            gr = np.zeros(t.numel())
            for e in range(t.numel()):
                with torch.enable_grad():
                    leaf = t.detach().clone().requires_grad_(True)
                    prm = dict(base)
                    prm[name] = leaf
                    _, F, sv = self._ops(prm)
                    tangent = torch.zeros_like(leaf).reshape(-1)
                    tangent[e] = 1.0
                    outs = [F.coef, sv]
                    live = [i for i, o in enumerate(outs) if o.requires_grad]
                    if not live:
                        continue
                    us = [torch.zeros_like(outs[i], requires_grad=True) for i in live]
                    (g,) = torch.autograd.grad([outs[i] for i in live], leaf, us,
                                               create_graph=True, allow_unused=True)
                    if g is None or not g.requires_grad:
                        continue
                    got = torch.autograd.grad(g, us, tangent.reshape(leaf.shape),
                                              allow_unused=True)
                dirs = [torch.zeros_like(o) for o in outs]
                for i, d in zip(live, got):
                    if d is not None:
                        dirs[i] = d
                dFc, dsc = dirs
                gr[e] = self._complex_parts(F, sv.detach(), Stencil(F.offsets, dFc.detach()),
                                            dsc.detach(), 1e-30)
            out.append(torch.as_tensor(gr.reshape(t.shape), dtype=t.dtype, device=t.device))
        return out

    def _logdet_grad_probing(self, tensors: dict, p: int, seed: int) -> list[torch.Tensor]:
        """Unbiased estimate of the same gradient for fields: ``d log|det M| = tr(M^{-1} dM)
        = E[u^T dM z]``, ``u = M^{-T} z``, over coloured Rademacher probes ``z`` (random signs
        on the cells of one colour of a ``p x p`` tiling, ``p^2`` probes per block;
        exact when ``p >= max(ny, nx)``). One multi-right-hand-side solve per block, then
        one vector-Jacobian product through the stencil construction."""
        ny, nx = self.shape
        pp = min(p, max(ny, nx))
        ii, jj = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        colour = ((ii % pp) * pp + (jj % pp)).reshape(-1)
        rng = np.random.default_rng(seed)
        Z = np.zeros((self.n, int(colour.max()) + 1))
        Z[np.arange(self.n), colour] = rng.choice([-1.0, 1.0], size=self.n)
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}
        prm = {k: v.detach() for k, v in self.params.items()}
        prm.update(leaves)
        zt = torch.as_tensor(Z.T.reshape(-1, ny, nx), dtype=self.dtype, device=self.dx.device)
        with torch.enable_grad():
            _, F, s = self._ops(prm)
            sur = 0.0
            done: set[int] = set()
            for k in range(1, self.T):
                i = self._pidx(k)
                mult = sum(1 for kk in range(1, self.T) if self._pidx(kk) == i)
                if i in done:
                    continue
                done.add(i)
                U = self._F_lu(k).solve_t(Z)  # u = F^{-T} z
                ut = torch.as_tensor(U.T.reshape(-1, ny, nx), dtype=self.dtype,
                                     device=self.dx.device)
                Fi = Stencil(F.offsets, F.coef[i if F.coef.shape[0] > 1 else 0])
                sur = sur + 2.0 * mult * (ut * Fi.apply(zt)).sum()
            if self.init == "stationary":
                k = 1 if self.T > 1 else 0
                i = self._pidx(k)
                Fi = Stencil(F.offsets, F.coef[i if F.coef.shape[0] > 1 else 0])
                si = s[i if s.shape[0] > 1 else 0]
                U = self._Q0_factor().solve(Z)  # Q_0 symmetric: u = Q_0^{-1} z
                ut = torch.as_tensor(U.T.reshape(-1, ny, nx), dtype=self.dtype,
                                     device=self.dx.device)
                # u^T Q_0 z = (F u)^T S^{-1} (F z) - u^T S^{-1} z
                sur = sur + ((Fi.apply(ut) * Fi.apply(zt) - ut * zt) / si).sum()
            grads = torch.autograd.grad(sur, list(leaves.values()), allow_unused=True)
        return [torch.zeros_like(t) if g_ is None else g_ for t, g_ in zip(tensors.values(), grads)]

    def nll(self, x: torch.Tensor, logdet_method: str = "auto") -> torch.Tensor:
        """Negative log-likelihood ``-log N(x; mu, Q^{-1})`` of trajectories ``x``
        ``(..., T, ny, nx)`` -> ``(...)``, differentiable in ``x`` and the parameters::

            0.5 (x-mu)^T Q (x-mu) - 0.5 log det Q + 0.5 N log(2 pi)

        ``logdet_method``: see :meth:`logdet_torch` (``"auto"``: dense blocks up to 6000
        cells, sparse factors with an exact stationary-parameter gradient above).
        """
        N = self.T * self.n
        return (0.5 * self.quad(x) - 0.5 * self.logdet_torch(logdet_method)
                + 0.5 * N * math.log(2 * math.pi))

    def precision_dense(self) -> torch.Tensor:
        """Dense ``Q`` ``(T n, T n)`` (tests only)."""
        n, T = self.n, self.T
        Q = torch.zeros((T * n, T * n), dtype=self.dtype)
        Q[:n, :n] = self._Q0_stencil().to_dense()
        for k in range(1, T):
            F = self._Fk(k).to_dense()
            Si = torch.diag(1.0 / self._sk(k).reshape(-1))
            a, b = (k - 1) * n, k * n
            Q[a:b, a:b] += Si
            Q[b:b + n, b:b + n] += F.T @ Si @ F
            Q[a:b, b:b + n] += -Si @ F
            Q[b:b + n, a:b] += -F.T @ Si
        return Q

    def _check_traj(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-3:]) != (self.T, *self.shape):
            raise InputError(f"trajectory must end with (T, ny, nx) = "
                             f"{(self.T, *self.shape)}, got {tuple(x.shape)}")

    # ------------------------------------------------------------------ scipy back-end
    def _np(self, t: torch.Tensor) -> np.ndarray:
        return t.detach().to("cpu", torch.float64).numpy()

    def _Ak(self, k: int) -> Stencil:
        return Stencil(self.A.offsets, self.A.coef[self._pidx(k) if self.A.coef.shape[0] > 1
                                                   else 0])

    def _F_lu(self, k: int) -> LUFactor | SquarePlusIdentityFactor:
        """Factor of ``F_k`` (``solve``, ``solve_t``, ``logabsdet``), cached per distinct
        ``F_k``; see ``factor`` in the class docstring."""
        key = ("F", self._pidx(k))
        if key not in self._np_cache:
            self._np_cache[key] = self._make_F_factor(k, single=False)
        return self._np_cache[key]

    def _make_F_factor(self, k: int, single: bool):
        grid = dict(grid_shape=self.shape, threads=self.threads) \
            if self.backend == "numba" else {}
        for kw in ((grid, {}) if grid else ({},)):
            try:
                if self.factor == "complex":
                    Ak = self._Ak(k)
                    return SquarePlusIdentityFactor(
                        stencil_to_csr(Ak.offsets, self._np(Ak.coef)), self.dt,
                        single=single, **kw)
                Fk = self._Fk(k)
                Fm = stencil_to_csr(Fk.offsets, self._np(Fk.coef))
                return LUFactor(Fm, single=single, **kw)
            except NumericalError:
                if not kw:
                    raise
                continue  # the strip LU needs no pivoting: fall back to SuperLU's solves
        raise AssertionError("unreachable")  # pragma: no cover

    def _F_pre(self, k: int, single: bool = True):
        """Factor of ``F_k`` for the preconditioner (single precision unless ``single`` is
        False: then the double-precision :meth:`_F_lu`)."""
        if not single:
            return self._F_lu(k)
        key = ("Fpre", self._pidx(k))
        if key not in self._np_cache:
            self._np_cache[key] = self._make_F_factor(k, single=True)
        return self._np_cache[key]

    def _by_columns(self, fn, V: np.ndarray) -> np.ndarray:
        """``fn(V)`` for ``V`` ``(T, n, k)`` with the ``k`` columns split over ``threads``
        (``fn`` acts column-wise)."""
        k = V.shape[-1]
        nt = min(self.threads, k)
        if nt <= 1:
            return fn(V)
        parts = np.array_split(np.arange(k), nt)
        out = np.empty(V.shape, dtype=np.float64)
        with ThreadPoolExecutor(nt) as ex:
            res = list(ex.map(lambda idx: fn(np.ascontiguousarray(V[..., idx])), parts))
        for idx, r in zip(parts, res):
            out[..., idx] = r
        return out

    def _Q0_factor(self):
        key = ("Q0",)
        if key not in self._np_cache:
            if self.init == "white":
                self._np_cache[key] = _DiagFactor(np.full(self.n, 1.0 / self.init_std))
            else:
                Q0 = self._Q0_stencil()
                M = stencil_to_csr(Q0.offsets, self._np(Q0.coef))
                M = 0.5 * (M + M.T)
                name = ("SPDE initial precision Q_0 (init='stationary'; advection too strong? "
                        "use init='white')")
                grid = dict(grid_shape=self.shape) if self.backend == "numba" else {}
                try:
                    self._np_cache[key] = SPDFactor(M, name=name, **grid)
                except NumericalError:
                    if not grid:
                        raise
                    self._np_cache[key] = SPDFactor(M, name=name)
        return self._np_cache[key]

    def _sqrt_s(self, k: int) -> np.ndarray:
        return np.sqrt(self._np(self._sk(k)).reshape(-1))

    def precision_csr(self) -> sp.csr_matrix:
        """Assembled sparse ``Q`` ``(T n, T n)`` (block-tridiagonal; moderate sizes)."""
        blocks = [[None] * self.T for _ in range(self.T)]
        Q0 = self._Q0_stencil()
        blocks[0][0] = stencil_to_csr(Q0.offsets, self._np(Q0.coef))
        for k in range(1, self.T):
            Fk = self._Fk(k)
            F = stencil_to_csr(Fk.offsets, self._np(Fk.coef))
            Si = sp.diags(1.0 / self._np(self._sk(k)).reshape(-1))
            blocks[k - 1][k - 1] = blocks[k - 1][k - 1] + Si
            blocks[k][k] = (F.T @ Si @ F)
            blocks[k - 1][k] = -Si @ F
            blocks[k][k - 1] = -(F.T @ Si)
        return sp.bmat(blocks, format="csr") if self.T > 1 else sp.csr_matrix(blocks[0][0])

    def logdet(self) -> float:
        """Exact ``log det Q`` (float) from sparse LU factors of the blocks::

            log det Q_0 + sum_{k=1}^{T-1} (2 log|det F_k| - sum log s_k)
        """
        total = self._Q0_factor().logdet()
        for k in range(1, self.T):
            total += 2.0 * self._F_lu(k).logabsdet() - float(np.log(self._np(self._sk(k))).sum())
        return total

    def log_prob(self, x) -> np.ndarray:
        """``log N(x; mu, Q^{-1})`` for ``x`` ``(..., T, ny, nx)`` (exact sparse log-det)."""
        x = torch.as_tensor(x, dtype=self.dtype)
        q = self._np(self.quad(x))
        N = self.T * self.n
        return -0.5 * q + 0.5 * self.logdet() - 0.5 * N * math.log(2 * math.pi)

    def whiten_inverse(self, V: np.ndarray) -> np.ndarray:
        """``W V = L^{-1} Sigma^{1/2} V`` for ``V`` ``(T, n, k)``: the forward sweep
        ``x_0 = G_0^{-1} v_0``, ``x_k = F_k^{-1} (x_{k-1} + S_k^{1/2} v_k)`` (one sparse
        solve per step; ``x = mu + W z`` with white ``z`` is a prior draw)."""
        if V.shape[-1] > 1 and self.threads > 1 and self.backend == "superlu":
            return self._by_columns(self._whiten_inverse, V)
        return self._whiten_inverse(V)

    def _whiten_inverse(self, V: np.ndarray) -> np.ndarray:
        X = np.empty_like(V)
        X[0] = self._Q0_factor().solve_G(V[0])
        for k in range(1, self.T):
            X[k] = self._F_lu(k).solve(X[k - 1] + self._sqrt_s(k)[:, None] * V[k])
        return X

    def whiten_inverse_t(self, U: np.ndarray) -> np.ndarray:
        """``W^T U = Sigma^{1/2} L^{-T} U`` for ``U`` ``(T, n, k)`` (backward sweep:
        ``w_{T-1} = F_{T-1}^{-T} u_{T-1}``, ``w_k = F_k^{-T}(u_k + w_{k+1})``,
        ``w_0 = G_0^{-T}(u_0 + w_1)``, then scaling by ``S_k^{1/2}``)."""
        if U.shape[-1] > 1 and self.threads > 1 and self.backend == "superlu":
            return self._by_columns(self._whiten_inverse_t, U)
        return self._whiten_inverse_t(U)

    def _whiten_inverse_t(self, U: np.ndarray) -> np.ndarray:
        Wt = np.empty_like(U)
        nxt = None
        for k in range(self.T - 1, 0, -1):
            rhs = U[k] if nxt is None else U[k] + nxt
            nxt = self._F_lu(k).solve_t(rhs)
            Wt[k] = self._sqrt_s(k)[:, None] * nxt
        rhs = U[0] if nxt is None else U[0] + nxt
        Wt[0] = self._Q0_factor().solve_Gt(rhs)
        return Wt

    def _mean_np(self) -> np.ndarray:
        m = self._np(self.mean)
        return np.broadcast_to(m, (self.T, *self.shape)).reshape(self.T, self.n)

    def sample(self, n_samples: int = 1, *, rng: np.random.Generator | int | None = None,
               method: str = "simulate") -> np.ndarray:
        """Prior draws ``x = mu + L^{-1} Sigma^{1/2} z`` by simulating the SPDE
        (``method="simulate"``: one sparse solve per step), or ``x = mu + S^{1/2} U W z`` in
        the modes of :meth:`spectrum` (``"spectral"``: one inverse DCT and one batched
        ``ny x ny`` product per draw, the noise drawn directly in the modes; exact, but other
        draws than the simulation's for the same seed); ``"auto"``: spectral when the prior is
        separable.

        Returns ``(n_samples, T, ny, nx)`` float64.
        """
        if method not in ("simulate", "spectral", "auto"):
            raise ConfigError(f"sample: method must be 'simulate', 'spectral' or 'auto', got "
                              f"{method!r}")
        spec = self.spectrum() if method != "simulate" else None
        if method == "spectral" and spec is None:
            raise ConfigError("sample: method='spectral' needs a separable prior (no land, "
                              "stationary init, isotropic diffusion, no advection, parameters "
                              "constant in time and along rows)")
        rng = np.random.default_rng(rng)
        if spec is not None:
            return spec.sample_fields(rng=rng, k=int(n_samples),
                                      mean=self._mean_np().reshape(self.T, *self.shape))
        Z = rng.standard_normal((self.T, self.n, n_samples))
        X = self.whiten_inverse(Z) + self._mean_np()[:, :, None]
        return np.moveaxis(X, -1, 0).reshape(n_samples, self.T, *self.shape)

    def posterior_mean(self, y, mask, R, *, rtol: float = 1e-8, maxiter: int = 5000,
                       coarse: tuple[int, int] | None = None, block: bool = True,
                       return_info: bool = False, split: int | None = None,
                       block_size: int | None = None, solver: str = "auto", device=None):
        """Exact posterior mean ``(Q + H^T R^{-1} H)^{-1} (Q mu + H^T R^{-1} y)``.

        ``solver="spectral"`` (what ``"auto"`` picks when :meth:`spectrum` exists: no land,
        parameters constant in time and along rows, isotropic, no advection, stationary
        initial state; e.g. any open-ocean patch of a regular lon/lat grid): the prior
        covariance is applied exactly in the prior's modes, ``Sigma = Q^{-1} = S^{1/2} U W W^T
        U^T S^{1/2}`` (``U`` = DCT in ``x`` then per-mode eigenvectors in ``y``, ``W`` per-mode
        bidiagonal in time; :mod:`oceanda.priors.spde_spectral`): two DCTs and two batched
        ``ny x ny`` products, nothing factorised. The solve is in observation space (the
        representer form, Bennett 1992)::

            x = mu + Sigma H^T R^{-1/2} w,
            (I + R^{-1/2} H Sigma H^T R^{-1/2}) w = R^{-1/2} (y - H mu)

        by CG on ``m``-vectors (``m`` observations; the matrix has the eigenvalues of the
        whitened system above 1, so the same convergence), stopping at ``||r|| <= rtol ||b||``
        on that system. With several right-hand sides block CG (``block=True``) costs
        ``O(m k^2)`` per iteration beyond the ``k`` covariance products, so Matheron ensembles
        solve all ``N + 1`` right-hand sides in one block (``block_size=None``); the products
        go through the transforms ``2^28 / (8 T n)`` columns at a time. Measured
        (``hpc/bench/spde.py``, 200 x 200 x 15, 1.25 % observed, rtol 1e-5, idle 2-core
        machine, every set-up included): two threads 103 iterations, 4.57 s vs the sparse PCG
        below 94 iterations, 17.5 s (3.8x), one thread 3.8 s vs 16.5 s (4.4x); the means agree to
        2.6e-5 (max difference / max). 200 Matheron members of that DAW: 45-54 s on two
        threads (11 block iterations over 201 right-hand sides, spread/skill 0.97), 36x less
        per member than the previous path (simulated draws, whitened block CG).

        ``solver="pcg"`` (default for non-separable priors with one right-hand side, or several
        with ``block=False``):
        PCG on ``(Q + D) d = D (y - mu)`` itself (``D = H^T R^{-1} H``, ``x = mu + d``) with
        the prior covariance as preconditioner, ``M = L^{-1} Sigma L^{-T} ~ Q^{-1}``, and
        stopping on the ``M``-norm of the residual, ``sqrt(r^T M r) <= rtol sqrt(b^T M b)``
        (with ``M = Q^{-1}`` exactly this is the residual of the whitened system below: the
        same iterations and the same stopping rule). Because ``M`` only preconditions, it
        need not be exact, which buys three savings at no loss of exactness (the operator
        ``Q + D`` is applied exactly by sparse products, no solve): (i) the sweeps use
        single-precision factors (complex64 for the first-order factor: half the memory
        traffic; double precision when ``rtol < 1e-7``, where the single-precision rounding
        costs iterations); (ii) ``Q_0^{-1}`` is applied as ``(F^2 - I)^{-1} S`` through factors of
        ``A`` and ``I + (dt/2) A^alpha`` (exact when ``S^{-1} A`` is symmetric: isotropic or
        symmetric ``H``, no advection, uniform ``tau``; otherwise ``Q_0``'s own factor),
        so ``Q_0``'s 25-point factor (19 M entries on 200 x 200, 2.5-3.5 s) is never
        built; (iii) ``Q_0`` appears once per iteration instead of twice. Flexible
        (Polak-Ribiere) updates absorb the single-precision rounding. Measured
        (``hpc/bench/spde.py --rtol 1e-5 --previous``, 200 x 200 x 15, one thread, same
        process, every factorisation included): nearly idle 2-core machine: 93 iterations,
        16.96 s vs the whitened CG (previous default) 88 iterations, 23.08 s (1.36x), peak
        RSS 1.36 GB (with the draws' factors); with ``threads=2`` (numba strips) 14.05 s
        (1.64x the previous default); at load 7: 20.0 vs 27.7 CPU-s (1.4x). The means
        agree to 9.9e-6 (max difference / max). With ``solver="pcg"``, several right-hand sides with
        ``block=True`` use the preconditioned block CG :func:`~oceanda.linalg.sparse.
        block_pcg` (Gram matrices of the split variables from sparse ``Q`` products); for
        Matheron ensembles it did not beat the whitened block CG (200 members of
        60 x 60 x 15, rtol 1e-5: 7 block iterations, 38.6 s CPU vs 5 and 36.0 s, members
        agreeing to 2.6e-5), so ``"auto"`` keeps the latter for blocks.

        ``solver="whitened"`` (used for several right-hand sides with ``block=True``, for
        ``split``, and on request). ``H`` selects the cells where ``mask`` is True. Solved by
        CG in the whitened
        variable ``v`` (``x = mu + W v``, ``W = L^{-1} Sigma^{1/2}``)::

            (I + W^T H^T R^{-1} H W) v = W^T H^T R^{-1} (y - H mu)

        whose matrix has eigenvalues in ``[1, 1 + max prior variance / R]`` (well
        conditioned; the prior acts as an exact preconditioner). Each iteration is one
        forward and one backward sweep (``2 (T-1)`` sparse triangular solve pairs with the
        ``F_k`` factors, factorised once). Stops at ``||r|| <= rtol ||b||`` (default
        ``1e-8``) on that system.

        ``coarse=(h, ht)``: two-level variant. PCG on ``(Q + D) x = Q mu + D y`` itself
        (``D = H^T R^{-1} H``) with the balancing (BNN) preconditioner
        ``(I - Z E^{-1} Z^T A) Q^{-1} (I - A Z E^{-1} Z^T) + Z E^{-1} Z^T``, ``A = Q + D``,
        ``E = Z^T A Z``, ``Z`` the tensor-product hat functions of a coarse space-time grid
        (every ``h`` cells, every ``ht`` frames). ``A Z`` and ``E`` need only sparse
        products (no solve); ``Q^{-1}`` is the same pair of sweeps. The coarse space
        removes the large eigenvalues that many correlated observations put on smooth
        modes (measured: 1128 -> 330 iterations on a 60 x 60 x 10 DAW with ``h = 6``,
        ``ht = 2``). Stops at ``||b - A x|| <= rtol ||b||`` on ``A x = b``.

        Measured (``hpc/bench/spde.py``, alpha = 2, std 0.1 m, noise 0.05 m, 4 nadir
        tracks/day, one thread, shared machine at load 8-10 so CPU seconds are quoted):
        200 x 200 x 15, 1.25 % observed, complex first-order factor, ``rtol = 1e-5``:
        88 iterations, 24.8 s CPU + 2.9 s factorisation, 1.0 GB peak RSS, vs the previous
        default (real LU of ``F``, ``rtol = 1e-8``) 146 iterations, 56.0 s CPU (2.0x);
        the two agree to 3.0e-5 (max difference / max). At ``rtol = 1e-5`` the posterior
        mean is within 2.7e-5 of the ``rtol = 1e-10`` solution in RMS relative to its error
        against the truth (100 x 100 x 15: 1e-8 / 1e-6 / 1e-5 / 1e-4 need 152 / 114 / 92 / 71
        iterations, errors 3e-8 / 3e-6 / 3e-5 / 3e-4 of the RMSE). Sparse direct on
        40 x 40 x 15 (SuperLU, symmetric mode, minimum degree on ``A + A^T``): 36 s and
        2.6 GB (76 M factor entries), 49x the CG time. Previous session: 200 x 200 x 15:
        146 iterations, 78 s (+ 5 s factorisation), 1.06 GB peak RSS; 40 x 40 x 15: CG 7.4 s
        vs scipy ``spsolve(Q + D)`` 171 s (23x, loaded machine), agreeing to 1.5e-7 relative.
        The two-level variant
        pays only when observations are precise relative to the prior (100 x 100 x 15 at
        noise/std = 0.5: 152 -> 131 iterations, slower overall). Matheron ensembles by block
        CG: 200 members of 100 x 100 x 15 in 385 s (9 block iterations vs ~150 column-wise;
        4.2 GB peak: memory ~ 8 copies of ``T n (N + 1)`` float64).

        Several right-hand sides (one mask) are solved together; with ``block=True`` (default)
        by block CG (:func:`~oceanda.linalg.sparse.block_cg`: the search space grows by ``k``
        directions per iteration, so Matheron ensembles need far fewer sweeps), otherwise
        column by column (:func:`~oceanda.linalg.sparse.batched_pcg`). Right-hand sides are
        taken ``block_size`` at a time (memory: about 8 arrays of ``T n block_size`` float64;
        ``None``: as many as fit in 1 GiB, e.g. 26 on 200 x 200 x 15, all 201 on
        60 x 60 x 15). Smaller blocks need more iterations each (60 x 60 x 15, 201
        right-hand sides in blocks of 32: 34 block iterations; all at once: 5, and 200
        members in 32.5 s CPU with spread/skill 1.07; previous session all at once on
        100 x 100 x 15: 9).

        ``split=s > 1``: a single right-hand side is split into the contributions of ``s``
        consecutive blocks of frames, ``b = sum_i b_i``, solved together by block CG and
        summed (an *enlarged Krylov* space: it contains the plain CG space, so fewer
        iterations; measured on 100 x 100 x 15 at rtol 1e-6: 114 -> 91 / 74 / 56
        iterations for 2 / 4 / 8 parts), each part's sweeps on its own thread when
        ``threads >= s``. It pays only if the parts really run in parallel: on the shared
        (load 8-12) 2-core machine, ``split=2, threads=2`` took 75 iterations but 1.9x the
        CPU time of plain CG (92 iterations), so the default is ``split=1``. The reported
        residual is that of the summed solution, ``||b - M v|| / ||b||``.

        Args:
            y: ``(T, ny, nx)`` or ``(k, T, ny, nx)`` observations; ignored where ``mask``
                is False (NaN allowed there).
            mask: ``(T, ny, nx)`` bool.
            R: observation-error variance, scalar or ``(T, ny, nx)`` (> 0).
            device: with the spectral solver, run its covariance products in torch on this
                device (e.g. ``"cuda"``, float64; the CG is the same); ``None``: numpy.
            solver: ``"auto"``, ``"spectral"``, ``"pcg"`` or ``"whitened"`` (above);
                ``coarse`` selects the two-level variant whatever ``solver`` says (and
                ``split`` the whitened one).
        Returns:
            ``x`` of the shape of ``y`` (float64), and a
            :class:`~oceanda.linalg.sparse.CGInfo` if ``return_info``.
        """
        y = np.asarray(y, dtype=np.float64)
        mask = np.asarray(mask, dtype=bool)
        grid = (self.T, *self.shape)
        if mask.shape != grid:
            raise InputError(f"mask must be (T, ny, nx) = {grid}, got {mask.shape}")
        single = y.ndim == 3
        Y = y[None] if single else y
        if Y.shape[1:] != grid:
            raise InputError(f"y must end with (T, ny, nx) = {grid}, got {y.shape}")
        Rv = np.broadcast_to(np.asarray(R, dtype=np.float64), grid)
        if not np.all(Rv[mask] > 0):
            raise InputError("observation-error variance R must be > 0")
        k = Y.shape[0]
        if solver not in ("auto", "pcg", "whitened", "spectral"):
            raise ConfigError(f"posterior_mean: solver must be 'auto', 'pcg', 'whitened' or "
                              f"'spectral', got {solver!r}")
        if solver == "spectral" and self.spectrum() is None:
            raise ConfigError("posterior_mean: solver='spectral' needs a separable prior (no "
                              "land, stationary init, isotropic diffusion, no advection, "
                              "parameters constant in time and along rows)")
        if solver == "auto" and coarse is None and (split or 1) == 1 \
                and self.spectrum() is not None:
            solver = "spectral"
        if device is not None and solver != "spectral":
            raise ConfigError("posterior_mean: device= runs the spectral solver only (a "
                              "separable prior); the sparse solvers are CPU")
        if solver == "spectral":
            X, info = self._posterior_spectral(Y, mask, Rv, rtol, maxiter, block_size, block,
                                               device)
            X = X[0] if single else X
            return (X, info) if return_info else X
        Ri = np.where(mask, 1.0 / np.where(mask, Rv, 1.0), 0.0).reshape(self.T, self.n, 1)
        mu = self._mean_np()[:, :, None]
        innov = np.where(mask[None], Y - self._mean_np().reshape(grid)[None], 0.0)
        U = np.moveaxis(innov.reshape(k, self.T, self.n), 0, -1)  # (T, n, k)
        if solver == "auto":
            solver = "pcg" if (coarse is None and (split or 1) == 1
                               and (k == 1 or not block)) else "whitened"
        if coarse is not None or solver == "pcg":
            if coarse is not None:
                X, info = self._posterior_two_level(Ri, U, coarse, rtol, maxiter)
            else:
                X, info = self._posterior_pcg(Ri, U, rtol, maxiter, block_size, block)
            X = np.moveaxis(X + mu, -1, 0).reshape(k, *grid)
            X = X[0] if single else X
            return (X, info) if return_info else X
        b = self.whiten_inverse_t(Ri * U)
        shp = b.shape

        def matvec(v):
            V = v.reshape(self.T, self.n, v.shape[-1])
            return (V + self.whiten_inverse_t(Ri * self.whiten_inverse(V))).reshape(v.shape)

        split = 1 if split is None else int(split)
        if k == 1 and split > 1 and self.T > 1:
            frames = [f for f in np.array_split(np.arange(self.T), min(split, self.T))]
            Ui = np.zeros((self.T, self.n, len(frames)))
            for j, f in enumerate(frames):
                Ui[f, :, j] = (Ri * U)[f, :, 0]
            keep = np.flatnonzero(np.abs(Ui).reshape(-1, len(frames)).max(0) > 0)
            Bs = self.whiten_inverse_t(Ui[..., keep]) if keep.size else Ui[..., :1]
            vs, info_s = block_cg(matvec, Bs.reshape(-1, Bs.shape[-1]), rtol=rtol,
                                  maxiter=maxiter, raise_on_fail=False)
            v = vs.sum(axis=1, keepdims=True)
            bn = max(float(np.linalg.norm(b)), np.finfo(float).tiny)
            rel = float(np.linalg.norm(b.reshape(-1, 1) - matvec(v))) / bn
            info = CGInfo(info_s.iterations, np.array([rel]), bool(rel <= 10 * rtol))
            if not info.converged:
                raise NumericalError(f"split block CG did not reach rtol={rtol:g} in "
                                     f"{maxiter} iterations (relative residual {rel:.2e})")
        else:
            if block_size is None:
                bs = max(1, int(2**30 // (8 * 8 * self.T * self.n)))
            else:
                bs = max(1, int(block_size))
            cols = lambda Bc: batched_pcg(matvec, Bc, rtol=rtol, maxiter=maxiter)  # noqa: E731
            v, info = _solve_columns(
                b.reshape(-1, k), bs, rtol,
                (lambda Bc: block_cg(matvec, Bc, rtol=rtol, maxiter=maxiter)) if block else cols,
                cols)
        X = self.whiten_inverse(v.reshape(shp)) + mu
        X = np.moveaxis(X, -1, 0).reshape(k, *grid)
        X = X[0] if single else X
        return (X, info) if return_info else X

    # ------------------------------------------------------------------ prior-preconditioned CG
    def _Q_ops(self):
        """Sparse ``F_k`` (per distinct frame), symmetrised ``Q_0`` and ``1 / s_k``
        ``(T-1, n, 1)`` for :meth:`_Q_apply_np`."""
        key = ("Qops",)
        if key not in self._np_cache:
            F = {}
            for k in range(1, self.T):
                i = self._pidx(k)
                if i not in F:
                    Fk = self._Fk(k)
                    m = stencil_to_csr(Fk.offsets, self._np(Fk.coef))
                    F[i] = (m, m.T.tocsr())
            Q0 = self._Q0_stencil()
            Q0m = stencil_to_csr(Q0.offsets, self._np(Q0.coef))
            sinv = np.stack([1.0 / self._np(self._sk(k)).reshape(-1)
                             for k in range(1, self.T)])[..., None] if self.T > 1 else None
            self._np_cache[key] = (F, sp.csr_matrix(0.5 * (Q0m + Q0m.T)), sinv)
        return self._np_cache[key]

    def _Q_apply_np(self, X: np.ndarray) -> np.ndarray:
        """``Q X`` for ``X`` ``(T, n, k)`` from sparse products (``e_k = S_k^{-1}(F_k x_k -
        x_{k-1})``, ``(Q x)_k = F_k^T e_k - e_{k+1}``, plus ``Q_0 x_0``); no solve."""
        F, Q0, sinv = self._Q_ops()
        T, n, k = X.shape
        out = np.empty_like(X)
        out[0] = Q0 @ X[0]
        if T == 1:
            return out

        def frames(M, Y):  # M Y[t] for all t, one sparse product with (n, m k) columns
            m = Y.shape[0]
            Z = M @ np.ascontiguousarray(Y.transpose(1, 0, 2)).reshape(n, m * k)
            return Z.reshape(n, m, k).transpose(1, 0, 2)

        if len(F) == 1:
            ((Fm, Ftm),) = F.values()
            E = frames(Fm, X[1:]) - X[:-1]
            E *= sinv
            out[1:] = frames(Ftm, E)
        else:
            E = np.stack([F[self._pidx(t)][0] @ X[t] for t in range(1, T)]) - X[:-1]
            E *= sinv
            for t in range(1, T):
                out[t] = F[self._pidx(t)][1] @ E[t - 1]
        out[:-1] -= E
        return out

    def _q0_selfadjoint(self) -> bool:
        """Whether ``S_1^{-1} A_1`` is symmetric (isotropic / symmetric ``H``, no advection,
        uniform ``tau``): then ``Q_0 = S^{-1}(F^2 - I)`` exactly."""
        key = ("Q0sa",)
        if key not in self._np_cache:
            k = 1 if self.T > 1 else 0
            Ak = self._Ak(k)
            K = sp.diags(1.0 / self._np(self._sk(k)).reshape(-1)) @ stencil_to_csr(
                Ak.offsets, self._np(Ak.coef))
            asym = abs(K - K.T).max() if K.nnz else 0.0
            self._np_cache[key] = bool(asym <= 1e-10 * abs(K).max())
        return self._np_cache[key]

    def _Q0_pre(self, U: np.ndarray, single: bool = True) -> np.ndarray:
        """``Q_0^{-1} U`` for the preconditioner: ``init="white"``: exact; stationary with
        ``S^{-1} A`` symmetric: ``(F^2 - I)^{-1} S U = (dt B)^{-1} (2 I + dt B)^{-1} S U``
        (``B = A^alpha``; equal to ``Q_0^{-1}`` up to rounding) from factors of ``A`` and of
        ``I + (dt/2) B`` (for ``alpha = 2`` the complex first-order one) in single
        (``single``) or double precision, much cheaper than ``Q_0``'s 25-point factor;
        otherwise that factor."""
        if self.init == "white":
            return U * self.init_std**2
        if not self._q0_selfadjoint():
            return self._Q0_factor().solve(U)
        key = ("Q0pre", single)
        if key not in self._np_cache:
            k = 1 if self.T > 1 else 0
            Ak = self._Ak(k)
            Am = stencil_to_csr(Ak.offsets, self._np(Ak.coef))
            grid = dict(grid_shape=self.shape, threads=self.threads) \
                if self.backend == "numba" else {}
            try:
                Ainv = LUFactor(Am, single=single, **grid)
                if self.alpha == 2:
                    half = SquarePlusIdentityFactor(Am, 0.5 * self.dt, single=single, **grid)
                else:
                    half = LUFactor(sp.eye(self.n) + 0.5 * self.dt * Am, single=single,
                                    **grid)
            except NumericalError:  # pivoting needed: use Q_0's own factor
                self._np_cache[key] = None
            else:
                self._np_cache[key] = (Ainv, half, self._np(self._sk(k)).reshape(-1, 1))
        pre = self._np_cache[key]
        if pre is None:
            return self._Q0_factor().solve(U)
        Ainv, half, s = pre
        Y = 0.5 * half.solve(s * U)
        for _ in range(self.alpha):
            Y = Ainv.solve(Y)
        return Y / self.dt

    spectral_max_bytes = 2**30  # the eigenvectors (8 nx ny^2 bytes) beyond which not to go

    def spectrum(self) -> SeparableSpectrum | None:
        """The exact spectral factors of ``Q`` (:mod:`oceanda.priors.spde_spectral`) when the
        prior is separable (no land, stationary initial state, time-invariant parameters
        constant along rows, isotropic, no advection) and its eigenvectors take at most
        ``spectral_max_bytes`` (1 GiB: grids up to ~500 x 500), else ``None``. Cached."""
        key = ("spectrum",)
        if key not in self._np_cache:
            spec = None
            ny, nx = self.shape
            if (8 * nx * ny * ny <= self.spectral_max_bytes
                    and self.init == "stationary" and self.A.coef.shape[0] == 1
                    and self.s.shape[0] == 1 and bool(self.ocean.all())):
                Ak = self._Ak(0)
                spec = separable_spectrum(stencil_to_csr(Ak.offsets, self._np(Ak.coef)),
                                          self._np(self._sk(0)), self.shape, T=self.T,
                                          dt=self.dt, alpha=self.alpha, workers=self.threads)
            self._np_cache[key] = spec
        return self._np_cache[key]

    def _precond_np(self, R: np.ndarray, single: bool = True) -> np.ndarray:
        """``M R ~ Q^{-1} R = L^{-1} Sigma L^{-T} R`` for ``R`` ``(T, n, k)``: backward sweep
        ``w_{T-1} = F^{-T} r_{T-1}``, ``w_k = F_k^{-T}(r_k + w_{k+1})``, then
        ``x_0 = Q_0^{-1}(r_0 + w_1)`` (:meth:`_Q0_pre`), forward ``x_k = F_k^{-1}(x_{k-1} +
        S_k w_k)``; single-precision factors if ``single``."""
        X = np.empty_like(R)
        nxt = None
        for k in range(self.T - 1, 0, -1):
            rhs = R[k] if nxt is None else R[k] + nxt
            nxt = self._F_pre(k, single).solve_t(rhs)
            X[k] = nxt * self._np(self._sk(k)).reshape(-1, 1)
        X[0] = self._Q0_pre(R[0] if nxt is None else R[0] + nxt, single)
        for k in range(1, self.T):
            X[k] = self._F_pre(k, single).solve(X[k - 1] + X[k])
        return X

    def _posterior_spectral(self, Y, mask, Rv, rtol, maxiter, block_size, block=True,
                            device=None):
        """Posterior means ``(k, T, ny, nx)`` of the right-hand sides ``Y`` ``(k, T, ny, nx)``
        in the representer form with the spectral covariance (:meth:`posterior_mean`,
        ``solver="spectral"``), and the :class:`CGInfo`. ``device``: the covariance products
        run in torch there (:class:`TorchSeparableSpectrum`); the CG on the ``m``-vectors is
        the same."""
        spec = self.spectrum()
        T, n, k = self.T, self.n, Y.shape[0]
        ny, nx = self.shape
        mean = self._mean_np().reshape(T, ny, nx)
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
        sq = np.sqrt(self._np(self._sk(0)).reshape(-1))  # S^{1/2} per cell
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
        bs = k if block_size is None else max(1, int(block_size))
        cols = lambda Bc: batched_pcg(matvec, Bc, rtol=rtol, maxiter=maxiter)  # noqa: E731
        Wsol, info = _solve_columns(
            c, bs, rtol,
            (lambda Bc: block_cg(matvec, Bc, rtol=rtol, maxiter=maxiter)) if block else cols, cols)
        sqf = sq.reshape(ny, nx)
        for c0 in range(0, k, chunk):
            X[c0:c0 + chunk] += to_np(core(Wsol[:, c0:c0 + chunk])).transpose(3, 2, 1, 0) * sqf
        return X, info

    def _posterior_pcg(self, Ri, U, rtol, maxiter, block_size, block=False):
        T, n, k = self.T, self.n, U.shape[-1]
        N = T * n
        single = rtol >= 1e-7  # below, the single-precision rounding would cost iterations

        def matvec(v):
            V = v.reshape(T, n, -1)
            return (self._Q_apply_np(V) + Ri * V).reshape(v.shape)

        def prec(r):
            return self._precond_np(r.reshape(T, n, -1), single).reshape(r.shape)

        def metric(y):
            return self._Q_apply_np(y.reshape(T, n, -1)).reshape(y.shape)

        B = (Ri * U).reshape(N, k)
        if block_size is None:  # memory: about 10 arrays of T n block_size float64
            bs = k if not block else max(1, int(2**30 // (10 * 8 * N)))
        else:
            bs = max(1, int(block_size))
        def cols(Bc):
            return batched_pcg(matvec, Bc, precond=prec, rtol=rtol, maxiter=maxiter,
                               norm="preconditioned", flexible=True)

        def blk(Bc):
            return block_pcg(matvec, Bc, precond=prec, metric=metric, rtol=rtol, maxiter=maxiter)

        X, info = _solve_columns(B, bs, rtol, blk if block else cols, cols)
        return X.reshape(T, n, k), info

    # ------------------------------------------------------------------ two-level solve
    def _coupling_csr(self) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
        """``Q_0`` (n x n), ``L'`` ((T-1) n x T n: rows ``F_k x_k - x_{k-1}``) and the
        diagonal of ``Sigma'^{-1}``; ``Q = blkdiag(Q_0, 0..) + L'^T Sigma'^{-1} L'``."""
        key = ("coupling",)
        if key not in self._np_cache:
            n, T = self.n, self.T
            Q0 = self._Q0_stencil()
            Q0m = stencil_to_csr(Q0.offsets, self._np(Q0.coef))
            if T > 1:
                blocks = [[None] * T for _ in range(T - 1)]
                si = []
                for k in range(1, T):
                    Fk = self._Fk(k)
                    blocks[k - 1][k] = stencil_to_csr(Fk.offsets, self._np(Fk.coef))
                    blocks[k - 1][k - 1] = -sp.eye(n, format="csr")
                    si.append(1.0 / self._np(self._sk(k)).reshape(-1))
                Lp = sp.bmat(blocks, format="csr")
                Lp.eliminate_zeros()
                sinv = np.concatenate(si)
            else:
                Lp, sinv = sp.csr_matrix((0, n)), np.zeros(0)
            self._np_cache[key] = (Q0m, Lp, sinv)
        return self._np_cache[key]

    def _Q_apply(self, X: np.ndarray) -> np.ndarray:
        """``Q X`` for ``X`` ``(T n, k)`` via the sparse blocks (no solve)."""
        Q0m, Lp, sinv = self._coupling_csr()
        out = Lp.T @ (sinv[:, None] * (Lp @ X)) if self.T > 1 else np.zeros_like(X)
        out[: self.n] += Q0m @ X[: self.n]
        return out

    def _posterior_two_level(self, Ri, U, coarse, rtol, maxiter):
        import scipy.linalg as sla

        h, ht = (int(c) for c in coarse)
        if h < 1 or ht < 1:
            raise ConfigError(f"coarse spacing must be >= 1 cell / frame, got {coarse}")
        T, n = self.T, self.n
        ny, nx = self.shape
        Z = sp.kron(sp.kron(_hats(T, ht), _hats(ny, h)), _hats(nx, h), format="csc")
        d = Ri.reshape(-1)
        N = T * n
        Q0m, Lp, sinv = self._coupling_csr()
        QZ = Lp.T @ sp.diags(sinv) @ (Lp @ Z) if T > 1 else sp.csr_matrix((N, Z.shape[1]))
        QZ = sp.csr_matrix(QZ)
        QZ = QZ + sp.vstack([Q0m @ Z[:n], sp.csr_matrix((N - n, Z.shape[1]))])
        AZ = sp.csr_matrix(QZ + sp.diags(d) @ Z)
        E = (Z.T @ AZ).toarray()
        cf = sla.cho_factor(0.5 * (E + E.T))
        ZT, AZT = Z.T.tocsr(), AZ.T.tocsr()
        k = U.shape[-1]

        def A(X):
            return self._Q_apply(X) + d[:, None] * X

        def Qinv(Rr):
            V = Rr.reshape(T, n, -1)
            return self.whiten_inverse(self.whiten_inverse_t(V)).reshape(N, -1)

        def prec(Rr):
            c = sla.cho_solve(cf, ZT @ Rr)
            y_ = Qinv(Rr - AZ @ c)
            return y_ - Z @ sla.cho_solve(cf, AZT @ y_) + Z @ c

        b = (Ri * U).reshape(N, k)
        X, info = batched_pcg(A, b, precond=prec, rtol=rtol, maxiter=maxiter)
        return X.reshape(T, n, k), info


class _SparseLogdetFn(torch.autograd.Function):
    """``log det Q_0 + 2 sum_k log|det F_k|`` of a :class:`SPDEPrior` from sparse factors,
    differentiable in the prior's parameter tensors (see :meth:`SPDEPrior.logdet_torch`)."""

    @staticmethod
    def forward(ctx, prior, names, p, seed, *tensors):
        ctx.prior, ctx.names, ctx.p, ctx.seed = prior, names, p, seed
        ctx.save_for_backward(*tensors)
        val = prior._Q0_factor().logdet()
        for k in range(1, prior.T):
            val += 2.0 * prior._F_lu(k).logabsdet()
        return torch.as_tensor(val, dtype=prior.dtype, device=prior.dx.device)

    @staticmethod
    def backward(ctx, g):
        prior, names = ctx.prior, ctx.names
        tensors = ctx.saved_tensors
        total = sum(t.numel() for t in tensors)
        if total <= prior._exact_max:
            grads = prior._logdet_grad_complex_step(dict(zip(names, tensors)))
        else:
            grads = prior._logdet_grad_probing(dict(zip(names, tensors)), ctx.p, ctx.seed)
        return (None, None, None, None, *[g * gr for gr in grads])


def _hats(n: int, h: int) -> sp.csr_matrix:
    """``(n, m)`` piecewise-linear hat functions on nodes ``0, h, 2h, .., n-1``."""
    nodes = np.unique(np.r_[np.arange(0, n, h), n - 1])
    x = np.arange(n)[:, None]
    left = np.r_[nodes[0], nodes[:-1]][None, :]
    right = np.r_[nodes[1:], nodes[-1]][None, :]
    nd = nodes[None, :]
    up = np.where((x >= left) & (x <= nd) & (nd > left), (x - left) / np.maximum(nd - left, 1), 0.0)
    down = np.where((x > nd) & (x <= right) & (right > nd),
                    (right - x) / np.maximum(right - nd, 1), 0.0)
    H = up + down
    H[nodes, np.arange(len(nodes))] = 1.0
    return sp.csr_matrix(H)
