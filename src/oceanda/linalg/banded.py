"""Batched banded SPD matrices: Cholesky, solve, log-det, sample, MAP / BLUE, with gradients.

Storage ("row-lower"): a symmetric n x n matrix A of bandwidth k (k sub-diagonals) is held
as ``band`` of shape ``(..., n, k+1)`` with

    band[..., i, j] = A[..., i, i - j]        j = 0..k   (entries with i - j < 0 are ignored)

so ``band[..., 0]`` is the diagonal. A lower band factor L (``A = L L^T``) uses the same
storage. Leading dimensions are batch dimensions (broadcast between arguments); float32
and float64; CPU tensors run numba-compiled loops vectorised over the batch
(:mod:`oceanda.linalg._band_numba`), CUDA tensors a log-depth torch scan
(:mod:`oceanda.linalg._band_torch`). ``backend="torch"`` forces the torch path on CPU.

Gradients are implicit (the factorisation loop is never taped):

* ``x = A^{-1} b``:  b_bar = A^{-1} x_bar (one more solve with the saved factor),
  A_bar = -A^{-1} x_bar x^T, i.e. for the stored entries
  band_bar[i, j] = -(g_i x_{i-j} + g_{i-j} x_i) (j > 0), -g_i x_i (j = 0), g = A^{-1} x_bar.
* ``log det A``:  A_bar = A^{-1}; only its band is needed, computed by the Takahashi
  selected-inverse recursion in O(n k^2) (never a dense inverse).
* ``u = L^{-T} z``:  z_bar = L^{-1} u_bar; L_bar = -u (L^{-1} u_bar)^T on the band, pulled
  back to A by the reverse-mode Cholesky recursion (O(n k^2)).

A non-SPD matrix or a NaN raises :class:`oceanda.errors.NumericalError` naming the batch
element; results are never silently NaN.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from oceanda.errors import InputError, NumericalError
from oceanda.linalg import _band_numba as _nb
from oceanda.linalg import _band_torch as _tb

Backend = Literal["numba", "torch"] | None

__all__ = [
    "band_from_dense",
    "band_to_dense",
    "band_matvec",
    "band_llt",
    "band_lower_to_dense",
    "band_cholesky",
    "band_solve",
    "band_logdet",
    "band_sample",
    "band_map",
    "band_kalman",
    "spd_band_from_raw",
]


# ------------------------------------------------------------------------------ checks


def _check_band(band: torch.Tensor, name: str = "band") -> tuple[int, int]:
    if not isinstance(band, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(band).__name__}")
    if band.ndim < 2 or band.shape[-1] < 1:
        raise InputError(f"{name} must have shape (..., n, k+1), got {tuple(band.shape)}")
    if band.dtype not in (torch.float32, torch.float64):
        raise InputError(f"{name} must be float32 or float64, got {band.dtype}")
    return band.shape[-2], band.shape[-1] - 1


def _check_vec(v: torch.Tensor, n: int, band: torch.Tensor, name: str) -> None:
    if not isinstance(v, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if v.ndim < 1 or v.shape[-1] != n:
        raise InputError(f"{name} must have shape (..., {n}) to match band {tuple(band.shape)}, got {tuple(v.shape)}")
    if v.dtype != band.dtype or v.device != band.device:
        raise InputError(
            f"{name} ({v.dtype}, {v.device}) must have the dtype and device of band ({band.dtype}, {band.device})"
        )


def _backend(t: torch.Tensor, backend: Backend) -> str:
    if backend is None:
        return "numba" if t.device.type == "cpu" else "torch"
    if backend not in ("numba", "torch"):
        raise InputError(f"backend must be None, 'numba' or 'torch', got {backend!r}")
    if backend == "numba" and t.device.type != "cpu":
        raise InputError(f"backend 'numba' needs CPU tensors, got device {t.device}")
    return backend


def _broadcast(band: torch.Tensor, *vecs: torch.Tensor):
    """Broadcast batch dims; return batch shape, band (B, n, k+1) and vectors (B, n)."""
    n, k1 = band.shape[-2:]
    batch = torch.broadcast_shapes(band.shape[:-2], *(v.shape[:-1] for v in vecs))
    b3 = band.expand(*batch, n, k1).reshape(-1, n, k1)
    return batch, b3, [v.expand(*batch, n).reshape(-1, n) for v in vecs]


def _raise_bad(op: str, info: torch.Tensor, batch: tuple, band3: torch.Tensor) -> None:
    bad = torch.nonzero(info).flatten()
    if bad.numel() == 0:
        return
    flat = int(bad[0])
    index = tuple(int(i) for i in np.unravel_index(flat, batch)) if len(batch) else ()
    row = int(info[flat]) - 1
    if not bool(torch.isfinite(band3[flat]).all()):
        why = "contains NaN or inf"
    else:
        why = f"is not symmetric positive definite (Cholesky fails at row {row})"
    more = f" ({bad.numel()} of {info.numel()} batch elements fail)" if bad.numel() > 1 else ""
    raise NumericalError(f"{op}: the band matrix at batch index {index} {why}{more}")


def _check_finite(op: str, what: str, x: torch.Tensor, batch: tuple) -> None:
    if bool(torch.isfinite(x.sum())):  # cheap: NaN / inf propagate into the sum
        return
    ok = torch.isfinite(x).flatten(1).all(dim=1)
    flat = int(torch.nonzero(~ok).flatten()[0])
    index = tuple(int(i) for i in np.unravel_index(flat, batch)) if len(batch) else ()
    raise NumericalError(f"{op}: {what} at batch index {index} is not finite (NaN or inf in the input)")


# ------------------------------------------------------------------------- primitives
# All on flattened tensors: band / L (B, n, k+1), vectors (B, n).


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


_NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


def _empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised CPU tensor for a numba kernel's output, allocated by numpy.

    numpy asks the kernel for transparent huge pages on large allocations (madvise), torch's
    default CPU allocator does not: on a VM the first touch of a fresh 88 MB output (the band
    gradient of B=16384 systems of size 96, k=6) then costs ~10 ms instead of ~40 ms of
    page faults. The tensor shares the numpy buffer and keeps it alive.
    """
    return torch.from_numpy(np.empty(shape, dtype=_NP_DTYPE[dtype]))


