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
DIR/best_checkpoint.pt (best validation RMSE [m]) and DIR/history.json. A checkpoint is
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
from typing import TYPE_CHECKING, Any

import numpy as np

from oceanda.errors import ConfigError

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger("oceanda.train")


def _plain(v: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


def run(cfg: DictConfig) -> int:
    import torch

    from oceanda.data.patches import PatchGeometry
    from oceanda.parallel.device import bind_device
    from oceanda.train.data import (Normalisation, PatchDataset, load_arrays, patch_starts, time_split,
                                    validation_window)
    from oceanda.train.fourdvarnet import (ModelConfig, TrainConfig, build_model, fit, init_distributed,
                                           write_history)
    from oceanda.parallel.comm import get_comm

    if cfg.model.get("name") == "spde_4dvarnet":  # model=spde_4dvarnet: SPDE-prior 4DVarNet
        from oceanda.train.spde_fourdvarnet import run_spde_training

        return run_spde_training(cfg)
    model_cfg = ModelConfig.from_dict(dict(_plain(cfg.model)))
    train_cfg = TrainConfig.from_dict(dict(_plain(cfg.train)))
    patch = _plain(cfg.patch)
    geom = PatchGeometry(size=tuple(patch["size"]), stride=tuple(patch["stride"]), crop=tuple(patch["crop"]),
                         anchor=patch.get("anchor", "centre"), time_weight=patch.get("time_weight", "triangle"),
                         space_weight=patch.get("space_weight", "crop"), taper=patch.get("taper", 20),
                         lead=patch.get("lead", 0) or 0)
    if model_cfg.n_time != geom.size[0]:
        raise ConfigError(f"model.n_time={model_cfg.n_time} differs from patch.size[0]={geom.size[0]}")
    for n in geom.size[1:]:
        k = model_cfg.prior_downsample if model_cfg.prior == "bilin_ae" else 2 ** model_cfg.unet_depth
        if n % k or n % model_cfg.lstm_downsample:
            raise ConfigError(f"patch.size {geom.size}: H and W must be divisible by the prior's "
                              f"downsampling ({k}) and model.lstm_downsample")
    truth_path = cfg.truth_path
    if truth_path is None and train_cfg.mode == "supervised":
        raise ConfigError("truth_path=null needs train.mode=semi (supervised training needs the truth)")
    out_dir = Path(str(cfg.out_dir)).expanduser()
    comm = get_comm()
    device = bind_device(comm, str(cfg.system.get("device", "auto")), cfg.system.get("threads", 1))
    dist = init_distributed(device)

    truth, obs, ocean, times, grid = load_arrays(truth_path, str(cfg.obs_path), _plain(cfg.box),
                                                 _plain(cfg.dates), with_grid=True)
    v0, nv = validation_window(times, _plain(cfg.val_period), cfg.val_fraction)
    train_days, val_days = time_split(len(times), v0, nv, int(cfg.gap_days))
    stride = tuple(_plain(cfg.stride) or geom.stride)
    tr_starts = patch_starts(train_days, ocean.shape, geom.size, stride)
    va_starts = patch_starts(val_days, ocean.shape, geom.size, (1, *stride[1:]))
    norm = Normalisation.fit(truth if truth is not None else obs, ocean, train_days)
    weight = geom.weights().full().astype(np.float32)
    common = dict(size=geom.size, weight=weight, norm=norm, holdout=float(cfg.holdout), seed=train_cfg.seed,
                  lead=geom.lead)
    if model_cfg.init == "oi":  # the solver's first guess: each item's OI analysis (oceanda.train.data)
        common.update(oi=model_cfg.oi_kwargs(), lon=grid.lon, lat=grid.lat)
    train_ds = PatchDataset(truth, obs, ocean, tr_starts, aug=int(cfg.aug), mode=train_cfg.mode, **common)
    val_ds = None
    if len(va_starts):
        val_ds = PatchDataset(truth, obs, ocean, va_starts, aug=0, mode=train_cfg.mode, cache_oi=True, **common)
    if dist.rank == 0:
        log.info("training on %d patches (%d days, aug x%d), validating on %d patches (%d days); "
                 "mode %s; normalisation mean %.4f m std %.4f m; %d rank(s), device %s",
                 len(train_ds), len(train_days), int(cfg.aug) + 1, 0 if val_ds is None else len(val_ds),
                 len(val_days), geom.mode, norm.mean, norm.std, dist.world, device)
    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg)
    init_from = cfg.get("init_checkpoint")
    if init_from is not None and not (bool(cfg.resume) and (out_dir / "checkpoint.pt").is_file()):
        from oceanda.train.fourdvarnet import load_weights
        from oceanda.weights import resolve_checkpoint

        src = load_weights(model, model_cfg, resolve_checkpoint(str(init_from)))
        if dist.rank == 0:
            log.info("initial weights from %s", src)
    if bool(cfg.get("zero_update", False)) and not (bool(cfg.resume) and (out_dir / "checkpoint.pt").is_file()):
        model.zero_update_()  # the untrained solver returns its first guess (the OI with model.init=oi)
    extra = {"truth": None if truth_path is None else str(truth_path), "obs": str(cfg.obs_path),
             "val_days": [int(val_days[0]), int(val_days[-1])], "gap_days": int(cfg.gap_days),
             "patch": patch, "mode": geom.mode_record()}
    history = fit(model, model_cfg, train_ds, val_ds, norm, train_cfg, out_dir / "checkpoint.pt",
                  resume=bool(cfg.resume), device=device, dist=dist, progress=bool(cfg.progress), extra=extra)
    write_history(history, out_dir, dist)
    return 0
