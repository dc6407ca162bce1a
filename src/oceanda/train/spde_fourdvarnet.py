"""Training of the SPDE-prior 4DVarNet (:mod:`oceanda.assim.spde_fourdvarnet`).

Loss of a batch (per sample, then averaged; ``w`` the blend weight x ocean, as
:mod:`oceanda.train.fourdvarnet`)::

    w_mse wmse(out - x_true) + w_nll NLL_c(x_true | Theta) / (T c^2) [+ w_grad wmse(|S out| - |S x_true|)]
        [+ w_nll_obs NLL(y | x_true, R) / m]   (the Gaussian observation likelihood: fits R)

``Theta`` is predicted from the observations only; the truth enters the loss and nothing
else. ``NLL_c`` is the exact SPDE negative log-likelihood (:meth:`SPDEPrior.nll`, dense
block log-determinants) of the truth on the centred ``c x c`` crop of the patch (``c =
nll_crop``), with the crop's own SPDE prior (closed crop borders) and ``Theta`` restricted
to the crop; patches whose crop holds land skip the term. The crop keeps the dense
log-determinant affordable (``c^2`` cells per frame); it is the lambda2 NLL of the paper,
restricted to a window. Semi-supervised mode (no truth): MSE on held-out observations only.
With ``model.mean=oi`` every item carries its OI analysis ``x0`` (:class:`oceanda.train.data.PatchDataset`
with ``oi``, as ``model=4dvarnet``'s ``init=oi``): the prior mean of the solver and of ``NLL_c``,
which is then the likelihood of the residual ``truth - x0`` (:func:`batch_theta`).
``theta_grad="nll"``: ``Theta`` and ``R`` are trained by the two likelihood terms only (maximum
likelihood) and enter the solver detached, so the MSE trains the solver (for a Gaussian truth
the MLE plus a converged solver is the exact OI; with ``"all"`` the MSE also bends ``Theta``
towards what suits the truncated solver). ``theta_init="mle"`` (``theta="global"``): before the
first epoch, :func:`fit_theta_mle` sets Theta by L-BFGS on the exact NLL (the kappa-std ridge of
the likelihood is too flat for Adam) and R by its closed form; with ``w_nll = w_nll_obs = 0`` and
``theta_grad="nll"`` they then stay fixed. ``w_mse = w_grad = 0`` (supervised): a likelihood-only
stage that does not run the solver (e.g. re-fitting Theta of an ``init_checkpoint``).

Optimiser: Adam (the Theta CNN and the noise variance at ``lr_theta`` times the rate),
cosine annealing over the epochs, gradient-norm clipping; the loop, data parallelism,
checkpoints after every epoch and resuming are :mod:`oceanda.train.loop`'s (:data:`TASK` is
what this model contributes to it; ``oceanda train model=spde_4dvarnet`` runs it). Checkpoints
are read back by :func:`oceanda.assim.spde_fourdvarnet.read_spde_checkpoint`.

Spread calibration of the Matheron members (after training, on training-period patches only):
:mod:`oceanda.train.spread`.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oceanda.assim.spde_fourdvarnet import (
    SPDEFourDVarNet,
    SPDEModelConfig,
    build_spde_model,
    read_spde_checkpoint,
    spde_checkpoint_state,
)
from oceanda.config_dataclass import from_mapping
from oceanda.errors import ConfigError, InputError
from oceanda.train.data import PatchDataset
from oceanda.train.fourdvarnet import sobel_magnitude, weighted_mse
from oceanda.train.loop import TrainingTask, _collate, _to, check_ranges, save_atomic

log = logging.getLogger("oceanda.train")

__all__ = ["SPDETrainConfig", "batch_theta", "fit_theta_mle", "make_spde_optimizer", "spde_loss_terms",
           "save_spde_checkpoint", "MetricPatches", "datasets", "build", "load_weights", "TASK"]


#: model config fields an ``init_checkpoint`` may differ in (same weights, other use of them)
_FINE_TUNE_FREE = ("mean", "oi_Lx_km", "oi_Ly_km", "oi_Lt_days", "oi_noise_std", "noise_std", "learn_noise",
                   "n_steps", "lr_grad", "dropout")


@dataclass
class SPDETrainConfig:
    """Optimisation settings of the SPDE-prior 4DVarNet."""

    epochs: int = 10
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    w_mse: float = 1.0         # lambda1
    w_nll: float = 0.1         # lambda2 (per-element NLL)
    w_grad: float = 0.0        # optional Sobel-gradient MSE
    nll_crop: int = 16         # side of the NLL crop (cells)
    w_nll_obs: float = 0.0     # NLL of the observations given the truth (fits the noise R; not with
                               # aug > 0, whose re-sampled observations are noise-free)
    lr_theta: float = 10.0     # learning-rate multiplier of the Theta CNN and the noise (few, slow scalars)
    theta_grad: str = "all"    # all: every loss term trains Theta and R | nll: only the likelihood terms do
                               # (Theta by NLL(truth | Theta), R by NLL(y | truth, R): maximum likelihood);
                               # the solver sees them detached, so the MSE trains the solver only
    theta_init: str = "none"   # mle (theta="global" only): before the first epoch, Theta by L-BFGS on the
                               # training truths' NLL and R by its closed-form MLE (the obs - truth misfit)
    mle_items: int = 256       # training items used by theta_init=mle
    mode: str = "supervised"   # supervised | semi
    seed: int = 333
    max_batches: int | None = None

    #: keys of ``oceanda train``'s ``train`` group read elsewhere / not used here
    IGNORED = ("w_prior",)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SPDETrainConfig:
        """The ``train`` section of ``oceanda train model=spde_4dvarnet``: typed (unknown keys
        refused, ``w_prior`` ignored) and checked."""
        cfg = from_mapping(cls, d, "train")
        if cfg.mode not in ("supervised", "semi"):
            raise ConfigError(f"train.mode must be 'supervised' or 'semi', got {cfg.mode!r}")
        if cfg.theta_init not in ("none", "mle"):
            raise ConfigError(f"train.theta_init must be 'none' or 'mle', got {cfg.theta_init!r}")
        if cfg.theta_grad not in ("all", "nll"):
            raise ConfigError(f"train.theta_grad must be 'all' or 'nll', got {cfg.theta_grad!r}")
        if cfg.mode == "supervised" and not any((cfg.w_mse, cfg.w_grad, cfg.w_nll, cfg.w_nll_obs)):
            raise ConfigError("train.w_mse, w_grad, w_nll and w_nll_obs are all 0: nothing to train")
        check_ranges(cfg, "train")
        if cfg.nll_crop < 2:
            raise ConfigError(f"train.nll_crop must be >= 2, got {cfg.nll_crop}")
        return cfg


# ----------------------------------------------------------------------------- losses


def _crop_slices(H: int, W: int, c: int) -> tuple[slice, slice]:
    c1, c2 = min(c, H), min(c, W)
    y0, x0 = (H - c1) // 2, (W - c2) // 2
    return slice(y0, y0 + c1), slice(x0, x0 + c2)


def crop_nll(model: SPDEFourDVarNet, theta: dict[str, torch.Tensor], truth: torch.Tensor,
             ocean: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, crop: int) -> torch.Tensor:
    """Per-element NLL ``(B,)`` of ``truth`` on the centred crop (0 where the crop holds land
    or non-finite truth; see the module docstring). A prior mean in ``theta`` (``"mean"``: ``(B,)``
    for ``mean="obs"``, ``(B, T, H, W)`` for ``"oi"``) enters as the NLL of the residual
    ``truth - mean`` under the zero-mean prior (the same value), so that samples of equal Theta
    share one prior."""
    B, T, H, W = truth.shape
    ys, xs = _crop_slices(H, W, crop)
    theta = dict(theta)
    mu = theta.pop("mean", None)
    if mu is not None:
        mu = mu.detach().to(truth.dtype)
        truth = truth - (mu.view(B, 1, 1, 1) if mu.dim() == 1 else mu)

    def crop_of(b: int) -> list[torch.Tensor]:  # what defines sample b's crop prior
        th = [v[b] if v.dim() == 1 else v[b, ys, xs] for v in theta.values()]
        return [t.detach() for t in th] + [dx[b, ys, xs], dy[b, ys, xs]]

    out = [torch.zeros((), dtype=torch.float64, device=truth.device) for _ in range(B)]
    groups: list[tuple[int, list[int]]] = []  # samples sharing one crop prior (first sample, members)
    for b in range(B):
        if not bool(ocean[b, ys, xs].all()) or not bool(torch.isfinite(truth[b, :, ys, xs]).all()):
            continue  # land in the crop: no term
        key = crop_of(b)
        g = next((g for g in groups if all(torch.equal(u, v) for u, v in zip(key, crop_of(g[0])))), None)
        if g is None:
            groups.append((b, [b]))
        else:
            g[1].append(b)
    # one prior and one NLL call (one log-determinant, the costly part) per group, batched over
    # its samples: e.g. theta="global" on a uniform grid is a single group
    for b0, members in groups:
        th = {k: (v[b0:b0 + 1] if v.dim() == 1 else v[b0:b0 + 1, ys, xs]).double() for k, v in theta.items()}
        prior = model.priors(th, ocean[b0:b0 + 1, ys, xs], dx[b0:b0 + 1, ys, xs].double(),
                             dy[b0:b0 + 1, ys, xs].double(), torch.float64)[0]
        tr = truth[members][:, :, ys, xs].double()
        nll = prior.nll(tr) / tr[0].numel()
        for j, b in enumerate(members):
            out[b] = nll[j]
    return torch.stack(out)


def batch_theta(model: SPDEFourDVarNet, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``Theta`` of a batch (from its observations) with, for ``mean="oi"``, the prior mean: the
    items' OI analyses ``x0`` (:class:`oceanda.train.data.PatchDataset` with ``oi``)."""
    theta = model.predict_theta(batch["obs"], batch["ocean"])
    return model.with_mean(theta, batch.get("x0") if model.cfg.mean == "oi" else None, tuple(batch["obs"].shape))


