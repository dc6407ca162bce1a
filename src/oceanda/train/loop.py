"""The one training loop of the models of :mod:`oceanda.train` (4DVarNet, SPDE-prior 4DVarNet).

A model contributes a :class:`TrainingTask`: its loss terms, its optimiser, its forward pass
for validation, its checkpoint writer / reader and an optional step before the first epoch.
Everything else is shared: epochs over seeded global batches, the optimisation step with
gradients averaged over ranks, validation, checkpoints after every epoch, resuming.

Data parallelism: every rank holds the model; global batch ``g`` of ``B x world`` patches
(one seeded permutation per epoch, the same on every rank) is split in rank order; after
``backward`` the gradients are summed with ``torch.distributed.all_reduce`` and divided by
the world size. With equal per-rank batches this is exactly one process on the
concatenated batch (tested with ``mpiexec -n 2``). torch.distributed is initialised from
the MPI environment (:func:`init_distributed`: rank / world size from
:mod:`oceanda.parallel.comm`, rank 0's address and a free port broadcast over MPI; gloo on
CPU, NCCL on GPU).

Checkpoints are written to a temporary file and renamed (:func:`save_atomic`): ``checkpoint.pt``
after every epoch (weights, optimiser and scheduler state, epoch, history), ``best_checkpoint.pt``
at the best validation RMSE. ``extra["mode"]`` is the patch mode the model is trained for
(:meth:`oceanda.data.patches.PatchGeometry.mode_record`); resuming with another mode is refused.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oceanda.data.files import write_bytes_atomic
from oceanda.errors import ConfigError, InputError
from oceanda.train.data import Normalisation

log = logging.getLogger("oceanda.train")

__all__ = ["TrainingTask", "DistContext", "init_distributed", "shutdown_distributed", "save_atomic",
           "optimise_step", "train_step", "run_epoch", "validate", "fit", "write_history"]


@dataclass(frozen=True)
class TrainingTask:
    """What a model contributes to the training loop.

    Attributes:
        name: the model kind (``"4dvarnet"``, ``"spde_4dvarnet"``).
        loss_terms: ``(model, batch, cfg) -> {term: (scalar) tensor}`` with ``"total"`` (the
            loss to minimise) and optionally ``"out"`` (the output; not logged).
        make_optimizer: ``(model, cfg) -> torch.optim.Optimizer`` (the loop adds cosine
            annealing over ``cfg.epochs``).
        predict: ``(model, batch) -> out`` in normalised units, for validation (no gradient).
        save: ``(path, model, model_cfg, norm, cfg, optimizer, scheduler, epoch, history, extra)
            -> path``, an atomic checkpoint write.
        read: ``(path, model_cfg) -> checkpoint dict`` (``state_dict``, ``optimizer``,
            ``scheduler``, ``epoch``, ``history``, ``extra``); an :class:`InputError` naming a
            file that is not such a checkpoint or whose model config differs.
        prepare: ``(model, train_ds, cfg, device) -> None`` before the first epoch of a fresh
            run (e.g. a maximum-likelihood start), or None.
    """

    name: str
    loss_terms: Callable[..., dict[str, torch.Tensor]]
    make_optimizer: Callable[..., torch.optim.Optimizer]
    predict: Callable[..., torch.Tensor]
    save: Callable[..., Path]
    read: Callable[..., dict[str, Any]]
    prepare: Callable[..., None] | None = None


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


def init_distributed(device: torch.device | None = None, backend: str = "auto", comm=None) -> DistContext:
    """torch.distributed from the MPI environment (serial without a launcher / one rank).

    Rank and size come from ``comm`` (default :func:`oceanda.parallel.comm.get_comm`). Rank 0 starts the
    rendezvous ``TCPStore`` on port 0 (the OS picks a free port and the store keeps it: no
    window in which another process could take it), broadcasts ``host:port`` over MPI and
    the other ranks connect to it. ``backend="auto"``: NCCL when ``device`` is CUDA, gloo
    otherwise.
    """
    from datetime import timedelta

    from oceanda.parallel.comm import get_comm

    comm = comm if comm is not None else get_comm()
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


def check_ranges(cfg: Any, where: str = "train") -> None:
    """Refuse out-of-range numbers of a training config (:class:`ConfigError` naming the key):
    ``epochs``, ``batch_size``, ``max_batches`` (or null), ``mle_items``, ``nll_crop`` >= 1;
    ``lr``, ``weight_decay``, ``grad_clip`` (0: no clipping), ``lr_theta`` and every loss weight
    ``w_*`` >= 0 (finite). Fields a config does not have are skipped."""
    for key in ("epochs", "batch_size", "max_batches", "mle_items", "nll_crop"):
        value = getattr(cfg, key, None)
        if value is not None and value < 1:
            raise ConfigError(f"{where}.{key} must be >= 1{' or null' if key == 'max_batches' else ''}, got {value}")
    keys = ["lr", "weight_decay", "grad_clip", "lr_theta", *sorted(k for k in vars(cfg) if k.startswith("w_"))]
    for key in keys:
        value = getattr(cfg, key, None)
        if value is not None and not (0 <= value < math.inf):
            raise ConfigError(f"{where}.{key} must be a finite number >= 0, got {value}")


def save_atomic(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save(state, path)`` through a temporary file in the same folder and a rename,
    so that ``path`` is never left half-written (an interrupted write removes the temporary).
    A ``state_dict`` entry gets its digest recorded (:func:`oceanda.assim.checkpoint.state_digest`),
    verified when the checkpoint is read. The state is serialised in memory first: a full device
    is then Python's ``OSError`` (ENOSPC, reported as a user error), not torch's opaque
    ``RuntimeError``."""
    from oceanda.assim.checkpoint import DIGEST_KEY, state_digest

    if isinstance(state.get("state_dict"), dict):
        state = {**state, DIGEST_KEY: state_digest(state["state_dict"])}
    buf = io.BytesIO()
    torch.save(state, buf)
    return write_bytes_atomic(path, buf.getvalue())


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


