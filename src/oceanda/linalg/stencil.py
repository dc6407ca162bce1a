"""Matrix-free stencil operators on a 2-D grid (torch; CPU or GPU, differentiable).

A :class:`Stencil` represents a sparse linear operator ``S`` acting on fields ``x`` of shape
``(..., ny, nx)`` (row index ``i`` = latitude, column index ``j`` = longitude)::

    (S x)[..., i, j] = sum_k coef[..., i, j, k] * x[..., i + di_k, j + dj_k]

with ``offsets[k] = (di_k, dj_k)`` and ``x`` taken as zero outside the grid (entries of
``coef`` that point outside the grid are ignored). Leading dims of ``coef`` (e.g. time)
broadcast against those of ``x``. Stencils compose (``S1 @ S2``), transpose (``S.T``), add
and scale by diagonal fields; every operation is plain torch arithmetic, so gradients flow
to whatever produced ``coef`` (SPDE parameters).

:func:`diffusion_advection` builds the finite-volume operator

    A u = kappa^2 u - div(H grad u) + m . grad u,   H = gamma I + beta v v^T,

on a lon/lat grid with metric factors (cell sizes ``dx``, ``dy``), conservative fluxes
through cell faces, the cross terms of the anisotropic tensor (9-point stencil), first-order
upwind advection and no-flux faces at land cells and at the grid border.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Offset = tuple[int, int]


def shift(x: torch.Tensor, o: Offset) -> torch.Tensor:
    """``y[..., i, j] = x[..., i + o[0], j + o[1]]``, zero where that index is outside."""
    di, dj = o
    if di == 0 and dj == 0:
        return x
    ny, nx = x.shape[-2:]
    y = torch.zeros_like(x)
    if abs(di) >= ny or abs(dj) >= nx:
        return y
    ys = slice(max(0, -di), ny - max(0, di))
    xs = slice(max(0, -dj), nx - max(0, dj))
    ys_src = slice(max(0, di), ny - max(0, -di))
    xs_src = slice(max(0, dj), nx - max(0, -dj))
    y[..., ys, xs] = x[..., ys_src, xs_src]
    return y


def inside_mask(shape: tuple[int, int], o: Offset, device=None) -> torch.Tensor:
    """Bool ``(ny, nx)``: True where ``(i + o[0], j + o[1])`` lies inside the grid."""
    ny, nx = shape
    i = torch.arange(ny, device=device)[:, None] + o[0]
    j = torch.arange(nx, device=device)[None, :] + o[1]
    return (i >= 0) & (i < ny) & (j >= 0) & (j < nx)


@dataclass(frozen=True)
class Stencil:
    """Sparse operator on ``(ny, nx)`` fields; see the module docstring.

    Attributes:
        offsets: tuple of ``(di, dj)`` neighbour offsets, one per coefficient slot.
        coef: ``(..., ny, nx, K)`` coefficients, ``K = len(offsets)``.
    """

    offsets: tuple[Offset, ...]
    coef: torch.Tensor

    def __post_init__(self) -> None:
        if self.coef.shape[-1] != len(self.offsets):
            raise ValueError(f"Stencil: coef has {self.coef.shape[-1]} slots, "
                             f"{len(self.offsets)} offsets")

    # -- construction ---------------------------------------------------------------
    @staticmethod
    def diag(d: torch.Tensor) -> Stencil:
        """The diagonal operator ``x -> d * x`` (``d`` of shape ``(..., ny, nx)``)."""
        return Stencil(((0, 0),), d[..., None])

    @staticmethod
    def identity(shape: tuple[int, int], dtype=torch.float64, device=None) -> Stencil:
        return Stencil.diag(torch.ones(shape, dtype=dtype, device=device))

    @staticmethod
    def shift_op(shape: tuple[int, int], o: Offset, dtype=torch.float64, device=None) -> Stencil:
        """The operator ``x -> shift(x, o)``."""
        return Stencil((o,), torch.ones((*shape, 1), dtype=dtype, device=device))

    # -- properties -----------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """Grid shape ``(ny, nx)``."""
        return tuple(self.coef.shape[-3:-1])  # type: ignore[return-value]

    @property
    def radius(self) -> int:
        return max(max(abs(a), abs(b)) for a, b in self.offsets)

    # -- algebra --------------------------------------------------------------------
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``S x`` for ``x`` of shape ``(..., ny, nx)``."""
        out = None
        for k, o in enumerate(self.offsets):
            term = self.coef[..., k] * shift(x, o)
            out = term if out is None else out + term
        return out

    def _combine(self, pieces: dict[Offset, torch.Tensor]) -> Stencil:
        offs = tuple(sorted(pieces))
        tensors = torch.broadcast_tensors(*[pieces[o] for o in offs])
        return Stencil(offs, torch.stack(tensors, dim=-1))

    def __matmul__(self, other: Stencil) -> Stencil:
        """Composition ``(S1 @ S2) x = S1 (S2 x)``."""
        pieces: dict[Offset, torch.Tensor] = {}
        for k1, o1 in enumerate(self.offsets):
            c1 = self.coef[..., k1]
            for k2, o2 in enumerate(other.offsets):
                o = (o1[0] + o2[0], o1[1] + o2[1])
                term = c1 * shift(other.coef[..., k2], o1)
                pieces[o] = term if o not in pieces else pieces[o] + term
        return self._combine(pieces)

    def __add__(self, other: Stencil) -> Stencil:
        pieces: dict[Offset, torch.Tensor] = {}
        for st in (self, other):
            for k, o in enumerate(st.offsets):
                c = st.coef[..., k]
                pieces[o] = c if o not in pieces else pieces[o] + c
        return self._combine(pieces)

    def __neg__(self) -> Stencil:
        return Stencil(self.offsets, -self.coef)

    def __sub__(self, other: Stencil) -> Stencil:
        return self + (-other)

    def scale(self, c: torch.Tensor | float) -> Stencil:
        """``diag(c) S`` (``c`` scalar or ``(..., ny, nx)`` field: scales rows)."""
        if isinstance(c, torch.Tensor):
            c = c[..., None]
        return Stencil(self.offsets, self.coef * c)

    @property
    def T(self) -> Stencil:  # noqa: N802
        """The transpose: ``S^T[p, p+o] = S[p+o, p]`` i.e. ``coefT[p, o] = coef[p+o, -o]``."""
        index = {o: k for k, o in enumerate(self.offsets)}
        pieces = {}
        for o in self.offsets:
            neg = (-o[0], -o[1])
            pieces[neg] = shift(self.coef[..., index[o]], neg)
        return self._combine(pieces)

    def pruned(self) -> Stencil:
        """The same operator without the coefficients pointing outside the grid."""
        masks = [inside_mask(self.shape, o, self.coef.device) for o in self.offsets]
        m = torch.stack(masks, dim=-1).to(self.coef.dtype)
        return Stencil(self.offsets, self.coef * m)

    def to_dense(self) -> torch.Tensor:
        """Dense ``(..., n, n)`` matrix, ``n = ny * nx`` in C order (tests, tiny grids)."""
        ny, nx = self.shape
        n = ny * nx
        lead = self.coef.shape[:-3]
        out = torch.zeros((*lead, n, n), dtype=self.coef.dtype, device=self.coef.device)
        rows = torch.arange(n, device=self.coef.device).reshape(ny, nx)
        for k, o in enumerate(self.offsets):
            m = inside_mask((ny, nx), o, self.coef.device)
            r = rows[m]
            c = (rows + o[0] * nx + o[1])[m]
            out[..., r, c] = out[..., r, c] + self.coef[..., k][..., m]
        return out


