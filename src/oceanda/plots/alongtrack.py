"""Figures of ``oceanda evaluate alongtrack=...``: along-track spectra and PSD score, the daily
RMSE score, the binned RMSE map (the data challenge 2021a's diagnostics). Built without pyplot;
render with :func:`oceanda.plots.metrics.png_bytes`."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure


def alongtrack_psd_figure(psd, name: str = "analysis") -> Figure:
    """Left: PSD of the reference and the analysis; right: PSD score vs wavelength, lambda_x."""
    fig = Figure(figsize=(10, 4.2))
    a1, a2 = fig.subplots(1, 2)
    k = psd.wavenumber[1:]
    wl = 1.0 / k
    a1.loglog(wl, psd.psd_ref[1:], "k", label="reference (along track)")
    a1.loglog(wl, psd.psd_study[1:], "g", label=name)
    a1.loglog(wl, psd.psd_diff[1:], "r", lw=0.8, label="error")
    a1.invert_xaxis()
    a1.set_xlabel("wavelength [km]")
    a1.set_ylabel("PSD [m$^2$ / (cy/km)]")
    a1.legend(fontsize=8)
    a1.grid(True, which="both", lw=0.3)
    a2.semilogx(wl, psd.score[1:], "k", lw=2)
    a2.axhline(0.5, color="r", lw=0.6, ls="--")
    if psd.lambda_x_km is not None:
        a2.axvline(psd.lambda_x_km, color="g", lw=0.8)
        a2.set_title(f"lambda_x = {psd.lambda_x_km:.0f} km ({psd.n_segments} segments of {psd.npt} points)",
                     fontsize=9)
    else:
        a2.set_title("PSD score does not cross 0.5", fontsize=9)
    a2.invert_xaxis()
    a2.set_ylim(-0.1, 1.05)
    a2.set_xlabel("wavelength [km]")
    a2.set_ylabel("PSD score 1 - PSD(err)/PSD(ref)")
    a2.grid(True, which="both", lw=0.3)
    fig.tight_layout()
    return fig


def alongtrack_time_figure(series, name: str = "analysis") -> Figure:
    """Daily RMSE score along track and the number of points per day."""
    fig = Figure(figsize=(10, 4.2))
    a1, a2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    t = series.bin_start
    a1.plot(t, series.score, "k.-", lw=0.8, ms=3)
    a1.set_ylabel("1 - RMSE/RMS(ref)")
    a1.set_title(f"{name}: mu = {series.mu:.3f}, sigma = {series.sigma:.3f}", fontsize=9)
    a1.grid(True, lw=0.3)
    a2.step(t, series.count, "grey", where="post")
    a2.set_ylabel("# points")
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def alongtrack_map_figure(bins, name: str = "analysis") -> Figure:
    """RMSE of (analysis - reference) in lon/lat bins."""
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.subplots()
    rm = np.ma.masked_invalid(bins["rmse"])
    pc = ax.pcolormesh(bins["lon_edges"], bins["lat_edges"], rm, cmap="Reds", shading="flat")
    fig.colorbar(pc, ax=ax, label="RMSE [m]")
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_title(f"{name}: along-track RMSE", fontsize=9)
    fig.tight_layout()
    return fig
