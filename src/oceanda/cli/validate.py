"""Validate neural incremental data assimilation against weak-constraint 4D-Var on the
pendulum and Lorenz-63 (Blanke, Fablet & Lelarge 2024, Sec. 4, Table 1, Figures 1-3).

usage:
  oceanda validate experiment=lorenz63 [preset=quick] [out_dir=DIR]
  oceanda validate experiment=pendulum [preset=quick]
  oceanda validate experiment=lorenz63 checkpoint=runs/validate/lorenz63/model.pt
  oceanda validate experiment=lorenz63 dt=0.05             # the public code's step
  oceanda validate experiment=lorenz63 'dt=[0.025,0.035,0.05]'   # the dt scan

Generates the data (trajectories, observation processes split into training and held-out
test processes), computes the Gaussian first guess z0, trains the neural band prior
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
import dataclasses
import json
import logging
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from oceanda.errors import ConfigError

log = logging.getLogger("oceanda.validate")


def settings_from_cfg(exp: DictConfig):
    """Typed :class:`ExperimentSettings` from the ``experiment`` config (unknown keys are errors)."""
    from oceanda.train.incremental import TrainSettings
    from oceanda.validation.runner import ExperimentSettings, ModelSettings, ParticleSettings, Var4DSettings

    raw = OmegaConf.to_container(exp, resolve=True)
    if not isinstance(raw, dict):
        raise ConfigError("experiment: expected a mapping")

    def build(cls, values, where):
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: expected a mapping, got {values!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
        return cls(**values)

    nested = {"model": ModelSettings, "training": TrainSettings, "var4d": Var4DSettings,
              "particle_smoother": ParticleSettings}
    kw = dict(raw)
    for key, cls in nested.items():
        if key in kw:
            kw[key] = build(cls, kw[key], f"experiment.{key}")
    if "system" not in kw:
        raise ConfigError("experiment.system is missing (lorenz63 | pendulum)")
    settings = build(ExperimentSettings, kw, "experiment")
    if not isinstance(settings.data, dict):
        raise ConfigError("experiment.data: expected a mapping")
    settings.z0_inflation = [float(c) for c in settings.z0_inflation]
    settings.check()
    return settings, raw


def run(cfg: DictConfig) -> int:
    import torch

    from oceanda.validation.report import write_scan

    settings, raw = settings_from_cfg(cfg.experiment)
    if cfg.get("threads") is not None:
        if int(cfg.threads) < 1:
            raise ConfigError(f"threads must be >= 1, got {cfg.threads}")
        torch.set_num_threads(int(cfg.threads))
    preset = str(cfg.get("preset_name") or "custom")
    out_dir = Path(str(cfg.out_dir)).expanduser()
    checkpoint = cfg.get("checkpoint")
    if checkpoint is not None and not Path(str(checkpoint)).is_file():
        raise ConfigError(f"checkpoint={checkpoint}: no such file")
    dts = _dt_values(cfg.get("dt"))
    if dts is None:
        return _run_one(settings, raw, preset, out_dir, checkpoint, bool(cfg.progress))
    if len(dts) == 1 and not OmegaConf.is_list(cfg.get("dt")):
        settings.data["dt"] = raw["data"]["dt"] = dts[0]
        return _run_one(settings, raw, preset, out_dir, checkpoint, bool(cfg.progress))
    if checkpoint is not None:
        raise ConfigError("checkpoint= cannot be combined with a dt list (one network per dt)")
    reports = {}
    for dt in dts:
        s_dt, raw_dt = copy.deepcopy(settings), copy.deepcopy(raw)
        s_dt.data["dt"] = raw_dt["data"]["dt"] = dt
        print(f"--- dt = {dt:g}")
        _run_one(s_dt, raw_dt, preset, out_dir / f"dt{dt:g}", None, bool(cfg.progress))
        reports[dt] = json.loads((out_dir / f"dt{dt:g}" / "report.json").read_text())
    table = write_scan(out_dir, settings.system, preset, reports)
    print(table)
    print(f"wrote {out_dir}/scan.md, scan.json, scan.png")
    return 0


def _dt_values(value) -> list[float] | None:
    if value is None:
        return None
    items = list(value) if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else [value]
    try:
        dts = [float(v) for v in items]
    except (TypeError, ValueError):
        raise ConfigError(f"dt must be a positive number or a list of them, got {value!r}") from None
    if not dts or min(dts) <= 0:
        raise ConfigError(f"dt must be a positive number or a non-empty list of them, got {value!r}")
    return dts


def _run_one(settings, raw, preset, out_dir: Path, checkpoint, progress: bool) -> int:
    from oceanda.validation.report import NAMES, write_report
    from oceanda.validation.runner import EXTRA, METHODS, run_experiment

    out_dir.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
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

