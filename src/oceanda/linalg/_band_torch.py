"""Generic torch back-end of the banded SPD kernels (CUDA, or CPU when forced): log depth.

A band matrix of bandwidth k, cut into blocks of size ``kb = max(k, 1)``, is block
tridiagonal: diagonal blocks ``D_i`` (symmetric) and sub-diagonal blocks ``C_i = A_{i,i-1}``
(upper triangular, since entries further than k from the diagonal vanish). Its Cholesky
factor is block lower bidiagonal with the same band:

    S_0 = D_0,   S_i = D_i - C_i S_{i-1}^{-1} C_i^T      (Schur complements)
    L_ii = chol(S_i),   L_{i,i-1} = C_i L_{i-1,i-1}^{-T}

Every recursion over the N = ceil(n / kb) blocks is evaluated by a parallel prefix scan
(Hillis & Steele 1986) of an associative operator: ceil(log2 N) levels of batched k x k
torch operations, no Python loop whose length grows with n.

* Schur complements: S_i = g_i(S_{i-1}) with g(X) = E - F (X + G)^{-1} F^T, a family closed
  under composition (Woodbury). (E, F, G) of an interval of blocks is the Schur complement
  of the interval's interior: M = E_1 + G_2 below is the Schur complement at the junction
  block of an SPD matrix, so it is SPD and is factorised by Cholesky (the scan is cyclic
  reduction in prefix order, stable for SPD matrices).
* Triangular solves: x_i = P_i x_{i-1} + q_i, affine maps (P, q).
* Selected inverse (Takahashi): Z_ii = W_i^T Z_{i+1,i+1} W_i + L_ii^{-T} L_ii^{-1} with
  W_i = L_{i+1,i} L_ii^{-1}, Z_{i+1,i} = -Z_{i+1,i+1} W_i.

The results equal the row-by-row banded Cholesky of the CPU back-end (same factor L, same
samples L^{-T} z) up to rounding. Tensors are flattened to one batch dimension:
band ``(B, n, k+1)``, vectors ``(B, n)``.
"""

from __future__ import annotations

import torch

# --------------------------------------------------------------------- block <-> band


def _block_index(n: int, k: int, device) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index tensors mapping band storage to the blocks [C_i, D_i] of each block row.

    Returns ``kb, N`` and, for the block row matrix R_i = [A_{i,i-1}, A_{i,i}]
    (kb x 2 kb), the global row ``rows[i, a]``, the band offset ``offs[a, c]`` of entry
    (a, c) (row i*kb + a, column (i-1)*kb + c), and ``valid[a, c]`` (0 <= off <= k).
    """
    kb = max(k, 1)
    N = -(-n // kb)
    a = torch.arange(kb, device=device)
    c = torch.arange(2 * kb, device=device)
    offs = kb + a[:, None] - c[None, :]  # row - column
    valid = (offs >= 0) & (offs <= k)
    rows = torch.arange(N, device=device)[:, None] * kb + a[None, :]
    return kb, N, rows, offs.clamp(0, k), valid


def _band_to_blocks(band: torch.Tensor):
    """band (B, n, k+1) -> D (B, N, kb, kb) symmetric, C (B, N, kb, kb) with C_0 = 0.

    Rows past n are padded with the identity.
    """
    B, n, k1 = band.shape
    k = k1 - 1
    kb, N, rows, offs, valid = _block_index(n, k, band.device)
    pad = N * kb - n
    if pad:
        eye_rows = torch.zeros(B, pad, k1, dtype=band.dtype, device=band.device)
        eye_rows[..., 0] = 1.0
        band = torch.cat([band, eye_rows], dim=1)
    # lower entries of R_i = [C_i, D_i]: R[i, a, c] = band[i*kb + a, offs[a, c]]
    R = band[:, rows[:, :, None], offs[None, :, :]]  # (B, N, kb, 2kb)
    # entries outside the band or before the start of the matrix (row - off < 0) are ignored
    keep = valid & (rows[:, :, None] - offs[None, :, :] >= 0)
    R = torch.where(keep, R, 0.0)
    C = R[..., :kb]
    Dl = R[..., kb:]  # lower triangle of D (upper part zero: offs < 0 there)
    D = Dl + Dl.mT - torch.diag_embed(torch.diagonal(Dl, dim1=-2, dim2=-1))
    return D, C, kb, N


def _lower_blocks_to_band(Ld: torch.Tensor, Ls: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Blocks of a lower band matrix (diagonal Ld, sub-diagonal Ls) -> band (B, n, k+1)."""
    B, N, kb, _ = Ld.shape
    R = torch.cat([Ls, Ld], dim=-1)  # (B, N, kb, 2kb)
    a = torch.arange(kb, device=Ld.device)
    j = torch.arange(k + 1, device=Ld.device)
    cols = kb + a[:, None] - j[None, :]  # (kb, k+1), in [0, 2kb)
    band = torch.gather(R, -1, cols.expand(B, N, kb, k + 1))
    band = band.reshape(B, N * kb, k + 1)[:, :n]
    i = torch.arange(n, device=Ld.device)
    return torch.where(i[:, None] >= j[None, :], band, 0.0)


