"""``oceanda evaluate alongtrack=FILES``: scores of an analysis against independent along-track
data (data challenge 2021a), JSON + figures. Used by :mod:`oceanda.cli.evaluate`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from oceanda import __version__
from oceanda.data import names as N
from oceanda.data.io import open_dataset, require_complete, select_window
from oceanda.errors import InputError

log = logging.getLogger("oceanda.evaluate")

FIGURES = ("alongtrack_psd.png", "alongtrack_score_time.png", "alongtrack_error_map.png")


def format_row(r: dict[str, Any]) -> str:
    lam = "-" if r.get("lambda_x_km") is None else f"{r['lambda_x_km']:.0f}"
    head = f"{'method':<12} {'mu(RMSE)':>9} {'sigma(RMSE)':>12} {'lambda_x [km]':>14} {'RMSE [m]':>9} {'points':>8}"
    row = (f"{r['method']:<12} {r['mu']:>9.3f} {r['sigma']:>12.3f} {lam:>14} {r['rmse_m']:>9.4f} "
           f"{r['n_points']:>8d}")
    return head + "\n" + row


def evaluate_alongtrack_paths(analysis_path: str | Path, alongtrack: Any, *, l3: dict[str, Any] | None = None,
                              options: dict[str, Any] | None = None, period: Sequence[Any] | None = None,
                              box: Sequence[float] | None = None, out_dir: str | Path | None = None,
                              figures: bool = True, name: str | None = None) -> dict[str, Any]:
    """Score ``analysis_path`` against the along-track files ``alongtrack`` (path, glob, list);
    write ``scores_alongtrack.json`` (+ figures) into ``out_dir`` (default: the analysis' folder).

    Raises:
        InputError / ConfigError: bad files or options (nothing is written then).
    """
    from oceanda.data.alongtrack import L3Options, read_points, resolve_paths
    from oceanda.errors import ConfigError
    from oceanda.metrics.alongtrack import (
        AlongTrackOptions,
        alongtrack_scores,
        interp_to_points,
    )

    analysis_path = Path(analysis_path)
    files = resolve_paths(alongtrack)
    try:
        l3opts = L3Options(**(l3 or {}))
        opts = AlongTrackOptions(**(options or {}))
    except TypeError as exc:
        raise ConfigError(f"alongtrack options: {exc}") from None
    ads = open_dataset(analysis_path, [N.SSH])
    require_complete(ads, f"analysis {analysis_path}")
    ssh = select_window(ads[N.SSH], period, box, what=f"analysis {analysis_path}")
    lon, lat, time = ssh[N.LON].values, ssh[N.LAT].values, ssh[N.TIME].values
    if ssh.sizes[N.TIME] < 2:
        raise InputError(f"analysis {analysis_path}: fewer than 2 days in the evaluation window")
    step = np.diff(time.astype("datetime64[ns]").astype(np.int64))
    if (step != 86_400_000_000_000).any():
        raise InputError(f"analysis {analysis_path}: the along-track scores need daily analysis times")
    pts, qc = read_points(files, l3opts, lon=lon, lat=lat, ocean=np.ones((lat.size, lon.size), bool), time=time)
    if pts["ssh"].size == 0:
        raise InputError(f"along-track {', '.join(map(str, files))}: no valid point in the analysis window "
                         f"(lon {lon[0]:.2f}..{lon[-1]:.2f}, lat {lat[0]:.2f}..{lat[-1]:.2f}, "
                         f"{str(time[0])[:10]}..{str(time[-1])[:10]})")
    e0 = lon[0] - 0.5 * (lon[1] - lon[0])
    plon = np.mod(pts["lon"] - e0, 360.0) + e0
    cache: dict[int, np.ndarray] = {}

    def day(k: int) -> np.ndarray:
        if k not in cache:
            if len(cache) > 2:
                cache.pop(min(cache))
            cache[k] = ssh.isel({N.TIME: k}).values.astype(np.float64)
        return cache[k]

    est = interp_to_points(day, time, lat, lon, pts["time"], pts["lat"], plon)
    ebox = (float(lon[0]), float(lon[-1]), float(lat[0]), float(lat[-1]))
    try:
        sc = alongtrack_scores(pts["time"], plon, pts["lat"], pts["ssh"], est, opts, box=ebox)
    except ValueError as exc:
        raise InputError(f"analysis {analysis_path} vs along-track: {exc}") from None
    method = name or str(ads.attrs.get("method") or analysis_path.stem)
    result: dict[str, Any] = {**sc.row(), "method": method}
    result["evaluation"] = {
        "analysis": str(analysis_path.resolve()),
        "alongtrack": [str(f.resolve()) for f in files],
        "missions": sorted(set(pts["mission"].tolist())),
        "qc": qc,
        "period": [str(time[0])[:10], str(time[-1])[:10]],
        "box": list(ebox),
        "l3": asdict(l3opts),
        "options": asdict(opts),
        "dx_km": None if sc.psd is None else sc.psd.dx_km,
        "segments": None if sc.psd is None else sc.psd.n_segments,
        "segment_points": None if sc.psd is None else sc.psd.npt,
        "days_scored": int(np.isfinite(sc.rmse.score).sum()),
        "notes": sc.notes,
        "oceanda_version": __version__,
    }
    pngs: dict[str, bytes] = {}
    if figures:
        from oceanda.plots.alongtrack import (
            alongtrack_map_figure,
            alongtrack_psd_figure,
            alongtrack_time_figure,
        )
        from oceanda.plots.metrics import png_bytes

        if sc.psd is not None:
            pngs[FIGURES[0]] = png_bytes(alongtrack_psd_figure(sc.psd, method))
        pngs[FIGURES[1]] = png_bytes(alongtrack_time_figure(sc.rmse, method))
        pngs[FIGURES[2]] = png_bytes(alongtrack_map_figure(sc.bins, method))
    from oceanda.data.io import write_outputs

    out = Path(out_dir) if out_dir is not None else analysis_path.resolve().parent
    write_outputs(out, pngs, "scores_alongtrack.json", result, "along-track scores")
    for note in sc.notes:
        log.info(note)
    result["evaluation"]["out_dir"] = str(out)
    return result
