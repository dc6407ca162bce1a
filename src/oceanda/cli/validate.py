"""Validate neural incremental data assimilation against weak-constraint 4D-Var on the
pendulum and Lorenz-63 (Blanke, Fablet & Lelarge 2024, Sec. 4, Table 1, Figures 1-3).

usage:
  oceanda validate experiment=lorenz63 [preset=quick] [out_dir=DIR]
  oceanda validate experiment=pendulum [preset=quick]
  oceanda validate experiment=lorenz63 checkpoint=runs/validate/lorenz63/model.pt
  oceanda validate experiment=lorenz63 dt=0.05             # the public code's step
  oceanda validate experiment=lorenz63 'dt=[0.025,0.035,0.05]'   # the dt scan

Generates the data (trajectories; observation processes: every phase for training and test
with ``experiment.data.processes=all``, the Lorenz-63 default, plus a diagnostic model trained
without some phases; or test phases never trained on with ``processes=heldout``), computes the Gaussian first guess z0, trains the neural band prior
(objective (3.5); one-shot (3.3) for the pendulum) and the unconditional cold-diffusion
ablation, then evaluates on the test set: z0, 4D-Var from z0, cold diffusion, neural
assimilation (Algorithm 2) and the neural output polished by 4D-Var. Writes into out_dir:
report.md (Table 1 layout), report.json, reconstructions.png (Fig. 1/2), var4d_inits.png
(Fig. 3), training.png and the checkpoint model.pt (reload it with checkpoint=PATH).
`preset=quick` takes a few minutes on 2 CPU cores; the default preset is the paper's scale.

``dt=`` overrides ``experiment.data.dt``; a list runs the whole experiment (training
included) at each step into ``out_dir/dt<value>/`` and writes the scan table
``scan.md`` / ``scan.json`` and ``scan.png`` (RMSE of every method against dt, the particle
smoother as the floor) into ``out_dir``.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from oceanda.errors import ConfigError

if TYPE_CHECKING:
    from oceanda.cli.schema import ValidateConfig

log = logging.getLogger("oceanda.validate")


def run(cfg: ValidateConfig) -> int:
    from oceanda.data.files import check_out_dir
    from oceanda.validation.report import write_scan
    from oceanda.validation.runner import read_checkpoint

    settings, raw, preset = cfg.experiment, cfg.experiment_raw, cfg.preset_name
    from oceanda.parallel.threads import limit_and_log

    limit_and_log(None, "auto" if cfg.threads is None else cfg.threads)  # torch, BLAS, OpenMP, numba
    out_dir = check_out_dir(cfg.out_dir)  # a file or a read-only folder: refused before any work
    checkpoint = cfg.checkpoint
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise ConfigError(f"checkpoint={checkpoint}: no such file")
        read_checkpoint(checkpoint, settings.system)  # unreadable / another system: before any work
    if cfg.dt is None:
        return _run_one(settings, raw, preset, out_dir, checkpoint, cfg.progress)
    if not isinstance(cfg.dt, tuple):  # dt=0.05: that setting, one run
        return _run_one(*_with_dt(settings, raw, cfg.dt), preset, out_dir, checkpoint, cfg.progress)
    if checkpoint is not None:
        raise ConfigError("checkpoint= cannot be combined with a dt list (one network per dt)")
    reports = {}
    for dt in cfg.dt:
        print(f"--- dt = {dt:g}")
        _run_one(*_with_dt(settings, raw, dt), preset, out_dir / f"dt{dt:g}", None, cfg.progress)
        reports[dt] = json.loads((out_dir / f"dt{dt:g}" / "report.json").read_text())
    table = write_scan(out_dir, settings.system, preset, reports)
    print(table)
    print(f"wrote {out_dir}/scan.md, scan.json, scan.png")
    return 0


def _with_dt(settings, raw: dict, dt: float):
    """Copies of the typed and the composed experiment with the model time step ``dt``."""
    settings, raw = copy.deepcopy(settings), copy.deepcopy(raw)
    settings.data["dt"] = dt
    raw.setdefault("data", {})["dt"] = dt
    return settings, raw


def _run_one(settings, raw, preset, out_dir: Path, checkpoint, progress: bool) -> int:
    from oceanda.data.files import made_dirs
    from oceanda.validation.report import NAMES, write_report
    from oceanda.validation.runner import EXTRA, METHODS, run_experiment

    t0, c0 = time.perf_counter(), time.process_time()
    with made_dirs(out_dir):  # a run that fails early leaves no empty out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        result = run_experiment(settings, out_dir=out_dir, checkpoint=checkpoint, progress=progress)
    result.extra["run_wall_s"] = time.perf_counter() - t0
    result.extra["run_cpu_s"] = time.process_time() - c0
    report = write_report(out_dir, result, preset, raw)
    shown = [m for m in (*METHODS, *EXTRA) if m in report]
    width = max(len(NAMES[m]) for m in shown)
    print(f"{settings.system}: RMSE (normalised / physical), time per window, Gauss-Newton iterations (median)")
    for m in shown:
        r = report[m]
        gn = f"  GN {r['gn_iters_median']:g}" if "gn_iters_median" in r else ""
        print(f"  {NAMES[m]:<{width}}  {r['rmse']:.4f} / {r['rmse_raw']:.4f}  {r['time_per_window_ms']:.3g} ms{gn}")
    for c in report["checks"]:
        print(f"  [{'ok' if c['holds'] else 'MISS'}] {c['check']}: {c['ours']} (paper {c['paper']})")
    print(f"wrote {out_dir}/report.md, report.json, figures, model.pt (run: {result.extra['run_wall_s']:.0f} s wall, "
          f"{result.extra['run_cpu_s']:.0f} s CPU)")
    return 0