def _tiled(be: str, B: int, n: int, k: int) -> bool:
    """Whether the numba tiled loops (batch-vectorised tiles) serve this size."""
    return be == "numba" and _nb.use_tiles(B, n, k)


# A factor is held as the row-lower band L (B, n, k+1); ``tiled`` says whether the numba
# tiled loops (batch-vectorised) serve it.


def _factor(band3: torch.Tensor, be: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(factor, info, tiled) of the flattened band (B, n, k+1)."""
    if be == "torch":
        L, info = _tb.factor(band3.detach())
        return L, info, False
    B, n, k1 = band3.shape
    info = torch.empty(B, dtype=torch.int64)
    if _tiled(be, B, n, k1 - 1):
        a = _np(band3)
        L = _empty((B, n, k1), band3.dtype)
        nothing = np.empty((0, 0), a.dtype)
        _nb.tile_factor_solve(a, nothing, L.numpy(), nothing, info.numpy(), True, False, _nb.tile_width(B))
        return L, info, True
    L = _empty((B, n, k1), band3.dtype)
    _nb.scalar_factor(_np(band3), L.numpy(), info.numpy())
    return L, info, False


def _factor_and_solve(band3: torch.Tensor, b: torch.Tensor, be: str):
    """(factor, x = A^{-1} b, info, tiled): the factor kept for a backward pass. The numba
    tiled loops do both in one pass over the tiles (L written out while it is cached)."""
    B, n, k1 = band3.shape
    if _tiled(be, B, n, k1 - 1):
        a = _np(band3)
        L = _empty((B, n, k1), band3.dtype)
        x = _empty((B, n), band3.dtype)
        info = torch.empty(B, dtype=torch.int64)
        _nb.tile_factor_solve(a, _np(b), L.numpy(), x.numpy(), info.numpy(), True, True, _nb.tile_width(B))
        return L, x, info, True
    L, info, tiled = _factor(band3, be)
    if bool(info.any()):
        return L, torch.full_like(b, float("nan")), info, tiled
    return L, _solve_factor(L, b, True, True, be, tiled), info, tiled


def _diag_of(L: torch.Tensor) -> torch.Tensor:
    """Diagonal of the factor, (B, n)."""
    return L[:, :, 0]


def _solve_factor(L: torch.Tensor, b: torch.Tensor, fwd: bool, bwd: bool, be: str, tiled: bool) -> torch.Tensor:
    """L^{-1} b (fwd), L^{-T} b (bwd) or A^{-1} b (both); b (B, n)."""
    if be == "torch":
        return _tb.solve_factor(L, b.detach(), fwd, bwd)
    if tiled:
        x = _empty(tuple(L.shape[:2]), L.dtype)
        _nb.tile_solve_factor(L.numpy(), _np(b), x.numpy(), fwd, bwd, _nb.tile_width(L.shape[0]))
        return x
    x = _empty(tuple(L.shape[:2]), L.dtype)
    _nb.scalar_solve_factor(_np(L), _np(b), x.numpy(), fwd, bwd)
    return x


def _factor_solve(band3: torch.Tensor, b: torch.Tensor, be: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x = A^{-1} b without keeping the factor (the no-gradient fast path)."""
    B, n, k1 = band3.shape
    if _tiled(be, B, n, k1 - 1):
        a = _np(band3)
        x = _empty((B, n), band3.dtype)
        info = torch.empty(B, dtype=torch.int64)
        nothing = np.empty((0, 0, 0), a.dtype)
        _nb.tile_factor_solve(a, _np(b), nothing, x.numpy(), info.numpy(), False, True, _nb.tile_width(B))
        return x, info
    L, info, tiled = _factor(band3, be)
    if bool(info.any()):
        return torch.full_like(b, float("nan")), info
    return _solve_factor(L, b, True, True, be, tiled), info


def _selinv(L: torch.Tensor, be: str) -> torch.Tensor:
    """Band of A^{-1} from the row-lower factor."""
    if be == "torch":
        return _tb.selected_inverse(L)
    Z = _empty(tuple(L.shape), L.dtype)
    _nb.selected_inverse(_np(L), Z.numpy())
    return Z


def _chol_backward(L: torch.Tensor, Lbar: torch.Tensor, band3: torch.Tensor, be: str) -> torch.Tensor:
    """d loss / d band from d loss / d L (row-lower factor)."""
    if be == "torch":
        return _tb.cholesky_backward(L, Lbar, band3)
    Abar = _empty(tuple(L.shape), L.dtype)
    _nb.cholesky_backward(_np(L), Lbar.detach().contiguous().clone().numpy(), Abar.numpy())
    return Abar


def _lower_mask(n: int, k1: int, device) -> torch.Tensor:
    """(n, k+1) bool: stored entries that exist (i - j >= 0)."""
    i = torch.arange(n, device=device)
    j = torch.arange(k1, device=device)
    return i[:, None] >= j[None, :]


def _sym_outer(g: torch.Tensor, x: torch.Tensor, k1: int, be: str) -> torch.Tensor:
    """band of -(g x^T + x g^T) restricted to the stored entries (diagonal once)."""
    B, n = g.shape
    if be == "numba":
        out = _empty((B, n, k1), g.dtype)
        _nb.sym_outer_band(_np(g), _np(x), out.numpy(), -1.0)
        return out
    cols = [-(g * x)]
    for j in range(1, k1):
        if j >= n:
            cols.append(torch.zeros_like(g))
            continue
        cols.append(F.pad(-(g[:, j:] * x[:, :-j] + g[:, :-j] * x[:, j:]), (j, 0)))
    return torch.stack(cols, dim=-1)


def _lower_outer(u: torch.Tensor, v: torch.Tensor, k1: int, be: str) -> torch.Tensor:
    """band of -u v^T restricted to the stored lower entries."""
    B, n = u.shape
    if be == "numba":
        out = _empty((B, n, k1), u.dtype)
        _nb.lower_outer_band(_np(u), _np(v), out.numpy(), -1.0)
        return out
    cols = [-(u * v)]
    for j in range(1, k1):
        cols.append(F.pad(-(u[:, j:] * v[:, :-j]), (j, 0)) if j < n else torch.zeros_like(u))
    return torch.stack(cols, dim=-1)


# ------------------------------------------------------------------ autograd functions


class _Cholesky(torch.autograd.Function):
    @staticmethod
    def forward(ctx, band3, be, batch):
        L, info, tiled = _factor(band3, be)
        _raise_bad("band_cholesky", info, batch, band3)
        ctx.save_for_backward(L, band3)
        ctx.be = be
        return L

    @staticmethod
    def backward(ctx, Lbar):
        L, band3 = ctx.saved_tensors
        Lbar = torch.where(_lower_mask(L.shape[1], L.shape[2], L.device), Lbar, 0.0)
        return _chol_backward(L, Lbar, band3, ctx.be), None, None


class _Solve(torch.autograd.Function):
    """x = A^{-1} b. The factor L is an intermediate held on ``ctx`` (neither input nor
    output) until the backward pass, which on CPU writes the band gradient over it: L is
    dead once g = A^{-1} x_bar is known, and the gradient has L's shape, so the pass needs
    no fresh (B, n, k+1) buffer (on a VM, first-touch page faults of a fresh buffer cost as
    much as the solve). A second backward pass through a retained graph factorises the
    saved band again."""

    @staticmethod
    def forward(ctx, band3, b, be, batch):
        L, x, info, tiled = _factor_and_solve(band3, b, be)
        _raise_bad("band_solve", info, batch, band3)
        _check_finite("band_solve", "the right-hand side b", x, batch)
        ctx.save_for_backward(band3, x)
        ctx.L = L
        ctx.be, ctx.tiled, ctx.k1 = be, tiled, band3.shape[2]
        return x

    @staticmethod
    def backward(ctx, xbar):
        band3, x = ctx.saved_tensors
        L, ctx.L = ctx.L, None
        if L is None:  # a previous backward pass wrote its gradient over the factor
            L, _, _ = _factor(band3, ctx.be)
        need_band = ctx.needs_input_grad[0]
        if ctx.be == "torch":
            g = _solve_factor(L, xbar, True, True, ctx.be, ctx.tiled)  # A^{-1} x_bar
            gband = _sym_outer(g, x, ctx.k1, ctx.be) if need_band else None
        else:
            B, n, k1 = L.shape
            # band of -(g x^T + x g^T), written over L (read first, tile by tile or whole)
            gband = L if need_band else None
            out = L.numpy() if need_band else np.empty((0, 0, 0), _NP_DTYPE[L.dtype])
            if ctx.tiled:  # one fused pass over the tiles: solve, then the band gradient
                g = _empty((B, n), L.dtype)
                _nb.tile_solve_grad(L.numpy(), _np(xbar), _np(x), g.numpy(), out, -1.0, need_band, _nb.tile_width(B))
            else:
                g = _solve_factor(L, xbar, True, True, ctx.be, False)
                if need_band:
                    _nb.sym_outer_band(g.numpy(), _np(x), out, -1.0)
        gb = g if ctx.needs_input_grad[1] else None
        return gband, gb, None, None


class _Logdet(torch.autograd.Function):
    @staticmethod
    def forward(ctx, band3, be, batch):
        L, info, tiled = _factor(band3, be)
        _raise_bad("band_logdet", info, batch, band3)
        ctx.save_for_backward(L)
        ctx.be, ctx.tiled = be, tiled
        return 2.0 * torch.log(_diag_of(L)).sum(dim=1)

    @staticmethod
    def backward(ctx, gout):
        (L,) = ctx.saved_tensors
        Z = _selinv(L, ctx.be)  # band of A^{-1}
        scale = torch.full((L.shape[2],), 2.0, dtype=L.dtype, device=L.device)
        scale[0] = 1.0
        return Z * scale * gout[:, None, None], None, None


class _SampleNoise(torch.autograd.Function):
    """u = L^{-T} z with A = L L^T."""

    @staticmethod
    def forward(ctx, band3, z, be, batch):
        L, info, tiled = _factor(band3, be)
        _raise_bad("band_sample", info, batch, band3)
        u = _solve_factor(L, z, False, True, be, tiled)
        _check_finite("band_sample", "the noise z", u, batch)
        ctx.save_for_backward(L, u, band3)
        ctx.be, ctx.tiled = be, tiled
        return u

    @staticmethod
    def backward(ctx, ubar):
        L, u, band3 = ctx.saved_tensors
        v = _solve_factor(L, ubar, True, False, ctx.be, ctx.tiled)  # L^{-1} u_bar
        gband = None
        if ctx.needs_input_grad[0]:
            Lbar = _lower_outer(u, v, band3.shape[2], ctx.be)  # -u v^T on the band
            gband = _chol_backward(L, Lbar, band3, ctx.be)
        return gband, (v if ctx.needs_input_grad[1] else None), None, None


# ------------------------------------------------------------------------- public API


def band_from_dense(A: torch.Tensor, k: int) -> torch.Tensor:
    """Row-lower band ``(..., n, k+1)`` of a dense symmetric ``A (..., n, n)``:
    ``band[..., i, j] = A[..., i, i-j]`` (zero where i - j < 0). Entries of A outside
    the band are dropped."""
    if A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise InputError(f"A must have shape (..., n, n), got {tuple(A.shape)}")
    if k < 0:
        raise InputError(f"bandwidth k must be >= 0, got {k}")
    cols = [F.pad(torch.diagonal(A, offset=-j, dim1=-2, dim2=-1), (j, 0)) for j in range(k + 1)]
    return torch.stack(cols, dim=-1)


def band_to_dense(band: torch.Tensor) -> torch.Tensor:
    """Dense symmetric ``A (..., n, n)`` from its row-lower band ``(..., n, k+1)``."""
    n, k = _check_band(band)
    A = torch.diag_embed(band[..., 0])
    for j in range(1, min(k, n - 1) + 1):
        off = torch.diag_embed(band[..., j:, j], offset=-j)
        A = A + off + off.mT
    return A


def band_lower_to_dense(L: torch.Tensor) -> torch.Tensor:
    """Dense lower-triangular matrix from a row-lower band factor ``(..., n, k+1)``."""
    n, k = _check_band(L, "L")
    A = torch.diag_embed(L[..., 0])
    for j in range(1, min(k, n - 1) + 1):
        A = A + torch.diag_embed(L[..., j:, j], offset=-j)
    return A


def band_matvec(band: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``A x`` for symmetric banded A; band ``(..., n, k+1)``, x ``(..., n)`` -> ``(..., n)``.

    ``(A x)_i = sum_j band[i, j] x_{i-j} + sum_{j>0} band[i+j, j] x_{i+j}``; O(n k),
    differentiable by torch autograd.
    """
    n, k = _check_band(band)
    _check_vec(x, n, band, "x")
    bm = torch.where(_lower_mask(n, k + 1, band.device), band, 0.0)
    y = bm[..., 0] * x
    for j in range(1, min(k, n - 1) + 1):
        bj = bm[..., j:, j]
        y = y + F.pad(bj * x[..., :-j], (j, 0)) + F.pad(bj * x[..., j:], (0, j))
    return y


def band_llt(L: torch.Tensor) -> torch.Tensor:
    """Band of ``L L^T`` (bandwidth k) from a lower band factor L ``(..., n, k+1)``.

    ``(L L^T)[i, i-j] = sum_{m=0}^{k-j} L[i, i-j-m] L[i-j, i-j-m]``; differentiable.
    """
    n, k = _check_band(L, "L")
    Lm = torch.where(_lower_mask(n, k + 1, L.device), L, 0.0)
    cols = []
    for j in range(k + 1):
        if j >= n:
            cols.append(torch.zeros_like(Lm[..., 0]))
            continue
        prod = (Lm[..., j:, j:] * Lm[..., : n - j, : k + 1 - j]).sum(dim=-1)
        cols.append(F.pad(prod, (j, 0)))
    return torch.stack(cols, dim=-1)


def band_cholesky(band: torch.Tensor, *, backend: Backend = None) -> torch.Tensor:
    """Lower band factor L of ``A = L L^T`` (same storage, bandwidth k), differentiable.

    Raises NumericalError if a batch element is not SPD or holds NaN / inf.
    """
    n, k = _check_band(band)
    be = _backend(band, backend)
    batch, b3, _ = _broadcast(band)
    return _Cholesky.apply(b3, be, batch).reshape(*batch, n, k + 1)


def band_solve(band: torch.Tensor, b: torch.Tensor, *, backend: Backend = None) -> torch.Tensor:
    """``x = A^{-1} b``; band ``(..., n, k+1)``, b ``(..., n)`` (batch dims broadcast).

    Cost O(n k^2). Differentiable w.r.t. band and b by implicit differentiation (the
    backward pass is one more solve with the saved factor).
    """
    n, k = _check_band(band)
    _check_vec(b, n, band, "b")
    be = _backend(band, backend)
    batch, band3, (b2,) = _broadcast(band, b)
    if torch.is_grad_enabled() and (band.requires_grad or b.requires_grad):
        x = _Solve.apply(band3, b2, be, batch)
    else:
        x, info = _factor_solve(band3, b2, be)
        _raise_bad("band_solve", info, batch, band3)
        _check_finite("band_solve", "the right-hand side b", x, batch)
    return x.reshape(*batch, n)


def band_logdet(band: torch.Tensor, *, backend: Backend = None) -> torch.Tensor:
    """``log det A`` ``(...)`` = 2 sum_i log L_ii. Gradient: the band of A^{-1} (Takahashi
    selected inverse, O(n k^2))."""
    n, k = _check_band(band)
    be = _backend(band, backend)
    batch, b3, _ = _broadcast(band)
    return _Logdet.apply(b3, be, batch).reshape(batch)


def band_sample(mu, band: torch.Tensor, z: torch.Tensor, *, backend: Backend = None) -> torch.Tensor:
    """A draw ``x = mu + L^{-T} z`` of N(mu, Q^{-1}) for ``band`` = precision Q = L L^T.

    z ``(..., n)`` standard normal (its batch dims give the number of draws); mu a tensor
    broadcastable to ``(..., n)`` or a scalar. Cov(L^{-T} z) = L^{-T} L^{-1} = Q^{-1}.
    Differentiable w.r.t. mu, band (reverse-mode Cholesky recursion) and z.
    """
    n, k = _check_band(band)
    _check_vec(z, n, band, "z")
    be = _backend(band, backend)
    batch, b3, (z2,) = _broadcast(band, z)
    u = _SampleNoise.apply(b3, z2, be, batch).reshape(*batch, n)
    return mu + u


def _obs_terms(op, mu, band, y, mask, R):
    """Validate and broadcast MAP inputs to the common shape ``(..., n)``.

    Returns n, k, mask, R_s (R where observed, 1 elsewhere), y_o (y where observed, 0
    elsewhere) and mu, all of one shape, and the band (batch-broadcast).
    """
    n, k = _check_band(band, "Q_band" if op == "band_map" else "P_band")
    _check_vec(y, n, band, "y")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape[-1:] != (n,):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputError(f"{op}: mask must be a bool tensor of shape (..., {n}), got {got}")
    mask = mask.to(band.device)
    R = torch.as_tensor(R, dtype=band.dtype, device=band.device)
    mu = torch.as_tensor(mu, dtype=band.dtype, device=band.device)
    if R.ndim > 0 and R.shape[-1] not in (1, n):
        raise InputError(f"{op}: R must be a scalar or of shape (..., {n}), got {tuple(R.shape)}")
    if mu.ndim > 0 and mu.shape[-1] not in (1, n):
        raise InputError(f"{op}: mu must be a scalar or of shape (..., {n}), got {tuple(mu.shape)}")
    shape = torch.broadcast_shapes(band.shape[:-1], y.shape, mask.shape, R.shape, mu.shape)
    mask = mask.expand(shape)
    if bool(((R <= 0) & mask).any()):
        raise InputError(f"{op}: observation-error variance R must be > 0 where mask is True")
    one = torch.ones((), dtype=band.dtype, device=band.device)
    Rs = torch.where(mask, R, one)
    yo = torch.where(mask, y, 0 * one)
    band = band.expand(*shape, k + 1)
    return n, k, mask, Rs, yo, mu.expand(shape), band


def _pair_mask(m: torch.Tensor, k: int) -> torch.Tensor:
    """band[..., i, j] = m_i m_{i-j}: the band of diag(m) (11^T) diag(m)."""
    n = m.shape[-1]
    cols = [m]
    for j in range(1, k + 1):
        cols.append(F.pad(m[..., :-j] * m[..., j:], (j, 0)) if j < n else torch.zeros_like(m))
    return torch.stack(cols, dim=-1)


def band_add_diagonal(band: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    """``band + diag(diag)`` for a row-lower band ``(..., n, k+1)`` and ``diag`` broadcastable
    to ``(..., n)`` (column 0 of the storage is the diagonal). Differentiable."""
    return torch.cat([band[..., :1] + diag.unsqueeze(-1), band[..., 1:]], dim=-1)


def band_map(mu, Q_band, y, mask, R, *, backend: Backend = None) -> torch.Tensor:
    """MAP / BLUE in information form with a selection operator H given by ``mask``:

        x = (Q + H^T R^{-1} H)^{-1} (Q mu + H^T R^{-1} y)
          = mu + (Q + H^T R^{-1} H)^{-1} H^T R^{-1} (y - H mu)

    Q_band ``(..., n, k+1)`` prior precision, mu / y ``(..., n)`` (y ignored where mask is
    False, may be NaN there), mask bool ``(..., n)`` (varies per sample; shapes stay
    static), R scalar or ``(..., n)`` observation-error variance. H^T R^{-1} H is
    diagonal, so the posterior precision keeps bandwidth k: one banded Cholesky.
    Differentiable w.r.t. mu, Q_band, y and R.
    """
    n, k, mask, Rs, yo, mu, Q = _obs_terms("band_map", mu, Q_band, y, mask, R)
    w = torch.where(mask, 1.0 / Rs, 0.0)  # diagonal of H^T R^{-1} H
    post = band_add_diagonal(Q, w)
    return mu + band_solve(post, w * (yo - mu), backend=backend)


def band_kalman(mu, P_band, y, mask, R, *, backend: Backend = None) -> torch.Tensor:
    """MAP / BLUE in Kalman form with banded prior covariance P and selection H = mask:

        x = mu + P H^T (H P H^T + R)^{-1} (y - H mu)

    With static shapes: S = M P M + diag(R on observed rows, 1 elsewhere), M = diag(mask),
    is banded (bandwidth k); it equals H P H^T + R on the observed rows and the identity on
    the others, so w = S^{-1} M (y - mu) is (H P H^T + R)^{-1}(y - H mu) scattered back
    (zero on unobserved rows) and x = mu + P w. Shapes as in :func:`band_map`;
    differentiable w.r.t. mu, P_band, y and R.
    """
    n, k, mask, Rs, yo, mu, P = _obs_terms("band_kalman", mu, P_band, y, mask, R)
    S = P * _pair_mask(mask.to(P.dtype), k)
    S = band_add_diagonal(S, Rs)
    w = band_solve(S, torch.where(mask, yo - mu, 0.0), backend=backend)
    return mu + band_matvec(P, w)


def spd_band_from_raw(raw: torch.Tensor, k: int, eps: float = 1e-6, ridge: float = 0.0) -> torch.Tensor:
    """Precision band ``Q = L L^T + ridge * diag(L L^T)`` (bandwidth k) from unconstrained
    values ``raw (..., n, k+1)``.

    L is lower banded with ``L[i, i] = softplus(raw[i, 0]) + eps`` (> 0) and
    ``L[i, i-j] = raw[i, j]`` (j = 1..k, ignored where i - j < 0), so Q is SPD by
    construction; with ``ridge = 0`` L is its Cholesky factor. Differentiable.

    ``L L^T`` alone can be numerically singular in float64: with off-diagonals of L a few
    hundred times its diagonal, ``L^{-1}`` grows geometrically along the band, the smallest
    eigenvalue of ``L L^T`` falls below rounding, and the Cholesky of ``Q`` (or of a posterior
    precision ``Q + W``, W >= 0 diagonal) fails. The relative ridge bounds what matters for
    Cholesky in floating point, the conditioning of the diagonally scaled matrix (Demmel 1989,
    "On floating point errors in Cholesky"): with ``D = diag(Q + W)``,
    ``lambda_min(D^{-1/2} (Q + W) D^{-1/2}) >= ridge / (1 + ridge)`` for every W >= 0 diagonal,
    whatever L, so a ridge well above ``(k+1) * 2^-52`` makes every such factorisation succeed.
    """
    n, kk = _check_band(raw, "raw")
    if kk != k:
        raise InputError(f"raw must have shape (..., n, k+1) = (..., n, {k + 1}), got {tuple(raw.shape)}")
    if not ridge >= 0:
        raise InputError(f"ridge must be >= 0, got {ridge}")
    L = torch.cat([F.softplus(raw[..., :1]) + eps, raw[..., 1:]], dim=-1)
    Q = band_llt(L)
    if ridge:
        Q = torch.cat([Q[..., :1] * (1.0 + ridge), Q[..., 1:]], dim=-1)
    return Q