def spde_loss_terms(model: SPDEFourDVarNet, batch: dict[str, torch.Tensor],
                    cfg: SPDETrainConfig) -> dict[str, torch.Tensor]:
    """Forward + loss terms; ``batch`` holds ``obs, tgt, weight, ocean, dx, dy``. ``Theta`` is
    predicted from ``obs`` only (``tgt`` is not an input of the model)."""
    obs, tgt, w, ocean = batch["obs"], batch["tgt"], batch["weight"], batch["ocean"]
    if cfg.mode == "supervised" and not cfg.w_mse and not cfg.w_grad:
        # likelihood terms only (a Theta / R stage): the solver is not run
        theta = batch_theta(model, batch)
        total = torch.zeros(obs.shape[0], dtype=obs.dtype, device=obs.device)
        return _likelihood_terms(model, theta, batch, cfg, {}, total)
    if cfg.theta_grad == "nll":  # Theta and R by maximum likelihood only; the MSE trains the solver
        theta = batch_theta(model, batch)
        out = model(obs, ocean, batch["dx"], batch["dy"], theta={k: v.detach() for k, v in theta.items()},
                    R=model.R.detach())
    else:
        out, theta = model(obs, ocean, batch["dx"], batch["dy"], return_theta=True, mean=batch.get("x0"))
    mse = weighted_mse(out - tgt, w)
    terms = {"mse": mse}
    total = cfg.w_mse * mse
    if cfg.mode == "supervised" and cfg.w_grad:
        g = weighted_mse(sobel_magnitude(out) - sobel_magnitude(torch.nan_to_num(tgt)), w)
        terms["grad"] = g
        total = total + cfg.w_grad * g
    return _likelihood_terms(model, theta, batch, cfg, terms, total)


