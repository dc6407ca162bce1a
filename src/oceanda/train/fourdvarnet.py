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
epochs, gradient-norm clipping.

Data parallelism: every rank holds the model; global batch ``g`` of ``B x world`` patches
(one seeded permutation per epoch, the same on every rank) is split in rank order; after
``backward`` the gradients are summed with ``torch.distributed.all_reduce`` and divided by
the world size. With equal per-rank batches this is exactly one process on the
concatenated batch (tested with ``mpiexec -n 2``). torch.distributed is initialised from
the MPI environment (:func:`init_distributed`: rank / world size from
:mod:`oceanda.parallel.comm`, rank 0's address and a free port broadcast over MPI; gloo on
CPU, NCCL on GPU).

Checkpoints (:func:`save_checkpoint` / :func:`load_checkpoint`) hold the model config,
weights, normalisation, training config, optimizer / scheduler state, epoch and history;
they are written to a temporary file and renamed. A corrupted, foreign or mismatching file
raises :class:`oceanda.errors.InputError` naming it. ``extra["mode"]`` (written by
``oceanda train``) is the patch mode the model was trained for
(:meth:`oceanda.data.patches.PatchGeometry.mode_record`, read back by
:func:`checkpoint_mode`); resuming with another mode is refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
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
from oceanda.errors import InputError
from oceanda.train.data import Normalisation

log = logging.getLogger("oceanda.train")


# ----------------------------------------------------------------------------- configs

__all__ = ["ModelConfig", "build_model", "TrainConfig", "fit", "train_step", "load_checkpoint",
           "save_checkpoint", "save_atomic", "checkpoint_mode", "init_distributed", "shutdown_distributed", "DistContext", "run_epoch",
           "optimise_step", "write_history", "load_weights"]


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
        return dataclass_from_dict(cls, d, "train config")


# ----------------------------------------------------------------------------- distributed


@dataclass
class DistContext:
    """Rank / world of the data-parallel group (``world == 1``: no torch.distributed)."""

    rank: int = 0
    world: int = 1
    backend: str | None = None

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device: torch.device | None = None, backend: str = "auto") -> DistContext:
    """torch.distributed from the MPI environment (serial without a launcher / one rank).

    Rank and size come from :func:`oceanda.parallel.comm.get_comm`. Rank 0 starts the
    rendezvous ``TCPStore`` on port 0 (the OS picks a free port and the store keeps it: no
    window in which another process could take it), broadcasts ``host:port`` over MPI and
    the other ranks connect to it. ``backend="auto"``: NCCL when ``device`` is CUDA, gloo
    otherwise.
    """
    from datetime import timedelta

    from oceanda.parallel.comm import get_comm

    comm = get_comm()
    if comm.size == 1:
        return DistContext()
    if backend == "auto":
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    if torch.distributed.is_initialized():
        return DistContext(comm.rank, comm.size, backend)
    timeout = timedelta(minutes=10)
    store, where = None, None
    if comm.rank == 0:
        host = socket.gethostname()
        try:
            socket.getaddrinfo(host, 0)
        except OSError:
            host = "127.0.0.1"
        store = torch.distributed.TCPStore(host, 0, comm.size, is_master=True, timeout=timeout,
                                           wait_for_workers=False)
        where = (host, store.port)
    host, port = comm.bcast(where, root=0)
    if store is None:
        store = torch.distributed.TCPStore(host, port, comm.size, is_master=False, timeout=timeout)
    torch.distributed.init_process_group(backend, store=store, rank=comm.rank, world_size=comm.size,
                                         timeout=timeout)
    return DistContext(comm.rank, comm.size, backend)


