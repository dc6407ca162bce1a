"""Gaussian random SSH fields: stationary (spectral synthesis) and non-stationary variants.

Stationary, separable space-time covariance (distances ``r`` in km, lags ``tau`` in days)::

    C(r, tau) = sigma^2  rho_s(r)  rho_t(tau)

    rho_s(r) = exp(-r^2 / (2 L^2))                                   covariance = "gaussian"
    rho_s(r) = 2^(1-nu) / Gamma(nu) (kappa r)^nu K_nu(kappa r),      covariance = "matern",
               kappa = sqrt(2 nu) / L
    rho_t(tau) = exp(-|tau| / T)                                     time_kernel = "exponential"
    rho_t(tau) = exp(-tau^2 / (2 T^2))                               time_kernel = "gaussian"

Spatial synthesis on a periodic plane larger than the output grid (circulant embedding):
a white field's Fourier coefficients are multiplied by ``sqrt(S(K))`` with the 2-D spectral
density ``S(K) ~ exp(-K^2 L^2 / 2)`` (Gaussian) or ``(kappa^2 + K^2)^-(nu + 1)`` (Matern,
Whittle 1954), normalised so the variance is exactly ``sigma^2`` on the plane. The implied
covariance is the periodic sum of ``C``, equal to ``C`` up to ``exp(-margin / L)``-small
terms (tested against the closed forms). Time: an exact AR(1) recursion per Fourier mode
(exponential) or a Gaussian moving average of white fields over a window of
``+-4 T / sqrt(2)`` days (gaussian); both stream one day at a time (memory independent of
the number of days).

Non-stationary variant: ``x(s) = sigma(s) * sum_j w_j(s) z_j(s)`` with independent
stationary unit fields ``z_j`` of length scales ``L_j`` (geometric ladder between ``L`` and
``L * length_ratio``), weights ``w_j(s) >= 0`` with ``sum_j w_j(s)^2 = 1`` selecting the
local scale ``L(s)`` (so ``Var x(s) = sigma(s)^2`` exactly). ``sigma(s)`` and ``L(s)`` vary
log-linearly from the south edge (``sigma``, ``L``) to the north edge
(``sigma * std_ratio``, ``L * length_ratio``).

References: Lantuejoul (2002), *Geostatistical Simulation*, ch. 15 (spectral methods);
Higdon (2002) for process-convolution / blended non-stationary fields.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from oceanda.dynamics.qg import GridMapping, SpectralSampler, fast_fft_size
from oceanda.errors import ConfigError


@dataclass(frozen=True)
class GaussianFieldConfig:
    """Parameters of :func:`gaussian_truth` (``configs/truth/gaussian.yaml`` mirrors them).

    Attributes:
        std_m: standard deviation sigma [m].
        length_km: correlation length L [km].
        time_days: correlation time T [days].
        covariance: spatial covariance, "matern" or "gaussian".
        nu: Matern smoothness (0.5: exponential, 1.5, 2.5, ...).
        time_kernel: "exponential" or "gaussian".
        std_ratio, length_ratio: north/south ratios of sigma and L (1, 1: stationary).
        n_scales: number of stationary fields blended in the non-stationary variant.
        dx_km: synthesis grid spacing [km] (None: the output grid's smallest cell size).
        margin_km: periodic-plane margin around the output grid [km] (None: 4 L_max).
        dtype: "float32" or "float64".
    """

    std_m: float = 0.1
    length_km: float = 100.0
    time_days: float = 10.0
    covariance: str = "matern"
    nu: float = 1.5
    time_kernel: str = "gaussian"
    std_ratio: float = 1.0
    length_ratio: float = 1.0
    n_scales: int = 4
    dx_km: float | None = None
    margin_km: float | None = None
    dtype: str = "float64"

    def __post_init__(self) -> None:
        for key in ("std_m", "length_km", "time_days", "nu", "std_ratio", "length_ratio"):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"truth.{key}={v!r}: must be a positive number")
        if self.covariance not in ("matern", "gaussian"):
            raise ConfigError(f"truth.covariance={self.covariance!r}: one of matern, gaussian")
        if self.time_kernel not in ("exponential", "gaussian"):
            raise ConfigError(f"truth.time_kernel={self.time_kernel!r}: one of exponential, gaussian")
        if int(self.n_scales) != self.n_scales or self.n_scales < 1:
            raise ConfigError(f"truth.n_scales={self.n_scales}: must be an integer >= 1")
        if self.dx_km is not None and not self.dx_km > 0:
            raise ConfigError(f"truth.dx_km={self.dx_km}: must be > 0")
        if self.margin_km is not None and not self.margin_km >= 0:
            raise ConfigError(f"truth.margin_km={self.margin_km}: must be >= 0")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"truth.dtype={self.dtype!r}: must be float32 or float64")


# ----------------------------------------------------------------------------- closed forms
def spatial_correlation(r_km: np.ndarray, length_km: float, kind: str = "matern", nu: float = 1.5) -> np.ndarray:
    """``rho_s(r)`` (see the module docstring), ``r`` in km."""
    r = np.abs(np.asarray(r_km, dtype=np.float64))
    if kind == "gaussian":
        return np.exp(-(r**2) / (2 * length_km**2))
    from scipy.special import gamma, kv

    kr = math.sqrt(2 * nu) * r / length_km
    with np.errstate(invalid="ignore"):
        out = 2 ** (1 - nu) / gamma(nu) * kr**nu * kv(nu, kr)
    return np.where(kr == 0, 1.0, out)


def temporal_correlation(tau_days: np.ndarray, time_days: float, kernel: str = "gaussian") -> np.ndarray:
    """``rho_t(tau)``, ``tau`` in days."""
    t = np.abs(np.asarray(tau_days, dtype=np.float64))
    if kernel == "exponential":
        return np.exp(-t / time_days)
    return np.exp(-(t**2) / (2 * time_days**2))


def spectral_density(K2: torch.Tensor, length: float, kind: str, nu: float) -> torch.Tensor:
    """Unnormalised 2-D spectral density ``S(K)`` of ``rho_s`` at squared wavenumbers
    ``K2`` [rad^2 / length-unit^2] (``length`` in the same unit)."""
    if kind == "gaussian":
        return torch.exp(-K2 * length**2 / 2)
    kappa2 = 2 * nu / length**2
    return (kappa2 + K2) ** (-(nu + 1))


# ----------------------------------------------------------------------------- synthesis
class PeriodicGaussianField:
    """Stationary Gaussian fields on a periodic ``(ny, nx)`` plane of spacing ``(dy, dx)`` km.

    ``amplitude`` ``(ny, nx//2 + 1)`` holds ``sqrt(S)`` normalised so that a field
    ``irfft2(amplitude * rfft2(w))`` of white noise ``w ~ N(0, I)`` has unit variance at
    every point. Its covariance is :meth:`torus_correlation`.
    """

    def __init__(self, ny: int, nx: int, dy: float, dx: float, length: float, kind: str, nu: float,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64) -> None:
        self.ny, self.nx, self.dy, self.dx = ny, nx, dy, dx
        self.device, self.dtype = torch.device(device), dtype
        k = 2 * math.pi * torch.fft.rfftfreq(nx, d=dx, dtype=torch.float64)
        l = 2 * math.pi * torch.fft.fftfreq(ny, d=dy, dtype=torch.float64)
        K2 = k[None, :] ** 2 + l[:, None] ** 2
        S = spectral_density(K2, length, kind, nu)
        # Var = (1/N) sum_full S_norm for the unitary-normalised synthesis: normalise on the full grid
        w = torch.full((k.numel(),), 2.0, dtype=torch.float64)
        w[0] = 1.0
        if nx % 2 == 0:
            w[-1] = 1.0
        total = float((w[None, :] * S).sum())
        self.amplitude = torch.sqrt(S / total * (nx * ny)).to(self.device, dtype)

    def sample_hat(self, generator: torch.Generator) -> torch.Tensor:
        """rfft2 coefficients ``(ny, nk)`` of a unit-variance sample (white noise drawn on
        the CPU from ``generator``, so results do not depend on the device)."""
        w = torch.randn((self.ny, self.nx), generator=generator, dtype=torch.float64)
        wh = torch.fft.rfft2(w.to(self.device, self.dtype))
        return wh * self.amplitude

    def field(self, fh: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfft2(fh, s=(self.ny, self.nx))

    def torus_correlation(self) -> torch.Tensor:
        """Exact correlation ``(ny, nx)`` between point ``(0, 0)`` and point ``(j, i)`` of the
        synthesised fields: ``irfft2(amplitude^2) / (nx ny) * ...`` (unit at lag 0)."""
        c = torch.fft.irfft2(self.amplitude.to(torch.float64) ** 2, s=(self.ny, self.nx))
        return c / c[0, 0]


def _time_weights(time_days: float) -> np.ndarray:
    """Moving-average weights ``w_s ~ exp(-s^2 / T^2)``, ``|s| <= 4 T / sqrt(2)``, with
    ``sum w^2 = 1``: the MA of white fields has correlation ``~ exp(-tau^2 / (2 T^2))``."""
    half = max(int(math.ceil(4 * time_days / math.sqrt(2))), 1)
    s = np.arange(-half, half + 1, dtype=np.float64)
    w = np.exp(-(s**2) / time_days**2)
    return w / np.sqrt((w**2).sum())


def gaussian_truth(lon: np.ndarray, lat: np.ndarray, days: int, seed: int = 0,
                   cfg: GaussianFieldConfig | None = None, device: str | torch.device = "cpu"
                   ) -> Iterator[np.ndarray]:
    """Daily Gaussian SSH [m] on the lon/lat grid: yields ``days`` arrays ``(ny, nx)`` float32.

    Points are placed on the synthesis plane by the same sinusoidal mapping as the QG truth
    (``x = R cos(lat) (lon - lon_c)``, ``y = R (lat - lat_c)``), so covariances hold in km.
    Reproducible from ``seed`` (``torch.Generator`` on the CPU).
    """
    cfg = cfg or GaussianFieldConfig()
    if int(days) != days or days < 1:
        raise ConfigError(f"period: number of days must be >= 1, got {days}")
    lon = np.asarray(lon, dtype=np.float64)
    lat = np.asarray(lat, dtype=np.float64)
    dtype = torch.float32 if cfg.dtype == "float32" else torch.float64
    mapping = GridMapping(lon_c=0.5 * (lon[0] + lon[-1]), lat_c=0.5 * (lat[0] + lat[-1]))
    x, y = mapping.xy(lon, lat)
    x, y = x / 1e3, y / 1e3  # km
    if cfg.dx_km is None:
        dxs = [np.min(np.abs(np.diff(x, axis=1))) if x.shape[1] > 1 else np.inf,
               np.min(np.abs(np.diff(y, axis=0))) if y.shape[0] > 1 else np.inf]
        dx = float(min(dxs)) if np.isfinite(min(dxs)) else cfg.length_km / 4
    else:
        dx = float(cfg.dx_km)
    dx = min(dx, cfg.length_km * min(1.0, cfg.length_ratio) / 3)  # resolve the shortest scale
    lengths = (cfg.length_km * cfg.length_ratio ** np.linspace(0, 1, int(cfg.n_scales))
               if cfg.length_ratio != 1.0 else np.array([cfg.length_km]))
    margin = 4 * float(lengths.max()) if cfg.margin_km is None else float(cfg.margin_km)
    nx = fast_fft_size(2 * (np.abs(x).max() + margin + 2 * dx) / dx)
    ny = fast_fft_size(2 * (np.abs(y).max() + margin + 2 * dx) / dx)
    fields = [PeriodicGaussianField(ny, nx, dx, dx, float(L), cfg.covariance, cfg.nu, device=device, dtype=dtype)
              for L in lengths]
    sampler = SpectralSampler((ny, nx, dx, dx), x, y, factor=1)
    # non-stationary modulation on the output grid: sigma(s), blend weights w_j(s)
    frac = (y - y.min()) / max(y.max() - y.min(), 1e-12)  # 0 south .. 1 north
    sigma = cfg.std_m * cfg.std_ratio**frac
    if len(lengths) > 1:
        target = np.log(cfg.length_km * cfg.length_ratio**frac)
        ll = np.log(lengths)
        # piecewise-linear hat weights in log L, then normalised to sum of squares 1
        wts = np.stack([np.interp(target.ravel(), ll, np.eye(len(ll))[j]).reshape(target.shape)
                        for j in range(len(ll))])
        wts = wts / np.sqrt((wts**2).sum(axis=0, keepdims=True))
    else:
        wts = np.ones((1, *x.shape))
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if cfg.time_kernel == "exponential":
        a = math.exp(-1.0 / cfg.time_days)
        state = [f.sample_hat(gen) for f in fields]
        for _ in range(int(days)):
            yield _combine(sampler, state, wts, sigma)
            state = [a * s + math.sqrt(1 - a * a) * f.sample_hat(gen) for s, f in zip(state, fields)]
    else:
        w = _time_weights(cfg.time_days)
        window = [[f.sample_hat(gen) for f in fields] for _ in range(len(w))]
        for _ in range(int(days)):
            state = [sum(float(w[i]) * window[i][j] for i in range(len(w))) for j in range(len(fields))]
            yield _combine(sampler, state, wts, sigma)
            window.pop(0)
            window.append([f.sample_hat(gen) for f in fields])


def _combine(sampler: SpectralSampler, state: list[torch.Tensor], wts: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    out = np.zeros(sampler.shape_out)
    for j, fh in enumerate(state):
        out += wts[j] * sampler(fh)
    return (sigma * out).astype(np.float32)
