"""Figures of ``oceanda evaluate``: PSD-score curves, error maps, daily score.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (no
global state, Agg canvas); :func:`png_bytes` renders one, so that a caller can render
all figures before writing any file.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, NullFormatter

from oceanda.data import names as N


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    """The figure rendered as PNG."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _log_ticks(axis) -> None:
    """Plain numbers on a log axis: major ticks as %g, no minor labels."""
    axis.set_major_formatter(FormatStrFormatter("%g"))
    axis.set_minor_formatter(NullFormatter())


def _fmt(v: float | None, unit: str) -> str:
    return "no finite value" if v is None else f"{v:.2f} {unit}"


def psd_score_figure(psd, name: str = "analysis") -> Figure:
    """PSD score ``1 - PSD(err)/PSD(truth)`` in wavelength space and its two 1-D curves.

    Args:
        psd: :class:`oceanda.metrics.PsdScores`.
        name: method name for the title.
    """
    fig = Figure(figsize=(14, 4.4), layout="constrained")
    ax2d, axx, axt = fig.subplots(1, 3)
    wl_x = psd.score["wavelength_lon"].values
    wl_t = psd.score["wavelength_time"].values
    score = np.clip(psd.score.values, -0.5, 1.0)
    mesh = ax2d.pcolormesh(wl_x, wl_t, score, shading="nearest", cmap="RdYlGn", vmin=0.0, vmax=1.0)
    if np.nanmin(psd.score.values) < 0.5 < np.nanmax(psd.score.values):
        ax2d.contour(wl_x, wl_t, psd.score.values, levels=[0.5], colors="k", linewidths=1.5)
    if psd.lambda_x_deg is not None and psd.lambda_t_days is not None:
        ax2d.axvline(psd.lambda_x_deg, color="k", ls="--", lw=0.8)
        ax2d.axhline(psd.lambda_t_days, color="k", ls="--", lw=0.8)
    ax2d.set(xscale="log", yscale="log", xlabel="wavelength in longitude [deg]", ylabel="period [days]",
             title="PSD score (0.5 contour)")
    _log_ticks(ax2d.xaxis)
    _log_ticks(ax2d.yaxis)
    fig.colorbar(mesh, ax=ax2d, label="1 - PSD(err) / PSD(truth)")
    for ax, curve, coord, lam, unit, label in (
        (axx, psd.score_lon, "wavelength_lon", psd.lambda_x_deg, "deg", "wavelength in longitude [deg]"),
        (axt, psd.score_time, "wavelength_time", psd.lambda_t_days, "days", "period [days]"),
    ):
        ax.semilogx(curve[coord].values, curve.values, "o-", ms=3, color="tab:blue")
        ax.axhline(0.5, color="k", lw=0.8)
        if lam is not None:
            ax.axvline(lam, color="tab:red", ls="--", lw=1.0, label=f"lambda = {lam:.2f} {unit}")
            ax.legend(loc="lower right")
        ax.set(xlabel=label, ylabel="PSD score (marginal)", ylim=(min(-0.1, float(np.nanmin(curve.values))), 1.05))
        ax.grid(True, which="both", alpha=0.3)
        _log_ticks(ax.xaxis)
    axx.set_title("vs wavelength (PSDs summed over periods)")
    axt.set_title("vs period (PSDs summed over wavelengths)")
    fig.suptitle(f"{name}: lambda_x = {_fmt(psd.lambda_x_deg, 'deg')}, lambda_t = {_fmt(psd.lambda_t_days, 'days')}")
    return fig


def _map(ax, fig, da, title, cmap, vmin=None, vmax=None, label="m"):
    lon, lat = da[N.LON].values, da[N.LAT].values
    mesh = ax.pcolormesh(lon, lat, np.asarray(da.values), shading="nearest", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set(title=title, xlabel="longitude [deg]", ylabel="latitude [deg]", aspect=1.0 / np.cos(np.deg2rad(lat.mean())))
    fig.colorbar(mesh, ax=ax, label=label, shrink=0.85)


def error_maps_figure(truth, analysis, rmse, name: str = "analysis", day: int | None = None, ocean=None) -> Figure:
    """Truth, analysis and error on one day, and the RMSE map over the period.

    Args:
        truth, analysis: ``(time, lat, lon)`` DataArrays of the evaluated block.
        rmse: :class:`oceanda.metrics.RmseScores` (for the RMSE map).
        day: index of the snapshot day (default: the middle one).
        ocean: optional ``(lat, lon)`` mask; land is left blank.
    """
    day = truth.sizes[N.TIME] // 2 if day is None else day
    t = truth.isel({N.TIME: day}).compute()
    a = analysis.isel({N.TIME: day}).compute()
    if ocean is not None:
        t, a = t.where(ocean != 0), a.where(ocean != 0)
    when = str(np.datetime_as_string(t[N.TIME].values, unit="D")) if np.issubdtype(t[N.TIME].dtype, np.datetime64) else f"t = {t[N.TIME].values}"
    lo, hi = np.nanpercentile(np.asarray(t.values), [1, 99]) if np.isfinite(t.values).any() else (0.0, 1.0)
    err = a - t
    emax = float(np.nanmax(np.abs(err.values))) if np.isfinite(err.values).any() else 1.0
    fig = Figure(figsize=(16, 4.2), layout="constrained")
    axes = fig.subplots(1, 4)
    _map(axes[0], fig, t, f"truth SSH, {when}", "viridis", lo, hi)
    _map(axes[1], fig, a, f"{name} SSH, {when}", "viridis", lo, hi)
    _map(axes[2], fig, err, f"error ({name} - truth), {when}", "RdBu_r", -emax, emax)
    _map(axes[3], fig, rmse.rmse_xy, "RMSE over the period", "magma_r", 0.0, None)
    fig.suptitle(f"{name}: RMSE = {rmse.rmse_m:.4f} m, mu = {rmse.mu:.3f}")
    return fig


def score_time_figure(rmse, name: str = "analysis") -> Figure:
    """The daily score ``1 - RMSE_t / RMS_t`` (its std over time is sigma_t) and RMSE_t."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax = fig.subplots()
    time = rmse.score_t[N.TIME].values
    ax.plot(time, rmse.score_t.values, "o-", ms=3, label="1 - RMSE(t) / RMS(t)")
    ax.axhline(rmse.mu, color="k", ls="--", lw=0.8, label=f"mu = {rmse.mu:.3f}")
    ax.set(ylabel="daily score", title=f"{name}: daily RMSE score, sigma_t = {rmse.sigma_t:.3f}")
    ax2 = ax.twinx()
    ax2.plot(time, rmse.rmse_t.values, color="tab:red", lw=0.8, alpha=0.7)
    ax2.set_ylabel("RMSE(t) [m]", color="tab:red")
    ax.legend(loc="lower left")
    ax.grid(True, alpha=0.3)
    fig.autofmt_xdate()
    return fig
