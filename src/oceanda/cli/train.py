"""Train 4DVarNet on OSSE patches (supervised or semi-supervised), data-parallel over MPI ranks.

usage:
  oceanda train truth_path=OSSE/truth.zarr obs_path=OSSE/obs.zarr out_dir=DIR [key=value ...]
  oceanda train ... model=4dvarnet_unet train.epochs=50 val_period=[2012-10-22,2012-12-02]
  mpiexec -n 4 oceanda train ... train.batch_size=1      # global batch = 4 (gloo on CPU, NCCL on GPU)
  oceanda train ... resume=true                          # continue from DIR/checkpoint.pt
  oceanda train ... model.init=oi init_checkpoint=default zero_update=true
      # solver starts from the per-patch OI analysis; fine-tune the shipped weights, the
      # gradient modulator's output zeroed so that training starts from the OI itself
  oceanda train truth_path=null obs_path=... out_dir=... train.mode=semi   # no truth: held-out observations
  oceanda train ... model=spde_4dvarnet +train.w_nll=0.1   # SPDE-prior 4DVarNet (oceanda.train.spde_fourdvarnet)
  oceanda train ... patch=nrt          # near-real-time model (or patch=forecast2 / forecast4: lead 2 / 4 days)

Reads the truth / observations (zarr or netCDF with the names of oceanda.data.names),
normalises with the training-period statistics, cuts patches (configs/patch: size, stride;
its crop and triangle weight the loss), keeps the validation period and gap_days on each
side out of training, and trains with Adam + cosine schedule + gradient clipping. Writes
DIR/checkpoint.pt after every epoch (model + normalisation + config + optimizer state),
DIR/best_checkpoint.pt (best validation RMSE [m]), DIR/history.json and DIR/train_run.json
(the run's identity: its inputs' content digests and model / patch / split config digest; an
out_dir holding another training run, or an inference run, is refused). A checkpoint is
used by `oceanda infer method=4dvarnet method.checkpoint=DIR/best_checkpoint.pt`.

Modes follow the patch (configs/patch): mapping (patch=anchor: the loss on the whole window,
triangle-weighted around its centre), near-real-time (patch=nrt: the loss on the window's
last day) and forecast (patch=forecast2|forecast4: the loss on the last day, the
observations of the last 2|4 days removed from the input as at inference). The checkpoint
records the mode; `oceanda infer` refuses it with patches of another mode.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from oceanda.errors import ConfigError, InputError

if TYPE_CHECKING:
    from oceanda.cli.schema import TrainAppConfig

log = logging.getLogger("oceanda.train")


def _list(value: tuple | None) -> list | None:
    return None if value is None else list(value)


def _join(cfg: TrainAppConfig, truth, obs, ocean, times, grid):
    """The training OSSEs (``obs_path`` and ``extra_train``, within ``dates``) and the validation
    one (``val_*_path`` within ``val_period``, or ``obs_path``'s own split when absent) as one array
    (:func:`oceanda.train.data.join_osses`); returns ``(truth, obs, ocean, train_days, val_days)``."""
    from oceanda.train.data import join_osses, load_arrays, time_split, validation_window

    from oceanda.errors import InputError

    parts, names = [(truth, obs, ocean)], [str(cfg.obs_path)]
    more = [(t, o, _list(cfg.dates)) for t, o in cfg.extra_train]
    if cfg.val_obs_path is not None:
        more.append((cfg.val_truth_path, cfg.val_obs_path, _list(cfg.val_period)))
    for t_path, o_path, period in more:
        t, o, oc, _, g = load_arrays(t_path, o_path, _list(cfg.box), period, with_grid=True)
        if g.lon.shape != grid.lon.shape or g.lat.shape != grid.lat.shape or not (
                np.allclose(g.lon, grid.lon) and np.allclose(g.lat, grid.lat)):
            raise InputError(f"{o_path}: its grid ({g.lat.size} x {g.lon.size}) is not the grid of "
                             f"{cfg.obs_path} ({grid.lat.size} x {grid.lon.size}): every OSSE of a training run "
                             "must share one grid")
        parts.append((t, o, oc))
        names.append(str(o_path))
    truth, obs, ocean, days = join_osses(parts, names)
    if cfg.val_obs_path is not None:
        return truth, obs, ocean, np.concatenate(days[:-1]), days[-1]
    v0, nv = validation_window(times, _list(cfg.val_period), cfg.val_fraction)
    tr, va = time_split(len(times), v0, nv, cfg.gap_days)
    return truth, obs, ocean, np.concatenate([tr, *days[1:]]), va


def run(cfg: TrainAppConfig) -> int:
    """``oceanda train``: one app for both models (``model=4dvarnet*`` or ``model=spde_4dvarnet``);
    each model contributes its datasets, its weights' start and its training task
    (:data:`oceanda.train.fourdvarnet.TASK`, :data:`oceanda.train.spde_fourdvarnet.TASK`)."""
    from oceanda.data.files import check_out_dir, made_dirs
    from oceanda.parallel.comm import get_comm
    from oceanda.parallel.device import bind_device

    spde = cfg.kind == "spde_4dvarnet"
    if spde:
        from oceanda.train import spde_fourdvarnet as trainer
    else:
        from oceanda.train import fourdvarnet as trainer
    if spde and cfg.zero_update:
        raise ConfigError("zero_update=true: only for 4DVarNet models (the SPDE-prior solver has no "
                          "modulator output layer to zero)")
    out_dir = check_out_dir(cfg.out_dir)  # a file or a read-only folder: refused before any work
    if cfg.resume and not (out_dir / "checkpoint.pt").is_file():
        raise InputError(f"resume=true: no checkpoint to resume from in out_dir={out_dir} "
                         f"({out_dir / 'checkpoint.pt'} is missing); drop resume=true to start a new training")
    comm = get_comm(cfg.system.use_mpi)
    device = bind_device(comm, cfg.system.device, cfg.system.threads)
    from oceanda.cli._identity import TRAIN_MANIFEST, bcast_checked, check_train_out_dir, train_identity

    def claim() -> dict:  # rank 0: the inputs by content, this out_dir not another run's
        ident = train_identity(cfg)
        check_train_out_dir(out_dir, ident, resume=cfg.resume)
        return ident

    ident = bcast_checked(comm, claim)
    manifest = out_dir / TRAIN_MANIFEST
    fresh = not manifest.exists()
    with made_dirs(out_dir):  # a run that fails before its first checkpoint leaves no out_dir behind
        try:
            _train(cfg, trainer, out_dir, comm, device, ident)
        except BaseException:
            if fresh and not (out_dir / "checkpoint.pt").exists():
                manifest.unlink(missing_ok=True)  # the identity of a run that wrote nothing
            raise
    return 0


def _train(cfg: TrainAppConfig, trainer, out_dir: Path, comm, device, ident: dict) -> None:
    """Load, split, build and fit (every rank); ``train_run.json`` (the run's identity,
    :mod:`oceanda.cli._identity`) and ``history.json`` on rank 0."""
    import torch

    from oceanda.cli._identity import record_train_run

    from oceanda.train.data import Normalisation, load_arrays, patch_starts, time_split, validation_window
    from oceanda.train.loop import fit, init_distributed, write_history

    geom, train_cfg = cfg.patch, cfg.train
    dist = init_distributed(device, comm=comm)
    truth, obs, ocean, times, grid = load_arrays(cfg.truth_path, cfg.obs_path, _list(cfg.box), _list(cfg.dates),
                                                 with_grid=True)
    if cfg.extra_train or cfg.val_obs_path is not None:  # several OSSEs: other seeds / years, a held-out one
        truth, obs, ocean, train_days, val_days = _join(cfg, truth, obs, ocean, times, grid)
    else:
        v0, nv = validation_window(times, _list(cfg.val_period), cfg.val_fraction)
        train_days, val_days = time_split(len(times), v0, nv, cfg.gap_days)
    stride = cfg.stride or geom.stride
    tr_starts = patch_starts(train_days, ocean.shape, geom.size, stride)
    va_starts = patch_starts(val_days, ocean.shape, geom.size, (1, *stride[1:]))
    norm = Normalisation.fit(truth if truth is not None else obs, ocean, train_days)
    weight = geom.weights().full().astype(np.float32)
    common = dict(size=geom.size, weight=weight, norm=norm, holdout=cfg.holdout, seed=train_cfg.seed)
    train_ds, val_ds = trainer.datasets(cfg.model, truth, obs, ocean, grid, tr_starts, va_starts, common,
                                        aug=cfg.aug, mode=train_cfg.mode, lead=geom.lead)
    if dist.rank == 0:
        log.info("training on %d patches (%d days, aug x%d), validating on %d patches (%d days); "
                 "mode %s; normalisation mean %.4f m std %.4f m; %d rank(s), device %s",
                 len(train_ds), len(train_days), cfg.aug + 1, 0 if val_ds is None else len(val_ds),
                 len(val_days), geom.mode, norm.mean, norm.std, dist.world, device)
    torch.manual_seed(train_cfg.seed)
    model = trainer.build(cfg.model)
    resuming = cfg.resume and (out_dir / "checkpoint.pt").is_file()
    if cfg.init_checkpoint is not None and not resuming:
        src = trainer.load_weights(model, cfg.model, cfg.init_checkpoint)
        if dist.rank == 0:
            log.info("initial weights from %s", src)
    if cfg.zero_update and not resuming:
        model.zero_update_()  # the untrained solver returns its first guess (the OI with model.init=oi)
    extra = {"truth": None if cfg.truth_path is None else str(cfg.truth_path), "obs": str(cfg.obs_path),
             "extra_train": [list(p) for p in cfg.extra_train],
             "val_data": None if cfg.val_obs_path is None else [cfg.val_truth_path, cfg.val_obs_path],
             "val_days": [int(val_days[0]), int(val_days[-1])], "gap_days": cfg.gap_days,
             "patch": geom.as_config(), "mode": geom.mode_record(),
             "init_checkpoint": None if cfg.init_checkpoint is None else str(cfg.init_checkpoint)}
    if dist.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        record_train_run(out_dir, ident)
    history = fit(trainer.TASK, model, cfg.model, train_ds, val_ds, norm, train_cfg, out_dir / "checkpoint.pt",
                  resume=cfg.resume, device=device, dist=dist, progress=cfg.progress, extra=extra,
                  validate_start=cfg.validate_start, snapshots=cfg.snapshots)
    write_history(history, out_dir, dist)
