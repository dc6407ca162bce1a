"""CPU back-end of the banded SPD kernels: numba-compiled loops, batched over systems.

All arrays are numpy views of contiguous torch tensors, flattened to one batch dimension:
``band`` / ``L`` / ``Z`` of shape ``(B, n, k+1)`` in "row-lower" storage
(``band[b, i, j] = A_b[i, i - j]``; entries with ``i - j < 0`` are never read), vectors
``(B, n)``, ``info`` ``(B,)`` int64 (0: success; ``r + 1``: the Cholesky pivot of row ``r`` is
not positive and finite, i.e. the matrix is not SPD or holds a NaN / inf).

Two loop families, chosen by :func:`use_tiles`:

* *tiled* (many small systems, e.g. B = 1024 systems of size 96): the batch is cut into
  tiles of ``tw`` systems (one contiguous block of each array), transposed into a
  batch-innermost buffer ``(n, k+1, tw)`` that stays in cache; every arithmetic statement
  is a SIMD loop over the ``tw`` systems of the tile. The fused factor + solve
  (:func:`tile_factor_solve`) and the fused backward pass of a solve
  (:func:`tile_solve_grad`) use, for k <= ``_GEN_K_MAX``, kernels generated for the given
  k with one row unrolled in the lane loop (see "fused factor + solve, generated per k").
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
# The tiled loops work on tile buffers that are batch-innermost ("SoA"); bands and factors
# (B, n, k+1) and vectors (B, n) stay batch-outermost in memory (torch's layout), so a tile
# of systems is one contiguous block, and are transposed tile by tile into and out of the
# tile buffers while they are in cache.
# Lane loops then read and write contiguous memory and LLVM vectorises them. Indices
# that LLVM cannot prove non-negative are cast to unsigned: numba's negative-index
# wrap-around would otherwise turn the accesses into (slow) gather / scatter instructions.


@njit(**_JIT)
def _tile_band_in(band, t0, nl, Lt):
    """Lt[:, :, w] = band[t0 + w] from row-lower storage (B, n, k+1): the transposition
    to batch-innermost, done per tile while it is cached; identity past the batch."""
    n, k1, nw = Lt.shape
    u0 = np.uint64(t0)
    for wb in range(0, nl, 8):  # blocks of 8 systems: one cache line of Lt per (i, j)
        we = min(wb + 8, nl)
        for i in range(n):
            for w in range(wb, we):
                uw = np.uint64(w)
                for j in range(k1):
                    Lt[i, j, uw] = band[u0 + uw, i, j]
    for i in range(n):
        for j in range(k1):
            fill = 1.0 if j == 0 else 0.0
            for w in range(nw - nl):
                Lt[i, j, np.uint64(nl) + np.uint64(w)] = fill


@njit(**_JIT)
def _tile_vec_in(b, t0, nl, y):
    """y[:, w] = b[t0 + w] from batch-outermost b (B, n) (each read contiguous); zero lanes
    past the batch."""
    n, nw = y.shape
    u0 = np.uint64(t0)
    for w in range(nl):
        for i in range(n):
            y[i, w] = b[u0 + np.uint64(w), i]
    for i in range(n):
        for w in range(nw - nl):
            y[i, np.uint64(nl) + np.uint64(w)] = 0.0


@njit(**_JIT)
def _tile_vec_out(y, t0, nl, x):
    """x[t0 + w] = y[:, w] for the nl lanes of the tile; x (B, n) batch-outermost."""
    n = y.shape[0]
    u0 = np.uint64(t0)
    for w in range(nl):
        for i in range(n):
            x[u0 + np.uint64(w), i] = y[i, w]


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
def _tile_factor_solve_loops(band, b, L, x, info, store_l, do_solve, tw):
    """Generic-k version of :func:`tile_factor_solve` (used for k > ``_GEN_K_MAX``).

    band, L: (B, n, k+1) row-lower; b, x: (B, n);
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
        if store_l:  # blocks of 8 systems, row by row (see _gen_grad_source)
            for wb in range(0, nl, 8):
                we = min(wb + 8, nl)
                for i in range(n):
                    for w in range(wb, we):
                        uw = np.uint64(w)
                        for j in range(k1):
                            L[u0 + uw, i, j] = Lt[i, j, uw]
        if do_solve:
            _tile_vec_in(b, t0, nl, y)
            _tile_forward(Lt, inv, y, k)
            _tile_backward(Lt, inv, y, k)
            _tile_vec_out(y, t0, nl, x)


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


