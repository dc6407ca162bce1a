"""Validate neural incremental data assimilation against weak-constraint 4D-Var on the
pendulum and Lorenz-63 (Blanke, Fablet & Lelarge 2024, Sec. 4, Table 1, Figures 1-3).

usage:
  oceanda validate experiment=lorenz63 [preset=quick] [out_dir=DIR]
  oceanda validate experiment=pendulum [preset=quick]
  oceanda validate experiment=lorenz63 checkpoint=runs/validate/lorenz63/model.pt

Generates the data (trajectories, observation processes split into training and held-out
test processes), computes the Gaussian first guess z0, trains the neural band prior
(objective (3.5); one-shot (3.3) for the pendulum) and the unconditional cold-diffusion
ablation, then evaluates on the test set: z0, 4D-Var from z0, cold diffusion, neural
assimilation (Algorithm 2) and the neural output polished by 4D-Var. Writes into out_dir:
report.md (Table 1 layout), report.json, reconstructions.png (Fig. 1/2), var4d_inits.png
(Fig. 3), training.png and the checkpoint model.pt (reload it with checkpoint=PATH).
`preset=quick` takes a few minutes on 2 CPU cores; the default preset is the paper's scale.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from oceanda.errors import ConfigError

if TYPE_CHECKING:
    from oceanda.cli.schema import ValidateConfig

log = logging.getLogger("oceanda.validate")


def run(cfg: ValidateConfig) -> int:
    import torch

    from oceanda.validation.report import NAMES, write_report
    from oceanda.validation.runner import METHODS, run_experiment

    settings = cfg.experiment
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir).expanduser()
    checkpoint = cfg.checkpoint
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ConfigError(f"checkpoint={checkpoint}: no such file")
    out_dir.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    result = run_experiment(settings, out_dir=out_dir, checkpoint=checkpoint, progress=cfg.progress)
    result.extra["run_wall_s"] = time.perf_counter() - t0
    result.extra["run_cpu_s"] = time.process_time() - c0
    report = write_report(out_dir, result, cfg.preset_name, cfg.experiment_raw)
    width = max(len(NAMES[m]) for m in METHODS)
    print(f"{settings.system}: RMSE (normalised / physical), time per window, Gauss-Newton iterations (median)")
    for m in METHODS:
        r = report[m]
        gn = f"  GN {r['gn_iters_median']:g}" if "gn_iters_median" in r else ""
        print(f"  {NAMES[m]:<{width}}  {r['rmse']:.4f} / {r['rmse_raw']:.4f}  {r['time_per_window_ms']:.3g} ms{gn}")
    for c in report["checks"]:
        print(f"  [{'ok' if c['holds'] else 'MISS'}] {c['check']}: {c['ours']} (paper {c['paper']})")
    print(f"wrote {out_dir}/report.md, report.json, figures, model.pt (run: {result.extra['run_wall_s']:.0f} s wall, "
          f"{result.extra['run_cpu_s']:.0f} s CPU)")
    return 0

