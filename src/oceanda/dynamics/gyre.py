"""Wind-driven multi-layer quasi-geostrophic double gyre in a closed basin: a Gulf Stream-like truth.

A rectangular basin ``[0, Lx] x [0, Ly]`` with ``n`` stacked layers (thicknesses ``H_i``,
reduced gravities ``g'_i``, ``g'_1 = g`` for the free surface) on a beta-plane, driven by a
zonal wind stress ``tau_x = -tau0 cos(2 pi y / Ly)`` (westerlies mid-basin, easterlies at
the southern and northern walls: an anticyclonic subtropical and a cyclonic subpolar gyre;
``GyreParams.wind_tilt`` tilts its zero-curl line).
Their western boundary currents meet mid-basin, separate from the coast and form an eastward
jet that meanders and sheds rings (Holland 1978; Thiry et al. 2024, MQGeometry)::

    q_i = lap(psi_i) - f0^2 (A psi)_i + beta (y - Ly/2)

    dq_i/dt + div(u_i q_i) = [i = 1] curl(tau) / (rho0 H_1) - [i = n] r lap(psi_n)

with ``psi_i = p_i / f0``, ``u_i = (-d psi_i/dy, d psi_i/dx)``, ``A`` the tridiagonal
stretching matrix (``A_11 = 1/(H_1 g'_1) + 1/(H_1 g'_2)``, ``A_12 = -1/(H_1 g'_2)``, ...,
MQGeometry's convention) and ``r`` a linear bottom drag. Surface height ``eta = f0 psi_1 / g``.

Discretisation (finite volumes on an Arakawa C grid, as MQGeometry's ``QGFV``): ``q`` at the
``nx x ny`` cell centres, ``psi`` at the ``(nx+1) x (ny+1)`` cell vertices, velocities on
the faces (exactly zero normal flow on the walls, where each layer's ``psi`` is constant).
PV fluxes use an upwind-biased linear 5-point reconstruction in the interior (3-point one cell
from a wall, centred 2-point next to it); its implicit dissipation is the only small-scale
dissipation (no explicit viscosity). Boundary condition: free slip (relative vorticity and
the stretching term vanish on the walls). Time stepping: SSP-RK3 (Shu-Osher) on ``(q, psi)``
together; ``dpsi/dt`` follows from ``dq/dt`` by one Helmholtz solve per vertical mode
(``(lap - lambda_m) dpsi_m = dq_m`` with a type-I discrete sine transform in torch) plus the
homogeneous solution that conserves each mode's mass (zero domain mean of its interface
displacement). Everything runs in torch on the given device and dtype (float64 by default).

The truth on a lon/lat grid: the basin is mapped onto the output grid by a sinusoidal
projection about the grid's centre (the model point ``(x0, y0)``), the daily-mean surface
height sampled by cubic splines. :func:`gyre_truth` continues a spun-up state shipped with the
package (:data:`STATE_FILE`, written by ``python hpc/truth/gyre_spinup.py``) from its
reference date, with a seed-dependent perturbation, so that the field of a date depends only
on the seed and the date.

References: Holland (1978), J. Phys. Oceanogr. 8, 363-392; Thiry, Li, Memin & Roullet (2024),
MQGeometry-1.0, Geosci. Model Dev. 17, 1749-1764; Shu & Osher (1988) for SSP-RK3.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oceanda.errors import ConfigError, InputError, NumericalError

DAY = 86400.0
GRAVITY = 9.81
EARTH_RADIUS = 6371.0e3

#: spun-up state shipped with the package (``hpc/truth/gyre_spinup.py`` writes it)
STATE_FILE = Path(__file__).with_name("data") / "gyre_state.npz"


@dataclass(frozen=True)
class GyreParams:
    """Physical and numerical parameters of :class:`GyreModel` (SI units).

    Attributes:
        nx, ny: cells in x and y (>= 8).
        Lx, Ly: basin size [m].
        H: layer thicknesses, top first [m].
        g_prime: reduced gravities at the top of each layer, ``g_prime[0] = g`` (free surface) [m s^-2].
        f0, beta: Coriolis parameter [s^-1] and its gradient [m^-1 s^-1].
        tau0: wind stress amplitude [N m^-2]; rho0: reference density [kg m^-3].
        drag: linear bottom drag on the deepest layer's vorticity [s^-1].
        steps_per_day: fixed time step ``dt = 1 day / steps_per_day``.
        cfl_max: the run stops with :class:`NumericalError` beyond this Courant number.
        wind_tilt: slope ``dy/dx`` of the zero-wind-curl line through the basin centre,
            ``tau_x = -tau0 cos(2 pi (y - wind_tilt (x - Lx/2)) / Ly)`` (0: the symmetric double
            gyre; > 0: the line, and the jet, lie further south at the western wall and head
            east-north-east).
        upwind: weight of the upwind bias of the 5-point PV reconstruction, in [0, 1]: the face
            value is ``c6 + upwind (u5 - c6)``, ``c6`` the centred 6-point (6th-order) value and
            ``u5`` the upwind-biased 5-point one; 1 (default) is MQGeometry's scheme, smaller
            values lower its implicit (hyper-)dissipation ``~ upwind |u| dx^5 d^6 q / 60``.
    """

    nx: int = 256
    ny: int = 256
    Lx: float = 3.072e6
    Ly: float = 3.072e6
    H: tuple[float, ...] = (400.0, 1100.0, 2600.0)
    g_prime: tuple[float, ...] = (9.81, 0.025, 0.0125)
    f0: float = 9.375e-5
    beta: float = 1.754e-11
    tau0: float = 0.08
    rho0: float = 1000.0
    drag: float = 3.6e-8
    steps_per_day: int = 36
    cfl_max: float = 1.2
    wind_tilt: float = 0.0
    upwind: float = 1.0

    def __post_init__(self) -> None:
        for key in ("nx", "ny", "steps_per_day"):
            v = getattr(self, key)
            if int(v) != v or v < (8 if key != "steps_per_day" else 1):
                raise ConfigError(f"truth.{key}={v}: must be an integer >= {8 if key != 'steps_per_day' else 1}")
        for key in ("Lx", "Ly", "f0", "rho0", "cfl_max"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"truth.{key}={getattr(self, key)}: must be > 0")
        if len(self.H) != len(self.g_prime) or len(self.H) < 1:
            raise ConfigError(f"truth.H and truth.g_prime: need the same number (>= 1) of layers, "
                              f"got {len(self.H)} and {len(self.g_prime)}")
        if min(self.H) <= 0 or min(self.g_prime) <= 0:
            raise ConfigError("truth.H and truth.g_prime: must be > 0")
        if not 0.0 <= self.upwind <= 1.0:
            raise ConfigError(f"truth.upwind={self.upwind}: must be in [0, 1]")
        for key in ("beta", "tau0", "drag", "wind_tilt"):
            if not math.isfinite(getattr(self, key)):
                raise ConfigError(f"truth.{key}: must be finite")
        if self.drag < 0:
            raise ConfigError(f"truth.drag={self.drag}: must be >= 0")

    @property
    def nl(self) -> int:
        return len(self.H)

    @property
    def dx(self) -> float:
        return self.Lx / self.nx

    @property
    def dy(self) -> float:
        return self.Ly / self.ny

    @property
    def dt(self) -> float:
        return DAY / self.steps_per_day


# ----------------------------------------------------------------------------- sine transform
def dst1(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Type-I discrete sine transform along ``dim``: ``X_k = 2 sum_n x_n sin(pi (k+1)(n+1)/(N+1))``
    (scipy's ``dst(type=1)``); its own inverse up to ``1 / (2 (N+1))``. Via an odd extension and rfft."""
    x = x.transpose(dim, -1)
    n = x.shape[-1]
    z = torch.zeros(x.shape[:-1] + (1,), dtype=x.dtype, device=x.device)
    ext = torch.cat((z, x, z, -x.flip(-1)), dim=-1)
    out = -torch.fft.rfft(ext, dim=-1)[..., 1:n + 1].imag
    return out.transpose(dim, -1)