def _tile_load_src(arr: str, k: int, tw: int, rs: int) -> str:
    """Source of the tile load shared by the generated kernels: the lower band ``arr``
    ``(B, n, k+1)`` of the tile's systems into ``W`` (``i, w, j`` order: measured fastest);
    a full tile has constant trip counts (unrolled), a partial one puts identity matrices in
    the lanes past the batch."""
    k1 = k + 1
    return f"""        if nl == {tw}:
            for i in range(n):
                ub = U((i + {k}) * {rs})
                for w in range({tw}):
                    uw = U(w)
                    for j in range({k1}):
                        W[ub + uw + U(j * {tw})] = {arr}[u0 + uw, i, j] if j <= i else 0.0
        else:
            for i in range(n):
                ub = U((i + {k}) * {rs})
                for w in range({tw}):
                    uw = U(w)
                    for j in range({k1}):
                        if w < nl:
                            W[ub + uw + U(j * {tw})] = {arr}[u0 + uw, i, j] if j <= i else 0.0
                        else:
                            W[ub + uw + U(j * {tw})] = 1.0 if j == 0 else 0.0
"""


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
def kernel(band, b, L, x, info, store_l, do_solve, W, first):
    nb, n, k1 = band.shape
    for t0 in range(0, nb, {tw}):
        nl = min({tw}, nb - t0)
        u0 = U(t0)
        # transpose the tile's band into W
{_tile_load_src('band', k, tw, rs)}        if do_solve:  # b (B, n): contiguous reads, one system at a time
            for w in range(nl):
                uw = U(w)
                for i in range(n):
                    W[U((i + {k}) * {rs} + {yo}) + uw] = b[u0 + uw, i]
            for i in range(n):
                ub = U((i + {k}) * {rs} + {yo})
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
        if store_l:  # L (B, n, k+1): blocks of 8 systems, row by row (see _gen_grad_source)
            for wb in range(0, nl, 8):
                we = min(wb + 8, nl)
                for i in range(n):
                    ub = U((i + {k}) * {rs})
                    for w in range(wb, we):
                        uw = U(w)
                        for j in range({k1}):
                            L[u0 + uw, i, j] = W[ub + uw + U(j * {tw})]
        if do_solve:
            for i in range(n - 1, -1, -1):  # back substitution
                ub = U((i + {k}) * {rs})
                for w in range({tw}):
                    p = ub + U(w)
                    {bwd}
            for w in range(nl):
                uw = U(w)
                for i in range(n):
                    x[u0 + uw, i] = W[U((i + {k}) * {rs} + {yo}) + uw]
