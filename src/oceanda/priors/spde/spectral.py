"""Exact spectral form of a separable SPDE prior: ``Q^{-1}`` by transforms, no sparse solve.

On a regular lon/lat grid without land, with time-invariant parameters that do not vary
along a row (``kappa``, ``gamma``, ``tau`` scalars or functions of latitude), isotropic
diffusion and no advection, the finite-volume operator of :mod:`oceanda.priors.spde` is
separable::

    A = Y (x) I_nx + diag(c) (x) L_x

(``Y`` tridiagonal in ``y`` with ``kappa^2`` on its diagonal, ``c_i`` the east-west face
coupling of row ``i``, ``L_x`` the 1-D Neumann Laplacian ``[[1, -1], [-1, 2, -1], ..]``)
and the noise covariance ``S = diag(s)`` is constant along rows. ``L_x`` is diagonalised by
the orthonormal DCT-II, ``L_x = C^T diag(lambda) C``, ``lambda_j = 2 - 2 cos(pi j / nx)``,
and when ``S^{-1} A`` is symmetric (the condition under which the stationary ``Q_0`` of
:class:`~oceanda.priors.spde.SPDEPrior` is exact) ``K = S^{-1/2} A S^{1/2}`` is symmetric,
with ``K_j = S_y^{-1/2} Y S_y^{1/2} + lambda_j diag(c)`` per east-west mode ``j``: a
symmetric tridiagonal ``ny x ny`` matrix, ``K_j = V_j diag(mu_j) V_j^T``
(:func:`scipy.linalg.eigh_tridiagonal`). With ``x = S^{1/2} U u`` (``U`` = DCT in ``x`` then
``V_j`` in ``y``, orthogonal) every 2-D mode ``m`` evolves independently::

    f_m v_k = v_{k-1} + z_k,   f_m = 1 + dt mu_m^alpha,   z_k ~ N(0, 1),
    v_0 ~ N(0, 1 / (f_m^2 - 1))                       (the stationary AR(1))

so ``Q = S^{-1/2} U Qhat U^T S^{-1/2}`` with ``Qhat`` block-diagonal over modes, each block
the ``T x T`` tridiagonal ``diag(f^2, f^2 + 1, .., f^2 + 1, f^2)``, off-diagonal ``-f``
(``T = 1``: ``f^2 - 1``). Hence

    Q^{-1} r = S^{1/2} U Qhat^{-1} U^T S^{1/2} r

costs two DCTs and two batched ``ny x ny`` products per trajectory (BLAS) and a
``T``-step tridiagonal recursion vectorised over the ``n`` modes; the same factors give
``Q`` itself, ``log det Q`` in closed form and exact samples ``x = mu + S^{1/2} U Lhat^{-T} z``.
It is exact (to rounding: the eigenvectors are orthonormal to ~1e-15) for the operators it
accepts; :func:`separable_spectrum` checks separability on the assembled sparse matrices and
returns ``None`` otherwise (land, spatially varying parameters along rows, anisotropy,
advection, time-varying parameters, white initial state), and the caller keeps its sparse
factors. Memory: the ``V_j`` take ``nx ny^2`` floats (64 MB on 200 x 200).
"""

from __future__ import annotations

import types

import numpy as np
import scipy.fft as sfft
import scipy.linalg as sla
import scipy.sparse as sp
from numba import njit, prange

_JIT = dict(cache=True, nogil=True)
_TILE = 16  # east-west cells per tile of the layout change


def _modes_to_fields_py(X, out):  # pragma: no cover - compiled below
    """``out[q, t, i, j] = X[j, i, t, q]``: x-major ``(nx, ny, T, c)`` -> fields
    ``(c, T, ny, nx)``, tiled over ``j`` so both sides stream through cache."""
    nx, ny, T, c = X.shape
    for t in prange(T):
        for i in range(ny):
            for j0 in range(0, nx, _TILE):
                j1 = min(nx, j0 + _TILE)
                for q in range(c):
                    for j in range(j0, j1):
                        out[q, t, i, j] = X[j, i, t, q]


@njit(**_JIT)
def _back_sweep(Z, lo, j, i):  # pragma: no cover - compiled
    """``Z[j, i] <- Lhat^{-T} Z[j, i]`` (unit upper bidiagonal, ``-lo`` above the diagonal)
    for mode ``(j, i)`` of ``Z`` ``(nx, ny, T, c)``."""
    T, c = Z.shape[2], Z.shape[3]
    for t in range(T - 2, -1, -1):
        lt = lo[t + 1, j, i]
        for q in range(c):
            Z[j, i, t, q] -= lt * Z[j, i, t + 1, q]


