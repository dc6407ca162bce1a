"""Build an OSSE: synthetic SSH truth, satellite observations and quick-look figures.

usage:
  oceanda generate                                   # gulfstream box, 4nadirs, 2012-10-07..12-17
  oceanda generate domain=gulfstream_train obs=4nadirs_swot period=year out_dir=runs/osse_year
  oceanda generate truth=gaussian truth.length_km=80 out_dir=runs/osse_gauss
  oceanda generate domain=box domain.lon_min=-40 domain.lon_max=-30 domain.lat_min=30 \\
                   domain.lat_max=40 domain.resolution=0.1 period.start=2013-01-01 period.end=2013-01-31

Writes into ``out_dir``:

``truth.zarr``   ``ssh`` (time, lat, lon) [m] daily, NaN on land; ``ocean`` (lat, lon) mask;
``obs.zarr``     ``ssh_obs`` (time, lat, lon) daily gridded observations (NaN unobserved),
                 the along-track table ``track_time/lon/lat/ssh/sat`` on dim ``obs``, ``ocean``;
``figures/``     truth.png, obs_day.png, coverage.png, spectrum.png.

Both stores carry CF attributes and their provenance (the composed config as YAML, the
oceanda version) and the measured diagnostics (SSH std, spectral slope in 50-250 km,
daily observed fraction). Outputs appear only when complete (written under
``*.tmp-<pid>`` and renamed). Truth kinds: ``qg`` (two-layer quasi-geostrophic jet with
eddies, spun up before the period; default), ``gaussian`` (stationary / non-stationary
Gaussian random field), ``spde`` (SPDE prior sample).

Runtime on one CPU core (torch 1 thread, 1/20 deg gulfstream, 4nadirs, measured): the
default (spin-up 365 + 30 days, 72 stored days) about 2 min 15 s; a year (``period=year``)
about 6 min; peak memory ~0.5 GB for both (``python hpc/bench/generate.py``
predicts the truth part). The QG model runs on
a CUDA device when present (``device=auto``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from oceanda.errors import ConfigError

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger("oceanda.generate")


def _plain(node: Any) -> Any:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if OmegaConf.is_config(node):
        try:
            return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"config: {exc}") from None
    return node


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"{key}: mandatory value not set ({key}=...)")
        return _plain(cfg.get(key, default))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _bool(cfg: DictConfig, key: str, default: bool) -> bool:
    value = _get(cfg, key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: must be true or false")
    return value


def run(cfg: DictConfig) -> int:
    """``oceanda generate``: see the module docstring."""
    from omegaconf import OmegaConf

    from oceanda.data.osse import generate_osse

    domain = _get(cfg, "domain")
    obs = _get(cfg, "obs")
    truth = _get(cfg, "truth") or {"kind": "qg"}
    period = _get(cfg, "period")
    if isinstance(period, dict):
        period = {k: v for k, v in period.items() if k in ("start", "end")}
    out_dir = _get(cfg, "out_dir")
    if not out_dir:
        raise ConfigError("out_dir: must be set (out_dir=runs/my_osse)")
    chunk_days = _get(cfg, "chunk_days", 10)
    if not isinstance(chunk_days, int) or isinstance(chunk_days, bool):
        raise ConfigError(f"chunk_days={chunk_days!r}: must be an integer")
    result = generate_osse(
        domain=domain,
        obs=obs,
        period=period,
        out_dir=out_dir,
        truth=truth,
        seed=_get(cfg, "seed", 0),
        figures=_bool(cfg, "figures", True),
        progress=_bool(cfg, "progress", True),
        obs_noise=_bool(cfg, "obs_noise", True),
        chunk_days=chunk_days,
        device=_get(cfg, "device", "auto"),
        overwrite=_bool(cfg, "overwrite", True),
        config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
    )
    stats = result["stats"]
    lines = [f"oceanda generate: wrote {result['truth']}"]
    if "obs" in result:
        lines.append(f"oceanda generate: wrote {result['obs']}")
    if "alongtrack" in result:
        lines.append(f"oceanda generate: wrote {result['alongtrack']}/ (one L3 along-track file a mission)")
    if "figures" in result:
        lines.append(f"oceanda generate: wrote {result['figures']}/")
    lines.append(f"  SSH std {stats['ssh_std_m']:.3f} m, zonal spectral slope (50-250 km) "
                 f"{stats.get('spectral_slope_50_250km', float('nan')):.2f}")
    if "observed_fraction" in stats:
        lines.append(f"  observed fraction {100 * stats['observed_fraction']:.2f} % of ocean cells per day, "
                     f"{stats['n_track_points']} along-track points")
    lines.append(f"  {stats['seconds']:.1f} s")
    print("\n".join(lines))
    return 0