def dst2(x: torch.Tensor) -> torch.Tensor:
    """``dst1`` over the last two dims (scipy's pocketfft on CPU tensors: several times faster)."""
    if x.device.type == "cpu":
        import scipy.fft

        return torch.from_numpy(scipy.fft.dstn(x.numpy(), type=1, axes=(-2, -1)))
    return dst1(dst1(x, -1), -2)


def idst2(xh: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dst2`."""
    ny, nx = xh.shape[-2], xh.shape[-1]
    return dst2(xh) / (4.0 * (nx + 1) * (ny + 1))


# ----------------------------------------------------------------------------- reconstructions
def _flux(q: torch.Tensor, u: torch.Tensor, dim: int, upwind: float = 1.0) -> torch.Tensor:
    """Upwind-biased PV flux ``u q_face`` on the ``n - 1`` interior faces along ``dim`` of ``q``
    (``n`` cells): linear 5-point reconstruction where it fits, 3-point one cell from a wall,
    centred 2-point on the faces next to a wall (MQGeometry's ``flux_5pts``). ``n >= 6``.
    ``upwind < 1`` moves the 5-point values towards the centred 6-point one
    ``(q_-2 - 8 q_-1 + 37 q_0 + 37 q_1 - 8 q_2 + q_3) / 60`` (``upwind = 0``: no upwind bias there)."""
    n = q.shape[dim]

    def s(i: int, m: int) -> torch.Tensor:
        return q.narrow(dim, i, m)

    up = torch.clamp(u, min=0)
    um = u - up
    # interior faces 2 .. n-4 (between cells i and i+1, i = 2 .. n-4): 5 points
    m = n - 5
    qmm, qm, q0, qp, qpp, qppp = s(0, m), s(1, m), s(2, m), s(3, m), s(4, m), s(5, m)
    left5 = (2 * qmm - 13 * qm + 47 * q0 + 27 * qp - 3 * qpp) / 60.0
    right5 = (2 * qppp - 13 * qpp + 47 * qp + 27 * q0 - 3 * qm) / 60.0
    if upwind != 1.0:
        c6 = (qmm - 8 * qm + 37 * q0 + 37 * qp - 8 * qpp + qppp) / 60.0
        left5, right5 = c6 + upwind * (left5 - c6), c6 + upwind * (right5 - c6)
    # faces 1 and n-3 (one cell from a wall): 3 points
    def left3(a, b, c):  # upwind from the left: cells a (i-1), b (i), c (i+1)
        return (-a + 5 * b + 2 * c) / 6.0

    f1l, f1r = left3(s(0, 1), s(1, 1), s(2, 1)), left3(s(3, 1), s(2, 1), s(1, 1))
    fnl, fnr = left3(s(n - 4, 1), s(n - 3, 1), s(n - 2, 1)), left3(s(n - 1, 1), s(n - 2, 1), s(n - 3, 1))
    ql = torch.cat((0.5 * (s(0, 1) + s(1, 1)), f1l, left5, fnl, 0.5 * (s(n - 2, 1) + s(n - 1, 1))), dim=dim)
    qr = torch.cat((0.5 * (s(0, 1) + s(1, 1)), f1r, right5, fnr, 0.5 * (s(n - 2, 1) + s(n - 1, 1))), dim=dim)
    return up * ql + um * qr


class GyreModel:
    """Finite-volume multi-layer QG model of a closed rectangular basin (see the module docstring).

    Args:
        params: :class:`GyreParams`.
        device, dtype: torch device and real dtype (float64 by default: the truth is chaotic,
            float32 rounding makes it diverge sooner across machines).

    State: ``(q, psi)``, ``q`` ``(nl, ny, nx)`` at cell centres, ``psi`` ``(nl, ny+1, nx+1)`` at
    vertices [m^2 s^-1]; arrays are ``(layer, y, x)``, row 0 the southern wall.
    """

    def __init__(self, params: GyreParams, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float64) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"truth.dtype={dtype}: must be float32 or float64")
        self.p = p = params
        self.device = torch.device(device)
        self.dtype = dtype
        kw = dict(device=self.device, dtype=dtype)
        nl, nx, ny = p.nl, p.nx, p.ny
        H = torch.tensor(p.H, dtype=torch.float64)
        g = torch.tensor(p.g_prime, dtype=torch.float64)
        A = torch.zeros((nl, nl), dtype=torch.float64)
        if nl == 1:
            A[0, 0] = 1.0 / (H[0] * g[0])
        else:
            A[0, 0] = 1.0 / (H[0] * g[0]) + 1.0 / (H[0] * g[1])
            A[0, 1] = -1.0 / (H[0] * g[1])
            for i in range(1, nl - 1):
                A[i, i - 1] = -1.0 / (H[i] * g[i])
                A[i, i] = (1.0 / g[i + 1] + 1.0 / g[i]) / H[i]
                A[i, i + 1] = -1.0 / (H[i] * g[i + 1])
            A[-1, -1] = 1.0 / (H[-1] * g[-1])
            A[-1, -2] = -1.0 / (H[-1] * g[-1])
        ev, P = torch.linalg.eig(A)
        order = torch.argsort(ev.real)
        ev, P = ev.real[order], P.real[:, order]
        self.A = A.to(**kw)
        self.lambda_sq = (p.f0**2 * ev).to(**kw)  # (nl,) deformation wavenumbers^2, lambda_sq[0] ~ 0
        self.Cm2l = P.to(**kw)
        self.Cl2m = torch.linalg.inv(P).to(**kw)
        self.rossby_radii_km = [float(1e-3 / math.sqrt(v)) if v > 0 else float("inf") for v in self.lambda_sq.tolist()]
        # Laplacian eigenvalues of the interior vertices (ny-1, nx-1) with psi = 0 on the walls
        ki = torch.arange(1, nx, dtype=torch.float64)
        kj = torch.arange(1, ny, dtype=torch.float64)
        lap = (2 * (torch.cos(math.pi * ki / nx) - 1) / p.dx**2)[None, :] + \
              (2 * (torch.cos(math.pi * kj / ny) - 1) / p.dy**2)[:, None]
        self.helm = (lap[None] - self.lambda_sq.double().cpu()[:, None, None]).to(**kw)  # (nl, ny-1, nx-1)
        self.yc = ((torch.arange(ny, dtype=torch.float64) + 0.5) * p.dy).to(**kw)
        self.beta_y = (p.beta * (self.yc - 0.5 * p.Ly))[:, None].expand(ny, nx)
        if p.wind_tilt == 0.0:
            curl = -p.tau0 * 2 * math.pi / p.Ly * torch.sin(2 * math.pi * self.yc / p.Ly)
            self.wind = (curl / (p.rho0 * p.H[0]))[:, None].expand(ny, nx).contiguous()
        else:  # tau_x = -tau0 cos(2 pi (y - tilt (x - Lx/2)) / Ly), curl = -d tau_x / dy
            xc = ((torch.arange(nx, dtype=torch.float64) + 0.5) * p.dx).to(**kw)
            ys = self.yc[:, None] - p.wind_tilt * (xc[None, :] - 0.5 * p.Lx)
            curl = -p.tau0 * 2 * math.pi / p.Ly * torch.sin(2 * math.pi * ys / p.Ly)
            self.wind = (curl / (p.rho0 * p.H[0])).contiguous()
        # homogeneous solutions (one per mode): (lap - lambda) h = 0 inside, h = 1 on the walls
        one = torch.ones((nl, ny + 1, nx + 1), **kw)
        sol = self._solve_modes(torch.ones((nl, ny - 1, nx - 1), **kw))
        self.homsol = one + sol * self.lambda_sq[:, None, None]
        self.homsol_mean = self.to_cells(self.homsol).mean(dim=(-2, -1), keepdim=True)

    # ------------------------------------------------------------------ grid operators
    @staticmethod
    def to_cells(f: torch.Tensor) -> torch.Tensor:
        """Vertex field ``(..., ny+1, nx+1)`` -> cell centres ``(..., ny, nx)`` (4-point mean)."""
        return 0.25 * (f[..., :-1, :-1] + f[..., :-1, 1:] + f[..., 1:, :-1] + f[..., 1:, 1:])

    @staticmethod
    def to_inner_vertices(f: torch.Tensor) -> torch.Tensor:
        """Cell field ``(..., ny, nx)`` -> interior vertices ``(..., ny-1, nx-1)`` (4-point mean)."""
        return 0.25 * (f[..., :-1, :-1] + f[..., :-1, 1:] + f[..., 1:, :-1] + f[..., 1:, 1:])

    def laplacian(self, psi: torch.Tensor) -> torch.Tensor:
        """5-point Laplacian of a vertex field on the interior vertices, zero on the walls
        (free slip), ``(..., ny+1, nx+1)``."""
        p = self.p
        inner = (psi[..., 1:-1, 2:] - 2 * psi[..., 1:-1, 1:-1] + psi[..., 1:-1, :-2]) / p.dx**2 + \
                (psi[..., 2:, 1:-1] - 2 * psi[..., 1:-1, 1:-1] + psi[..., :-2, 1:-1]) / p.dy**2
        return torch.nn.functional.pad(inner, (1, 1, 1, 1))

    def _solve_modes(self, rhs: torch.Tensor) -> torch.Tensor:
        """``(lap - lambda_m)^{-1} rhs`` per mode with zero walls: interior ``(nl, ny-1, nx-1)``
        -> vertices ``(nl, ny+1, nx+1)``."""
        return torch.nn.functional.pad(idst2(dst2(rhs) / self.helm), (1, 1, 1, 1))

    def stretching(self, psi: torch.Tensor) -> torch.Tensor:
        """``f0^2 A psi`` over the layers of a ``(nl, ...)`` field."""
        return self.p.f0**2 * torch.einsum("lm,m...->l...", self.A, psi)

    def q_from_psi(self, psi: torch.Tensor) -> torch.Tensor:
        """Cell PV ``(nl, ny, nx)`` of a vertex streamfunction ``(nl, ny+1, nx+1)``."""
        w = self.laplacian(psi) - self.stretching(psi)
        w = torch.nn.functional.pad(w[..., 1:-1, 1:-1], (1, 1, 1, 1))  # zero on the walls
        return self.to_cells(w) + self.beta_y

    def psi_from_dq(self, dq: torch.Tensor) -> torch.Tensor:
        """The ``dpsi`` ``(nl, ny+1, nx+1)`` of a PV change ``dq`` ``(nl, ny, nx)``: modal Helmholtz
        solves plus the homogeneous solution with zero mean per mode (mass conservation)."""
        rhs = torch.einsum("lm,m...->l...", self.Cl2m, self.to_inner_vertices(dq))
        modes = self._solve_modes(rhs)
        alpha = -self.to_cells(modes).mean(dim=(-2, -1), keepdim=True) / self.homsol_mean
        modes = modes + alpha * self.homsol
        return torch.einsum("lm,m...->l...", self.Cm2l, modes)

    def velocities(self, psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``u = -dpsi/dy`` on x-faces ``(nl, ny, nx+1)``, ``v = dpsi/dx`` on y-faces ``(nl, ny+1, nx)``."""
        return -torch.diff(psi, dim=-2) / self.p.dy, torch.diff(psi, dim=-1) / self.p.dx

    # ------------------------------------------------------------------ dynamics
    def tendency(self, q: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        """``dq/dt`` ``(nl, ny, nx)``: minus the PV flux divergence, wind forcing, bottom drag."""
        p = self.p
        u, v = self.velocities(psi)
        fx = torch.nn.functional.pad(_flux(q, u[..., 1:-1], -1, p.upwind), (1, 1))
        fy = torch.nn.functional.pad(_flux(q, v[..., 1:-1, :], -2, p.upwind), (0, 0, 1, 1))
        dq = -(torch.diff(fx, dim=-1) / p.dx + torch.diff(fy, dim=-2) / p.dy)
        dq[0] = dq[0] + self.wind
        if p.drag > 0:
            zeta = self.to_cells(self.laplacian(psi[-1]))
            dq[-1] = dq[-1] - p.drag * zeta
        return dq

    def _rates(self, q: torch.Tensor, psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dq = self.tendency(q, psi)
        return dq, self.psi_from_dq(dq)

    def step(self, q: torch.Tensor, psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One SSP-RK3 step of ``dt = p.dt`` on ``(q, psi)``."""
        dt = self.p.dt
        dq0, dp0 = self._rates(q, psi)
        q1, p1 = q + dt * dq0, psi + dt * dp0
        dq1, dp1 = self._rates(q1, p1)
        q2, p2 = 0.75 * q + 0.25 * (q1 + dt * dq1), 0.75 * psi + 0.25 * (p1 + dt * dp1)
        dq2, dp2 = self._rates(q2, p2)
        return q / 3.0 + 2.0 / 3.0 * (q2 + dt * dq2), psi / 3.0 + 2.0 / 3.0 * (p2 + dt * dp2)

    def courant(self, psi: torch.Tensor) -> float:
        u, v = self.velocities(psi)
        return float(max(u.abs().max() * self.p.dt / self.p.dx, v.abs().max() * self.p.dt / self.p.dy))

    def run(self, q: torch.Tensor, psi: torch.Tensor, days: int,
            callback: Callable[[int, torch.Tensor], None] | None = None, daily_mean: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Integrate ``days`` days; after each day ``callback(day, psi1)`` with the upper-layer
        streamfunction ``(ny+1, nx+1)`` (daily mean over the steps, or the end-of-day state)."""
        n = self.p.steps_per_day
        for day in range(days):
            acc = torch.zeros_like(psi[0]) if (callback is not None and daily_mean) else None
            for _ in range(n):
                q, psi = self.step(q, psi)
                if acc is not None:
                    acc += psi[0]
            c = self.courant(psi)
            if not math.isfinite(c) or c > self.p.cfl_max:
                raise NumericalError(f"gyre model: Courant number {c:.2f} > {self.p.cfl_max} on day {day} "
                                     "(raise truth.steps_per_day)")
            if callback is not None:
                callback(day, acc / n if acc is not None else psi[0].clone())
        return q, psi

    # ------------------------------------------------------------------ states and diagnostics
    def rest_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        psi = torch.zeros((self.p.nl, self.p.ny + 1, self.p.nx + 1), device=self.device, dtype=self.dtype)
        return self.q_from_psi(psi), psi

    def perturbation(self, generator: torch.Generator, ssh_amp: float, scale: float = 100e3) -> torch.Tensor:
        """Random streamfunction ``(nl, ny+1, nx+1)``, zero on the walls, spectrum peaked at
        wavelength ``scale`` [m], upper-layer SSH std ``ssh_amp`` [m] (each layer the same
        pattern scaled by its std); drawn on the CPU in float64 (reproducible), then moved."""
        p = self.p
        noise = torch.randn((p.nl, p.ny - 1, p.nx - 1), generator=generator, dtype=torch.float64)
        kx = math.pi * torch.arange(1, p.nx, dtype=torch.float64) / p.Lx
        ky = math.pi * torch.arange(1, p.ny, dtype=torch.float64) / p.Ly
        k2 = kx[None, :] ** 2 + ky[:, None] ** 2
        k0 = 2 * math.pi / scale
        shape = torch.sqrt((k2 / k0**2) * torch.exp(-k2 / k0**2))
        f = idst2(noise * shape)
        f = f / f.std(dim=(-2, -1), keepdim=True)
        amp = torch.tensor([ssh_amp * (0.5 ** i) for i in range(p.nl)], dtype=torch.float64)
        f = f * (amp * GRAVITY / p.f0)[:, None, None]
        return torch.nn.functional.pad(f, (1, 1, 1, 1)).to(self.device, self.dtype)

    def ssh(self, psi1: torch.Tensor) -> torch.Tensor:
        """Surface height ``f0 psi1 / g`` [m] at the vertices."""
        return self.p.f0 / GRAVITY * psi1

    def energy(self, psi: torch.Tensor) -> torch.Tensor:
        """Kinetic + available potential energy per unit area and density, ``(1/2) sum_i H_i
        <|grad psi_i|^2> + (f0^2/2) sum H_i psi_i (A psi)_i`` over the basin mean [m^3 s^-2]."""
        u, v = self.velocities(psi)
        H = torch.tensor(self.p.H, device=self.device, dtype=self.dtype)
        ke = 0.5 * (H * ((u**2).mean(dim=(-2, -1)) + (v**2).mean(dim=(-2, -1)))).sum()
        pe = 0.5 * (H * (psi * self.stretching(psi)).mean(dim=(-2, -1))).sum()
        return ke + pe


# ----------------------------------------------------------------------------- truth on a grid
@dataclass(frozen=True)
class GyreTruthConfig:
    """Settings of :func:`gyre_truth` (``configs/truth/gyre.yaml`` mirrors them).

    Attributes:
        state: path of the spun-up state (None: the shipped :data:`STATE_FILE`).
        x0_km, y0_km: model point (distance from the western and southern walls) placed at
            the output grid's centre (None: the values stored with the state).
        perturb_ssh_m: upper-layer SSH std of the seed's perturbation added at the reference date.
        perturb_scale_km: its dominant wavelength.
        dtype: float64 or float32. daily_mean: daily means (True) or end-of-day states.
    """

    state: str | None = None
    x0_km: float | None = None
    y0_km: float | None = None
    perturb_ssh_m: float = 0.02
    perturb_scale_km: float = 150.0
    dtype: str = "float64"
    daily_mean: bool = True


def save_state(path: str | Path, params: GyreParams, psi: torch.Tensor, date: str,
               meta: dict[str, Any] | None = None) -> None:
    """Write a state (``psi`` float32, compressed npz) with its parameters and reference date."""
    import json

    meta = dict(meta or {})
    np.savez_compressed(Path(path), psi=psi.detach().cpu().numpy().astype(np.float32),
                        params=json.dumps(asdict(params)), date=str(date), meta=json.dumps(meta))


def load_state(path: str | Path | None = None) -> tuple[GyreParams, np.ndarray, np.datetime64, dict[str, Any]]:
    """``(params, psi (nl, ny+1, nx+1) float32, reference date, meta)`` of a state file."""
    import json

    path = Path(path) if path else STATE_FILE
    if not path.is_file():
        raise InputError(f"truth.state={path}: no such gyre state file "
                         "(write one with python hpc/truth/gyre_spinup.py)")
    try:
        with np.load(path, allow_pickle=False) as z:
            raw = json.loads(str(z["params"]))
            psi = np.asarray(z["psi"])
            date = np.datetime64(str(z["date"]), "D")
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"truth.state={path}: not a gyre state file ({exc})") from None
    raw["H"] = tuple(raw["H"])
    raw["g_prime"] = tuple(raw["g_prime"])
    params = GyreParams(**raw)
    if psi.shape != (params.nl, params.ny + 1, params.nx + 1):
        raise InputError(f"truth.state={path}: psi has shape {psi.shape}, parameters say "
                         f"{(params.nl, params.ny + 1, params.nx + 1)}")
    return params, psi, date, meta


class BasinSampler:
    """Samples a vertex field of the basin at lon/lat points: sinusoidal projection about the
    grid centre ``(lon_c, lat_c)`` placed at the model point ``(x0, y0)``, cubic splines."""

    def __init__(self, params: GyreParams, lon: np.ndarray, lat: np.ndarray, x0: float, y0: float) -> None:
        lon = np.asarray(lon, float)
        lat = np.asarray(lat, float)
        lon_c = 0.5 * (lon[0] + lon[-1])
        lat_c = 0.5 * (lat[0] + lat[-1])
        lon2, lat2 = np.meshgrid(lon, lat)
        x = x0 + EARTH_RADIUS * np.cos(np.radians(lat2)) * np.radians(lon2 - lon_c)
        y = y0 + EARTH_RADIUS * np.radians(lat2 - lat_c)
        margin = 2.0
        if (x.min() < margin * params.dx or x.max() > params.Lx - margin * params.dx
                or y.min() < margin * params.dy or y.max() > params.Ly - margin * params.dy):
            raise ConfigError(
                f"truth=gyre: the domain ({lon.min():g}..{lon.max():g}E, {lat.min():g}..{lat.max():g}N) "
                f"does not fit in the {params.Lx / 1e3:.0f} x {params.Ly / 1e3:.0f} km basin at "
                f"x0_km={x0 / 1e3:g}, y0_km={y0 / 1e3:g}; use a smaller domain or move truth.x0_km / truth.y0_km")
        self.shape = x.shape
        self.coords = np.stack([(y / params.dy).ravel(), (x / params.dx).ravel()])

    def __call__(self, f: np.ndarray) -> np.ndarray:
        from scipy.ndimage import map_coordinates

        return map_coordinates(np.asarray(f, np.float64), self.coords, order=3, mode="nearest").reshape(self.shape)


def gyre_start(cfg: GyreTruthConfig, seed: int, device: str | torch.device = "cpu"
               ) -> tuple[GyreModel, torch.Tensor, torch.Tensor, np.datetime64, dict[str, Any]]:
    """The model and the seed's state ``(q, psi)`` at the reference date of the state file."""
    if cfg.dtype not in ("float32", "float64"):
        raise ConfigError(f"truth.dtype={cfg.dtype!r}: must be float32 or float64")
    if not cfg.perturb_ssh_m >= 0 or not cfg.perturb_scale_km > 0:
        raise ConfigError("truth.perturb_ssh_m must be >= 0 and truth.perturb_scale_km > 0")
    params, psi0, date, meta = load_state(cfg.state)
    model = GyreModel(params, device=device, dtype=torch.float64 if cfg.dtype == "float64" else torch.float32)
    psi = torch.as_tensor(psi0, dtype=torch.float64).to(model.device, model.dtype)
    if cfg.perturb_ssh_m > 0:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        psi = psi + model.perturbation(gen, cfg.perturb_ssh_m, cfg.perturb_scale_km * 1e3)
    return model, model.q_from_psi(psi), psi, date, meta


def gyre_truth(lon: np.ndarray, lat: np.ndarray, start: np.datetime64, days: int, seed: int = 0,
               cfg: GyreTruthConfig | None = None, device: str | torch.device = "cpu",
               progress: Callable[[str, int], None] | None = None) -> Iterator[np.ndarray]:
    """Daily SSH [m] of the double gyre on the lon/lat grid from the date ``start``: yields
    ``days`` arrays ``(ny, nx)`` float32, the upper-layer ``f0 psi1 / g`` minus its basin mean.

    The model starts from the state file's reference date with the seed's perturbation and
    runs (without output) up to ``start``: the field of a date depends on the seed and the date
    only, not on the period asked for. ``start`` before the reference date is an error.
    ``progress(stage, n)`` is called once per model day (``"spinup"`` before ``start``,
    ``"truth"`` after).
    """
    cfg = cfg or GyreTruthConfig()
    if int(days) != days or days < 1:
        raise ConfigError(f"period: number of days must be >= 1, got {days}")
    model, q, psi, ref, meta = gyre_start(cfg, seed, device)
    start = np.datetime64(start, "D")
    lead = int((start - ref).astype(int))
    if lead < 0:
        raise ConfigError(f"period.start={start}: the gyre truth starts on its reference date {ref}")
    x0 = (cfg.x0_km if cfg.x0_km is not None else meta.get("x0_km", model.p.Lx / 2e3)) * 1e3
    y0 = (cfg.y0_km if cfg.y0_km is not None else meta.get("y0_km", model.p.Ly / 2e3)) * 1e3
    sampler = BasinSampler(model.p, lon, lat, x0, y0)
    return _gyre_days(model, q, psi, sampler, lead, int(days), cfg.daily_mean, progress)


def _gyre_days(model: GyreModel, q: torch.Tensor, psi: torch.Tensor, sampler: BasinSampler, lead: int,
               days: int, daily_mean: bool, progress: Callable[[str, int], None] | None) -> Iterator[np.ndarray]:
    tick = (lambda stage: (lambda d, _f: progress(stage, 1))) if progress else (lambda stage: None)
    q, psi = model.run(q, psi, lead, callback=tick("spinup") if progress else None)
    for _ in range(days):
        box: list[torch.Tensor] = []
        q, psi = model.run(q, psi, 1, callback=lambda d, f: box.append(f), daily_mean=daily_mean)
        eta = model.ssh(box[0])
        eta = eta - model.to_cells(eta).mean()
        if progress:
            progress("truth", 1)
        yield sampler(eta.cpu().numpy()).astype(np.float32)