def _likelihood_terms(model: SPDEFourDVarNet, theta: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                      cfg: SPDETrainConfig, terms: dict[str, torch.Tensor], total: torch.Tensor
                      ) -> dict[str, torch.Tensor]:
    """Add the NLL terms (supervised) to per-sample ``terms`` / ``total``; batch means."""
    obs, tgt, ocean = batch["obs"], batch["tgt"], batch["ocean"]
    if cfg.mode == "supervised" and cfg.w_nll:
        nll = crop_nll(model, theta, tgt, ocean, batch["dx"], batch["dy"], cfg.nll_crop)
        terms["nll"] = nll.to(total.dtype)
        total = total + cfg.w_nll * nll.to(total.dtype)
    if cfg.mode == "supervised" and cfg.w_nll_obs:
        m = torch.isfinite(obs) & ocean.unsqueeze(1)
        r2 = torch.where(m, obs - tgt, torch.zeros_like(obs)) ** 2
        nobs = m.sum(dim=(1, 2, 3)).clamp_min(1).to(obs.dtype)
        R = model.R.to(obs.dtype)
        nll_obs = 0.5 * (r2.sum(dim=(1, 2, 3)) / R + nobs * torch.log(2 * math.pi * R)) / nobs
        terms["nll_obs"] = nll_obs
        total = total + cfg.w_nll_obs * nll_obs
    terms = {k: v.mean() for k, v in terms.items()}
    terms["total"] = total.mean()
    terms["noise_std"] = torch.sqrt(model.R.detach())
    for k, v in theta.items():
        terms[f"theta_{k}"] = v.detach().mean()
    return terms


