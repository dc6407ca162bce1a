"""Two-layer quasi-geostrophic (QG) model on a beta-plane: a synthetic SSH truth generator.

Equations (doubly periodic domain ``Lx x Ly``, layers ``i = 1`` upper, ``2`` lower,
thicknesses ``H1, H2``, ``delta = H1 / H2``, baroclinic deformation radius ``Ld``)::

    q1 = lap(psi1) + F1 (psi2 - psi1)        F1 = 1 / (Ld^2 (1 + delta))
    q2 = lap(psi2) + F2 (psi1 - psi2)        F2 = delta F1

    dq_i/dt + J(psi_i, q_i) + U_i dq_i/dx + Qy_i d(psi_i)/dx
        = - (q_i - q_i^jet) / tau            (relaxation toward a zonal jet: the forcing)
          - [i = 2] r_ek lap(psi2)           (linear bottom drag)
          - nu_8 lap^4 q_i                   (hyperviscosity, small-scale dissipation)

with ``J(a, b) = a_x b_y - a_y b_x``, optional uniform background flows ``U_i`` and PV
gradients ``Qy_1 = beta + F1 (U1 - U2)``, ``Qy_2 = beta - F2 (U1 - U2)``. The forcing state ``psi1^jet(y)`` is an eastward
upper-layer jet ``u1 = U0 sech^2((y - y_jet) / w)`` minus its mean (doubly periodic fields
have no mean flow: the jet comes with a weak, broad westward return flow),
``psi2^jet = 0``; the vertical shear makes the jet baroclinically unstable (the lower-layer
PV gradient ``beta - F2 U0`` changes sign), so it meanders and sheds eddies at the
deformation scale. Surface height ``eta = f0 psi1 / g`` [m].

Numerics: pseudo-spectral (``torch.fft.rfft2``), state ``qh`` = Fourier coefficients of
``(q1, q2)``, shape ``(2, ny, nx // 2 + 1)`` complex; products dealiased by the 2/3 rule
(modes with ``|k| >= 2/3 k_max`` or ``|l| >= 2/3 l_max`` are kept at zero, which makes the
discrete advection conserve energy and both layers' enstrophy exactly in the absence of
time-stepping error); classical RK4 for advection, beta, forcing and drag; hyperviscosity
by an exact integrating factor ``exp(-nu_8 K^8 dt)`` after each step. The time step is
chosen from a CFL condition on the current maximum velocity with a whole number of steps
per day. Runs on whatever device/dtype it is given (CUDA when present).

Inversion ``q -> psi`` for each wavenumber ``K^2 = k^2 + l^2 > 0`` (the mean mode is 0)::

    [q1]   [-K^2 - F1      F1    ] [psi1]              [psi1]     1     [-K^2 - F2     -F1    ] [q1]
    [q2] = [   F2      -K^2 - F2 ] [psi2]     =>       [psi2] = ----- *  [  -F2     -K^2 - F1 ] [q2]
                                                                 det      det = K^2 (K^2 + F1 + F2)

Linear Rossby waves (tested): barotropic ``omega = -beta k / K^2``, baroclinic
``omega = -beta k / (K^2 + F1 + F2)``.

References: Vallis (2017), *Atmospheric and Oceanic Fluid Dynamics*, ch. 5 and 9 (two-layer
QG); pyqg (Abernathey et al.) for the layer/PV conventions; Flierl (1978) for the modes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from oceanda.dynamics.integrate import rk4_step
from oceanda.errors import ConfigError, NumericalError

OMEGA = 7.2921159e-5  #: Earth rotation rate [s^-1]
EARTH_RADIUS = 6371.0e3  #: mean Earth radius [m]
GRAVITY = 9.81  #: [m s^-2]
DAY = 86400.0  #: [s]


def fast_fft_size(n: int) -> int:
    """Smallest even integer ``>= n`` whose prime factors are 2, 3 and 5 only."""
    m = max(int(math.ceil(n)), 2)
    while True:
        if m % 2 == 0:
            r = m
            for p in (2, 3, 5):
                while r % p == 0:
                    r //= p
            if r == 1:
                return m
        m += 1


@dataclass(frozen=True)
class QGParams:
    """Physical and numerical parameters of :class:`QGModel` (SI units).

    Attributes:
        nx, ny: model grid points (even).
        Lx, Ly: periodic domain size [m].
        f0, beta: Coriolis parameter [s^-1] and its meridional gradient [m^-1 s^-1].
        Ld: baroclinic deformation radius [m].
        H1, H2: layer thicknesses [m].
        jet_u: peak upper-layer speed of the forcing jet U0 [m/s] (0: no jet).
        jet_width: e-folding half-width w of the sech^2 jet [m].
        jet_y: jet axis in model coordinates (0 = domain centre) [m].
        U1, U2: uniform background zonal flows of the layers [m/s] (Phillips model: a
            vertical shear ``U1 - U2 > beta / F2`` makes eddies everywhere, not only
            along the jet). Their SSH, a uniform meridional slope, is not part of the
            output (it is the large-scale gyre, not mesoscale).
        tau_relax: relaxation time toward the jet [s] (``inf``: none).
        rek: linear bottom drag on the lower layer [s^-1].
        tau_hyper: hyperviscous damping time at the 2/3 cut-off wavenumber [s].
        cfl: Courant number used to choose the time step.
        g: gravity [m/s^2].
    """

    nx: int = 128
    ny: int = 128
    Lx: float = 1.0e6
    Ly: float = 1.0e6
    f0: float = 2 * OMEGA * math.sin(math.radians(38.0))
    beta: float = 2 * OMEGA * math.cos(math.radians(38.0)) / EARTH_RADIUS
    Ld: float = 30.0e3
    H1: float = 1000.0
    H2: float = 3000.0
    jet_u: float = 0.5
    jet_width: float = 50.0e3
    jet_y: float = 0.0
    U1: float = 0.0
    U2: float = 0.0
    tau_relax: float = 60.0 * DAY
    rek: float = 1.0 / (40.0 * DAY)
    tau_hyper: float = 0.1 * DAY
    cfl: float = 0.5
    g: float = GRAVITY

    def __post_init__(self) -> None:
        for key in ("nx", "ny"):
            v = getattr(self, key)
            if int(v) != v or v < 8 or v % 2:
                raise ConfigError(f"truth.{key}={v}: must be an even integer >= 8")
        for key in ("Lx", "Ly", "Ld", "H1", "H2", "jet_width", "tau_relax", "tau_hyper", "cfl", "g", "f0"):
            v = getattr(self, key)
            if not (v > 0):
                raise ConfigError(f"truth.{key}={v}: must be > 0")
        for key in ("beta", "jet_u", "rek", "jet_y", "U1", "U2"):
            v = getattr(self, key)
            if not math.isfinite(v):
                raise ConfigError(f"truth.{key}={v}: must be finite")
        if self.rek < 0:
            raise ConfigError(f"truth.rek={self.rek}: must be >= 0")

    @property
    def delta(self) -> float:
        return self.H1 / self.H2

    @property
    def F1(self) -> float:
        return 1.0 / (self.Ld**2 * (1.0 + self.delta))

    @property
    def F2(self) -> float:
        return self.delta * self.F1

    @property
    def dx(self) -> float:
        return self.Lx / self.nx

    @property
    def dy(self) -> float:
        return self.Ly / self.ny


class QGModel:
    """Pseudo-spectral two-layer QG model (see the module docstring for the equations).

    Args:
        params: :class:`QGParams`.
        device, dtype: real dtype of physical fields (float32 or float64); spectral
            fields use the matching complex dtype.

    The state is ``qh`` ``(2, ny, nx//2 + 1)`` complex: rfft2 of ``(q1, q2)`` over
    ``(y, x)``. ``x`` runs over ``[-Lx/2, Lx/2)`` and ``y`` over ``[-Ly/2, Ly/2)``.
    """

    def __init__(self, params: QGParams, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"truth.dtype={dtype}: must be float32 or float64")
        self.p = params
        self.device = torch.device(device)
        self.dtype = dtype
        self.cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
        p = params
        kw = dict(device=self.device, dtype=dtype)
        self.x = (torch.arange(p.nx, **kw) - p.nx // 2) * p.dx
        self.y = (torch.arange(p.ny, **kw) - p.ny // 2) * p.dy
        k = 2 * math.pi * torch.fft.rfftfreq(p.nx, d=p.dx, dtype=torch.float64).to(**kw)
        l = 2 * math.pi * torch.fft.fftfreq(p.ny, d=p.dy, dtype=torch.float64).to(**kw)
        self.k = k[None, :].expand(p.ny, -1)
        self.l = l[:, None].expand(-1, k.numel())
        self.ik = (1j * self.k).to(self.cdtype)
        self.il = (1j * self.l).to(self.cdtype)
        self.K2 = self.k**2 + self.l**2
        kmax, lmax = math.pi / p.dx, math.pi / p.dy
        self.dealias = ((self.k.abs() < 2.0 / 3.0 * kmax) & (self.l.abs() < 2.0 / 3.0 * lmax)).to(dtype)
        F1, F2 = p.F1, p.F2
        det = self.K2 * (self.K2 + F1 + F2)
        inv_det = torch.where(det > 0, 1.0 / torch.where(det > 0, det, torch.ones_like(det)), torch.zeros_like(det))
        # psi = A q, A[i, j] (ny, nk)
        self._a11 = (-(self.K2 + F2) * inv_det).to(self.cdtype)
        self._a12 = (-F1 * inv_det).to(self.cdtype)
        self._a21 = (-F2 * inv_det).to(self.cdtype)
        self._a22 = (-(self.K2 + F1) * inv_det).to(self.cdtype)
        kc = 2.0 / 3.0 * min(kmax, lmax)
        self.nu8 = 1.0 / (p.tau_hyper * kc**8)
        self.qh_jet = self.jet_qh()
        # rfft weights: interior k columns stand for two modes (k and -k)
        w = torch.full((k.numel(),), 2.0, **kw)
        w[0] = 1.0
        if p.nx % 2 == 0:
            w[-1] = 1.0
        self._rfft_w = w[None, :]

    # ----------------------------------------------------------------- transforms
    def fft(self, f: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft2(f)

    def ifft(self, fh: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfft2(fh, s=(self.p.ny, self.p.nx))

    def invert(self, qh: torch.Tensor) -> torch.Tensor:
        """``psih = A qh``: the streamfunction of the PV ``qh`` (``(2, ny, nk)``; mean mode 0)."""
        q1, q2 = qh[0], qh[1]
        return torch.stack((self._a11 * q1 + self._a12 * q2, self._a21 * q1 + self._a22 * q2))

    def pv_from_psi(self, psih: torch.Tensor) -> torch.Tensor:
        """``qh`` of a streamfunction ``psih`` (inverse of :meth:`invert` on non-mean modes)."""
        p1, p2 = psih[0], psih[1]
        q1 = -self.K2 * p1 + self.p.F1 * (p2 - p1)
        q2 = -self.K2 * p2 + self.p.F2 * (p1 - p2)
        return torch.stack((q1, q2))

    # ------------------------------------------------------------------- forcing
    def jet_psi1(self) -> torch.Tensor:
        """Upper-layer streamfunction ``(ny,)`` of the forcing jet: ``u = U0 sech^2((y-y0)/w)``
        minus its mean, ``psi = -int u dy`` (periodic)."""
        p = self.p
        y = self.y.double()
        # periodic distance to the jet axis
        d = torch.remainder(y - p.jet_y + p.Ly / 2, p.Ly) - p.Ly / 2
        u = p.jet_u / torch.cosh(d / p.jet_width) ** 2
        u = u - u.mean()
        uh = torch.fft.fft(u)
        l = 2 * math.pi * torch.fft.fftfreq(p.ny, d=p.dy, dtype=torch.float64)
        psih = torch.where(l != 0, 1j * uh / torch.where(l != 0, l, torch.ones_like(l)), torch.zeros_like(uh))
        return torch.fft.ifft(psih).real.to(self.dtype)

    def jet_qh(self) -> torch.Tensor:
        """PV ``(2, ny, nk)`` of the forcing state ``(psi1^jet, 0)``."""
        psi1 = self.jet_psi1()[:, None].expand(self.p.ny, self.p.nx)
        psi = torch.stack((psi1, torch.zeros_like(psi1)))
        return self.pv_from_psi(self.fft(psi)) * self.dealias

    # ----------------------------------------------------------------- tendency
    def velocities(self, psih: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``u = -psi_y``, ``v = psi_x`` in physical space, each ``(2, ny, nx)``."""
        return self.ifft(-self.il * psih), self.ifft(self.ik * psih)

    def tendency(self, qh: torch.Tensor, nonlinear: bool = True, forcing: bool = True) -> torch.Tensor:
        """``d qh / dt`` without hyperviscosity (applied by the integrating factor).

        ``nonlinear=False`` drops ``J(psi, q)`` (linearised about rest);
        ``forcing=False`` drops the jet relaxation and the bottom drag.
        """
        p = self.p
        psih = self.invert(qh)
        # background PV gradients Qy_i = beta + F1 (U1 - U2), beta - F2 (U1 - U2)
        qy1 = p.beta + p.F1 * (p.U1 - p.U2)
        qy2 = p.beta - p.F2 * (p.U1 - p.U2)
        out = -self.ik * torch.stack((qy1 * psih[0] + p.U1 * qh[0], qy2 * psih[1] + p.U2 * qh[1]))
        if nonlinear:
            u, v = self.velocities(psih)
            qx = self.ifft(self.ik * qh)
            qy = self.ifft(self.il * qh)
            out = out - self.fft(u * qx + v * qy) * self.dealias
        if forcing:
            if math.isfinite(p.tau_relax):
                out = out - (qh - self.qh_jet) / p.tau_relax
            if p.rek > 0:
                out = out.clone()
                out[1] = out[1] + p.rek * self.K2 * psih[1]
        return out

    def step(self, qh: torch.Tensor, dt: float, nonlinear: bool = True, forcing: bool = True,
             hyperviscosity: bool = True) -> torch.Tensor:
        """One RK4 step of length ``dt`` [s], then the hyperviscous factor ``exp(-nu8 K^8 dt)``."""
        qh = rk4_step(lambda s: self.tendency(s, nonlinear=nonlinear, forcing=forcing), qh, dt)
        if hyperviscosity:
            qh = qh * torch.exp(-self.nu8 * self.K2**4 * dt)
        return qh

    # ------------------------------------------------------------ diagnostics
    def spectral_sum(self, ah: torch.Tensor, bh: torch.Tensor) -> torch.Tensor:
        """``sum_xy a b / (nx ny)`` (the domain mean of ``a b``) from rfft2 coefficients."""
        n = self.p.nx * self.p.ny
        return (self._rfft_w * (ah.conj() * bh).real).sum(dim=(-2, -1)) / n**2

    def energy(self, qh: torch.Tensor) -> torch.Tensor:
        """Total energy per unit area and density, depth-weighted mean over the layers:
        ``E = -(H1 <psi1 q1> + H2 <psi2 q2>) / (2 H)`` [m^2 s^-2]."""
        p = self.p
        psih = self.invert(qh)
        e = self.spectral_sum(psih, qh)
        return -(p.H1 * e[0] + p.H2 * e[1]) / (2 * (p.H1 + p.H2))

    def enstrophy(self, qh: torch.Tensor) -> torch.Tensor:
        """``Z_i = <q_i^2> / 2`` of each layer, ``(2,)``."""
        return 0.5 * self.spectral_sum(qh, qh)

    def max_speed(self, qh: torch.Tensor) -> float:
        u, v = self.velocities(self.invert(qh))
        return float(torch.sqrt(u**2 + v**2).max())

    def cfl_steps_per_day(self, qh: torch.Tensor, u_floor: float = 0.2) -> int:
        """Whole number of steps per day so that ``max|u| dt / min(dx, dy) <= cfl``."""
        umax = max(self.max_speed(qh) + max(abs(self.p.U1), abs(self.p.U2)), abs(self.p.jet_u), u_floor)
        if not math.isfinite(umax):
            raise NumericalError("QG model blew up (non-finite velocity); lower truth.cfl")
        dt = self.p.cfl * min(self.p.dx, self.p.dy) / umax
        return max(int(math.ceil(DAY / dt)), 1)

    def ssh(self, qh: torch.Tensor) -> torch.Tensor:
        """Sea-surface height ``f0 psi1 / g`` [m], ``(ny, nx)``."""
        return self.p.f0 / self.p.g * self.ifft(self.invert(qh)[0])

    # ------------------------------------------------------------------ states
    def random_state(self, generator: torch.Generator, ssh_amp: float = 0.05,
                     scale: float | None = None) -> torch.Tensor:
        """Jet PV plus random eddies: each layer's streamfunction has a random-phase
        spectrum peaked at the wavenumber ``1/scale`` (default ``2 Ld``) and an SSH
        standard deviation ``ssh_amp`` [m] (lower layer: half of it). Reproducible
        from ``generator`` (drawn on the CPU, then moved)."""
        p = self.p
        scale = 2 * p.Ld if scale is None else scale
        shape = (2, p.ny, p.nx)
        noise = torch.randn(shape, generator=generator, dtype=torch.float64).to(self.device, self.dtype)
        nh = self.fft(noise)
        k0 = 1.0 / scale
        shape_k = (self.K2 / k0**2) * torch.exp(-self.K2 / k0**2)
        psih = nh * torch.sqrt(shape_k) * self.dealias
        psi = self.ifft(psih)
        psi = psi / psi.std(dim=(-2, -1), keepdim=True)
        amp = torch.tensor([ssh_amp, 0.5 * ssh_amp], device=self.device, dtype=self.dtype)
        psi = psi * (amp * p.g / p.f0)[:, None, None]
        return self.qh_jet + self.pv_from_psi(self.fft(psi)) * self.dealias

    def run(self, qh: torch.Tensor, days: int, daily_mean: bool = True,
            callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Integrate ``days`` days; after each day call ``callback(day, psi1h_day)`` with the
        upper-layer streamfunction (daily mean over the steps if ``daily_mean`` else the
        end-of-day snapshot), ``(ny, nk)`` complex. Returns the final state."""
        for day in range(days):
            n = self.cfl_steps_per_day(qh)
            dt = DAY / n
            acc = None
            for _ in range(n):
                qh = self.step(qh, dt)
                if callback is not None and daily_mean:
                    p1 = self.invert(qh)[0]
                    acc = p1 if acc is None else acc + p1
            if not bool(torch.isfinite(qh).all()):
                raise NumericalError(f"QG model blew up on day {day}; lower truth.cfl or raise truth.tau_hyper")
            if callback is not None:
                callback(day, acc / n if daily_mean else self.invert(qh)[0])
        return qh

    def resample(self, qh: torch.Tensor, other: QGModel) -> torch.Tensor:
        """The state ``qh`` of this model on ``other``'s grid (same domain), by zero-padding
        or truncating the spectrum (exact for band-limited fields)."""
        if (other.p.Lx, other.p.Ly) != (self.p.Lx, self.p.Ly):
            raise ConfigError("resample: models must share the domain size")
        ny, nk = other.p.ny, other.p.nx // 2 + 1
        out = torch.zeros((qh.shape[0], ny, nk), dtype=other.cdtype, device=other.device)
        mk = min(nk, qh.shape[-1])
        mly = min(ny, self.p.ny) // 2
        scale = (other.p.nx * other.p.ny) / (self.p.nx * self.p.ny)
        src = qh.to(other.device, other.cdtype) * scale
        out[:, :mly, :mk] = src[:, :mly, :mk]
        out[:, ny - mly + 1:, :mk] = src[:, self.p.ny - mly + 1:, :mk]
        return out * other.dealias


# --------------------------------------------------------------------------- truth on a grid
@dataclass(frozen=True)
class GridMapping:
    """Maps a lon/lat grid onto the model plane: ``x = R cos(lat) (lon - lon_c)``,
    ``y = R (lat - lat_c) - y_off`` (sinusoidal projection about the centre; distances in
    km are true along parallels and meridians to within the sphere's accuracy)."""

    lon_c: float
    lat_c: float

    def xy(self, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` [m], each ``(ny, nx)``, of the grid points ``(lat[j], lon[i])``."""
        lon2, lat2 = np.meshgrid(np.asarray(lon, float), np.asarray(lat, float))
        x = EARTH_RADIUS * np.cos(np.radians(lat2)) * np.radians(lon2 - self.lon_c)
        y = EARTH_RADIUS * np.radians(lat2 - self.lat_c)
        return x, y


class SpectralSampler:
    """Evaluates a model field at arbitrary points ``(x, y)``: spectral upsampling by
    ``factor`` (zero-padding, exact), then periodic cubic-spline interpolation
    (``scipy.ndimage.map_coordinates``, order 3, ``grid-wrap``).

    With the 2/3-rule truncation the field is band-limited to wavelengths ``>= 3 dx``;
    after upsampling by 2 there are >= 6 samples per wavelength and the spline errs by
    < 1e-3 relative at 8 dx (tested against a closed form). Returns numpy arrays.
    """

    def __init__(self, model: QGModel | tuple[int, int, float, float], x: np.ndarray, y: np.ndarray,
                 factor: int = 2) -> None:
        if isinstance(model, QGModel):
            ny, nx, dy, dx = model.p.ny, model.p.nx, model.p.dy, model.p.dx
        else:  # a plain periodic plane (ny, nx, dy, dx)
            ny, nx, dy, dx = model
        self.n = (int(ny), int(nx))
        self.factor = int(factor)
        self.shape_up = (self.n[0] * self.factor, self.n[1] * self.factor)
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if np.abs(x).max() > nx * dx / 2 - 2 * dx or np.abs(y).max() > ny * dy / 2 - 2 * dy:
            raise ConfigError("truth: the output grid does not fit inside the model domain "
                              "(raise truth.margin_km or the model size)")
        # fractional indices on the upsampled grid; model point i sits at x = (i - n/2) dx
        self.shape_out = x.shape
        self.coords = np.stack([(y / (dy / self.factor) + self.shape_up[0] // 2).ravel(),
                                (x / (dx / self.factor) + self.shape_up[1] // 2).ravel()])

    def upsample(self, fh: torch.Tensor) -> torch.Tensor:
        """Physical field ``(ny * factor, nx * factor)`` of rfft2 coefficients ``fh`` ``(ny, nk)``."""
        ny, nx = self.shape_up
        up = torch.zeros((ny, nx // 2 + 1), dtype=fh.dtype, device=fh.device)
        h = self.n[0] // 2
        nk = fh.shape[-1]
        up[:h, :nk] = fh[:h]
        up[ny - h + 1:, :nk] = fh[self.n[0] - h + 1:]
        return torch.fft.irfft2(up * (self.factor**2), s=(ny, nx))

    def __call__(self, fh: torch.Tensor) -> np.ndarray:
        """Field with rfft2 coefficients ``fh`` ``(ny, nk)`` at the points: ``x.shape``, float64."""
        from scipy.ndimage import map_coordinates

        f = self.upsample(fh).detach().cpu().numpy().astype(np.float64)
        out = map_coordinates(f, self.coords, order=3, mode="grid-wrap")
        return out.reshape(self.shape_out)


@dataclass(frozen=True)
class QGTruthConfig:
    """Settings of :func:`qg_truth` (plain values; ``configs/truth/qg.yaml`` mirrors them).

    Attributes:
        dx_km: model grid spacing [km] (the 1/20 deg output grid is 4.4-5.6 km).
        margin_km: model domain margin around the output grid on each side [km].
        ld_km: deformation radius [km].
        h1, h2: layer thicknesses [m].
        jet_u: jet speed U0 [m/s]; jet_width_km: its half-width [km];
        jet_lat: latitude of the jet axis (None: centre of the grid).
        shear_u: uniform background flow of the upper layer over a lower layer at rest
            (``U1 = shear_u``, ``U2 = 0``) [m/s]; above ``beta / F2`` (0.029 m/s at 38N with Ld = 20 km, H1/H2 =
            1/3) it makes baroclinic eddies everywhere, not only along the jet.
        tau_relax_days, drag_days (1 / r_ek), tau_hyper_days: forcing/dissipation times.
        spinup_days: spin-up on a grid twice as coarse (cheap), then spinup_fine_days at
            full resolution, before the first stored day.
        cfl: Courant number. dtype: "float32" or "float64". daily_mean: store daily
            means (True) or end-of-day snapshots.
    """

    dx_km: float = 6.0
    margin_km: float = 250.0
    ld_km: float = 20.0
    h1: float = 1000.0
    h2: float = 3000.0
    jet_u: float = 0.5
    jet_width_km: float = 50.0
    jet_lat: float | None = None
    shear_u: float = 0.09
    tau_relax_days: float = 60.0
    drag_days: float = 40.0
    tau_hyper_days: float = 0.1
    spinup_days: int = 365
    spinup_fine_days: int = 30
    cfl: float = 0.5
    dtype: str = "float32"
    daily_mean: bool = True


def qg_setup(lon: np.ndarray, lat: np.ndarray, cfg: QGTruthConfig, device: str | torch.device = "cpu"
             ) -> tuple[QGModel, GridMapping, np.ndarray, np.ndarray]:
    """Model sized to cover the lon/lat grid plus margins, the mapping and the grid's
    model coordinates ``x, y`` ``(ny, nx)`` [m]."""
    lon = np.asarray(lon, float)
    lat = np.asarray(lat, float)
    if cfg.dx_km <= 0:
        raise ConfigError(f"truth.dx_km={cfg.dx_km}: must be > 0")
    if cfg.margin_km < 0:
        raise ConfigError(f"truth.margin_km={cfg.margin_km}: must be >= 0")
    if cfg.dtype not in ("float32", "float64"):
        raise ConfigError(f"truth.dtype={cfg.dtype!r}: must be float32 or float64")
    lat_c = 0.5 * (lat[0] + lat[-1])
    lon_c = 0.5 * (lon[0] + lon[-1])
    if abs(lat_c) < 5:
        raise ConfigError(f"truth: a beta-plane QG truth needs |centre latitude| >= 5 deg, got {lat_c:g}")
    mapping = GridMapping(lon_c=lon_c, lat_c=lat_c)
    x, y = mapping.xy(lon, lat)
    dx = cfg.dx_km * 1e3
    need_x = 2 * (np.abs(x).max() + cfg.margin_km * 1e3 + 2 * dx)
    need_y = 2 * (np.abs(y).max() + cfg.margin_km * 1e3 + 2 * dx)
    # sizes divisible by 4 so that the half-resolution spin-up grid is even too
    nx = 2 * fast_fft_size(need_x / (2 * dx))
    ny = 2 * fast_fft_size(need_y / (2 * dx))
    jet_lat = lat_c if cfg.jet_lat is None else float(cfg.jet_lat)
    phi0 = math.radians(lat_c)
    params = QGParams(
        nx=nx, ny=ny, Lx=nx * dx, Ly=ny * dx,
        f0=2 * OMEGA * math.sin(phi0), beta=2 * OMEGA * math.cos(phi0) / EARTH_RADIUS,
        Ld=cfg.ld_km * 1e3, H1=cfg.h1, H2=cfg.h2, jet_u=cfg.jet_u, jet_width=cfg.jet_width_km * 1e3,
        jet_y=EARTH_RADIUS * math.radians(jet_lat - lat_c), U1=float(cfg.shear_u), U2=0.0,
        tau_relax=cfg.tau_relax_days * DAY,
        rek=0.0 if not math.isfinite(cfg.drag_days) or cfg.drag_days <= 0 else 1.0 / (cfg.drag_days * DAY),
        tau_hyper=cfg.tau_hyper_days * DAY, cfl=cfg.cfl,
    )
    dtype = torch.float32 if cfg.dtype == "float32" else torch.float64
    return QGModel(params, device=device, dtype=dtype), mapping, x, y


def qg_truth(lon: np.ndarray, lat: np.ndarray, days: int, seed: int = 0,
             cfg: QGTruthConfig | None = None, device: str | torch.device = "cpu",
             progress: Callable[[str, int], None] | None = None) -> Iterator[np.ndarray]:
    """Daily SSH [m] of the QG truth on the lon/lat grid: yields ``days`` arrays ``(ny, nx)``
    float32, ``f0 psi1 / g`` relative to the model domain's mean (the jet's SSH step and
    the eddies; the uniform background shear's SSH slope is not included).

    Spin-up: ``cfg.spinup_days`` on a grid of spacing ``2 dx`` from the jet plus random
    eddies (``torch.Generator`` seeded with ``seed``), spectral refinement, then
    ``cfg.spinup_fine_days`` at ``dx``; then the stored days. Memory is independent of
    ``days`` (a generator). ``progress(stage, n)`` is called once per model day with
    stage ``"spinup"`` or ``"truth"``.
    """
    cfg = cfg or QGTruthConfig()
    if int(days) != days or days < 1:
        raise ConfigError(f"period: number of days must be >= 1, got {days}")
    if cfg.spinup_days < 0 or cfg.spinup_fine_days < 0:
        raise ConfigError("truth.spinup_days and truth.spinup_fine_days must be >= 0")
    # set-up (and its config errors) happen now, the integration when the first day is asked
    model, _, x, y = qg_setup(lon, lat, cfg, device=device)
    sampler = SpectralSampler(model, x, y)
    return _qg_days(model, sampler, int(days), int(seed), cfg, progress)


def _qg_days(model: QGModel, sampler: SpectralSampler, days: int, seed: int, cfg: QGTruthConfig,
             progress: Callable[[str, int], None] | None) -> Iterator[np.ndarray]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tick = (lambda stage: (lambda d, _f: progress(stage, 1))) if progress else (lambda stage: None)
    if cfg.spinup_days > 0:
        p = model.p
        coarse = QGModel(replace(p, nx=p.nx // 2, ny=p.ny // 2), device=model.device, dtype=model.dtype)
        qc = coarse.random_state(gen)
        qc = coarse.run(qc, cfg.spinup_days, callback=tick("spinup"))
        qh = coarse.resample(qc, model)
    else:
        qh = model.random_state(gen)
    qh = model.run(qh, cfg.spinup_fine_days, callback=tick("spinup"))
    scale = model.p.f0 / model.p.g
    for _ in range(days):
        box: list[np.ndarray] = []
        qh = model.run(qh, 1, daily_mean=cfg.daily_mean, callback=lambda d, p1h: box.append(sampler(p1h)))
        if progress:
            progress("truth", 1)
        yield (box[0] * scale).astype(np.float32)


# --------------------------------------------------------------------------- spectra
def zonal_spectrum(field: np.ndarray, dx_km: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zonal wavenumber spectrum of ``field`` ``(..., ny, nx)`` averaged over rows and
    leading dims: each row is detrended (linear), Hann-windowed and Fourier transformed.

    Returns ``(k, psd)``: wavenumbers [cycles/km] ``(nx//2,)`` without the mean, and the
    one-sided PSD [units^2 km] normalised so that ``sum(psd) * dk ~ var`` (window-corrected).
    ``dx_km`` may be a scalar or a ``(ny,)`` array (rows with different spacing are
    interpolated onto the wavenumbers of the mean spacing). NaN rows are skipped.
    """
    f = np.asarray(field, dtype=np.float64)
    f = f.reshape(-1, f.shape[-2], f.shape[-1])
    nt, ny, nx = f.shape
    dxs = np.broadcast_to(np.asarray(dx_km, dtype=np.float64), (ny,))
    dx_ref = float(dxs.mean())
    k_ref = np.fft.rfftfreq(nx, d=dx_ref)[1:]
    win = np.hanning(nx)
    wnorm = (win**2).mean()
    t = np.arange(nx) - (nx - 1) / 2
    acc = np.zeros_like(k_ref)
    count = 0
    for j in range(ny):
        rows = f[:, j, :]
        rows = rows[np.all(np.isfinite(rows), axis=1)]
        if rows.size == 0:
            continue
        coef = ((rows - rows.mean(axis=1, keepdims=True)) @ t) / (t @ t)
        rows = rows - rows.mean(axis=1, keepdims=True) - coef[:, None] * t[None, :]
        spec = np.abs(np.fft.rfft(rows * win, axis=1)) ** 2
        k = np.fft.rfftfreq(nx, d=dxs[j])
        psd = 2 * spec * dxs[j] / (nx * wnorm)
        psd = psd.mean(axis=0)[1:]
        acc += np.interp(k_ref, k[1:], psd) if dxs[j] != dx_ref else psd
        count += 1
    if count == 0:
        raise NumericalError("zonal_spectrum: every row holds NaN")
    return k_ref, acc / count


def spectral_slope(k: np.ndarray, psd: np.ndarray, band_km: tuple[float, float] = (50.0, 250.0)) -> float:
    """Least-squares slope of ``log psd`` vs ``log k`` for wavelengths ``1/k`` in ``band_km``."""
    lo, hi = band_km
    sel = (k >= 1.0 / hi) & (k <= 1.0 / lo) & (psd > 0)
    if sel.sum() < 3:
        raise NumericalError(f"spectral_slope: fewer than 3 wavenumbers in the band {band_km} km")
    return float(np.polyfit(np.log(k[sel]), np.log(psd[sel]), 1)[0])
