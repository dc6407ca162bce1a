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
scale through sparse factors, :meth:`SPDEPrior.logdet_torch`). The operator ``Q`` itself
(products, factors, sweeps, log-det, draws) is :class:`~oceanda.priors.spde.precision.
SPDEPrecision` (``prior.precision``); posterior means are solved by one of the solvers of
:mod:`oceanda.priors.spde.posterior` (:meth:`SPDEPrior.posterior_mean`).

Reference: Lindgren, Rue & Lindstrom (2011), JRSS-B 73(4); Beauchamp et al. (2024),
"Bridging data assimilation & SPDE with a generative extension of 4DVarNet schemes".
"""

from __future__ import annotations

import math

import numpy as np
import torch

from oceanda.errors import ConfigError, InputError, NumericalError
from oceanda.linalg.stencil import Stencil, diffusion_advection, power
from oceanda.priors.spde.logdet import sparse_logdet
from oceanda.priors.spde.posterior import solve_posterior
from oceanda.priors.spde.precision import SPDEPrecision, precision_product

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
            several right-hand sides are split between threads (SuperLU's solve holds the
            GIL, so this gains little). For separable priors (:meth:`SPDEPrecision.spectrum`)
            the DCT workers and the compiled per-mode loops use this many threads (the
            ``ny x ny`` products use BLAS's own, ``OMP_NUM_THREADS``). ``None``: 1.
        backend: ``"superlu"`` (SuperLU's own solves; ``"auto"`` with one thread) or
            ``"numba"`` (``"auto"`` with ``threads > 1``; the same SuperLU factors, or for
            more than one thread factors ordered strip by strip, with triangular solves
            compiled by numba that release the GIL, so ``threads`` strips of the grid are
            solved concurrently; identical draws). ``hpc/bench/spde.py`` times both.
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
        if backend == "auto":  # faster of the two in hpc/bench/spde.py (README, SPDE prior)
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
        self.A, self.F, self.s = self._ops(self.params)
        self.Tp = self.F.coef.shape[0]
        self.precision = SPDEPrecision(self)  # Q: products, factors, log-det, draws

    # ------------------------------------------------------------------ torch operators
    def _ops(self, params: dict) -> tuple[Stencil, Stencil, torch.Tensor]:
        """``(A, F, s)`` stacks (leading ``Tp`` dim) of the parameters ``params``:
        ``A_k``, ``F_k = I + dt A_k^alpha`` and the diagonal ``s_k`` of ``S_k``."""
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

    def _pidx(self, k: int) -> int:
        """Index of frame ``k``'s operators in the (Tp, ...) stacks."""
        return k if self.Tp > 1 else 0

    def _Fk(self, k: int) -> Stencil:
        """Stencil of ``F_k``."""
        return Stencil(self.F.offsets, self.F.coef[self._pidx(k)])

    def _Ak(self, k: int) -> Stencil:
        """Stencil of ``A_k``."""
        return Stencil(self.A.offsets, self.A.coef[self._pidx(k) if self.A.coef.shape[0] > 1
                                                   else 0])

    def _sk(self, k: int) -> torch.Tensor:
        """``s_k`` ``(ny, nx)``, the diagonal of ``S_k``."""
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
        """``Q x`` (matrix free, :func:`~oceanda.priors.spde.precision.precision_product`)
        for ``x`` ``(..., T, ny, nx)``; differentiable."""
        self._check_traj(x)
        tv = self.Tp > 1
        F = Stencil(self.F.offsets, self.F.coef[1:] if tv else self.F.coef)
        s = self.s[1:] if self.s.shape[0] > 1 else self.s
        return precision_product(x, F.apply, F.T.apply, self._Q0_stencil().apply, 1.0 / s)

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
          construction) and one complex sparse LU per number and distinct block;
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
            return sparse_logdet(self, int(probe_spacing))
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
        """Dense ``Q`` ``(T n, T n)`` (tests only; from :meth:`SPDEPrecision.csr`)."""
        return torch.as_tensor(self.precision.csr().toarray(), dtype=self.dtype)

    def _check_traj(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-3:]) != (self.T, *self.shape):
            raise InputError(f"trajectory must end with (T, ny, nx) = "
                             f"{(self.T, *self.shape)}, got {tuple(x.shape)}")


    def logdet(self) -> float:
        """Exact ``log det Q`` (:meth:`SPDEPrecision.logdet`, sparse factors, no gradient)."""
        return self.precision.logdet()

    def log_prob(self, x) -> np.ndarray:
        """``log N(x; mu, Q^{-1})`` for ``x`` ``(..., T, ny, nx)`` (exact sparse log-det)."""
        x = torch.as_tensor(x, dtype=self.dtype)
        q = self.quad(x).detach().to("cpu", torch.float64).numpy()
        N = self.T * self.n
        return -0.5 * q + 0.5 * self.logdet() - 0.5 * N * math.log(2 * math.pi)

    def _mean_np(self) -> np.ndarray:
        m = self.mean.detach().to("cpu", torch.float64).numpy()
        return np.broadcast_to(m, (self.T, *self.shape)).reshape(self.T, self.n)

    def sample(self, n_samples: int = 1, *, rng: np.random.Generator | int | None = None,
               method: str = "simulate") -> np.ndarray:
        """Prior draws ``x = mu + L^{-1} Sigma^{1/2} z`` (:meth:`SPDEPrecision.sample`) by
        simulating the SPDE (``method="simulate"``: one sparse solve per step), or
        ``x = mu + S^{1/2} U W z`` in the modes of :meth:`SPDEPrecision.spectrum`
        (``"spectral"``: one inverse DCT and one batched ``ny x ny`` product per draw, the
        noise drawn directly in the modes; exact, but other draws than the simulation's for
        the same seed); ``"auto"``: spectral when the prior is separable.

        Returns ``(n_samples, T, ny, nx)`` float64.
        """
        if method not in ("simulate", "spectral", "auto"):
            raise ConfigError(f"sample: method must be 'simulate', 'spectral' or 'auto', got "
                              f"{method!r}")
        spec = self.precision.spectrum() if method != "simulate" else None
        if method == "spectral" and spec is None:
            raise ConfigError("sample: method='spectral' needs a separable prior (no land, "
                              "stationary init, isotropic diffusion, no advection, parameters "
                              "constant in time and along rows)")
        return self.precision.sample(int(n_samples), np.random.default_rng(rng),
                                     "spectral" if spec is not None else "simulate",
                                     mean=self._mean_np())

    def posterior_mean(self, y, mask, R, *, rtol: float = 1e-8, maxiter: int = 5000,
                       coarse: tuple[int, int] | None = None, block: bool = True,
                       return_info: bool = False, block_size: int | None = None,
                       solver: str = "auto", device=None):
        """Exact posterior mean ``(Q + H^T R^{-1} H)^{-1} (Q mu + H^T R^{-1} y)`` (``H``
        selects the cells where ``mask`` is True) by one of the solvers of
        :mod:`oceanda.priors.spde.posterior`: ``"spectral"`` (representer CG with the
        spectral covariance; separable priors), ``"pcg"`` (CG on ``Q + D`` preconditioned by
        the prior), ``"whitened"`` (CG on the whitened system), ``"two_level"`` (PCG with a
        coarse space, ``coarse=(h, ht)``) or ``"direct"`` (sparse LDL^T of ``Q + D``);
        ``"auto"``: :func:`~oceanda.priors.spde.posterior.choose`. Several right-hand sides
        (one mask) are solved together, by block CG when ``block`` (default), else column by
        column, ``block_size`` at a time (``None``: as many as fit in about 1 GiB).

        Args:
            y: ``(T, ny, nx)`` or ``(k, T, ny, nx)`` observations; ignored where ``mask``
                is False (NaN allowed there).
            mask: ``(T, ny, nx)`` bool.
            R: observation-error variance, scalar or ``(T, ny, nx)`` (> 0).
            rtol, maxiter: the iterative solvers' relative residual and iteration cap (each
                solver's module says on which system).
            coarse: ``(h, ht)``: coarse space-time spacing of the two-level solver (chooses it
                under ``"auto"``).
            device: the spectral solver's covariance products in torch on this device (e.g.
                ``"cuda"``, float64; the CG is the same); ``None``: numpy.
            solver: a name of :data:`~oceanda.priors.spde.posterior.SOLVERS` or ``"auto"``.
        Returns:
            ``x`` of the shape of ``y`` (float64), and a
            :class:`~oceanda.linalg.sparse.CGInfo` if ``return_info``.
        """
        X, info = solve_posterior(self, y, mask, R, solver=solver, rtol=rtol, maxiter=maxiter,
                                  block=block, block_size=block_size, coarse=coarse,
                                  device=device)
        return (X, info) if return_info else X
