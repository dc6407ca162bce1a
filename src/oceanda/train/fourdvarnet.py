"""Training of 4DVarNet: losses, checkpoints, the epoch loop, data parallelism over ranks.

Losses (per sample, then averaged over the batch; ``w`` the blend weight x ocean of
:class:`oceanda.train.data.PatchDataset`, ``e`` the error on cells where ``w > 0`` and the
target is finite; ``wmse(e) = sum (w e)^2 / #{w > 0, target finite}``, the anchor's
``weighted_mse``):

- supervised: ``w_mse wmse(out - x_true) + w_grad wmse(|S out| - |S x_true|)
  + w_prior ||1_ocean (out - Phi(out))||^2 / (T n_ocean)`` with ``|S .|`` the Sobel gradient
  magnitude (anchor weights 50 / 1000 / 1);
- semi-supervised (no truth): ``w_mse wmse(out - y_held_out) + w_prior prior`` on
  observations held out of the input.

Optimiser: Adam (Phi's learning rate halved, as the anchor), cosine annealing over the
epochs, gradient-norm clipping; the loop, data parallelism and resuming are
:mod:`oceanda.train.loop`'s (:data:`TASK` is what 4DVarNet contributes to it).

Checkpoints (:func:`save_checkpoint` / :func:`load_checkpoint`) hold the model config,
weights, normalisation, training config, optimizer / scheduler state, epoch and history.
A corrupted, foreign or mismatching file raises :class:`oceanda.errors.InputError` naming it.
``extra["mode"]`` (written by ``oceanda train``) is the patch mode the model was trained for
(:meth:`oceanda.data.patches.PatchGeometry.mode_record`, read back by :func:`checkpoint_mode`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from oceanda.assim.fourdvarnet import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    FourDVarNet,
    ModelConfig,
    build_model,
    read_checkpoint,
)
from oceanda.config_dataclass import dataclass_from_dict
from oceanda.errors import ConfigError, InputError
from oceanda.train.data import Normalisation, PatchDataset
from oceanda.train.loop import TrainingTask, check_ranges, save_atomic

log = logging.getLogger("oceanda.train")


# ----------------------------------------------------------------------------- configs

__all__ = ["ModelConfig", "build_model", "TrainConfig", "loss_terms", "make_optimizer", "load_checkpoint",
           "save_checkpoint", "checkpoint_mode", "load_weights", "datasets", "build", "TASK"]


@dataclass
class TrainConfig:
    """Optimisation settings (anchor: Adam lr 1e-3, cosine, clip 0.5, batch 4)."""

    epochs: int = 10
    batch_size: int = 4            # per rank; global batch = batch_size x world size
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    w_mse: float = 50.0
    w_grad: float = 1000.0
    w_prior: float = 1.0
    mode: str = "supervised"       # supervised | semi
    seed: int = 333
    max_batches: int | None = None  # per epoch (quick runs); None: all

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """The ``train`` section of ``oceanda train``: typed (unknown keys refused) and checked."""
        cfg = dataclass_from_dict(cls, d, "train")
        if cfg.mode not in ("supervised", "semi"):
            raise ConfigError(f"train.mode must be 'supervised' or 'semi', got {cfg.mode!r}")
        check_ranges(cfg, "train")
        return cfg


# ----------------------------------------------------------------------------- distributed


# ----------------------------------------------------------------------------- losses


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """``|S x|`` per channel: normalised 3x3 Sobel (kernel / 8), replicate border,
    ``sqrt(gx^2 + gy^2 + 1e-6)`` (kornia.filters.sobel's definition)."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype,
                      device=x.device) / 8.0
    k = torch.stack([kx, kx.T]).unsqueeze(1)
    b, c, h, w = x.shape
    xp = F.pad(x.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    g = F.conv2d(xp, k).reshape(b, c, 2, h, w)
    return torch.sqrt(g[:, :, 0] ** 2 + g[:, :, 1] ** 2 + 1e-6)


def weighted_mse(err: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-sample ``sum (w e)^2 / #{w > 0, e finite}`` -> ``(B,)`` (0 when nothing counts)."""
    ok = (weight > 0) & torch.isfinite(err)
    e = torch.where(ok, err * weight, torch.zeros_like(err))
    n = ok.sum(dim=(1, 2, 3)).clamp_min(1).to(err.dtype)
    return (e * e).sum(dim=(1, 2, 3)) / n


def loss_terms(model: FourDVarNet, batch: dict[str, torch.Tensor], cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Forward + the training loss terms (see the module docstring); ``total`` is the
    batch mean of the weighted sum."""
    obs, tgt, w, ocean = batch["obs"], batch["tgt"], batch["weight"], batch["ocean"]
    out = model(obs, ocean, x0=batch.get("x0"))
    mse = weighted_mse(out - tgt, w)
    terms = {"mse": mse}
    total = cfg.w_mse * mse
    if cfg.mode == "supervised" and cfg.w_grad:
        g = weighted_mse(sobel_magnitude(out) - sobel_magnitude(torch.nan_to_num(tgt)), w)
        terms["grad"] = g
        total = total + cfg.w_grad * g
    if cfg.w_prior:
        oc = ocean.to(out.dtype).unsqueeze(1)
        r = (out - model.prior(out)) * oc
        pc = (r * r).sum(dim=(1, 2, 3)) / (oc.sum(dim=(1, 2, 3)).clamp_min(1.0) * out.shape[1])
        terms["prior"] = pc
        total = total + cfg.w_prior * pc
    terms = {k: v.mean() for k, v in terms.items()}
    terms["total"] = total.mean()
    terms["out"] = out
    return terms


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | os.PathLike, model: FourDVarNet, model_cfg: ModelConfig,
                    norm: Normalisation, train_cfg: TrainConfig | None = None,
                    optimizer=None, scheduler=None, epoch: int = -1,
                    history: list | None = None, extra: dict | None = None) -> Path:
    """Write a checkpoint atomically (:func:`save_atomic`)."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_config": asdict(model_cfg),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "norm": norm.to_dict(),
        "train_config": None if train_cfg is None else asdict(train_cfg),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "epoch": int(epoch),
        "history": list(history or []),
        "extra": dict(extra or {}),
    }
    return save_atomic(state, path)


def load_checkpoint(path: str | os.PathLike, expect: ModelConfig | None = None) -> dict[str, Any]:
    """:func:`oceanda.assim.fourdvarnet.read_checkpoint` plus ``normalisation``
    (a :class:`~oceanda.train.data.Normalisation`)."""
    ck = read_checkpoint(path, expect)
    ck["normalisation"] = Normalisation(float(ck["norm"]["mean"]), float(ck["norm"]["std"]))
    return ck


#: ModelConfig fields that may differ between a checkpoint and the model it initialises
#: (:func:`load_weights`): runtime options and the solver's first guess (same weights)
_FINE_TUNE_FREE = ("precision", "fuse_cell", "init", "oi_Lx_km", "oi_Ly_km", "oi_Lt_days", "oi_noise_std")


def load_weights(model: FourDVarNet, model_cfg: ModelConfig, path: str | os.PathLike) -> Path:
    """Load the weights of checkpoint ``path`` (a path, ``default`` or ``shipped:NAME``: the
    shipped weights, :func:`oceanda.weights.resolve_checkpoint`) into ``model`` (fine-tuning
    start; optimizer, history and normalisation are not taken). The architecture must match
    ``model_cfg``; the first guess (``init``, ``oi_*``) and runtime options may differ.
    Returns the path; :class:`InputError` naming it when it does not fit."""
    from oceanda.weights import resolve_checkpoint

    path = resolve_checkpoint(str(path))
    ck = read_checkpoint(path)
    have = ck["model_cfg"]
    diff = {k: (v, getattr(have, k)) for k, v in asdict(model_cfg).items()
            if k not in _FINE_TUNE_FREE and getattr(have, k) != v}
    if diff:
        raise InputError(f"init_checkpoint {path} does not fit the model config: "
                         + ", ".join(f"{k}: config {a!r} vs checkpoint {b!r}" for k, (a, b) in diff.items()))
    model.load_state_dict(ck["state_dict"])
    return Path(path)


def checkpoint_mode(ck: dict[str, Any]) -> dict[str, Any] | None:
    """The patch mode record of a loaded checkpoint: ``extra["mode"]``, or derived from
    ``extra["patch"]`` for checkpoints written before modes were recorded; ``None`` when
    unknown (e.g. a checkpoint saved without ``extra``)."""
    from oceanda.data.patches import mode_record_from_patch

    extra = ck.get("extra") or {}
    rec = extra.get("mode")
    return rec if isinstance(rec, dict) else mode_record_from_patch(extra.get("patch"))


# ----------------------------------------------------------------------------- loop


def make_optimizer(model: FourDVarNet, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam, the prior at lr/2 (as the anchor)."""
    prior_ids = {id(p) for p in model.prior.parameters()}
    rest = [p for p in model.parameters() if id(p) not in prior_ids]
    return torch.optim.Adam([{"params": rest, "lr": cfg.lr},
                             {"params": list(model.prior.parameters()), "lr": cfg.lr / 2}],
                            weight_decay=cfg.weight_decay)


def predict(model: FourDVarNet, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reconstruction of a batch (validation; no autograd graph kept)."""
    with torch.inference_mode():
        return model(batch["obs"], batch["ocean"], x0=batch.get("x0"))


# ----------------------------------------------------------------------------- the model's part of `oceanda train`


def datasets(model_cfg: ModelConfig, truth, obs, ocean, grid, tr_starts, va_starts, common: dict[str, Any],
             aug: int, mode: str, lead: int) -> tuple[PatchDataset, PatchDataset | None]:
    """Training and validation patches (``common``: size, weight, norm, holdout, seed); with
    ``model.init=oi`` each item carries its OI first guess ``x0``."""
    common = dict(common, lead=lead)
    if model_cfg.init == "oi":  # the solver's first guess: each item's OI analysis (oceanda.train.data)
        common.update(oi=model_cfg.oi_kwargs(), lon=grid.lon, lat=grid.lat)
    train_ds = PatchDataset(truth, obs, ocean, tr_starts, aug=aug, mode=mode, **common)
    val_ds = None
    if len(va_starts):
        val_ds = PatchDataset(truth, obs, ocean, va_starts, aug=0, mode=mode, cache_oi=True, **common)
    return train_ds, val_ds


def build(model_cfg: ModelConfig) -> FourDVarNet:
    """A fresh model (weights from torch's current RNG)."""
    return build_model(model_cfg)


#: 4DVarNet's part of the training loop (:func:`oceanda.train.loop.fit`)
TASK = TrainingTask("4dvarnet", loss_terms=loss_terms, make_optimizer=make_optimizer, predict=predict,
                    save=save_checkpoint, read=load_checkpoint)