# ---------------------------------------------------------------------------------------
# the SPDE spatial operator
# ---------------------------------------------------------------------------------------


def _as_field(v, shape, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return t.expand(*t.shape[:-2], *shape) if t.ndim >= 2 else t.expand(shape)


def diffusion_advection(
    dx: torch.Tensor,
    dy: torch.Tensor,
    ocean: torch.Tensor | None = None,
    *,
    kappa,
    gamma=1.0,
    beta=0.0,
    vx=0.0,
    vy=0.0,
    mx=0.0,
    my=0.0,
) -> Stencil:
    """Finite-volume stencil of ``A u = kappa^2 u - div(H grad u) + m . grad u``.

    Args:
        dx, dy: ``(ny, nx)`` cell sizes (zonal, meridional), any length unit; the
            parameters are in the same unit (``gamma``, ``beta``: length^2 / time unit of
            ``kappa^2``; ``kappa``: 1/length; ``m``: length / time).
        ocean: ``(ny, nx)`` bool; faces touching a land cell are closed (no flux), as are
            the faces on the grid border. ``None``: all ocean.
        kappa, gamma, beta, vx, vy, mx, my: scalars or fields broadcastable to
            ``(..., ny, nx)`` (leading dims, e.g. time, give one operator per entry).
            ``H = gamma I + beta v v^T`` with ``v = (vx, vy)``; ``m = (mx, my)``.

    Discretisation (cell ``P``, area ``a_P = dx_P dy_P``; east face ``e`` between ``P`` and
    ``E = (i, j+1)``, north face ``n`` between ``P`` and ``N = (i+1, j)``)::

        (A u)_P = kappa_P^2 u_P - (F_e(P) - F_e(W) + F_n(P) - F_n(S)) / a_P + (m . grad u)_P
        F_e = l_e [Hxx_e (u_E - u_P) / d_e + Hxy_e gy_e],   l_e = (dy_P + dy_E)/2,
                                                              d_e = (dx_P + dx_E)/2
        gy_e = (gy_P + gy_E) / 2,  gy_P = ((u_N - u_P)/d_n [n open] + (u_P - u_S)/d_s [s open]) / 2

    (``F_n`` alike with x and y swapped), face tensors are the means of the two cell
    tensors, and closed faces carry no flux; ``sum_P a_P (A u - kappa^2 u)_P = 0`` without
    advection (conservation). Advection is first-order upwind:
    ``(m_x d_x u)_P = max(m_x,0) (u_P - u_W)/d_w + min(m_x,0) (u_E - u_P)/d_e`` over open
    faces. Land cells keep only ``kappa^2`` (decoupled).

    Returns:
        A 9-point :class:`Stencil` (coefficients ``(..., ny, nx, 9)``, pruned at borders).
    """
    dx = torch.as_tensor(dx)
    dtype = dx.dtype if dx.is_floating_point() else torch.float64
    dx = dx.to(dtype)
    dy = torch.as_tensor(dy, dtype=dtype, device=dx.device)
    shape = tuple(dx.shape[-2:])
    dev = dx.device
    if ocean is None:
        ocean = torch.ones(shape, dtype=torch.bool, device=dev)
    ocean = torch.as_tensor(ocean, device=dev).to(torch.bool)
    f = lambda v: _as_field(v, shape, dx)  # noqa: E731
    kappa, gamma, beta = f(kappa), f(gamma), f(beta)
    vx, vy, mx, my = f(vx), f(vy), f(mx), f(my)
    oc = ocean.to(dtype)

    # open faces (east of P, north of P)
    open_e = oc * shift(oc, (0, 1))
    open_n = oc * shift(oc, (1, 0))
    d_e = 0.5 * (dx + shift(dx, (0, 1)))
    d_n = 0.5 * (dy + shift(dy, (1, 0)))
    d_e = torch.where(open_e > 0, d_e, torch.ones_like(d_e))
    d_n = torch.where(open_n > 0, d_n, torch.ones_like(d_n))
    l_e = 0.5 * (dy + shift(dy, (0, 1)))
    l_n = 0.5 * (dx + shift(dx, (1, 0)))
    area = dx * dy

    hxx = gamma + beta * vx * vx
    hyy = gamma + beta * vy * vy
    hxy = beta * vx * vy
    avg_e = lambda h: 0.5 * (h + shift(h, (0, 1)))  # noqa: E731
    avg_n = lambda h: 0.5 * (h + shift(h, (1, 0)))  # noqa: E731

    def two(o, c0, c1):  # stencil c0 * u_P + c1 * u_{P+o}
        return Stencil(((0, 0), o), torch.stack(torch.broadcast_tensors(c0, c1), -1))

    Ge = two((0, 1), -open_e / d_e, open_e / d_e)  # (u_E - u_P)/d_e on open faces
    Gn = two((1, 0), -open_n / d_n, open_n / d_n)
    ones = torch.ones(shape, dtype=dtype, device=dev)
    half = 0.5 * ones
    # cell-centred gradients from the open faces
    gy_c = Stencil.diag(half) @ (Gn + Stencil.shift_op(shape, (-1, 0), dtype, dev) @ Gn)
    gx_c = Stencil.diag(half) @ (Ge + Stencil.shift_op(shape, (0, -1), dtype, dev) @ Ge)
    # face averages of cell-centred gradients
    gy_e = Stencil.diag(half * open_e) @ (Stencil.identity(shape, dtype, dev)
                                          + Stencil.shift_op(shape, (0, 1), dtype, dev)) @ gy_c
    gx_n = Stencil.diag(half * open_n) @ (Stencil.identity(shape, dtype, dev)
                                          + Stencil.shift_op(shape, (1, 0), dtype, dev)) @ gx_c
    Fe = Stencil.diag(l_e * avg_e(hxx)) @ Ge + Stencil.diag(l_e * avg_e(hxy)) @ gy_e
    Fn = Stencil.diag(l_n * avg_n(hyy)) @ Gn + Stencil.diag(l_n * avg_n(hxy)) @ gx_n
    div = (Fe - Stencil.shift_op(shape, (0, -1), dtype, dev) @ Fe
           + Fn - Stencil.shift_op(shape, (-1, 0), dtype, dev) @ Fn)
    A = Stencil.diag(kappa * kappa) - div.scale(1.0 / area)
    # upwind advection
    mxp, mxm = torch.clamp(mx, min=0.0) * oc, torch.clamp(mx, max=0.0) * oc
    myp, mym = torch.clamp(my, min=0.0) * oc, torch.clamp(my, max=0.0) * oc
    Gw = Stencil.shift_op(shape, (0, -1), dtype, dev) @ Ge  # (u_P - u_W)/d_w at P
    Gs = Stencil.shift_op(shape, (-1, 0), dtype, dev) @ Gn
    adv = (Gw.scale(mxp) + Ge.scale(mxm) + Gs.scale(myp) + Gn.scale(mym))
    A = A + adv
    return _keep_offsets(A.pruned(), radius=1)


def _keep_offsets(st: Stencil, radius: int) -> Stencil:
    """Drop slots beyond ``radius`` (they are identically zero by construction) and merge."""
    keep = [k for k, o in enumerate(st.offsets) if max(abs(o[0]), abs(o[1])) <= radius]
    return Stencil(tuple(st.offsets[k] for k in keep), st.coef[..., keep])


def power(st: Stencil, alpha: int) -> Stencil:
    """``S^alpha`` for an integer ``alpha >= 1`` (repeated composition)."""
    out = st
    for _ in range(alpha - 1):
        out = out @ st
    return out.pruned()
