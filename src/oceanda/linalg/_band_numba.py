"""CPU back-end of the banded SPD kernels: numba-compiled loops, batched over systems.

All arrays are numpy views of contiguous torch tensors, flattened to one batch dimension:
``band`` / ``L`` / ``Z`` of shape ``(B, n, k+1)`` in "row-lower" storage
(``band[b, i, j] = A_b[i, i - j]``; entries with ``i - j < 0`` are never read), vectors
``(B, n)``, ``info`` ``(B,)`` int64 (0: success; ``r + 1``: the Cholesky pivot of row ``r`` is
not positive and finite, i.e. the matrix is not SPD or holds a NaN / inf).

Two loop families, chosen by :func:`use_tiles`:

* *tiled* (many small systems, e.g. B = 1024 systems of size 96): bands are passed
  batch-innermost, ``(n, k+1, B)``, and cut into tiles of ``tw`` systems copied into a
  buffer ``(n, k+1, tw)`` that stays in cache; every arithmetic statement is a SIMD loop
  over the ``tw`` systems of the tile. The fused factor + solve (:func:`tile_factor_solve`)
  uses, for k <= ``_GEN_K_MAX``, a kernel generated for the given k with one row of the
  factor unrolled in the lane loop (see "fused factor + solve, generated per k").
* *scalar* (few long systems, e.g. one system of size 10^6): plain row loops per system,
  O(n k^2) for the factor and O(n k) per solve.

The Cholesky factor is computed row by row ("row-lower" is a row-oriented storage):

    L[i, c] = (A[i, c] - sum_{q<c} L[i, q] L[c, q]) / L[c, c]      (i - k <= c < i)
    L[i, i] = sqrt(A[i, i] - sum_{q<i} L[i, q]^2)
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading

import numpy as np
from numba import njit

# Systems per tile: the lane loops run over this many contiguous values (a few AVX-512
# vectors), and the tile buffer (n, k+1, _TW) stays in L2 for the sizes we target.
_TW = 64
# Use tiles when the tile buffer (n * (k+1) * _TW values) stays below this many values
# (4 MiB in float64); beyond that the scalar loops stream better.
_TILE_MAX_VALUES = 1 << 19
# fastmath flags that keep IEEE NaN / inf semantics (needed for the SPD checks):
# fused multiply-add and reciprocal approximations of divisions only.
_FM = {"contract", "arcp"}
_JIT = dict(cache=True, nogil=True, error_model="numpy", fastmath=_FM)


def use_tiles(batch: int, n: int, k: int) -> bool:
    """Whether the tiled (batch-vectorised) loops are used for this problem size."""
    return batch >= 4 and n * (k + 1) * tile_width(batch) <= _TILE_MAX_VALUES


def tile_width(batch: int) -> int:
    """Lanes per tile: ``_TW``, or the batch rounded up to a multiple of 8 when smaller."""
    return min(_TW, -(-batch // 8) * 8)


# --------------------------------------------------------------------------- tiled loops
# The tiled loops keep factors and vectors batch-innermost ("SoA"): a factor LT of shape
# (n, k+1, B), vectors (n, B); the input band (B, n, k+1) is transposed tile by tile.
# Lane loops then read and write contiguous memory and LLVM vectorises them. Indices
# that LLVM cannot prove non-negative are cast to unsigned: numba's negative-index
# wrap-around would otherwise turn the accesses into (slow) gather / scatter instructions.


@njit(**_JIT)
def _tile_copy_in(T, t0, nl, Lt):
    """Lt[:, :, w] = T[:, :, t0 + w]; lanes past the batch get the identity matrix."""
    n, k1, nw = Lt.shape
    u0 = np.uint64(t0)  # unsigned indices: no negative-index wrap-around, affine addresses
    for i in range(n):
        for j in range(k1):
            for w in range(nl):
                Lt[i, j, w] = T[i, j, u0 + np.uint64(w)]
            fill = 1.0 if j == 0 else 0.0
            for w in range(nw - nl):
                Lt[i, j, np.uint64(nl) + np.uint64(w)] = fill


@njit(**_JIT)
def _tile_band_in(band, t0, nl, Lt):
    """Lt[:, :, w] = band[t0 + w] from row-lower storage (B, n, k+1): the transposition
    to batch-innermost, done per tile while it is cached; identity past the batch."""
    n, k1, nw = Lt.shape
    u0 = np.uint64(t0)
    for i in range(n):
        for j in range(k1):
            for w in range(nl):
                Lt[i, j, w] = band[u0 + np.uint64(w), i, j]
            fill = 1.0 if j == 0 else 0.0
            for w in range(nw - nl):
                Lt[i, j, np.uint64(nl) + np.uint64(w)] = fill


@njit(**_JIT)
def _tile_vec_in(b, t0, nl, y):
    n, nw = y.shape
    u0 = np.uint64(t0)
    for i in range(n):
        for w in range(nl):
            y[i, w] = b[i, u0 + np.uint64(w)]
        for w in range(nw - nl):
            y[i, np.uint64(nl) + np.uint64(w)] = 0.0


@njit(**_JIT)
def _tile_factor_row(Lt, inv, i, k):
    """Overwrite row i of the tile (holding A's row) with L's row; inv[i] = 1 / L[i, i]."""
    nw = Lt.shape[2]
    for j in range(k, 0, -1):
        c = i - j
        if c < 0:
            for w in range(nw):
                Lt[i, j, w] = 0.0
            continue
        for m in range(min(c, k - j), 0, -1):
            for w in range(nw):
                Lt[i, j, w] -= Lt[i, j + m, w] * Lt[c, m, w]
        for w in range(nw):
            Lt[i, j, w] *= inv[c, w]
    for m in range(1, min(i, k) + 1):
        for w in range(nw):
            Lt[i, 0, w] -= Lt[i, m, w] * Lt[i, m, w]
    for w in range(nw):
        d = np.sqrt(Lt[i, 0, w])
        Lt[i, 0, w] = d
        inv[i, w] = 1.0 / d


@njit(**_JIT)
def _tile_forward(Lt, inv, y, k):
    """Forward substitution in place: y <- L^{-1} y."""
    n, nw = y.shape
    for i in range(n):
        for m in range(min(i, k), 0, -1):
            for w in range(nw):
                y[i, w] -= Lt[i, m, w] * y[i - m, w]
        for w in range(nw):
            y[i, w] *= inv[i, w]


@njit(**_JIT)
def _tile_backward(Lt, inv, y, k):
    """Back substitution in place: y <- L^{-T} y."""
    n, nw = y.shape
    for i in range(n - 1, -1, -1):
        for m in range(min(n - 1 - i, k), 0, -1):
            for w in range(nw):
                y[i, w] -= Lt[i + m, m, w] * y[i + m, w]
        for w in range(nw):
            y[i, w] *= inv[i, w]


@njit(**_JIT)
def _tile_info(Lt, t0, nl, first, info):
    """info[t0 + w] = 1 + first row whose pivot is not positive and finite (0 if none)."""
    n, k1, nw = Lt.shape
    for w in range(nw):
        first[w] = 0
    for i in range(n - 1, -1, -1):
        for w in range(nw):
            d = Lt[i, 0, w]
            first[w] = first[w] if (d > 0.0 and d < np.inf) else i + 1
    for w in range(nl):
        info[np.uint64(t0) + np.uint64(w)] = first[w]


@njit(**_JIT)
def _tile_factor_solve_loops(band, b, LT, x, info, store_l, do_solve, tw):
    """Generic-k version of :func:`tile_factor_solve` (used for k > ``_GEN_K_MAX``).

    band: (B, n, k+1) row-lower; LT: (n, k+1, B) batch-innermost factor; b, x: (n, B);
    info (B,). One pass per tile of ``tw`` systems in a buffer that stays in cache: factor
    rows, then forward and back substitution, so A^{-1} b never needs L in memory.
    """
    nb, n, k1 = band.shape
    k = k1 - 1
    Lt = np.empty((n, k1, tw), band.dtype)
    inv = np.empty((n, tw), band.dtype)
    y = np.empty((n, tw), band.dtype)
    first = np.empty(tw, np.int64)
    for t0 in range(0, nb, tw):
        nl = min(tw, nb - t0)
        _tile_band_in(band, t0, nl, Lt)
        for i in range(n):
            _tile_factor_row(Lt, inv, i, k)
        _tile_info(Lt, t0, nl, first, info)
        u0 = np.uint64(t0)
        if store_l:
            for i in range(n):
                for j in range(k1):
                    for w in range(nl):
                        LT[i, j, u0 + np.uint64(w)] = Lt[i, j, w]
        if do_solve:
            _tile_vec_in(b, t0, nl, y)
            _tile_forward(Lt, inv, y, k)
            _tile_backward(Lt, inv, y, k)
            for i in range(n):
                for w in range(nl):
                    x[i, u0 + np.uint64(w)] = y[i, w]


# ------------------------------------------------- fused factor + solve, generated per k
# For moderate k the fused tiled kernel is generated for the given (k, tile width) with the
# whole row of the factor unrolled into one loop over the tile's lanes: the k+1 entries of
# the row live in registers (one FMA per term instead of a load, FMA and store), and every
# array access is at a compile-time constant distance from the others in ONE flat work
# buffer, so LLVM vectorises the lane loop without run-time alias checks.
#
# Work buffer W (flat): row r of the tile (r = 0..n-1) at offset (r + k) * RS, with
# RS = (k + 3) * tw, holding L[r, j] for the tw lanes at j * tw (j = 0..k), then
# 1 / L[r, r] at (k+1) * tw, then the solution vector at (k+2) * tw. k zero rows before and
# after the matrix stand for the entries outside it (L and y = 0 there), so no row needs a
# boundary test; band entries above the matrix (i - j < 0) are never read, zeros are
# copied in their place.

_GEN_K_MAX = 16  # unrolled row: (k+1)(k+2)/2 terms; beyond this, the generic loops
_GEN_TW = 32  # lanes per tile of the generated kernels (measured best for n ~ 100, k ~ 6)
_gen_cache: dict = {}
_gen_lock = threading.Lock()


def _gen_source(k: int, tw: int) -> str:
    k1, rs = k + 1, (k + 3) * tw
    inv, yo = k1 * tw, (k1 + 1) * tw

    def at(off: int) -> str:  # W index at a constant offset from p (p = row base + lane)
        return "W[p]" if off == 0 else (f"W[p + U({off})]" if off > 0 else f"W[p - U({-off})]")

    row = []  # body of the lane loop of row i: factor row, then forward substitution
    for j in range(k1):
        row.append(f"a{j} = {at(j * tw)}")
    for j in range(k, 0, -1):  # L[i, i-j], c = i - j: row offset -j * rs
        e = f"a{j}"
        for m in range(k - j, 0, -1):
            e = f"({e} - l{j + m} * {at(-j * rs + m * tw)})"
        row.append(f"l{j} = {e} * {at(-j * rs + inv)}")
    e = "a0"
    for m in range(1, k1):
        e = f"({e} - l{m} * l{m})"
    row.append(f"d = np.sqrt({e})")
    row.append("r = 1.0 / d")
    row.append(f"{at(0)} = d")
    for j in range(1, k1):
        row.append(f"{at(j * tw)} = l{j}")
    row.append(f"{at(inv)} = r")
    e = at(yo)
    for m in range(k, 0, -1):
        e = f"({e} - l{m} * {at(-m * rs + yo)})"
    fwd = f"{at(yo)} = {e} * r"
    e = at(yo)
    for m in range(k, 0, -1):
        e = f"({e} - {at(m * rs + m * tw)} * {at(m * rs + yo)})"
    bwd = f"{at(yo)} = {e} * {at(inv)}"
    ind = "\n" + " " * 16
    return f"""
def kernel(band, b, LT, x, info, store_l, do_solve, W, first):
    nb, n, k1 = band.shape
    for t0 in range(0, nb, {tw}):
        nl = min({tw}, nb - t0)
        u0 = U(t0)
        # transpose the tile's band into W (i, w, j order: measured fastest)
        if nl == {tw}:
            for i in range(n):
                ub = U((i + {k}) * {rs})
                for w in range({tw}):
                    uw = U(w)
                    for j in range({k1}):
                        W[ub + uw + U(j * {tw})] = band[u0 + uw, i, j] if j <= i else 0.0
        else:  # partial tile: identity matrices in the lanes past the batch
            for i in range(n):
                ub = U((i + {k}) * {rs})
                for w in range({tw}):
                    uw = U(w)
                    for j in range({k1}):
                        if w < nl:
                            W[ub + uw + U(j * {tw})] = band[u0 + uw, i, j] if j <= i else 0.0
                        else:
                            W[ub + uw + U(j * {tw})] = 1.0 if j == 0 else 0.0
        if do_solve:
            for i in range(n):
                ub = U((i + {k}) * {rs} + {yo})
                for w in range(nl):
                    W[ub + U(w)] = b[i, u0 + U(w)]
                for w in range(nl, {tw}):
                    W[ub + U(w)] = 0.0
        # factor row by row, forward substitution with the fresh row
        for i in range(n):
            ub = U((i + {k}) * {rs})
            for w in range({tw}):
                p = ub + U(w)
                {ind.join(row)}
                if do_solve:
                    {fwd}
        # info: 1 + first row whose pivot is not positive and finite (NaN / inf included)
        for w in range({tw}):
            first[w] = 0
        for i in range(n - 1, -1, -1):
            ub = U((i + {k}) * {rs})
            for w in range({tw}):
                d = W[ub + U(w)]
                first[w] = first[w] if (d > 0.0 and d < np.inf) else i + 1
        for w in range(nl):
            info[u0 + U(w)] = first[w]
        if store_l:
            for i in range(n):
                for j in range({k1}):
                    ub = U((i + {k}) * {rs} + j * {tw})
                    for w in range(nl):
                        LT[i, j, u0 + U(w)] = W[ub + U(w)]
        if do_solve:
            for i in range(n - 1, -1, -1):  # back substitution
                ub = U((i + {k}) * {rs})
                for w in range({tw}):
                    p = ub + U(w)
                    {bwd}
            for i in range(n):
                ub = U((i + {k}) * {rs} + {yo})
                for w in range(nl):
                    x[i, u0 + U(w)] = W[ub + U(w)]
"""


def _gen_kernel(k: int, tw: int):
    """The generated fused kernel for bandwidth k and tile width tw (compiled once)."""
    key = (k, tw)
    kern = _gen_cache.get(key)
    if kern is None:
        with _gen_lock:
            kern = _gen_cache.get(key)
            if kern is None:
                kern = _load_gen_module(k, tw)
                _gen_cache[key] = kern
    return kern


def _load_gen_module(k: int, tw: int):
    """Compile the generated source. It is written as a module under this package's
    ``__pycache__`` so that numba's on-disk cache (``cache=True``) spares later processes
    the compilation; if that folder is not writable, the source is compiled in memory."""
    src = "import numpy as np\nfrom numpy import uint64 as U\n" + _gen_source(k, tw)
    name = f"band_gen_k{k}_tw{tw}"
    try:
        folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__", "oceanda_band_gen")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, name + ".py")
        try:
            with open(path) as f:
                same = f.read() == src
        except OSError:
            same = False
        if not same:  # rewrite only when changed (the file's time stamp keys numba's cache)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(src)
            os.replace(tmp, path)
        spec = importlib.util.spec_from_file_location(f"oceanda.linalg._{name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # numba's cache re-imports the module by name
        spec.loader.exec_module(mod)
        return njit(cache=True, nogil=True, error_model="numpy", fastmath=_FM)(mod.kernel)
    except OSError:
        ns = {}
        exec(compile(src, f"<oceanda {name}>", "exec"), ns)
        return njit(nogil=True, error_model="numpy", fastmath=_FM)(ns["kernel"])


def tile_factor_solve(band, b, LT, x, info, store_l, do_solve, tw):
    """Factor A = L L^T (into ``LT`` when ``store_l``) and, when ``do_solve``, x = A^{-1} b.

    band: (B, n, k+1) row-lower; LT: (n, k+1, B) batch-innermost factor; b, x: (n, B);
    info (B,). One pass per tile of systems in a buffer that stays in cache: factor rows,
    then forward and back substitution, so A^{-1} b never needs L in memory. Uses the
    generated kernel for k <= ``_GEN_K_MAX`` (tiles of at most ``_GEN_TW`` systems), the
    generic loops (tiles of ``tw`` systems) otherwise.
    """
    nb, n, k1 = band.shape
    k = k1 - 1
    if k > _GEN_K_MAX:
        _tile_factor_solve_loops(band, b, LT, x, info, store_l, do_solve, tw)
        return
    gtw = min(tw, _GEN_TW)
    W = np.zeros((n + 2 * k) * (k + 3) * gtw, band.dtype)
    first = np.empty(gtw, np.int64)
    _gen_kernel(k, gtw)(band, b, LT, x, info, store_l, do_solve, W, first)


@njit(**_JIT)
def tile_solve_factor(LT, b, x, forward, backward, tw):
    """x = L^{-1} b (forward), L^{-T} b (backward) or A^{-1} b = L^{-T} L^{-1} b (both).

    LT: (n, k+1, B) batch-innermost factor; b, x: (n, B).
    """
    n, k1, nb = LT.shape
    k = k1 - 1
    Lt = np.empty((n, k1, tw), LT.dtype)
    inv = np.empty((n, tw), LT.dtype)
    y = np.empty((n, tw), LT.dtype)
    for t0 in range(0, nb, tw):
        nl = min(tw, nb - t0)
        _tile_copy_in(LT, t0, nl, Lt)
        for i in range(n):
            for w in range(tw):
                inv[i, w] = 1.0 / Lt[i, 0, w]
        _tile_vec_in(b, t0, nl, y)
        if forward:
            _tile_forward(Lt, inv, y, k)
        if backward:
            _tile_backward(Lt, inv, y, k)
        u0 = np.uint64(t0)
        for i in range(n):
            for w in range(nl):
                x[i, u0 + np.uint64(w)] = y[i, w]


# -------------------------------------------------------------------------- scalar loops


@njit(**_JIT)
def scalar_factor(band, L, info):
    """L = chol(A) per system; stops a system at its first failing pivot (info = row + 1).

    The sums run towards the most recently computed entry and divide by a stored
    reciprocal, so the dependency chain between consecutive entries is one FMA and one
    multiply.
    """
    nb, n, k1 = band.shape
    k = k1 - 1
    inv = np.empty(n, band.dtype)
    for s in range(nb):
        info[s] = 0
        for i in range(n):
            for j in range(k, 0, -1):
                c = i - j
                if c < 0:
                    L[s, i, j] = 0.0
                    continue
                acc = band[s, i, j]
                for m in range(min(c, k - j), 0, -1):
                    acc -= L[s, i, j + m] * L[s, c, m]
                L[s, i, j] = acc * inv[c]
            acc = band[s, i, 0]
            for m in range(min(i, k), 0, -1):
                acc -= L[s, i, m] * L[s, i, m]
            if not (acc > 0.0 and acc < np.inf):
                info[s] = i + 1
                L[s, i:, :] = np.nan
                break
            d = np.sqrt(acc)
            L[s, i, 0] = d
            inv[i] = 1.0 / d


@njit(**_JIT)
def scalar_solve_factor(L, b, x, forward, backward):
    """Same contract as :func:`tile_solve_factor`, one system at a time."""
    nb, n, k1 = L.shape
    k = k1 - 1
    inv = np.empty(n, L.dtype)
    for s in range(nb):
        for i in range(n):
            x[s, i] = b[s, i]
            inv[i] = 1.0 / L[s, i, 0]
        if forward:
            for i in range(n):
                acc = x[s, i]
                for m in range(min(i, k), 0, -1):
                    acc -= L[s, i, m] * x[s, i - m]
                x[s, i] = acc * inv[i]
        if backward:
            for i in range(n - 1, -1, -1):
                acc = x[s, i]
                for m in range(min(n - 1 - i, k), 0, -1):
                    acc -= L[s, i + m, m] * x[s, i + m]
                x[s, i] = acc * inv[i]


# ------------------------------------------------------------------ gradients' kernels


@njit(**_JIT)
def selected_inverse(L, Z):
    """Band of Z = A^{-1} = L^{-T} L^{-1} (Takahashi et al. 1973 recursion), O(n k^2).

    From L^T Z = L^{-1} and Z L = L^{-T} (both triangular), for i = n-1 .. 0:

        Z[r, i] = -(1 / L[i,i]) sum_{l=i+1}^{i+k} Z[r, l] L[l, i]        (i < r <= i + k)
        Z[i, i] = (1 / L[i,i]) (1 / L[i,i] - sum_{l=i+1}^{i+k} L[l, i] Z[l, i])

    Only entries inside the band are touched. ``Z`` is returned in row-lower storage.
    """
    nb, n, k1 = L.shape
    k = k1 - 1
    for s in range(nb):
        Z[s, :, :] = 0.0
        for i in range(n - 1, -1, -1):
            inv = 1.0 / L[s, i, 0]
            top = min(n - 1, i + k)
            for r in range(top, i, -1):
                acc = 0.0
                for l in range(i + 1, top + 1):
                    if r >= l:
                        zrl = Z[s, r, r - l]
                    else:
                        zrl = Z[s, l, l - r]
                    acc += zrl * L[s, l, l - i]
                Z[s, r, r - i] = -acc * inv
            acc = inv
            for l in range(i + 1, top + 1):
                acc -= L[s, l, l - i] * Z[s, l, l - i]
            Z[s, i, 0] = acc * inv


@njit(**_JIT)
def cholesky_backward(L, Lbar, Abar):
    """Reverse mode of the row-lower Cholesky loop: Abar = d loss / d band given Lbar.

    ``Lbar`` (gradient w.r.t. the stored entries of L) is used as work space and is
    overwritten. ``Abar[b, i, j]`` is the gradient w.r.t. ``band[b, i, j]``, the stored
    lower entry A[i, i-j] (which the factorisation reads once). Cost O(n k^2).
    """
    nb, n, k1 = L.shape
    k = k1 - 1
    for s in range(nb):
        for i in range(n - 1, -1, -1):
            # diagonal: L[i,i] = sqrt(A[i,i] - sum_m L[i,i-m]^2)
            sb = Lbar[s, i, 0] / (2.0 * L[s, i, 0])
            Abar[s, i, 0] = sb
            for m in range(1, min(i, k) + 1):
                Lbar[s, i, m] -= 2.0 * sb * L[s, i, m]
            # off-diagonal entries of row i in reverse order of the forward loop
            for j in range(1, k1):
                c = i - j
                if c < 0:
                    Abar[s, i, j] = 0.0
                    continue
                sb = Lbar[s, i, j] / L[s, c, 0]
                Abar[s, i, j] = sb
                Lbar[s, c, 0] -= sb * L[s, i, j]
                for m in range(1, min(c, k - j) + 1):
                    Lbar[s, i, j + m] -= sb * L[s, c, m]
                    Lbar[s, c, m] -= sb * L[s, i, j + m]


@njit(**_JIT)
def sym_outer_band(g, x, out, scale):
    """out[b, i, j] = scale * (g_i x_{i-j} + g_{i-j} x_i) for j > 0, scale * g_i x_i for j = 0.

    The band gradient of a function of A(band) x where A is symmetric: each stored
    entry band[i, j] (j > 0) stands for both A[i, i-j] and A[i-j, i].
    """
    nb, n, k1 = out.shape
    for s in range(nb):
        for i in range(n):
            out[s, i, 0] = scale * g[s, i] * x[s, i]
            for j in range(1, k1):
                if j <= i:
                    out[s, i, j] = scale * (g[s, i] * x[s, i - j] + g[s, i - j] * x[s, i])
                else:
                    out[s, i, j] = 0.0


@njit(**_JIT)
def lower_outer_band(u, v, out, scale):
    """out[b, i, j] = scale * u_i v_{i-j} (the stored lower band of scale * u v^T)."""
    nb, n, k1 = out.shape
    for s in range(nb):
        for i in range(n):
            for j in range(k1):
                if j <= i:
                    out[s, i, j] = scale * u[s, i] * v[s, i - j]
                else:
                    out[s, i, j] = 0.0