def shutdown_distributed() -> None:
    """Leave torch.distributed cleanly: barrier, then destroy the process group.

    Without the barrier the rank that hosts the TCP store (rank 0) may tear it down while
    another rank's gloo threads still talk to it, and that rank dies at exit with
    ``terminate called without an active exception`` (SIGABRT, mpiexec exit 6).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        from oceanda.parallel.comm import get_comm

        get_comm().barrier()


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


def save_atomic(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save(state, path)`` through a temporary file in the same folder and a rename,
    so that ``path`` is never left half-written (an interrupted write removes the temporary)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
    """Load the weights of checkpoint ``path`` into ``model`` (fine-tuning start; optimizer,
    history and normalisation are not taken). The architecture must match ``model_cfg``;
    the first guess (``init``, ``oi_*``) and runtime options may differ. Returns the path;
    :class:`InputError` naming it when it does not fit."""
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


def _global_batches(n: int, batch: int, world: int, epoch: int, seed: int) -> list[np.ndarray]:
    """Global batches of ``batch x world`` indices (one seeded permutation per epoch; a
    trailing incomplete global batch is dropped so every rank has ``batch`` items)."""
    perm = np.random.default_rng((seed, epoch)).permutation(n)
    g = batch * world
    return [perm[i:i + g] for i in range(0, n - g + 1, g)]


def _collate(ds, idx) -> dict[str, torch.Tensor]:
    items = [ds[int(i)] for i in idx]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _to(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def make_optimizer(model: FourDVarNet, cfg: TrainConfig):
    """Adam (prior at lr/2, as the anchor) + cosine annealing over ``cfg.epochs``."""
    prior_ids = {id(p) for p in model.prior.parameters()}
    rest = [p for p in model.parameters() if id(p) not in prior_ids]
    opt = torch.optim.Adam([{"params": rest, "lr": cfg.lr},
                            {"params": list(model.prior.parameters()), "lr": cfg.lr / 2}],
                           weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
    return opt, sched


def train_step(model: FourDVarNet, opt, batch: dict[str, torch.Tensor], cfg: TrainConfig,
               dist: DistContext | None = None) -> dict[str, float]:
    """One optimisation step on ``batch`` (this rank's share of the global batch)."""
    dist = dist or DistContext()
    model.train()
    opt.zero_grad(set_to_none=True)
    terms = loss_terms(model, batch, cfg)
    return optimise_step(model, opt, terms, cfg.grad_clip, dist)


def optimise_step(model: torch.nn.Module, opt, terms: dict[str, torch.Tensor], grad_clip: float | None,
                  dist: DistContext) -> dict[str, float]:
    """Backward of ``terms["total"]``, gradients averaged over ranks (one flat all-reduce),
    clipped to norm ``grad_clip``, one optimiser step. Returns the loss terms (all but the
    output ``"out"``) as floats averaged over ranks. Shared by both 4DVarNet trainers."""
    terms["total"].backward()
    params = [p for p in model.parameters() if p.requires_grad]
    if dist.world > 1:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce_(flat)
        flat /= dist.world
        o = 0
        for p in params:
            n = p.numel()
            p.grad = flat[o:o + n].view_as(p).clone()
            o += n
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    out = {k: float(v.detach()) for k, v in terms.items() if k != "out"}
    if dist.world > 1:
        t = dist.all_reduce_(torch.tensor([out[k] for k in sorted(out)], dtype=torch.float64)) / dist.world
        out = dict(zip(sorted(out), t.tolist()))
    return out


def write_history(history: list[dict], out_dir: Path, dist: DistContext) -> None:
    """Rank 0: ``out_dir/history.json`` and the last epoch's numbers on stdout; then leave
    torch.distributed (:func:`shutdown_distributed`). The end of both training apps."""
    if dist.rank == 0:
        from oceanda.data.io import write_json_atomic

        write_json_atomic(Path(out_dir) / "history.json", history)
        last = history[-1] if history else {}
        print(json.dumps({k: v for k, v in last.items() if isinstance(v, (int, float))}))
    if dist.world > 1:
        shutdown_distributed()


@torch.no_grad()
def validate(model: FourDVarNet, ds, norm: Normalisation, device, batch_size: int = 4,
             dist: DistContext | None = None) -> dict[str, float]:
    """Blend-weighted RMSE [m] of the reconstruction vs the target on ``ds``, and the score
    ``1 - rmse / rms(target)`` (targets in physical units; patches split over ranks)."""
    dist = dist or DistContext()
    model.eval()
    acc = torch.zeros(3, dtype=torch.float64)
    idx = np.arange(len(ds))[dist.rank::dist.world]
    with torch.inference_mode():
        for i in range(0, len(idx), batch_size):
            b = _to(_collate(ds, idx[i:i + batch_size]), device)
            out = model(b["obs"], b["ocean"], x0=b.get("x0"))
            ok = (b["weight"] > 0) & torch.isfinite(b["tgt"])
            w = torch.where(ok, b["weight"], torch.zeros_like(b["weight"])).double()
            err = torch.where(ok, out - b["tgt"], torch.zeros_like(out)).double() * norm.std
            tgt = torch.where(ok, b["tgt"], torch.zeros_like(out)).double() * norm.std + norm.mean * ok
            acc += torch.stack([(w * err ** 2).sum(), (w * tgt ** 2).sum(), w.sum()]).cpu()
    dist.all_reduce_(acc)
    if acc[2] <= 0:
        return {"val_rmse": math.nan, "val_score": math.nan}
    rmse = math.sqrt(acc[0] / acc[2])
    rms = math.sqrt(acc[1] / acc[2])
    return {"val_rmse": rmse, "val_score": 1.0 - rmse / rms if rms > 0 else math.nan}


def run_epoch(step, model, opt, sched, train_ds, cfg, epoch: int, device, dist: DistContext,
              progress: bool = False) -> dict[str, Any]:
    """One training epoch, shared by 4DVarNet and the SPDE-prior 4DVarNet trainers.

    ``step(model, opt, batch, cfg, dist) -> {term: float}`` on this rank's share of each
    global batch (:func:`_global_batches`: ``cfg.batch_size`` items per rank, at most
    ``cfg.max_batches`` global batches), then one scheduler step. Returns the epoch record
    ``{"epoch", "train_<term>" (mean over batches), "lr", "seconds"}``.
    """
    t0 = time.perf_counter()
    if hasattr(train_ds, "set_epoch"):
        train_ds.set_epoch(epoch)
    batches = _global_batches(len(train_ds), cfg.batch_size, dist.world, epoch, cfg.seed)
    if cfg.max_batches is not None:
        batches = batches[:cfg.max_batches]
    if not batches:
        raise InputError(f"{len(train_ds)} training patches < one global batch of "
                         f"{cfg.batch_size} x {dist.world} ranks: lower train.batch_size")
    bar = None
    if progress and dist.rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch")
    sums: dict[str, float] = {}
    for g in batches:
        mine = g[dist.rank * cfg.batch_size:(dist.rank + 1) * cfg.batch_size]
        terms = step(model, opt, _to(_collate(train_ds, mine), device), cfg, dist)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        if bar is not None:
            bar.set_postfix(loss=f"{terms['total']:.4g}")
            bar.update()
    if bar is not None:
        bar.close()
    sched.step()
    return {"epoch": epoch, **{f"train_{k}": v / len(batches) for k, v in sums.items()},
            "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}


def fit(model: FourDVarNet, model_cfg: ModelConfig, train_ds, val_ds, norm: Normalisation,
        cfg: TrainConfig, checkpoint: str | os.PathLike | None = None, resume: bool = False,
        device: torch.device | str = "cpu", dist: DistContext | None = None,
        progress: bool = True, extra: dict | None = None) -> list[dict[str, float]]:
    """Train ``model`` for ``cfg.epochs`` epochs; returns the per-epoch history.

    With ``checkpoint``, rank 0 writes it after every epoch (``<checkpoint>``: the last
    epoch, ``best_<name>``: the best validation RMSE). ``resume`` restarts from an existing
    checkpoint (weights, optimizer, scheduler, epoch, history); its model config must match.
    """
    dist = dist or DistContext()
    device = torch.device(device)
    model.to(device)
    opt, sched = make_optimizer(model, cfg)
    history: list[dict[str, float]] = []
    start = 0
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if resume and ckpt is not None and ckpt.is_file():
        ck = load_checkpoint(ckpt, expect=model_cfg)
        was = (ck.get("extra") or {}).get("mode")
        now = (extra or {}).get("mode")
        if isinstance(was, dict) and isinstance(now, dict) and was != now:
            raise InputError(f"checkpoint {ckpt} was trained for patch mode {was} but this run's "
                             f"patches are {now}: resume with the same patch config or use another out_dir")
        model.load_state_dict(ck["state_dict"])
        if ck.get("optimizer"):
            opt.load_state_dict(ck["optimizer"])
        if ck.get("scheduler"):
            sched.load_state_dict(ck["scheduler"])
        history = list(ck.get("history", []))
        start = int(ck["epoch"]) + 1
        if dist.rank == 0:
            log.info("resumed from %s at epoch %d", ckpt, start)
    best = min((h["val_rmse"] for h in history if math.isfinite(h.get("val_rmse", math.nan))), default=math.inf)
    for epoch in range(start, cfg.epochs):
        rec = run_epoch(train_step, model, opt, sched, train_ds, cfg, epoch, device, dist, progress)
        if val_ds is not None and len(val_ds):
            rec.update(validate(model, val_ds, norm, device, cfg.batch_size, dist))
        history.append(rec)
        if dist.rank == 0:
            log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4g}" for k, v in rec.items() if k != "epoch"))
            if ckpt is not None:
                save_checkpoint(ckpt, model, model_cfg, norm, cfg, opt, sched, epoch, history, extra)
                v = rec.get("val_rmse", math.nan)
                if math.isfinite(v) and v < best:
                    best = v
                    save_checkpoint(ckpt.with_name("best_" + ckpt.name), model, model_cfg, norm, cfg,
                                    None, None, epoch, history, extra)
        dist.barrier()
    return history