def _band_to_lower_blocks(L: torch.Tensor):
    """Inverse of :func:`_lower_blocks_to_band`: L band -> (Ld, Ls) blocks, pad = identity."""
    B, n, k1 = L.shape
    k = k1 - 1
    kb, N, rows, offs, valid = _block_index(n, k, L.device)
    pad = N * kb - n
    if pad:
        eye_rows = torch.zeros(B, pad, k1, dtype=L.dtype, device=L.device)
        eye_rows[..., 0] = 1.0
        L = torch.cat([L, eye_rows], dim=1)
    R = L[:, rows[:, :, None], offs[None, :, :]]
    keep = valid & (rows[:, :, None] - offs[None, :, :] >= 0)
    R = torch.where(keep, R, 0.0)
    return R[..., kb:], R[..., :kb]


# ------------------------------------------------------------------------------ scans


def _shift(t: torch.Tensor, d: int, fill: torch.Tensor | None = None) -> torch.Tensor:
    """Elements i - d along the block axis (dim 1); the first d are taken from ``fill``."""
    head = t[:, :d] if fill is None else fill[:, :d]
    return torch.cat([head, t[:, :-d]], dim=1)


def _schur_scan(D: torch.Tensor, C: torch.Tensor):
    """All Schur complements S_i by a prefix scan; returns (S, bad (B,) bool)."""
    B, N, kb, _ = D.shape
    eye = torch.eye(kb, dtype=D.dtype, device=D.device).expand(B, N, kb, kb)
    E, F = D, C
    # G = I for element 0 (F_0 = 0 makes it a constant map), 0 elsewhere
    G = torch.cat([eye[:, :1], torch.zeros_like(D[:, 1:])], dim=1)
    bad = torch.zeros(B, dtype=torch.bool, device=D.device)
    d = 1
    while d < N:
        E1, F1, G1 = E[:, :-d], F[:, :-d], G[:, :-d]  # left intervals, ending at i - d
        E2, F2, G2 = E[:, d:], F[:, d:], G[:, d:]  # right intervals, ending at i
        Mc, info = torch.linalg.cholesky_ex(E1 + G2)
        bad |= (info != 0).any(dim=1)
        U = torch.linalg.solve_triangular(Mc, F2.mT, upper=False)  # Mc^{-1} F2^T
        V = torch.linalg.solve_triangular(Mc, F1, upper=False)  # Mc^{-1} F1
        En = E2 - U.mT @ U
        Fn = U.mT @ V
        Gn = G1 - V.mT @ V
        E = torch.cat([E[:, :d], En], dim=1)
        F = torch.cat([F[:, :d], Fn], dim=1)
        G = torch.cat([G[:, :d], Gn], dim=1)
        d *= 2
    return E, bad