"""


def _gen_grad_source(k: int, tw: int) -> str:
    """Source of the fused solve + band-gradient kernel (see :func:`tile_solve_grad`).

    Work buffer W as in :func:`_gen_source` with one more slot per row: row r at offset
    (r + k) * RS, RS = (k + 4) * tw: L[r, j] at j * tw, 1 / L[r, r] at (k+1) * tw, the
    right-hand side / solution g at (k+2) * tw, the forward solution x at (k+3) * tw; k rows
    of zeros before and after the matrix (g = x = L = 0 there: no boundary tests).

    The band gradient is formed in the back substitution: once g_i is final, so are
    g_{i+1..i+k}, which gives the entries (i + j, j), j = 0..k, of the band of
    scale * (g x^T + x g^T); and the slot of L[i + j, i] is dead once g_i is computed (row
    i is the only one that reads it), so the gradient overwrites the factor in W, in the
    same lane loop (SIMD over the tile's systems). Rows i + j past the matrix receive zeros
    (g = x = 0 there) unless g or x holds NaN / inf: the padding rows are cleared per tile.
    """
    k1, rs = k + 1, (k + 4) * tw
    inv, yo, xo = k1 * tw, (k1 + 1) * tw, (k1 + 2) * tw

    def at(off: int) -> str:
        return "W[p]" if off == 0 else (f"W[p + U({off})]" if off > 0 else f"W[p - U({-off})]")

    e = at(yo)
    for m in range(k, 0, -1):
        e = f"({e} - {at(m * tw)} * {at(-m * rs + yo)})"
    fwd = f"{at(yo)} = {e} * {at(inv)}"
    e = at(yo)
    for m in range(k, 0, -1):
        e = f"({e} - {at(m * rs + m * tw)} * {at(m * rs + yo)})"
    bwd = f"{at(yo)} = {e} * {at(inv)}"
    band = [f"gi = {e} * {at(inv)}", f"{at(yo)} = gi", f"xi = {at(xo)}", f"{at(0)} = scale * (gi * xi)"]
    for j in range(1, k1):
        band.append(f"{at(j * rs + j * tw)} = scale * ({at(j * rs + yo)} * xi + gi * {at(j * rs + xo)})")
    ind = "\n" + " " * 20
    # copy out of the tile, (B, n) and (B, n, k+1) batch-outermost: blocks of 8 systems
    # (one cache line of W per slot), row by row, so that W is read from L1 and the 8
    # systems' rows are written sequentially (measured 1.7-2.2x faster than one system
    # at a time, which re-reads each line of W from L2 for every system)
    copy_out = f"""if nl == {tw}:
                for wb in range(0, {tw}, 8):
                    for i in range(n):
                        ub = U((i + {k}) * {rs} + wb)
                        for w in range(8):
                            uw = U(w)
                            g[u0 + U(wb) + uw, i] = W[ub + uw + U({yo})]
                            for j in range({k1}):
                                gband[u0 + U(wb) + uw, i, j] = W[ub + uw + U(j * {tw})]
            else:
                for wb in range(0, nl, 8):
                    we = min(wb + 8, nl)
                    for i in range(n):
                        ub = U((i + {k}) * {rs})
                        for w in range(wb, we):
                            uw = U(w)
                            g[u0 + uw, i] = W[ub + uw + U({yo})]
                            for j in range({k1}):
                                gband[u0 + uw, i, j] = W[ub + uw + U(j * {tw})]"""
    return f"""
def kernel(L, gin, xs, g, gband, scale, do_band, W):
    nb, n, k1 = L.shape
    for t0 in range(0, nb, {tw}):
        nl = min({tw}, nb - t0)
        u0 = U(t0)
        # the tile's factor into W (identity in the lanes past the batch), 1 / L[i, i]
{_tile_load_src('L', k, tw, rs)}        for i in range(n):
            ub = U((i + {k}) * {rs})
            for w in range({tw}):
                W[ub + U({inv}) + U(w)] = 1.0 / W[ub + U(w)]
        for q in range(U((n + {k}) * {rs}), U((n + {2 * k}) * {rs})):  # padding rows after the matrix
            W[q] = 0.0
        # right-hand side and x, (B, n): contiguous reads, one system at a time
        for w in range(nl):
            uw = U(w)
            for i in range(n):
                p = U((i + {k}) * {rs}) + uw
                W[p + U({yo})] = gin[u0 + uw, i]
                W[p + U({xo})] = xs[u0 + uw, i]
        for i in range(n):
            ub = U((i + {k}) * {rs})
            for w in range(nl, {tw}):
                W[ub + U({yo}) + U(w)] = 0.0
                W[ub + U({xo}) + U(w)] = 0.0
        for i in range(n):  # forward substitution
            ub = U((i + {k}) * {rs})
            for w in range({tw}):
                p = ub + U(w)
                {fwd}
        if do_band:
            for i in range(n - 1, -1, -1):  # back substitution + band gradient
                ub = U((i + {k}) * {rs})
                for w in range({tw}):
                    p = ub + U(w)
                    {ind.join(band)}
            {copy_out}
        else:
            for i in range(n - 1, -1, -1):  # back substitution
                ub = U((i + {k}) * {rs})
                for w in range({tw}):
                    p = ub + U(w)
                    {bwd}
            for wb in range(0, nl, 8):
                we = min(wb + 8, nl)
                for i in range(n):
                    ub = U((i + {k}) * {rs} + {yo})
                    for w in range(wb, we):
                        g[u0 + U(w), i] = W[ub + U(w)]
"""


def _gen_kernel(k: int, tw: int, kind: str = "factor_solve"):
    """The generated kernel of this kind for bandwidth k and tile width tw (compiled once)."""
    key = (kind, k, tw)
    kern = _gen_cache.get(key)
    if kern is None:
        with _gen_lock:
            kern = _gen_cache.get(key)
            if kern is None:
                kern = _load_gen_module(k, tw, kind)
                _gen_cache[key] = kern
    return kern


def _load_gen_module(k: int, tw: int, kind: str = "factor_solve"):
    """Compile the generated source. It is written as a module under this package's
    ``__pycache__`` so that numba's on-disk cache (``cache=True``) spares later processes
    the compilation; if that folder is not writable, the source is compiled in memory."""
    gen = {"factor_solve": _gen_source, "solve_grad": _gen_grad_source}[kind]
    src = "import numpy as np\nfrom numpy import uint64 as U\n" + gen(k, tw)
    name = f"band_gen_k{k}_tw{tw}" if kind == "factor_solve" else f"band_{kind}_k{k}_tw{tw}"
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


def tile_factor_solve(band, b, L, x, info, store_l, do_solve, tw):
    """Factor A = L L^T (into ``L`` when ``store_l``) and, when ``do_solve``, x = A^{-1} b.

    band, L: (B, n, k+1) row-lower; b, x: (B, n); info (B,). One pass per tile of systems
    in a buffer that stays in cache: factor rows, then forward and back substitution, so
    A^{-1} b never needs L in memory (when ``store_l``, L is written out from the tile). Uses the
    generated kernel for k <= ``_GEN_K_MAX`` (tiles of at most ``_GEN_TW`` systems), the
    generic loops (tiles of ``tw`` systems) otherwise.
    """
    nb, n, k1 = band.shape
    k = k1 - 1
    if k > _GEN_K_MAX:
        _tile_factor_solve_loops(band, b, L, x, info, store_l, do_solve, tw)
        return
    gtw = min(tw, _GEN_TW)
    W = np.zeros((n + 2 * k) * (k + 3) * gtw, band.dtype)
    first = np.empty(gtw, np.int64)
    _gen_kernel(k, gtw)(band, b, L, x, info, store_l, do_solve, W, first)


@njit(**_JIT)
def tile_solve_factor(L, b, x, forward, backward, tw):
    """x = L^{-1} b (forward), L^{-T} b (backward) or A^{-1} b = L^{-T} L^{-1} b (both).

    L: (B, n, k+1) row-lower factor; b, x: (B, n).
    """
    nb, n, k1 = L.shape
    k = k1 - 1
    Lt = np.empty((n, k1, tw), L.dtype)
    inv = np.empty((n, tw), L.dtype)
    y = np.empty((n, tw), L.dtype)
    for t0 in range(0, nb, tw):
        nl = min(tw, nb - t0)
        _tile_band_in(L, t0, nl, Lt)
        for i in range(n):
            for w in range(tw):
                inv[i, w] = 1.0 / Lt[i, 0, w]
        _tile_vec_in(b, t0, nl, y)
        if forward:
            _tile_forward(Lt, inv, y, k)
        if backward:
            _tile_backward(Lt, inv, y, k)
        _tile_vec_out(y, t0, nl, x)


def tile_solve_grad(L, gin, x, g, gband, scale, do_band, tw):
    """Backward pass of x = A^{-1} b in one pass over the tiles of the saved factor:

        g = A^{-1} gin,   gband[b, i, j] = scale * (g_i x_{i-j} + g_{i-j} x_i)  (j > 0),
                          gband[b, i, 0] = scale * g_i x_i,

    i.e. with scale = -1 the gradients w.r.t. b and the stored band entries (A_bar =
    -g x^T, symmetrised: each stored entry band[i, j], j > 0, stands for A[i, i-j] and
    A[i-j, i]); entries with i - j < 0 are set to 0. L: (B, n, k+1) row-lower factor;
    gin, x, g: (B, n); gband: (B, n, k+1) (not touched unless ``do_band``).
    The band gradient is formed while g and x of the tile are in cache, so it costs one
    write of gband and no temporary. ``gband`` may be ``L`` itself (each tile of L is read
    before the same tile of gband is written). Generated kernel (tiles of ``_GEN_TW``
    systems) for k <= ``_GEN_K_MAX`` and batches of at least one such tile; generic loops
    (:func:`tile_solve_factor`, then :func:`sym_outer_band`) otherwise: smaller batches
    are cheap either way, and this keeps the compiled variants to one per (k, dtype).
    """
    nb, n, k1 = L.shape
    k = k1 - 1
    if k > _GEN_K_MAX or tw < _GEN_TW:
        tile_solve_factor(L, gin, g, True, True, tw)
        if do_band:
            sym_outer_band(g, x, gband, scale)
        return
    gtw = _GEN_TW
    W = np.zeros((n + 2 * k) * (k + 4) * gtw, L.dtype)
    _gen_kernel(k, gtw, "solve_grad")(L, gin, x, g, gband, L.dtype.type(scale), do_band, W)


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
