"""Score an SSH analysis against the truth with the 2020a SSH mapping data-challenge metrics.

usage:
  oceanda evaluate truth=runs/osse/truth.zarr analysis=runs/oi/analysis.zarr
  oceanda evaluate analysis=A alongtrack=dc_obs/dt_global_c2_phy_l3_*.nc   # independent along-track scores
  oceanda evaluate truth=T analysis=A period=[2012-10-22,2012-12-02] box=[-65,-55,33,43] out_dir=DIR

Prints the leaderboard row (mu, sigma_t, lambda_x, lambda_t, RMSE; plus spread/skill and
CRPS when the analysis carries ``ssh_std`` or ``ssh_members``), writes it to
``OUT_DIR/scores.json`` (keys ``mu``, ``sigma_t``, ``lambda_x_deg``, ``lambda_t_days``,
``rmse_m``; a lambda is ``null`` when the PSD score never crosses 0.5) and draws
``psd_score.png``, ``error_maps.png`` and ``score_time.png``.

Window: by default the data challenge's period 2012-10-22..2012-12-02 and box lon
-65..-55, lat 33..43, clipped to the data where they intersect it, else the whole common
extent of truth and analysis (the log says which). Cells evaluated: finite in both and
ocean (the truth's ``ocean`` mask). Truth and analysis must share their grid in the
window (no silent regridding).

Bad input (missing file or variable, non-monotonic or mismatched coordinates, empty
window, all-NaN analysis) stops with an error naming it, exit status 2, before anything
is written.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oceanda import __version__
from oceanda.data import names as N
from oceanda.data.io import check_values, compute, open_dataset, require_complete, require_finite, write_outputs

if TYPE_CHECKING:
    from oceanda.cli.schema import EvaluateConfig

log = logging.getLogger("oceanda.evaluate")

FIGURES = ("psd_score.png", "error_maps.png", "score_time.png")


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """An aligned text table of leaderboard rows (``method`` plus the score keys)."""
    cols = [("method", "method", "{}"), ("mu", "mu", "{:.3f}"), ("sigma_t", "sigma_t", "{:.3f}"),
            ("lambda_x_deg", "lambda_x [deg]", "{:.2f}"), ("lambda_t_days", "lambda_t [days]", "{:.2f}"),
            ("rmse_m", "RMSE [m]", "{:.4f}")]
    for key, head in (("spread_skill", "spread/skill"), ("crps", "CRPS [m]")):
        if any(r.get(key) is not None for r in rows):
            cols.append((key, head, "{:.4f}" if key == "crps" else "{:.3f}"))
    cells = [[head for _, head, _ in cols]]
    for r in rows:
        cells.append(["-" if r.get(k) is None else fmt.format(r[k]) for k, _, fmt in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = []
    for row in cells:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def evaluate_paths(truth_path: str | Path, analysis_path: str | Path, period: Sequence[Any] | None = None,
                   box: Sequence[float] | None = None, out_dir: str | Path | None = None, figures: bool = True,
                   name: str | None = None, detrend: str | None = "linear") -> dict[str, Any]:
    """Evaluate ``analysis_path`` against ``truth_path``; write ``scores.json`` (+ figures).

    Args:
        truth_path: zarr / netCDF with ``ssh`` (time, lat, lon) and optional ``ocean``.
        analysis_path: zarr / netCDF with ``ssh`` and optional ``ssh_std`` / ``ssh_members``.
        period, box: evaluation window (None: see :func:`oceanda.metrics.default_window`).
        out_dir: output folder (None: the analysis' folder).
        figures: draw the PNG figures.
        name: method name (None: the analysis' ``method`` attribute, else its file stem).
        detrend: spectra detrending, ``"linear"`` (the challenge) or ``"constant"``.

    Returns:
        The content of ``scores.json``: the leaderboard keys, ``spread_skill`` / ``crps``
        when the analysis has a spread, ``method`` and an ``evaluation`` record (files,
        window, shape, notes).

    Raises:
        InputError: bad or inconsistent input; nothing is written then.
    """
    from oceanda.metrics import default_window, evaluate, match_grid, select_pair

    truth_path, analysis_path = Path(truth_path), Path(analysis_path)
    tds = open_dataset(truth_path, [N.SSH], optional=[N.OCEAN])
    ads = open_dataset(analysis_path, [N.SSH], optional=[N.SSH_STD, N.SSH_MEMBERS])
    require_complete(ads, f"analysis {analysis_path}")
    names = (f"truth {truth_path}", f"analysis {analysis_path}")
    period, box, notes = default_window(tds[N.SSH], ads[N.SSH], period, box)
    truth, analysis = select_pair(tds[N.SSH], ads[N.SSH], period, box, names=names)
    # the evaluated block is loaded once (the spectra need it in memory anyway)
    truth = compute(truth.astype("float64"), names[0], f"variable '{N.SSH}'")
    analysis = compute(analysis.astype("float64"), names[1], f"variable '{N.SSH}'")
    for what, field in zip(names, (truth, analysis)):  # +-inf or absurd values: not scored as missing
        check_values(field, f"{what} (evaluation window)")
    require_finite(analysis, f"{names[1]}: variable '{N.SSH}' in the evaluation window")
    require_finite(truth, f"{names[0]}: variable '{N.SSH}' in the evaluation window")
    ocean = None
    if N.OCEAN in tds:
        ocean = match_grid(tds[N.OCEAN], truth, names=names, dims=(N.LAT, N.LON)).load()
    std = members = None
    if N.SSH_MEMBERS in ads:
        members = match_grid(ads[N.SSH_MEMBERS], truth, names=names).astype("float64")
    elif N.SSH_STD in ads:
        std = match_grid(ads[N.SSH_STD], truth, names=names).astype("float64")
    for note in notes:
        log.info(note)
    ev = evaluate(truth, analysis, ocean, std=std, members=members, detrend=detrend)
    for note in ev.notes:
        log.info(note)
    method = name or str(ads.attrs.get("method") or analysis_path.stem)
    result: dict[str, Any] = ev.row()
    if ev.spread_skill is not None:
        result["spread_skill"] = ev.spread_skill
        result["crps"] = ev.crps
    result["method"] = method
    result["evaluation"] = {
        "truth": str(truth_path.resolve()),
        "analysis": str(analysis_path.resolve()),
        "period": [str(p) for p in period],
        "box": box,
        "shape": dict(truth.sizes),
        "n_valid_cells": ev.rmse.n_valid,
        "detrend": detrend,
        "ensemble": "members" if members is not None else "std" if std is not None else None,
        "notes": notes + ev.notes,
        "oceanda_version": __version__,
    }
    # render everything before writing anything
    pngs: dict[str, bytes] = {}
    if figures:
        from oceanda.plots.metrics import error_maps_figure, png_bytes, psd_score_figure, score_time_figure

        if ev.psd is not None:
            pngs["psd_score.png"] = png_bytes(psd_score_figure(ev.psd, method))
        pngs["error_maps.png"] = png_bytes(error_maps_figure(truth, analysis, ev.rmse, method, ocean=ocean))
        pngs["score_time.png"] = png_bytes(score_time_figure(ev.rmse, method))
    out = Path(out_dir) if out_dir is not None else analysis_path.resolve().parent
    write_outputs(out, pngs, "scores.json", result, "scores")
    result["evaluation"]["out_dir"] = str(out)
    return result


def run(cfg: EvaluateConfig) -> int:
    """``oceanda evaluate``: print the leaderboard row, write scores.json and figures (and
    scores_alongtrack.json with ``alongtrack=FILES``)."""
    from dataclasses import asdict

    from oceanda.data.files import check_out_dir
    from oceanda.parallel.threads import limit_and_log

    if cfg.out_dir is not None:  # a file or a read-only folder: refused before any work
        check_out_dir(cfg.out_dir)
    elif Path(cfg.analysis).exists():
        check_out_dir(Path(cfg.analysis).resolve().parent, "out_dir (default: the analysis' folder)")
    limit_and_log(None, "auto", load=False)  # BLAS / OpenMP (torch and numba are not used)
    period = None if cfg.dates is None else list(cfg.dates)
    box = None if cfg.box is None else list(cfg.box)
    detrend = None if cfg.detrend in (None, "none") else cfg.detrend
    if cfg.alongtrack is not None:
        from oceanda.cli._alongtrack import evaluate_alongtrack_paths, format_row

        opts = cfg.alongtrack_options
        at = evaluate_alongtrack_paths(cfg.analysis, cfg.alongtrack, l3=asdict(opts.l3),
                                       options=asdict(opts.scores_options()), period=period, box=box,
                                       out_dir=cfg.out_dir, figures=cfg.figures, name=cfg.name)
        ev = at["evaluation"]
        print(f"along-track: {at['n_points']} points of {', '.join(ev['missions'])}, "
              f"{ev['period'][0]}..{ev['period'][1]}, {ev['segments'] or 0} spectral segments")
        print(format_row(at))
        print(f"\nwrote {Path(ev['out_dir']) / 'scores_alongtrack.json'}")
        if cfg.truth_path is None:
            return 0
        print()
    result = evaluate_paths(cfg.truth_path, cfg.analysis, period=period, box=box, out_dir=cfg.out_dir,
                            figures=cfg.figures, name=cfg.name, detrend=detrend)
    ev = result["evaluation"]
    print(f"evaluated {ev['shape'][N.TIME]} days x {ev['shape'][N.LAT]} x {ev['shape'][N.LON]} cells, "
          f"period {ev['period'][0]}..{ev['period'][1]}, box lon {ev['box'][0]:g}..{ev['box'][1]:g} "
          f"lat {ev['box'][2]:g}..{ev['box'][3]:g}")
    print()
    print(format_table([result]))
    print(f"\nwrote {Path(ev['out_dir']) / 'scores.json'}")
    return 0