def _qhat_solve_py(Z, d, lo):  # pragma: no cover - compiled below
    """``Z <- Qhat^{-1} Z`` per mode: ``Z`` ``(nx, ny, T, c)``, ``Qhat = L D L^T`` with pivots
    ``d`` and sub-diagonal ``lo`` ``(T, nx, ny)`` of the unit bidiagonal ``L``."""
    nx, ny, T, c = Z.shape
    for j in prange(nx):
        for i in range(ny):
            for t in range(1, T):
                lt = lo[t, j, i]
                for q in range(c):
                    Z[j, i, t, q] -= lt * Z[j, i, t - 1, q]
            for t in range(T):
                inv = 1.0 / d[t, j, i]
                for q in range(c):
                    Z[j, i, t, q] *= inv
            _back_sweep(Z, lo, j, i)


def _whiten_py(Z, d, lo):  # pragma: no cover - compiled below
    """``Z <- Lhat^{-T} D^{-1/2} Z`` per mode (``W`` of :meth:`SeparableSpectrum.whiten`)."""
    nx, ny, T, c = Z.shape
    for j in prange(nx):
        for i in range(ny):
            for t in range(T):
                inv = 1.0 / np.sqrt(d[t, j, i])
                for q in range(c):
                    Z[j, i, t, q] *= inv
            _back_sweep(Z, lo, j, i)


# serial kernels (one thread: prange is range) and parallel ones (``threads > 1``: numba's
# threads over frames / east-west modes; never called concurrently from several Python threads)
# (the parallel ones compile renamed copies, so that numba's on-disk cache, keyed by the
# function's qualified name, keeps the two apart)
def _renamed(f, suffix: str):
    g = types.FunctionType(f.__code__, f.__globals__, f.__name__ + suffix, f.__defaults__,
                           f.__closure__)
    g.__qualname__, g.__module__ = f.__qualname__ + suffix, f.__module__
    return g


_PY = (_modes_to_fields_py, _qhat_solve_py, _whiten_py)
_KERNELS = {False: tuple(njit(**_JIT)(f) for f in _PY),
            True: tuple(njit(parallel=True, **_JIT)(_renamed(f, "_par")) for f in _PY)}


