"""Quick-look figures of an OSSE (matplotlib, Agg backend; numpy inputs only).

:func:`quicklook` writes into a folder:

- ``truth.png``     SSH snapshot with land in grey;
- ``obs_day.png``   one day of observations: along-track samples coloured by value over
                    the gridded daily observations;
- ``coverage.png``  fraction of days each cell is observed;
- ``spectrum.png``  zonal wavenumber spectrum of the truth with the least-squares slope
                    in the 50-250 km band and k^-4, k^-5 reference lines.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _land(ax, lon, lat, ocean) -> None:
    if ocean is not None and not np.all(ocean):
        land = np.where(ocean, np.nan, 1.0)
        ax.pcolormesh(lon, lat, land, cmap="Greys", vmin=0, vmax=1.6, shading="auto")


def _decorate(ax, title: str) -> None:
    ax.set_xlabel("longitude [deg E]")
    ax.set_ylabel("latitude [deg N]")
    ax.set_title(title, fontsize=10)
    ax.set_aspect(1.0 / np.cos(np.deg2rad(np.mean(ax.get_ylim()))))


def plot_field(path: str | os.PathLike, lon, lat, field, ocean=None, title: str = "", label: str = "SSH [m]",
               cmap: str = "RdBu_r", symmetric: bool = False) -> Path:
    """Map of a 2-D field ``(ny, nx)``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    f = np.asarray(field, dtype=float)
    finite = f[np.isfinite(f)]
    vmin, vmax = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    if symmetric:
        m = max(abs(vmin), abs(vmax))
        vmin, vmax = -m, m
    im = ax.pcolormesh(lon, lat, f, cmap=cmap, vmin=vmin, vmax=vmax, shading="auto")
    _land(ax, lon, lat, ocean)
    fig.colorbar(im, ax=ax, label=label, shrink=0.85)
    _decorate(ax, title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_obs_day(path: str | os.PathLike, lon, lat, gridded, tracks=None, ocean=None, title: str = "",
                 vlim: tuple[float, float] | None = None) -> Path:
    """One day of observations: gridded cells and, if given, the along-track samples
    ``tracks = (lon, lat, value)``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    g = np.asarray(gridded, dtype=float)
    vals = g[np.isfinite(g)]
    if tracks is not None and len(tracks[2]):
        vals = np.concatenate([vals, np.asarray(tracks[2], float)])
    if vlim is None:
        vlim = tuple(np.percentile(vals, [1, 99])) if vals.size else (-1.0, 1.0)
    im = ax.pcolormesh(lon, lat, g, cmap="RdBu_r", vmin=vlim[0], vmax=vlim[1], shading="auto")
    if tracks is not None and len(tracks[0]):
        ax.scatter(tracks[0], tracks[1], c=tracks[2], s=2, cmap="RdBu_r", vmin=vlim[0], vmax=vlim[1],
                   linewidths=0)
    _land(ax, lon, lat, ocean)
    ax.set_xlim(lon[0], lon[-1])
    ax.set_ylim(lat[0], lat[-1])
    fig.colorbar(im, ax=ax, label="observed SSH [m]", shrink=0.85)
    frac = np.isfinite(g).mean() if g.size else 0.0
    _decorate(ax, f"{title}\n{100 * frac:.1f} % of the cells observed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_spectrum(path: str | os.PathLike, k, psd, band_km=(50.0, 250.0), title: str = "") -> Path:
    """Log-log zonal spectrum with the fitted slope in ``band_km`` [km]."""
    from oceanda.dynamics.qg import spectral_slope

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 4.6))
    k = np.asarray(k)
    psd = np.asarray(psd)
    ax.loglog(k, psd, color="k", lw=1.5, label="truth")
    sel = (k >= 1 / band_km[1]) & (k <= 1 / band_km[0]) & (psd > 0)
    if sel.sum() >= 3:
        slope = spectral_slope(k, psd, band_km)
        c = np.polyfit(np.log(k[sel]), np.log(psd[sel]), 1)
        ax.loglog(k[sel], np.exp(np.polyval(c, np.log(k[sel]))), color="tab:red", lw=2.5, alpha=0.7,
                  label=f"fit {band_km[0]:g}-{band_km[1]:g} km: k^{slope:.2f}")
        k0, p0 = k[sel][0], np.exp(np.polyval(c, np.log(k[sel][0])))
        for s, ls in ((-4, "--"), (-5, ":")):
            ax.loglog(k[sel], p0 * (k[sel] / k0) ** s, color="0.5", ls=ls, lw=1, label=f"k^{s}")
    for b in band_km:
        ax.axvline(1 / b, color="0.8", lw=0.8)
    ax.set_xlabel("zonal wavenumber [cycles/km]")
    ax.set_ylabel("PSD [m$^2$ / (cycles/km)]")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    sec = ax.secondary_xaxis("top", functions=(lambda x: 1 / np.maximum(x, 1e-12), lambda x: 1 / np.maximum(x, 1e-12)))
    kpos = k[k > 0]
    ticks = [w for w in (1000, 500, 250, 100, 50, 25, 10) if kpos.size and kpos.min() <= 1 / w <= kpos.max()]
    sec.set_xticks(ticks, labels=[str(w) for w in ticks])
    sec.xaxis.set_minor_formatter(NullFormatter())
    sec.set_xlabel("wavelength [km]")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def quicklook(out_dir: str | os.PathLike, lon, lat, ocean, truth_field, day_label: str, obs_field=None,
              tracks=None, coverage=None, spectrum=None, title: str = "") -> list[Path]:
    """Write the OSSE quick-look figures into ``out_dir`` (see the module docstring)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if truth_field is not None:
        paths.append(plot_field(out / "truth.png", lon, lat, truth_field, ocean,
                                title=f"{title}\ntruth SSH, {day_label}"))
        vlim = tuple(np.nanpercentile(truth_field, [1, 99])) if np.isfinite(truth_field).any() else None
    else:
        vlim = None
    if obs_field is not None:
        paths.append(plot_obs_day(out / "obs_day.png", lon, lat, obs_field, tracks, ocean,
                                  title=f"{title}\nobservations, {day_label}", vlim=vlim))
    if coverage is not None:
        cov = np.where(ocean, coverage, np.nan) if ocean is not None else coverage
        paths.append(plot_field(out / "coverage.png", lon, lat, cov, ocean, cmap="viridis",
                                label="fraction of days observed",
                                title=f"{title}\nobservation coverage (mean {100 * np.nanmean(cov):.1f} % / day)"))
    if spectrum is not None:
        paths.append(plot_spectrum(out / "spectrum.png", spectrum[0], spectrum[1], title=f"{title}\nzonal SSH spectrum"))
    return paths