def _affine_scan(P: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x_i = P_i x_{i-1} + q_i with P_0 = 0: all x_i by a prefix scan. q (B, N, kb)."""
    N = P.shape[1]
    q = q.unsqueeze(-1)
    d = 1
    while d < N:
        Pb, qb = P[:, d:], q[:, d:]
        Pa, qa = P[:, :-d], q[:, :-d]
        P = torch.cat([P[:, :d], Pb @ Pa], dim=1)
        q = torch.cat([q[:, :d], Pb @ qa + qb], dim=1)
        d *= 2
    return q.squeeze(-1)


def _congruence_scan(W: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """X_t = W_t^T X_{t-1} W_t + R_t with W_0 = 0: all X_t by a prefix scan."""
    N = W.shape[1]
    d = 1
    while d < N:
        Wa, Ra = W[:, :-d], R[:, :-d]
        Wb, Rb = W[:, d:], R[:, d:]
        W = torch.cat([W[:, :d], Wa @ Wb], dim=1)
        R = torch.cat([R[:, :d], Wb.mT @ Ra @ Wb + Rb], dim=1)
        d *= 2
    return R


# ------------------------------------------------------------------------- primitives


def factor(band: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L = chol(A) in row-lower storage and ``info`` (B,) int64 (0 ok, else first failing
    block row + 1: the matrix is not SPD or not finite)."""
    B, n, k1 = band.shape
    k = k1 - 1
    D, C, kb, N = _band_to_blocks(band)
    S, bad = _schur_scan(D, C)
    Ld, info = torch.linalg.cholesky_ex(S)
    # L_{i,i-1} = C_i L_{i-1,i-1}^{-T}  (solve X L^T = C)
    Lprev = _shift(Ld, 1, fill=torch.eye(kb, dtype=D.dtype, device=D.device).expand_as(Ld))
    Ls = torch.linalg.solve_triangular(Lprev.mT, C, upper=True, left=False)
    L = _lower_blocks_to_band(Ld, Ls, n, k)
    fin = torch.isfinite(L).all(dim=2)  # (B, n)
    rowbad = ~fin | (info != 0).repeat_interleave(kb, dim=1)[:, :n]
    first = torch.where(rowbad.any(dim=1), rowbad.to(torch.int8).argmax(dim=1) + 1, bad.to(torch.int64))
    return L, first.to(torch.int64)


def solve_factor(L: torch.Tensor, b: torch.Tensor, forward: bool, backward: bool) -> torch.Tensor:
    """x = L^{-1} b (forward), L^{-T} b (backward) or A^{-1} b (both); b (B, n)."""
    B, n, k1 = L.shape
    Ld, Ls = _band_to_lower_blocks(L)
    kb, N = Ld.shape[-1], Ld.shape[1]
    x = torch.cat([b, b.new_zeros(B, N * kb - n)], dim=1).reshape(B, N, kb)
    if forward:
        # x_i = L_ii^{-1} (b_i - L_{i,i-1} x_{i-1})
        P = -torch.linalg.solve_triangular(Ld, Ls, upper=False)
        q = torch.linalg.solve_triangular(Ld, x.unsqueeze(-1), upper=False).squeeze(-1)
        x = _affine_scan(P, q)
    if backward:
        # x_i = L_ii^{-T} (y_i - L_{i+1,i}^T x_{i+1}); scan over reversed blocks
        Lnext = torch.cat([Ls[:, 1:], torch.zeros_like(Ls[:, :1])], dim=1)  # L_{i+1,i}
        P = -torch.linalg.solve_triangular(Ld.mT, Lnext.mT, upper=True)
        q = torch.linalg.solve_triangular(Ld.mT, x.unsqueeze(-1), upper=True).squeeze(-1)
        x = _affine_scan(P.flip(1), q.flip(1)).flip(1)
    return x.reshape(B, N * kb)[:, :n]


def selected_inverse(L: torch.Tensor) -> torch.Tensor:
    """Band of A^{-1} (row-lower storage) from the factor, by a Takahashi scan."""
    B, n, k1 = L.shape
    k = k1 - 1
    Ld, Ls = _band_to_lower_blocks(L)
    kb = Ld.shape[-1]
    eye = torch.eye(kb, dtype=L.dtype, device=L.device).expand_as(Ld)
    Ldinv = torch.linalg.solve_triangular(Ld, eye, upper=False)  # L_ii^{-1}
    Lnext = torch.cat([Ls[:, 1:], torch.zeros_like(Ls[:, :1])], dim=1)  # L_{i+1,i}
    W = Lnext @ Ldinv  # W_i = L_{i+1,i} L_ii^{-1}; W_{N-1} = 0
    R = Ldinv.mT @ Ldinv
    Zd = _congruence_scan(W.flip(1), R.flip(1)).flip(1)  # Z_ii
    Znext = torch.cat([Zd[:, 1:], torch.zeros_like(Zd[:, :1])], dim=1)
    Zs_next = -Znext @ W  # Z_{i+1,i}
    Zs = torch.cat([torch.zeros_like(Zs_next[:, :1]), Zs_next[:, :-1]], dim=1)  # Z_{i,i-1}
    return _lower_blocks_to_band(torch.tril(Zd), Zs, n, k)


def cholesky_backward(L: torch.Tensor, Lbar: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    """d loss / d band given d loss / d L, by reverse mode through the log-depth factor scan
    (recomputed here; memory O(n k log n))."""
    with torch.enable_grad():
        a = band.detach().requires_grad_(True)
        Lr, _ = factor(a)
        (g,) = torch.autograd.grad(Lr, a, Lbar)
    return g