class SeparableSpectrum:
    """The spectral factors of a separable SPDE prior (module docstring).

    Args:
        V: ``(nx, ny, ny)`` orthonormal eigenvectors of ``K_j`` (columns).
        mu: ``(nx, ny)`` eigenvalues of ``K_j``.
        s: ``(ny,)`` noise variance per row (``S = diag(s)``, constant along rows).
        T, dt, alpha: window length, time step, power of ``A``.
        workers: threads for the DCTs.
    """

    def __init__(self, V: np.ndarray, mu: np.ndarray, s: np.ndarray, *, T: int, dt: float,
                 alpha: int, workers: int = 1):
        self.V = np.ascontiguousarray(V)
        self.Vt = np.ascontiguousarray(np.swapaxes(V, 1, 2))
        self.nx, self.ny = mu.shape
        self.n = self.nx * self.ny
        self.T, self.workers = int(T), max(1, int(workers))
        (self._m2f, self._qsolve, self._whiten_k) = _KERNELS[self.workers > 1]
        self.sqrt_s = np.sqrt(np.asarray(s, dtype=np.float64))[:, None]  # (ny, 1)
        f = 1.0 + dt * mu**alpha  # (nx, ny) per mode
        self.f = f
        # LDL^T of the per-mode T x T tridiagonal Qhat: d_k pivots, l_k = -f / d_{k-1}
        T = self.T
        diag = np.empty((T,) + f.shape)
        if T == 1:
            diag[0] = f * f - 1.0
        else:
            diag[:] = f * f + 1.0
            diag[0] = diag[-1] = f * f
        d = np.empty_like(diag)
        lo = np.zeros_like(diag)  # lo[k] multiplies x_{k-1} in row k of L
        d[0] = diag[0]
        for k in range(1, T):
            lo[k] = -f / d[k - 1]
            d[k] = diag[k] - f * f / d[k - 1]
        self._diag, self._d, self._lo = diag, d, lo

    # -------------------------------------------------------------- transforms
    def to_modes(self, R: np.ndarray) -> np.ndarray:
        """``U^T R`` for ``R`` ``(T, n, k)`` (physical, row-major cells) -> modes
        ``(nx, ny, T, k)`` (east-west mode, north-south mode, frame, column)."""
        T, n, k = R.shape
        X = sfft.dct(R.reshape(T, self.ny, self.nx, k), type=2, axis=2, norm="ortho",
                     workers=self.workers)
        X = np.ascontiguousarray(X.transpose(2, 1, 0, 3)).reshape(self.nx, self.ny, T * k)
        return np.matmul(self.Vt, X).reshape(self.nx, self.ny, T, k)

    def from_modes(self, Z: np.ndarray) -> np.ndarray:
        """``U Z`` for modes ``Z`` ``(nx, ny, T, k)`` -> ``(T, n, k)``."""
        nx, ny, T, k = Z.shape
        X = np.matmul(self.V, Z.reshape(nx, ny, T * k)).reshape(nx, ny, T, k)
        X = np.ascontiguousarray(X.transpose(2, 1, 0, 3))  # (T, ny, nx, k)
        X = sfft.idct(X, type=2, axis=2, norm="ortho", workers=self.workers, overwrite_x=True)
        return X.reshape(T, self.n, k)

    # -------------------------------------------------------------- per-mode time algebra
    def qhat_apply(self, Z: np.ndarray) -> np.ndarray:
        """``Qhat Z`` for modes ``Z`` ``(nx, ny, T, k)`` (for :meth:`apply`)."""
        out = self._diag.transpose(1, 2, 0)[..., None] * Z
        if self.T > 1:
            f = self.f[:, :, None, None]
            out[:, :, 1:] -= f * Z[:, :, :-1]
            out[:, :, :-1] -= f * Z[:, :, 1:]
        return out

    def covariance_xmajor(self, F: np.ndarray, work: dict | None = None) -> np.ndarray:
        """``U Qhat^{-1} U^T`` of fields stored x-major, ``F`` ``(nx, ny, T, c)``
        (``F[j, i, t, q]`` = column ``q``, frame ``t``, cell ``(i, j)``; overwritten), returned
        in the same layout: ``Q^{-1} = S^{1/2} (this) S^{1/2}``. In this layout the DCTs run
        along axis 0 (many contiguous lanes at once) and the ``ny x ny`` products act on
        ``(ny, T c)`` slabs in place, so no transposed copy is ever made; the time recursion
        is a compiled loop. ``work``: a dict keeping the second buffer between calls (calls of
        one size then touch no fresh memory); the result may share memory with ``F``."""
        nx, ny, T, c = F.shape
        cols = (nx, ny, T * c)
        Z = None if work is None else work.get("Z")
        if Z is None or Z.shape != F.shape:
            Z = np.empty(F.shape)
            if work is not None:
                work["Z"] = Z
        F = sfft.dct(F, type=2, axis=0, norm="ortho", workers=self.workers, overwrite_x=True)
        np.matmul(self.Vt, F.reshape(cols), out=Z.reshape(cols))
        self._qsolve(Z, self._d, self._lo)
        np.matmul(self.V, Z.reshape(cols), out=F.reshape(cols))
        return sfft.idct(F, type=2, axis=0, norm="ortho", workers=self.workers,
                         overwrite_x=True)

    def _scale(self, X: np.ndarray, power: float) -> np.ndarray:
        """``S^{power / 2} X`` for ``X`` ``(T, n, k)``."""
        T, n, k = X.shape
        sc = self.sqrt_s if power == 1 else self.sqrt_s**power
        return (X.reshape(T, self.ny, self.nx, k) * sc[None, :, :, None]).reshape(T, n, k)

    # -------------------------------------------------------------- public operations
    def solve(self, R: np.ndarray) -> np.ndarray:
        """``Q^{-1} R`` for ``R`` ``(T, n, k)`` (through :meth:`covariance_xmajor`)."""
        T, n, k = R.shape
        F = np.ascontiguousarray(self._scale(R, 1).reshape(T, self.ny, self.nx, k)
                                 .transpose(2, 1, 0, 3))
        X = self.covariance_xmajor(F).transpose(2, 1, 0, 3).reshape(T, n, k)
        return self._scale(X, 1)

    def apply(self, X: np.ndarray) -> np.ndarray:
        """``Q X`` for ``X`` ``(T, n, k)`` (the spectral form; equal to the sparse ``Q``)."""
        return self._scale(self.from_modes(self.qhat_apply(self.to_modes(self._scale(X, -1)))),
                           -1)

    def sample_fields(self, Zn: np.ndarray | None = None, chunk: int | None = None, *,
                      rng: np.random.Generator | None = None, k: int | None = None,
                      mean: np.ndarray | None = None) -> np.ndarray:
        """Zero-mean draws ``S^{1/2} U W z``, exactly ``N(0, Q^{-1})``, as fields
        ``(k, T, ny, nx)``, ``chunk`` draws at a time (default ~256 MB arrays). ``z``: the
        standard normal ``Zn`` ``(T, n, k)`` (read as modes ``(nx, ny)`` per frame), or, when
        ``Zn`` is None, ``k`` draws generated by ``rng`` chunk by chunk directly in the modes'
        layout (no transposed copy of the noise). ``mean`` ``(T, ny, nx)``: added to every
        draw."""
        if Zn is None:
            if rng is None or k is None:
                raise ValueError("sample_fields: give Zn, or rng and k")
            T = self.T
        else:
            T, _, k = Zn.shape
        chunk = max(1, int(2**28 // (8 * T * self.n))) if chunk is None else int(chunk)
        out = np.empty((k, T, self.ny, self.nx))
        for c0 in range(0, k, chunk):
            c1 = min(k, c0 + chunk)
            if Zn is None:
                W = rng.standard_normal((self.nx, self.ny, T, c1 - c0))
            else:
                W = np.ascontiguousarray(
                    Zn[..., c0:c1].reshape(T, self.nx, self.ny, c1 - c0).transpose(1, 2, 0, 3))
            self._whiten_k(W, self._d, self._lo)
            M = np.matmul(self.V, W.reshape(self.nx, self.ny, -1)).reshape(W.shape)
            F = out[c0:c1]  # contiguous: c is the leading axis
            self._m2f(M, F)
            G = sfft.idct(F, type=2, axis=-1, norm="ortho", workers=self.workers,
                          overwrite_x=True)  # in place for contiguous float64 (pocketfft)
            if not np.shares_memory(G, F):
                F[...] = G
            F *= self.sqrt_s[None, None]
            if mean is not None:
                F += mean
        return out

    def sample(self, Zn: np.ndarray) -> np.ndarray:
        """:meth:`sample_fields` as ``(T, n, k)``."""
        F = self.sample_fields(Zn)
        return np.ascontiguousarray(F.reshape(F.shape[0], self.T, self.n).transpose(1, 2, 0))

    def logdet(self) -> float:
        """``log det Q = sum log d_k - T sum log s`` (per row ``s``, ``nx`` cells each)."""
        return float(np.log(self._d).sum() - self.T * self.nx * np.log(self.sqrt_s**2).sum())


def _neumann_laplacian(n: int) -> sp.csr_matrix:
    main = np.full(n, 2.0)
    main[0] = main[-1] = 1.0
    if n == 1:
        main[:] = 0.0
    off = -np.ones(n - 1)
    return sp.diags([off, main, off], [-1, 0, 1], format="csr")


def separable_spectrum(A: sp.spmatrix, s: np.ndarray, shape: tuple[int, int], *, T: int,
                       dt: float, alpha: int, workers: int = 1,
                       rtol: float = 1e-10) -> SeparableSpectrum | None:
    """:class:`SeparableSpectrum` of the prior with spatial operator ``A`` (``n x n``,
    row-major cells of ``shape = (ny, nx)``) and noise variances ``s`` ``(ny, nx)``, or
    ``None`` when ``A`` is not ``Y (x) I + diag(c) (x) L_x`` to ``rtol`` (relative to
    ``max |A|``), ``s`` varies along a row by more than ``rtol`` (relative to ``max s``), or
    ``S^{-1} A`` is not symmetric. ``rtol`` tolerates the rounding of metric factors that vary
    with latitude only (geodesic cell sizes along a row of a regular grid differ by ~1e-13
    relative); the factors are those of the first column's ``Y``, ``c`` and ``s``, so the
    operator applied differs from ``A`` by at most ``rtol`` relative, far below the solvers'
    tolerances."""
    ny, nx = shape
    A = sp.csr_matrix(A)
    s = np.asarray(s, dtype=np.float64).reshape(ny, nx)
    scale = float(abs(A).max()) if A.nnz else 0.0
    if scale == 0.0 or not np.all(s > 0):
        return None
    if np.max(np.abs(s - s[:, :1])) > rtol * np.max(s):
        return None
    idx = np.arange(ny) * nx  # cell (i, 0)
    Ad = A[idx][:, idx].toarray()  # rows (i, 0), columns (i', 0)
    if nx > 1:
        c = -np.asarray(A[idx, idx + 1]).reshape(-1)
    else:
        c = np.zeros(ny)
    Y = Ad.copy()
    if nx > 1:
        Y[np.arange(ny), np.arange(ny)] -= c  # L_x[0, 0] = 1
    if np.max(np.abs(np.triu(Y, 2))) > 0 or np.max(np.abs(np.tril(Y, -2))) > 0:
        return None
    Arec = sp.kron(sp.csr_matrix(Y), sp.eye(nx)) + sp.kron(sp.diags(c), _neumann_laplacian(nx))
    diff = A - Arec
    if diff.nnz and float(abs(diff).max()) > rtol * scale:
        return None
    sy = s[:, 0]
    r = np.sqrt(sy)
    Ks = Y * r[None, :] / r[:, None]  # S_y^{-1/2} Y S_y^{1/2}
    if np.max(np.abs(Ks - Ks.T)) > 1e-10 * np.max(np.abs(Ks)):
        return None
    Ks = 0.5 * (Ks + Ks.T)
    lam = 2.0 - 2.0 * np.cos(np.pi * np.arange(nx) / nx)
    e = np.diag(Ks, 1)
    V = np.empty((nx, ny, ny))
    mu = np.empty((nx, ny))
    for j in range(nx):
        dj = np.diag(Ks) + lam[j] * c
        if ny > 1:
            mu[j], V[j] = sla.eigh_tridiagonal(dj, e)
        else:
            mu[j], V[j] = dj, 1.0
    if not np.all(mu > 0):
        return None
    return SeparableSpectrum(V, mu, sy, T=T, dt=dt, alpha=alpha, workers=workers)


class TorchSeparableSpectrum:
    """The same factors in torch on any device (the GPU path of the spectral solver).

    The DCT in ``x`` is a product with the orthonormal DCT-II matrix ``C`` (``nx x nx``), so
    a whole transform is two matrix products; :meth:`covariance_xmajor` and :meth:`sample`
    mirror :class:`SeparableSpectrum`'s (the posterior solve itself is shared:
    :meth:`SPDEPrior.posterior_mean` with ``device=``).
    """

    def __init__(self, spec: SeparableSpectrum, device=None, dtype=None):
        import torch

        dtype = torch.float64 if dtype is None else dtype
        t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=dtype,  # noqa: E731
                                      device=device)
        self.torch = torch
        self.nx, self.ny, self.n, self.T = spec.nx, spec.ny, spec.n, spec.T
        self.V, self.Vt = t(spec.V), t(spec.Vt)
        self.C = t(sfft.dct(np.eye(spec.nx), type=2, axis=0, norm="ortho"))  # C x = dct(x)
        self.sqrt_s = t(spec.sqrt_s)  # (ny, 1)
        self.sqrt_d = t(np.sqrt(spec._d.transpose(1, 2, 0)))[..., None]  # (nx, ny, T, 1)
        self.lo = t(spec._lo)[..., None]  # (T, nx, ny, 1)
        self.device, self.dtype = self.V.device, dtype

    def _synthesis(self, Z):
        """``U Z`` for modes ``Z`` ``(nx, ny, T, c)``, x-major fields of the same shape."""
        nx, ny = self.nx, self.ny
        X = self.torch.bmm(self.V, Z.reshape(nx, ny, -1))
        return (self.C.T @ X.reshape(nx, -1)).reshape(Z.shape)

    def whiten(self, Zw):
        """``W z = Lhat^{-T} D^{-1/2} z`` per mode (a new tensor)."""
        W = Zw / self.sqrt_d
        for t in range(self.T - 2, -1, -1):
            W[:, :, t] -= self.lo[t + 1] * W[:, :, t + 1]
        return W

    def covariance_xmajor(self, F):
        """:meth:`SeparableSpectrum.covariance_xmajor` (``U W W^T U^T`` of x-major fields
        ``(nx, ny, T, c)``) in torch."""
        nx, ny = self.nx, self.ny
        Z = self.torch.bmm(self.Vt, (self.C @ F.reshape(nx, -1)).reshape(nx, ny, -1))
        Z = Z.reshape(F.shape)
        for t in range(1, self.T):  # W^T = D^{-1/2} Lhat^{-1}
            Z[:, :, t] -= self.lo[t] * Z[:, :, t - 1]
        return self._synthesis(self.whiten(Z / self.sqrt_d))

    def sample(self, Zn):
        """:meth:`SeparableSpectrum.sample` in torch: ``(T, n, k)`` draws for ``Zn``."""
        T, n, k = Zn.shape
        W = self.whiten(Zn.reshape(T, self.nx, self.ny, k).permute(1, 2, 0, 3))
        X = self._synthesis(W).permute(2, 1, 0, 3)  # (T, ny, nx, k)
        return (X * self.sqrt_s[None, :, :, None]).reshape(T, n, k)
