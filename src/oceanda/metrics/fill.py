"""Gap filling for spectra: harmonic (Laplace) interpolation of each daily map.

Fourier spectra need gap-free fields. The 2020a SSH mapping data challenge regrids the
reconstruction onto the reference grid and fills its remaining gaps with
``pyinterp.fill.gauss_seidel`` (4DVarNet-starter fills the truth the same way): a
Gauss-Seidel relaxation of Laplace's equation in the gaps, the valid values held fixed.
:func:`laplace_fill` solves that same equation exactly, with a sparse direct solve:

    (Δ u)(i, j) = 0 in every gap cell,   u = f on valid cells,

with the 5-point Laplacian on the index grid and zero-flux (Neumann) conditions at the
border of the map (a gap cell's neighbours outside the map are dropped). Every connected
gap touches a valid cell as soon as one cell of the day is valid, so the system is
non-singular; an all-invalid day raises.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from oceanda.errors import InputError


def _laplace_operator(gaps: np.ndarray) -> tuple[sp.csc_matrix, sp.csr_matrix, np.ndarray]:
    """System of the gap cells of a 2-D ``gaps`` mask.

    Returns ``(A, B, idx)``: for unknowns ``u`` (gap cells in C order, ``idx`` their flat
    indices) and the full flattened map ``f``, the equations are ``A u = B f`` where
    ``A`` is minus the Neumann Laplacian restricted to the gaps (SPD) and ``B`` gathers
    the valid neighbours.
    """
    ny, nx = gaps.shape
    idx = np.flatnonzero(gaps.ravel())
    number = -np.ones(ny * nx, dtype=np.int64)
    number[idx] = np.arange(idx.size)
    jj, ii = np.divmod(idx, nx)
    rows_a, cols_a, rows_b, cols_b = [], [], [], []
    degree = np.zeros(idx.size)
    for dj, di in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        j2, i2 = jj + dj, ii + di
        inside = (j2 >= 0) & (j2 < ny) & (i2 >= 0) & (i2 < nx)
        degree += inside
        k = np.flatnonzero(inside)
        flat = j2[k] * nx + i2[k]
        is_gap = number[flat] >= 0
        rows_a.append(k[is_gap])
        cols_a.append(number[flat[is_gap]])
        rows_b.append(k[~is_gap])
        cols_b.append(flat[~is_gap])
    n = idx.size
    A = sp.coo_matrix((np.full(sum(map(len, rows_a)), -1.0), (np.concatenate(rows_a), np.concatenate(cols_a))), shape=(n, n))
    A = (A + sp.diags(degree)).tocsc()
    B = sp.coo_matrix((np.ones(sum(map(len, rows_b))), (np.concatenate(rows_b), np.concatenate(cols_b))), shape=(n, ny * nx)).tocsr()
    return A, B, idx


def laplace_fill(fields: list[np.ndarray], valid: np.ndarray, times: np.ndarray | None = None) -> list[np.ndarray]:
    """Fill every cell where ``valid`` is False by harmonic interpolation, day by day.

    Args:
        fields: arrays of shape ``(T, ny, nx)`` (float); values where ``valid`` is False
            are ignored. Several fields share one factorisation per distinct mask.
        valid: bool ``(T, ny, nx)``.
        times: labels of the T days, used in error messages.

    Returns:
        New float64 arrays equal to the inputs on valid cells and solving ``Δu = 0``
        (Neumann at the map border) in the gaps.

    Raises:
        InputError: a day without any valid cell.
    """
    valid = np.asarray(valid, dtype=bool)
    out = [np.array(f, dtype=np.float64, copy=True) for f in fields]
    if valid.all():
        return out
    T, ny, nx = valid.shape
    empty = ~valid.reshape(T, -1).any(axis=1)
    if empty.any():
        t = int(np.flatnonzero(empty)[0])
        label = times[t] if times is not None else t
        raise InputError(f"no valid (finite, ocean) cell in both truth and analysis on day {label} "
                         f"({int(empty.sum())} such day(s)); shorten the period")
    # group days by mask so that one factorisation serves all days sharing it
    keys: dict[bytes, list[int]] = {}
    for t in range(T):
        if not valid[t].all():
            keys.setdefault(np.packbits(valid[t]).tobytes(), []).append(t)
    for days in keys.values():
        gaps = ~valid[days[0]]
        A, B, idx = _laplace_operator(gaps)
        solve = spla.splu(A).solve
        for f in out:
            flat = f[days].reshape(len(days), -1)
            known = np.where(valid[days].reshape(len(days), -1), flat, 0.0)
            rhs = (B @ known.T)  # (n_gaps, n_days)
            flat[:, idx] = solve(np.ascontiguousarray(rhs)).T
            f[days] = flat.reshape(len(days), ny, nx)
    return out
