"""Optimal interpolation (OI) with a Gaussian space-time covariance: the DUACS-like baseline
of the SSH mapping data challenge, solved exactly per DAW patch.

Model (per patch). Prior ``x ~ N(mu 1, C)`` with the separable Gaussian covariance of the
data challenge's baseline OI

    C((t, y, x), (t', y', x')) = s2 * exp(-((x - x')/Lx)^2) * exp(-((y - y')/Ly)^2)
                                    * exp(-((t - t')/Lt)^2),

``x, y`` in km on the patch's local equirectangular projection (``x = a cos(lat0) lon``,
``y = a lat``, ``a`` = 6371 km, ``lat0`` the patch's mean latitude), ``t`` in days.
Observations ``y_o = H x + e``, ``e ~ N(0, R I)``, ``H`` the selection of the ``m`` observed
(finite) cells of the patch. The posterior mean (Kalman / observation-space form) is

    x_a = mu + C H^T (H C H^T + R I)^{-1} (y_o - mu),

computed exactly: one Cholesky factorisation of the ``m x m`` matrix ``H C H^T + R I`` in
float64 (``scipy.linalg.cho_factor``), ``alpha = (H C H^T + R I)^{-1} (y_o - mu)``, then
``C H^T alpha`` by the separable structure: scatter ``alpha`` to a ``(T, H, W)`` array ``Z``
and apply the three 1-D Gaussian matrices, ``x_a - mu = s2 * Ct (Cy (Z Cx^T))``, in
``O(T H W (T + H + W))``. Cost per patch ``O(m^3 / 3 + m^2)`` (``solver="cholesky"``).

Fast solver (``solver="cg"``, the default): the same representer system
``(R I + H C H^T) alpha = y_o - mu`` by preconditioned conjugate gradients
(:func:`oceanda.linalg.sparse.batched_pcg`), nothing of size ``m x m`` formed. Each 1-D
Gaussian matrix is replaced by its eigen-decomposition ``C_a = U_a diag(l_a) U_a^T`` without
the eigenvalues below ``EIG_RTOL`` (1e-14) of the largest (rounding level: ``eigh`` itself is
only accurate to about ``n eps`` of the largest), so ``C = s2 (U_t x U_y x U_x) diag(l) (..)^T``
with ``r_a`` columns per axis (about 11, 27, 23 for 15 days x 100 x 100 cells of 1/20 deg and
the default scales), and one product ``H C H^T w`` costs ``O(m r_x + T H r_y r_x + T r_t r_y r_x)``
(scatter, two small matrix products, gather), linear in cells and observations. The
preconditioner is ``R I + G G^T`` with ``G = H V_k diag(s2 l_k)^{1/2}`` the ``k`` leading
Kronecker eigenvectors of ``C`` with ``s2 l_k > PRECOND_RATIO R`` (16; at most ``PRECOND_MAX``),
applied by the Woodbury identity (one ``k x k`` Cholesky): since ``H`` is a selection, the
preconditioned matrix has its eigenvalues in ``[1, 1 + s2 l_(k+1) / R]`` (here ``<= 17``), so
CG converges in a few tens of iterations whatever ``m`` (measured: 8-15 on 15 x 100 x 100
patches with 2,300 to 15,000 observations; k about 300). PRECOND_RATIO trades the ``m k^2``
set-up against iterations (1: about 5 iterations, k about 480). A patch with few observations (``m <= DIRECT_MAX_OBS``)
is solved by the exact Cholesky instead (cheaper there). The stopping rule ``||r|| <= rtol
||y_o - mu||`` with the default ``rtol = 1e-10`` gives analyses equal to the Cholesky path's
to about 1e-8 of the analysis increment (tested to 1e-6 on random, empty, single-observation,
nadir- and SWOT-density patches; ``hpc/bench/oi.py`` reports the maximum difference).

The only approximations are the stated ones: the DAW (observations outside the patch are
not seen), the local projection, and, by default, the prior mean and variance estimated from
the patch's observations (``mu = mean(y_o)``, ``s2 = max(var(y_o) - R, R)``).

References: Le Traon, Nadal, Ducet (1998), An improved mapping method of multisatellite
altimeter data, J. Atmos. Oceanic Technol.; the 2020a SSH mapping data challenge baseline
OI (ocean-data-challenges, Lx = Ly = 1 deg, Lt = 7 days, noise 0.05).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import scipy.linalg
import torch

from oceanda.assim.base import PatchBatch, PatchResult
from oceanda.assim.registry import register
from oceanda.errors import ConfigError, NumericalError

EARTH_RADIUS_KM = 6371.0


def gaussian_1d(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """``exp(-((a_i - b_j) / scale)^2)``, shape ``(len(a), len(b))``."""
    d = (np.asarray(a, np.float64)[:, None] - np.asarray(b, np.float64)[None, :]) / scale
    return np.exp(-d * d)


@numba.njit(cache=True, nogil=True)
def _obs_cov_lower(ti, yi, xi, Ct, Cy, Cx, s2, R):  # pragma: no cover - compiled
    """Lower triangle of ``s2 Ct[ti, tj] Cy[yi, yj] Cx[xi, xj] + R I`` (m x m, float64);
    the strict upper triangle is left zero (``cho_factor(lower=True)`` reads the lower)."""
    m = ti.shape[0]
    out = np.zeros((m, m))
    for i in range(m):
        a, b, c = ti[i], yi[i], xi[i]
        for j in range(i):
            out[i, j] = s2 * Ct[a, ti[j]] * Cy[b, yi[j]] * Cx[c, xi[j]]
        out[i, i] = s2 * Ct[a, a] * Cy[b, b] * Cx[c, c] + R
    return out


def local_km(lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Local equirectangular coordinates [km] of a patch: ``x`` (W,), ``y`` (H,)."""
    lat0 = np.deg2rad(float(np.mean(lat)))
    x = EARTH_RADIUS_KM * np.cos(lat0) * np.deg2rad(np.asarray(lon, np.float64) - np.mean(lon))
    y = EARTH_RADIUS_KM * np.deg2rad(np.asarray(lat, np.float64) - np.mean(lat))
    return x, y


