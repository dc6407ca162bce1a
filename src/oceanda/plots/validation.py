"""Figures of the validation experiments, after Blanke et al. (2024) Figures 1-3.

* :func:`plot_reconstructions` -- reconstructed trajectories of a few test windows, one
  row per window, one column per state component (plus a phase portrait for 2-D systems):
  truth, observations and each method (Figures 1 and 2);
* :func:`plot_var4d_inits` -- 4D-Var output from two initialisations on one window, with
  the cost against Gauss-Newton iterations (Figure 3);
* :func:`plot_training` -- training loss per epoch;
* :func:`plot_scan` -- RMSE of every method against the model time step (the dt scan),
  the particle smoother as the floor.

All functions write one PNG with the Agg backend and return its path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

STYLE = {
    "truth": dict(color="black", lw=2.0, label="truth"),
    "z0": dict(color="tab:gray", ls=":", lw=1.4, label="first guess z0"),
    "var4d": dict(color="tab:blue", ls="--", lw=1.4, label="4D-Var"),
    "cold_diffusion": dict(color="tab:orange", ls="-.", lw=1.4, label="cold diffusion"),
    "neural": dict(color="tab:red", lw=1.4, label="neural assimilation"),
    "neural_var4d": dict(color="tab:green", ls="--", lw=1.2, label="neural + 4D-Var polish"),
    "var4d_from_truth": dict(color="tab:cyan", ls=":", lw=1.4, label="4D-Var from the truth"),
    "var4d_strong": dict(color="tab:purple", ls="--", lw=1.2, label="4D-Var near-strong"),
    "neural_var4d_strong": dict(color="tab:olive", ls="--", lw=1.2, label="neural + near-strong polish"),
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from oceanda.data.files import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=Path(path).suffix.lstrip(".") or "png")
    return Path(path)


def plot_reconstructions(path, time, truth, y, mask, estimates: dict, labels: list[str], title: str,
                         phase_portrait: bool = False) -> Path:
    """``truth``, ``y``, ``mask`` ``(n, T, phi)`` (physical units), ``estimates`` method ->
    ``(n, T, phi)``; ``labels`` names the ``phi`` components."""
    plt = _plt()
    truth, y, mask = (np.asarray(a) for a in (truth, y, mask))
    n, T, phi = truth.shape
    ncol = phi + (1 if phase_portrait else 0)
    fig, axes = plt.subplots(n, ncol, figsize=(3.6 * ncol, 2.4 * n), squeeze=False)
    for i in range(n):
        for c in range(phi):
            ax = axes[i, c]
            ax.plot(time, truth[i, :, c], **STYLE["truth"])
            for name, est in estimates.items():
                ax.plot(time, np.asarray(est)[i, :, c], **STYLE.get(name, dict(label=name)))
            obs = mask[i, :, c]
            if obs.any():
                ax.plot(time[obs], y[i, obs, c], "o", color="black", mfc="white", ms=5, label="observations")
            if i == 0:
                ax.set_title(labels[c])
            if i == n - 1:
                ax.set_xlabel("time")
        if phase_portrait:
            ax = axes[i, phi]
            ax.plot(truth[i, :, 0], truth[i, :, 1], **STYLE["truth"])
            for name, est in estimates.items():
                e = np.asarray(est)
                ax.plot(e[i, :, 0], e[i, :, 1], **STYLE.get(name, dict(label=name)))
            if i == 0:
                ax.set_title("phase portrait")
            ax.set_xlabel(labels[0])
            ax.set_ylabel(labels[1])
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=len(names), bbox_to_anchor=(0.5, 1.0 + 0.04 / n))
    fig.suptitle(title, y=1.0 + 0.09 / n)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_var4d_inits(path, time, truth, y, mask, runs: dict, labels: list[str], title: str) -> Path:
    """One window: ``runs`` name -> ``(estimate (T, phi), start (T, phi), iterations,
    cost history (list of float))``; truth/y/mask ``(T, phi)``."""
    plt = _plt()
    truth, y, mask = (np.asarray(a) for a in (truth, y, mask))
    T, phi = truth.shape
    fig, axes = plt.subplots(1, phi + 1, figsize=(3.8 * (phi + 1), 3.2), squeeze=False)
    colors = ["tab:blue", "tab:green", "tab:purple", "tab:brown"]
    for c in range(phi):
        ax = axes[0, c]
        ax.plot(time, truth[:, c], **STYLE["truth"])
        for (name, (est, start, iters, _)), col in zip(runs.items(), colors):
            ax.plot(time, np.asarray(start)[:, c], ls=":", color=col, lw=1.0, label=f"start: {name}")
            ax.plot(time, np.asarray(est)[:, c], ls="--", color=col, lw=1.5, label=f"4D-Var from {name} ({iters} it.)")
        obs = mask[:, c]
        if obs.any():
            ax.plot(time[obs], y[obs, c], "o", color="black", mfc="white", ms=5, label="observations")
        ax.set_title(labels[c])
        ax.set_xlabel("time")
    ax = axes[0, phi]
    for (name, (_, _, _, hist)), col in zip(runs.items(), colors):
        h = np.asarray(hist, dtype=float)
        h = h[np.isfinite(h)]
        ax.semilogy(np.arange(len(h)), h, "o-", color=col, ms=3, label=name)
    ax.set_xlabel("Gauss-Newton iteration")
    ax.set_ylabel("4D-Var cost J")
    ax.set_title("cost")
    ax.legend(fontsize=8)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=3, bbox_to_anchor=(0.5, 1.12), fontsize=8)
    fig.suptitle(title, y=1.2)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_training(path, histories: dict, title: str) -> Path:
    """Training loss (mean squared error, normalised units) per epoch for each network."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, h in histories.items():
        if h:
            ax.semilogy(np.arange(1, len(h) + 1), h, label=name, **{k: v for k, v in STYLE.get(name, {}).items()
                                                                    if k == "color"})
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (MSE)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_scan(path, dts, rmse: dict, names: dict, title: str, floor: str = "particle_smoother") -> Path:
    """``rmse`` method -> list of RMSE (one per ``dts`` entry, ``nan`` where missing); the
    ``floor`` method is drawn as a shaded floor (nothing can do better on average)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.8, 4.2))
    x = np.asarray(dts, float)
    if floor in rmse:
        f = np.asarray(rmse[floor], float)
        ax.fill_between(x, 0, f, color="0.85", label=names.get(floor, floor))
        ax.plot(x, f, color="black", lw=2.0)
    markers = "osD^v<>p*hx"
    for i, (m, vals) in enumerate(rmse.items()):
        if m == floor:
            continue
        st = {k: v for k, v in STYLE.get(m, {}).items() if k in ("color", "ls")}
        ax.plot(x, np.asarray(vals, float), marker=markers[i % len(markers)], label=names.get(m, m), **st)
    ax.set_xlabel("model time step dt (window of 32 steps)")
    ax.set_ylabel("RMSE (normalised units)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out
