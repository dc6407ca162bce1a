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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from oceanda.cli.schema import GenerateConfig

log = logging.getLogger("oceanda.generate")


def register_truths() -> None:
    """Add the truth kinds of layers above ``data`` to :data:`oceanda.data.osse.TRUTH_KINDS`:
    ``spde`` (:func:`oceanda.priors.spde_truth.spde_truth`)."""
    from oceanda.data.osse import TRUTH_KINDS, register_truth

    if "spde" not in TRUTH_KINDS:
        from oceanda.priors.spde_truth import spde_truth

        register_truth("spde", spde_truth)


def quicklook(draw: bool):
    """The ``figures`` argument of :func:`oceanda.data.osse.generate_osse`: the quick-look
    figures of :mod:`oceanda.plots.osse` when ``draw``, else None."""
    if not draw:
        return None
    from oceanda.plots.osse import quicklook as draw_quicklook

    return draw_quicklook


#: the keys of the typed config passed to :func:`oceanda.data.osse.generate_osse` as they are
_PASSED = ("domain", "obs", "period", "out_dir", "truth", "seed", "progress", "obs_noise", "chunk_days",
           "device", "overwrite")


def run(cfg: GenerateConfig) -> int:
    """``oceanda generate``: see the module docstring."""
    from oceanda.data.files import check_out_dir, made_dirs
    from oceanda.data.osse import generate_osse
    from oceanda.parallel.threads import limit_and_log

    check_out_dir(cfg.out_dir)  # a file or a read-only folder: refused before any work
    limit_and_log(None, "auto")
    register_truths()
    with made_dirs(cfg.out_dir):  # a run that fails leaves no empty out_dir behind
        result = generate_osse(figures=quicklook(cfg.figures), config_yaml=cfg.source_yaml,
                               **{k: getattr(cfg, k) for k in _PASSED})
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
