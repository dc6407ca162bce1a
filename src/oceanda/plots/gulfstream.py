"""Figure of a Gulf Stream truth: one day of SSH, the time-mean SSH with the mean jet axis,
and the SSH anomaly std (matplotlib, Agg backend; numpy inputs only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def truth_panels(path: str | Path, lon: np.ndarray, lat: np.ndarray, snapshot: np.ndarray, mean: np.ndarray,
                 std: np.ndarray, axis: np.ndarray | None = None, title: str = "", day_label: str = "",
                 dpi: int = 80) -> Path:
    """Write ``path``: ``snapshot`` (one day, with 10 cm contours), ``mean`` (time-mean SSH, with
    the mean jet axis ``axis`` ``(nx,)`` when given) and ``std``, each ``(ny, nx)`` [m]."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.2), constrained_layout=True)
    ext = (float(lon[0]), float(lon[-1]), float(lat[0]), float(lat[-1]))
    lim = float(np.nanmax(np.abs(np.concatenate([snapshot.ravel(), mean.ravel()]))))
    levels = np.arange(-np.ceil(lim * 10) / 10, np.ceil(lim * 10) / 10 + 1e-9, 0.1)
    for ax, f, name in ((axes[0], snapshot, f"SSH {day_label} [m]"), (axes[1], mean, "time-mean SSH [m]")):
        im = ax.imshow(f, origin="lower", extent=ext, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.contour(lon, lat, f, levels=levels, colors="k", linewidths=0.4)
        ax.set_title(name)
        fig.colorbar(im, ax=ax, shrink=0.9)
    if axis is not None:
        axes[1].plot(lon, axis, "y-", lw=1.5, label="mean jet axis")
        axes[1].legend(loc="lower right", fontsize=8)
    im = axes[2].imshow(std, origin="lower", extent=ext, cmap="viridis", aspect="auto")
    axes[2].set_title("SSH anomaly std [m]")
    fig.colorbar(im, ax=axes[2], shrink=0.9)
    for ax in axes:
        ax.set_xlabel("lon [deg E]")
    axes[0].set_ylabel("lat [deg N]")
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
