"""Gaussian SSH truth drawn from the SPDE prior (``oceanda generate truth=spde``).

:func:`sample_truth` streams daily fields of one long SPDE trajectory: ``x_0`` from the
stationary initial state, then ``F x_k = x_{k-1} + e_k`` (one sparse solve per day with the
LU factor of ``F = I + dt A^alpha``, computed once), so memory is one factor plus one field
whatever the number of days. Parameters are in kilometres and days; ``std`` sets ``tau``
(:func:`oceanda.priors.spde.tau_for_std`) unless ``tau`` is given. Land cells are no-flux
boundaries and are returned as NaN.

:func:`spde_truth` has the signature of :data:`oceanda.data.osse.TruthFn`
(``grid, days, seed, params, device, progress``) so the OSSE builder can register it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from oceanda.config_dataclass import from_mapping
from oceanda.errors import ConfigError
from oceanda.priors.spde import SPDEPrior, tau_for_std


@dataclass(frozen=True)
class SPDETruthConfig:
    """SPDE truth parameters (lengths in km, time in days, SSH in m)."""

    kappa: float = 0.55     #: 1/sqrt(km^2): range sqrt(8 gamma)/kappa ~ 100 km with gamma
    gamma: float = 375.0    #: isotropic diffusion [km^2 / day^(1/alpha)]
    beta: float = 0.0       #: anisotropic diffusion along v [km^2 ...]
    vx: float = 0.0
    vy: float = 0.0
    mx: float = 0.0         #: advection [km/day]
    my: float = 0.0
    std: float = 0.1        #: marginal std [m] (alpha = 2 continuum formula)
    tau: float | None = None  #: overrides std
    alpha: int = 2
    dt: float = 1.0         #: days per output field
    mean: float = 0.0       #: mean SSH [m]


def sample_truth(dx_km: np.ndarray, dy_km: np.ndarray, ocean: np.ndarray, days: int, *,
                 seed: int = 0, cfg: SPDETruthConfig | None = None,
                 progress: Callable[[str, int], None] | None = None) -> Iterator[np.ndarray]:
    """Yield ``days`` daily SSH fields ``(ny, nx)`` float32 [m] of one SPDE trajectory."""
    cfg = cfg or SPDETruthConfig()
    if int(days) != days or days < 1:
        raise ConfigError(f"truth=spde: days must be an integer >= 1, got {days}")
    ocean = np.asarray(ocean, bool)
    area = float(np.mean((dx_km * dy_km)[ocean])) if ocean.any() else float(np.mean(dx_km * dy_km))
    p = asdict(cfg)
    tau = p.pop("tau")
    std = p.pop("std")
    if tau is None:
        if not std > 0:
            raise ConfigError(f"truth=spde: std must be > 0, got {std}")
        tau = tau_for_std(std, cfg.kappa, cfg.gamma, area) if cfg.gamma > 0 and cfg.kappa > 0 \
            else 1.0
    mean = p.pop("mean")
    alpha, dt = p.pop("alpha"), p.pop("dt")
    prior = SPDEPrior(dx_km, dy_km, ocean, T=2, dt=dt, alpha=alpha, tau=tau, **p)
    rng = np.random.default_rng(seed)
    x = prior.precision.initial(rng.standard_normal(prior.n))  # stationary x_0 = G_0^{-1} z
    land = ~ocean
    for _ in range(int(days)):
        field = (x.reshape(prior.shape) + mean).astype(np.float32)
        field[land] = np.nan
        if progress:
            progress("truth", 1)
        yield field
        x = prior.precision.step(1, x, rng.standard_normal(prior.n))


def spde_truth(grid: Any, days: int, seed: int, params: dict[str, Any], device: str,
               progress: Callable[[str, int], None] | None) -> Iterator[np.ndarray]:
    """:data:`oceanda.data.osse.TruthFn` adapter: ``truth.kind = spde`` (``device`` unused:
    the simulation runs on CPU sparse factors)."""
    cfg = from_mapping(SPDETruthConfig, params, "truth")
    return sample_truth(np.asarray(grid.dx_m) / 1000.0, np.asarray(grid.dy_m) / 1000.0,
                        np.asarray(grid.ocean), days, seed=seed, cfg=cfg, progress=progress)