#: eigenvalues of a 1-D Gaussian matrix below this fraction of its largest are dropped (fast solver)
EIG_RTOL = 1e-14
#: Kronecker modes of C with ``s2 l > PRECOND_RATIO R`` form the preconditioner (at most PRECOND_MAX)
PRECOND_RATIO = 16.0
PRECOND_MAX = 1500
#: patches with at most this many observations take the exact Cholesky solve in ``solver="cg"``
DIRECT_MAX_OBS = 800
#: accepted values of ``solver``
SOLVERS = ("cg", "cholesky")
#: default relative residual of the CG (see the module docstring)
DEFAULT_RTOL = 1e-10


def _eig_truncated(C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(l, U)`` of the symmetric PSD ``C`` (n x n) without the eigenvalues below
    ``EIG_RTOL`` times the largest, in decreasing order: ``C ~ U diag(l) U^T``."""
    lam, U = np.linalg.eigh(C)
    keep = lam > EIG_RTOL * lam[-1]
    return lam[keep][::-1].copy(), np.ascontiguousarray(U[:, keep][:, ::-1])


class SeparableObsCov:
    """Products with ``H C H^T`` (``m x m``) and ``C H^T`` of one patch, never forming them.

    ``C = s2 Ct x Cy x Cx`` (Kronecker, axes t, y, x) in the truncated eigenbases of its
    three factors (:func:`_eig_truncated`), ``H`` the selection of the cells ``idx = (ti, yi,
    xi)``. Layout inside: fields of the truncated x-basis are ``(H, T, r_x)`` arrays, whose
    rows ``y T + t`` make the y-product one matrix product.

    Args:
        idx: three ``(m,)`` int arrays, the observed cells' (t, y, x) indices.
        shape: ``(T, H, W)``; Ct, Cy, Cx: the 1-D Gaussian matrices; s2: prior variance.
    """

    def __init__(self, idx, shape, Ct, Cy, Cx, s2: float) -> None:
        import scipy.sparse

        T, H, W = shape
        self.shape = shape
        lt, self.Ut = _eig_truncated(Ct)
        ly, self.Uy = _eig_truncated(Cy)
        lx, self.Ux = _eig_truncated(Cx)
        #: eigenvalues of C, layout (r_y, r_t, r_x)
        self.lam = s2 * ly[:, None, None] * lt[None, :, None] * lx[None, None, :]
        ti, yi, xi = idx
        m = ti.size
        self.m = m
        self.ti, self.yi, self.xi = ti, yi, xi
        self.rows = yi * T + ti
        self.Ex = self.Ux[xi]  # (m, r_x)
        self.S = scipy.sparse.csr_matrix((np.ones(m), (self.rows, np.arange(m))), shape=(H * T, m))

    def _forward(self, w: np.ndarray) -> np.ndarray:
        """``diag(l) V^T H^T w`` for ``w`` (m,): the coefficients ``(r_y, r_t, r_x)``."""
        T, H, _ = self.shape
        rx = self.Ux.shape[1]
        R1 = self.S @ (w[:, None] * self.Ex)  # (H T, r_x): scatter into rows y T + t
        K = self.Uy.T @ R1.reshape(H, T * rx)  # (r_y, T r_x)
        K = np.matmul(self.Ut.T, K.reshape(-1, T, rx))  # (r_y, r_t, r_x)
        return K * self.lam

    def _backward(self, K: np.ndarray) -> np.ndarray:
        """``(U_y x U_t) K`` in the x-basis: ``(H T, r_x)`` rows ``y T + t``."""
        T, H, _ = self.shape
        rx = self.Ux.shape[1]
        Y = np.matmul(self.Ut, K)  # (r_y, T, r_x)
        return (self.Uy @ Y.reshape(-1, T * rx)).reshape(H * T, rx)

    def matvec(self, w: np.ndarray) -> np.ndarray:
        """``H C H^T w`` for ``w`` (m,)."""
        G = self._backward(self._forward(w))[self.rows]  # (m, r_x)
        return np.einsum("ij,ij->i", G, self.Ex)

    def cov_ht(self, w: np.ndarray) -> np.ndarray:
        """``C H^T w`` as a ``(T, H, W)`` field."""
        T, H, W = self.shape
        F = self._backward(self._forward(w)) @ self.Ux.T  # (H T, W)
        return F.reshape(H, T, W).transpose(1, 0, 2)

    def woodbury_preconditioner(self, R: float):
        """``v -> (R I + G G^T)^{-1} v`` with ``G = H V_k diag(l_k)^{1/2}`` the leading
        Kronecker modes with ``l_k > PRECOND_RATIO R`` (at most ``PRECOND_MAX``), by the
        Woodbury identity ``(v - G (R I + G^T G)^{-1} G^T v) / R``; ``None`` when no mode
        qualifies (then ``R I + H C H^T`` is already within ``1 + PRECOND_RATIO`` of ``R I``)."""
        flat = self.lam.ravel()
        k = int(min(PRECOND_MAX, np.count_nonzero(flat > PRECOND_RATIO * R)))
        if k == 0:
            return None
        top = np.argpartition(-flat, k - 1)[:k] if k < flat.size else np.arange(flat.size)
        b, a, c = np.unravel_index(top, self.lam.shape)
        # G^T (k, m), built from contiguous rows (gathering columns of (m, r) arrays is slow)
        Gt = self.Uy.T[:, self.yi][b]
        Gt *= self.Ut.T[:, self.ti][a]
        Gt *= self.Ex.T[c]
        Gt *= np.sqrt(flat[top])[:, None]
        K = Gt @ Gt.T
        K[np.diag_indices_from(K)] += R
        factor = scipy.linalg.cho_factor(K, lower=True, overwrite_a=True, check_finite=False)

        def apply(V: np.ndarray) -> np.ndarray:
            return (V - Gt.T @ scipy.linalg.cho_solve(factor, Gt @ V, check_finite=False)) / R

        return apply


_BLAS_CONTROLLER = None


def _one_blas_thread():
    """Context running BLAS on one thread (threadpoolctl; the controller is built once).

    A patch's products are small (``m x k`` GEMMs, ``k`` a few hundred, and matrix-vector
    products), so BLAS threads only add synchronisation: measured on a 2-core machine shared
    with other jobs, a nadir patch took 0.16 s with one BLAS thread and 1.0-1.1 s with two
    (the exact Cholesky 1.2-1.3 s vs 3.0-4.7 s). Parallelism comes from the ranks."""
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")


def oi_patch(obs: np.ndarray, lon: np.ndarray, lat: np.ndarray, time: np.ndarray, *,
             Lx_km: float, Ly_km: float, Lt_days: float, R: float,
             mean: float | None = None, sigma2: float | None = None,
             max_obs: int | None = None, solver: str = "cg", rtol: float = DEFAULT_RTOL,
             info: dict | None = None) -> np.ndarray:
    """OI posterior mean of one patch (BLAS on one thread: :func:`_one_blas_thread`).

    Args:
        obs: (T, H, W) observations, NaN where unobserved.
        lon: (W,) deg; lat: (H,) deg; time: (T,) days.
        Lx_km, Ly_km, Lt_days: Gaussian decorrelation scales.
        R: observation-error variance [m^2].
        mean, sigma2: prior mean [m] and variance [m^2]; ``None`` estimates them from the
            patch's observations (``mean(y)``, ``max(var(y) - R, R)``).
        max_obs: raise :class:`ConfigError` when the patch holds more observations
            (``solver="cholesky"`` only: the memory guard of its m x m matrix).
        solver: ``"cg"`` (preconditioned CG in the truncated Kronecker eigenbasis, see the
            module docstring) or ``"cholesky"`` (exact: the m x m factorisation).
        rtol: relative residual at which the CG stops.
        info: if given, receives ``m``, ``path`` (``"empty"``, ``"cholesky"``, ``"cg"``) and,
            for CG, ``iterations`` and ``precond_rank``.

    Returns:
        (T, H, W) float64 ``mu + C H^T (H C H^T + R I)^{-1} (y - mu)``; the prior mean
        (0 when ``mean`` is None) where the patch has no observation.
    """
    if solver not in SOLVERS:
        raise ConfigError(f"method.solver must be one of {list(SOLVERS)}, got {solver!r}")
    with _one_blas_thread():
        return _oi_patch(obs, lon, lat, time, Lx_km=Lx_km, Ly_km=Ly_km, Lt_days=Lt_days, R=R,
                         mean=mean, sigma2=sigma2, max_obs=max_obs, solver=solver, rtol=rtol,
                         info={} if info is None else info)


def _oi_patch(obs, lon, lat, time, *, Lx_km, Ly_km, Lt_days, R, mean, sigma2, max_obs, solver,
              rtol, info) -> np.ndarray:
    """:func:`oi_patch` (arguments checked, ``info`` a dict)."""
    obs = np.asarray(obs, np.float64)
    T, H, W = obs.shape
    idx = np.nonzero(np.isfinite(obs))
    y = obs[idx]
    m = y.size
    info["m"] = m
    if m == 0:
        info["path"] = "empty"
        return np.full((T, H, W), 0.0 if mean is None else float(mean))
    mu = float(np.mean(y)) if mean is None else float(mean)
    s2 = max(float(np.var(y)) - R, R) if sigma2 is None else float(sigma2)
    xk, yk = local_km(lon, lat)
    Ct = gaussian_1d(time, time, Lt_days)
    Cy = gaussian_1d(yk, yk, Ly_km)
    Cx = gaussian_1d(xk, xk, Lx_km)
    ti, yi, xi = (np.ascontiguousarray(v, dtype=np.int64) for v in idx)
    if solver == "cg" and m > DIRECT_MAX_OBS:
        from oceanda.linalg.sparse import batched_pcg

        op = SeparableObsCov((ti, yi, xi), (T, H, W), Ct, Cy, Cx, s2)
        pre = op.woodbury_preconditioner(R)
        d = y - mu
        alpha, cg = batched_pcg(lambda V: R * V + op.matvec(V[:, 0])[:, None], d[:, None],
                                precond=pre, rtol=rtol, maxiter=2000, raise_on_fail=False)
        if not cg.converged:
            raise NumericalError(f"method=oi: CG on a patch with {m} observations did not reach "
                                 f"rtol={rtol:g} (relative residual {float(cg.rel_residual.max()):.2e}); "
                                 "use method.solver=cholesky")
        info.update(path="cg", iterations=cg.iterations,
                    precond_rank=0 if pre is None else int(min(PRECOND_MAX, np.count_nonzero(
                        op.lam > PRECOND_RATIO * R))))
        out = op.cov_ht(alpha[:, 0])
        out += mu
        return out
    if max_obs is not None and m > max_obs:
        raise ConfigError(f"method=oi: a patch holds {m} observations > max_obs={max_obs}; "
                          "use a smaller patch (patch.size), raise method.max_obs or use method.solver=cg")
    info["path"] = "cholesky"
    Coo = _obs_cov_lower(ti, yi, xi, Ct, Cy, Cx, s2, R)
    try:
        factor = scipy.linalg.cho_factor(Coo, lower=True, overwrite_a=True, check_finite=False)
    except np.linalg.LinAlgError:
        raise NumericalError(f"method=oi: observation covariance of a patch with {m} "
                             "observations is not positive definite (R too small?)") from None
    alpha = scipy.linalg.cho_solve(factor, y - mu, check_finite=False)
    Z = np.zeros((T, H, W))
    Z[idx] = alpha
    # s2 * Ct (Cy (Z Cx^T)) over the (t, y, x) axes
    out = Z @ Cx.T
    out = np.matmul(Cy, out)
    out = (Ct @ out.reshape(T, H * W)).reshape(T, H, W)
    out *= s2
    out += mu
    return out


@register("oi")
@dataclass(frozen=True)
class OptimalInterpolation:
    """DUACS-like OI (see the module docstring), one exact solve per patch.

    Args:
        Lx_km, Ly_km: zonal / meridional decorrelation scales [km] (default 100).
        Lt_days: decorrelation time [days] (default 10).
        noise_std: observation-error standard deviation [m]; ``R = noise_std^2``.
        mean: prior mean [m], or ``"patch"`` for the mean of the patch's observations.
        sigma2: prior variance [m^2], or ``"patch"`` for ``max(var(y) - R, R)``.
        max_obs: largest number of observations per patch accepted by ``solver="cholesky"``
            (memory guard: the m x m matrix takes ``8 m^2`` bytes).
        solver: ``"cg"`` (default: preconditioned CG, cost about linear in cells and
            observations) or ``"cholesky"`` (exact, ``O(m^3)``: the reference).
        rtol: relative residual of the CG (default 1e-10: the analysis equals the Cholesky
            path's to about 1e-8 of its increment).
    """

    Lx_km: float = 100.0
    Ly_km: float = 100.0
    Lt_days: float = 10.0
    noise_std: float = 0.05
    mean: float | str = "patch"
    sigma2: float | str = "patch"
    max_obs: int = 20000
    solver: str = "cg"
    rtol: float = DEFAULT_RTOL

    def __post_init__(self) -> None:
        for key in ("Lx_km", "Ly_km", "Lt_days", "noise_std"):
            if not float(getattr(self, key)) > 0:
                raise ConfigError(f"method.{key} must be > 0, got {getattr(self, key)}")
        for key in ("mean", "sigma2"):
            value = getattr(self, key)
            if isinstance(value, str) and value != "patch":
                raise ConfigError(f"method.{key} must be a number or 'patch', got {value!r}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"method.solver must be one of {list(SOLVERS)}, got {self.solver!r}")
        if not 0 < float(self.rtol) < 1:
            raise ConfigError(f"method.rtol must be in (0, 1), got {self.rtol}")

    def __call__(self, batch: PatchBatch) -> PatchResult:
        mean = None if self.mean == "patch" else float(self.mean)
        sigma2 = None if self.sigma2 == "patch" else float(self.sigma2)
        out = oi_patches(batch.obs, batch.lon, batch.lat, batch.time, Lx_km=self.Lx_km,
                         Ly_km=self.Ly_km, Lt_days=self.Lt_days, R=float(self.noise_std) ** 2,
                         mean=mean, sigma2=sigma2, max_obs=self.max_obs, solver=self.solver,
                         rtol=float(self.rtol))
        return PatchResult(mean=out.to(batch.obs.dtype))


def oi_patches(obs: torch.Tensor, lon: torch.Tensor, lat: torch.Tensor, time: torch.Tensor,
               **kwargs) -> torch.Tensor:
    """:func:`oi_patch` of every patch of a batch: ``obs (B, T, H, W)`` [NaN where
    unobserved], ``lon (B, W)``, ``lat (B, H)`` [deg], ``time (B, T)`` [days]; ``kwargs`` those
    of :func:`oi_patch`. Returns ``(B, T, H, W)`` float64 on ``obs``' device (computed in
    float64 on the CPU, patch by patch, so a patch's analysis does not depend on the others
    of its batch)."""
    o = obs.detach().cpu().double().numpy()
    lo, la, ti = (v.detach().cpu().double().numpy() for v in (lon, lat, time))
    out = np.stack([oi_patch(o[b], lo[b], la[b], ti[b], **kwargs) for b in range(o.shape[0])])
    return torch.from_numpy(out).to(obs.device)