def train_step(task: TrainingTask, model: torch.nn.Module, opt, batch: dict[str, torch.Tensor], cfg,
               dist: DistContext | None = None) -> dict[str, float]:
    """One optimisation step of ``task``'s loss on ``batch`` (this rank's share of the global batch)."""
    dist = dist or DistContext()
    model.train()
    opt.zero_grad(set_to_none=True)
    terms = task.loss_terms(model, batch, cfg)
    return optimise_step(model, opt, terms, cfg.grad_clip, dist)


def optimise_step(model: torch.nn.Module, opt, terms: dict[str, torch.Tensor], grad_clip: float | None,
                  dist: DistContext) -> dict[str, float]:
    """Backward of ``terms["total"]``, gradients averaged over ranks (one flat all-reduce),
    clipped to norm ``grad_clip``, one optimiser step. Returns the loss terms (all but the
    output ``"out"``) as floats averaged over ranks."""
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


def run_epoch(task: TrainingTask, model, opt, sched, train_ds, cfg, epoch: int, device, dist: DistContext,
              progress: bool = False) -> dict[str, Any]:
    """One training epoch: :func:`train_step` with ``task``'s loss on this rank's share of each
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
        terms = train_step(task, model, opt, _to(_collate(train_ds, mine), device), cfg, dist)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        if bar is not None:
            bar.set_postfix(loss=f"{terms['total']:.4g}")
            bar.update()
    if bar is not None:
        bar.close()
    sched.step()
    return {"epoch": epoch, **{f"train_{k}": v / len(batches) for k, v in sums.items()},
            "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0, "batches": len(batches)}


@torch.no_grad()
def validate(task: TrainingTask, model: torch.nn.Module, ds, norm: Normalisation, device, batch_size: int = 4,
             dist: DistContext | None = None) -> dict[str, float]:
    """Blend-weighted RMSE [m] of the reconstruction vs the target on ``ds``, and the score
    ``1 - rmse / rms(target)`` (targets in physical units; patches split over ranks)."""
    dist = dist or DistContext()
    model.eval()
    acc = torch.zeros(3, dtype=torch.float64)
    idx = np.arange(len(ds))[dist.rank::dist.world]
    for i in range(0, len(idx), batch_size):
        b = _to(_collate(ds, idx[i:i + batch_size]), device)
        out = task.predict(model, b)
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


def fit(task: TrainingTask, model: torch.nn.Module, model_cfg: Any, train_ds, val_ds,
        norm: Normalisation | dict[str, float], cfg, checkpoint: str | os.PathLike | None = None,
        resume: bool = False, device: torch.device | str = "cpu", dist: DistContext | None = None,
        progress: bool = True, extra: dict | None = None, validate_start: bool = False,
        snapshots: bool = False) -> list[dict[str, float]]:
    """Train ``model`` with ``task``'s loss for ``cfg.epochs`` epochs; returns the per-epoch history.

    ``cfg`` carries at least ``epochs, batch_size, grad_clip, seed, max_batches``. With
    ``checkpoint``, rank 0 writes it after every epoch (``<checkpoint>``: the last epoch,
    ``best_<name>``: the best validation RMSE). ``resume`` restarts from an existing checkpoint
    (weights, optimizer, scheduler, epoch, history); its model config and patch mode must match.
    Items of the datasets are dicts with ``obs, tgt, weight (T, H, W)``, ``ocean (H, W)`` and
    whatever the task's model reads.

    ``validate_start``: a fresh run first validates the untrained start (after ``task.prepare``;
    recorded as ``extra["val_start"]``) and that start competes for ``best_<name>``: the selected
    weights are never worse on the validation set than the weights training started from (if no
    epoch beats the start, ``best_<name>`` holds the start, ``epoch`` -1). ``snapshots``: rank 0
    also keeps every epoch's weights (no optimizer state) as ``snapshots/epoch_NNN.pt`` next to
    ``checkpoint``, and the validated start as ``snapshots/start.pt`` (a learning curve can score
    each on held-out data). Every record carries
    ``steps``, the optimiser steps of this run so far.
    """
    if not isinstance(norm, Normalisation):
        norm = Normalisation(float(norm["mean"]), float(norm["std"]))
    dist = dist or DistContext()
    device = torch.device(device)
    model.to(device)
    opt = task.make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
    history: list[dict[str, float]] = []
    start = 0
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if resume and ckpt is not None and ckpt.is_file():
        ck = task.read(ckpt, model_cfg)
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
        start = int(ck.get("epoch", -1)) + 1
        if dist.rank == 0:
            log.info("resumed from %s at epoch %d", ckpt, start)
    extra = dict(extra or {})
    if resume and ckpt is not None and ckpt.is_file():
        extra = (ck.get("extra") or {}) | extra  # keeps the first stage's "val_start"
    if start == 0 and task.prepare is not None:
        task.prepare(model, train_ds, cfg, device)
    best = min((h["val_rmse"] for h in history if math.isfinite(h.get("val_rmse", math.nan))), default=math.inf)
    if validate_start and start == 0 and val_ds is not None and len(val_ds):
        rec0 = validate(task, model, val_ds, norm, device, cfg.batch_size, dist)
        extra["val_start"] = rec0
        if dist.rank == 0:
            log.info("untrained start: %s", ", ".join(f"{k}={v:.4g}" for k, v in rec0.items()))
            if ckpt is not None and math.isfinite(rec0["val_rmse"]):
                task.save(ckpt.with_name("best_" + ckpt.name), model, model_cfg, norm, cfg, None, None, -1,
                          history, extra)
            if ckpt is not None and snapshots:
                task.save(ckpt.parent / "snapshots" / "start.pt", model, model_cfg, norm, cfg, None, None, -1,
                          history, extra)
        best = min(best, rec0["val_rmse"]) if math.isfinite(rec0["val_rmse"]) else best
        dist.barrier()
    steps = sum(int(h.get("batches", 0)) for h in history)
    for epoch in range(start, cfg.epochs):
        rec = run_epoch(task, model, opt, sched, train_ds, cfg, epoch, device, dist, progress)
        steps += rec["batches"]
        rec["steps"] = steps
        if val_ds is not None and len(val_ds):
            rec.update(validate(task, model, val_ds, norm, device, cfg.batch_size, dist))
        history.append(rec)
        if dist.rank == 0:
            log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4g}" for k, v in rec.items() if k != "epoch"))
            if ckpt is not None:
                task.save(ckpt, model, model_cfg, norm, cfg, opt, sched, epoch, history, extra)
                if snapshots:
                    task.save(ckpt.parent / "snapshots" / f"epoch_{epoch:03d}.pt", model, model_cfg, norm, cfg,
                              None, None, epoch, history, extra)
                v = rec.get("val_rmse", math.nan)
                if math.isfinite(v) and v < best:
                    best = v
                    task.save(ckpt.with_name("best_" + ckpt.name), model, model_cfg, norm, cfg,
                              None, None, epoch, history, extra)
        dist.barrier()
    return history