# ----------------------------------------------------------------------------- checkpoints


def save_spde_checkpoint(path: str | os.PathLike, model: SPDEFourDVarNet, norm: dict[str, float],
                         train_cfg: SPDETrainConfig | None = None, optimizer=None, scheduler=None,
                         epoch: int = -1, history: list | None = None, extra: dict | None = None) -> Path:
    """Write an SPDE-4DVarNet checkpoint atomically (:func:`save_atomic`)."""
    state = spde_checkpoint_state(
        model, norm, train_config=None if train_cfg is None else asdict(train_cfg),
        optimizer=None if optimizer is None else optimizer.state_dict(),
        scheduler=None if scheduler is None else scheduler.state_dict(),
        epoch=int(epoch), history=list(history or []), extra=dict(extra or {}))
    return save_atomic(state, path)


def fit_theta_mle(model: SPDEFourDVarNet, ds, cfg: SPDETrainConfig, device: torch.device | str = "cpu",
                  max_iter: int = 25) -> dict[str, float]:
    """Maximum-likelihood ``Theta`` and ``R`` of a ``theta="global"`` model on the first
    ``cfg.mle_items`` training items: ``theta_global`` by L-BFGS (strong Wolfe) on the mean crop
    NLL of the truths (:func:`crop_nll`, crop ``cfg.nll_crop``), ``R`` by its closed form, the
    mean squared observation-minus-truth misfit (the minimiser of the observation NLL).
    The truth is a training target here, as in the loss; nothing of it reaches inference.
    Returns the fitted values."""
    if model.cfg.theta != "global":
        raise ConfigError(f"train.theta_init=mle needs model.theta=global, got {model.cfg.theta!r}")
    n = min(len(ds), int(cfg.mle_items))
    b = _to(_collate(ds, np.arange(n)), device)
    ok = torch.isfinite(b["obs"]) & b["ocean"].unsqueeze(1) & torch.isfinite(b["tgt"])
    with torch.no_grad():
        if bool(ok.any()) and model.log_noise.requires_grad:
            r2 = ((b["obs"] - b["tgt"])[ok].double() ** 2).mean().clamp_min(1e-12)
            model.log_noise.fill_(0.5 * float(torch.log(r2)))
    opt = torch.optim.LBFGS([model.theta_global], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = crop_nll(model, batch_theta(model, b), b["tgt"], b["ocean"], b["dx"], b["dy"], cfg.nll_crop).mean()
        loss.backward()
        return loss

    loss = float(opt.step(closure).detach())
    model.theta_global.grad = None
    with torch.no_grad():
        th = {k: float(v[0]) for k, v in model.predict_theta(b["obs"][:1], b["ocean"][:1]).items()}
    out = {**{f"mle_{k}": v for k, v in th.items()}, "mle_noise_std": float(model.R.detach().sqrt()), "mle_nll": loss}
    log.info("theta_init=mle on %d items: %s", n, ", ".join(f"{k}={v:.4g}" for k, v in out.items()))
    return out


def make_spde_optimizer(model: SPDEFourDVarNet, cfg: SPDETrainConfig) -> torch.optim.Adam:
    """Adam: the solver at ``lr``, the Theta CNN and the noise at ``lr * lr_theta``."""
    theta = model.theta_net.parameters() if model.theta_net is not None else [model.theta_global]
    fast = [p for p in [*theta, model.log_noise] if p.requires_grad]
    ids = {id(p) for p in fast}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return torch.optim.Adam([{"params": rest, "lr": cfg.lr},
                             {"params": fast, "lr": cfg.lr * cfg.lr_theta}], weight_decay=cfg.weight_decay)


# ----------------------------------------------------------------------------- data


class MetricPatches(torch.utils.data.Dataset):
    """A :class:`oceanda.train.data.PatchDataset` whose items also carry the patch's cell
    sizes ``dx, dy (H, W)`` in the model's length unit."""

    def __init__(self, base, dx: np.ndarray, dy: np.ndarray) -> None:
        self.base = base
        self.dx = torch.as_tensor(np.asarray(dx, np.float32))
        self.dy = torch.as_tensor(np.asarray(dy, np.float32))

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        item = dict(self.base[idx])
        t, y, x = self.base.starts[idx % len(self.base.starts)]
        _, H, W = self.base.size
        item["dx"] = self.dx[y:y + H, x:x + W]
        item["dy"] = self.dy[y:y + H, x:x + W]
        return item


def datasets(model_cfg: SPDEModelConfig, truth, obs, ocean, grid, tr_starts, va_starts, common: dict[str, Any],
             aug: int, mode: str, lead: int = 0) -> tuple[MetricPatches, MetricPatches | None]:
    """Training and validation patches carrying the cells' sizes in the model's length unit
    (``common``: size, weight, norm, holdout, seed). Mapping patches only (``lead`` 0). With
    ``model.mean=oi`` each item carries its OI analysis ``x0`` (the prior mean), computed as
    ``model=4dvarnet``'s ``init=oi`` first guess (:class:`PatchDataset` ``oi``)."""
    if lead:
        raise ConfigError(f"patch.lead={lead}: spde_4dvarnet trains mapping patches only")
    u = model_cfg.length_unit_m
    dx, dy = grid.dx_m / u, grid.dy_m / u
    if model_cfg.mean == "oi":
        common = dict(common, oi=model_cfg.oi_kwargs(), lon=grid.lon, lat=grid.lat)
    train_ds = MetricPatches(PatchDataset(truth, obs, ocean, tr_starts, aug=aug, mode=mode, **common), dx, dy)
    val_ds = None
    if len(va_starts):
        val_ds = MetricPatches(PatchDataset(truth, obs, ocean, va_starts, aug=0, mode=mode, cache_oi=True, **common),
                               dx, dy)
    return train_ds, val_ds


def build(model_cfg: SPDEModelConfig) -> SPDEFourDVarNet:
    """A fresh model (weights from torch's current RNG)."""
    return build_spde_model(model_cfg)


def load_weights(model: SPDEFourDVarNet, model_cfg: SPDEModelConfig, path: str | os.PathLike) -> Path:
    """Load the weights of the SPDE-4DVarNet checkpoint ``path`` into ``model`` (a start, e.g. a
    second stage with other loss weights); the model config must match but for
    ``mean, oi_*, noise_std, learn_noise, n_steps, lr_grad, dropout``. :class:`InputError` naming it."""
    ck = read_spde_checkpoint(str(path))
    have, want = asdict(ck["model_cfg"]), asdict(model_cfg)
    diff = {k: (want[k], have[k]) for k in want if k not in _FINE_TUNE_FREE and want[k] != have[k]}
    if diff:
        raise InputError(f"init_checkpoint {path} does not fit the model config: "
                         + ", ".join(f"{k}: config {a!r} vs checkpoint {b!r}" for k, (a, b) in diff.items()))
    model.load_state_dict(ck["state_dict"])
    return Path(path)


@torch.no_grad()
def predict(model: SPDEFourDVarNet, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reconstruction of a batch (validation)."""
    return model(batch["obs"], batch["ocean"], batch["dx"], batch["dy"], mean=batch.get("x0"))


def _save(path, model, model_cfg, norm, cfg, optimizer, scheduler, epoch, history, extra) -> Path:
    return save_spde_checkpoint(path, model, norm.to_dict(), cfg, optimizer, scheduler, epoch, history, extra)


def _prepare(model: SPDEFourDVarNet, train_ds, cfg: SPDETrainConfig, device) -> None:
    if cfg.theta_init == "mle":
        fit_theta_mle(model, train_ds, cfg, device)


#: the SPDE-prior 4DVarNet's part of the training loop (:func:`oceanda.train.loop.fit`)
TASK = TrainingTask("spde_4dvarnet", loss_terms=spde_loss_terms, make_optimizer=make_spde_optimizer,
                    predict=predict, save=_save, read=lambda path, expect: read_spde_checkpoint(path, expect=expect),
                    prepare=_prepare)
