"""Training of the neural band prior on objective (3.5) of Blanke et al. (2024).

    minimise_theta  sum_k sum_i | A(z_k^(i), y^(i); theta, s_k) - x^(i) |^2,
    z_k^(i) = s_k z_0^(i) + (1 - s_k) x^(i)                                    (3.4)

over the temperature levels ``s_k`` (:func:`oceanda.assim.incremental.temperature_levels`;
one level ``s = 1`` is the one-shot objective (3.3)). Each minibatch holds every level of
its samples. ``A`` is the MAP operator (gradients through the banded solve by implicit
differentiation) or, for the unconditional ablation, the prior mean ``mu(z_k; theta, s_k)``.
Adam with a cosine learning-rate decay and gradient-norm clipping. With validation pairs
(``val``, trajectories held out of the training pairs, never the test windows) the
parameters of the epoch of lowest validation RMSE are kept (early stopping by restoring the
best epoch: the schedule still runs all ``epochs``).

A step whose loss or gradient is not finite, or whose banded solve fails
(:class:`~oceanda.errors.NumericalError`), is skipped: no update of the weights nor of
Adam's moments, logged and counted in :attr:`TrainRecord.skipped`; more than
``max_skip_fraction`` of all steps skipped is an error. (The precision parametrisation keeps
every solve factorisable, :func:`oceanda.linalg.spd_band_from_raw`; this guards what is left,
e.g. an overflow.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from oceanda.errors import ConfigError, NumericalError
from oceanda.priors.neural_band import NeuralBandPrior

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    """Optimisation settings (``epochs`` passes over the training pairs)."""

    epochs: int = 100
    batch_size: int = 64
    lr: float = 2e-3
    lr_final: float = 1e-4
    grad_clip: float = 10.0
    seed: int = 0
    #: keep the epoch of lowest validation RMSE, on the pairs of the last ``val_fraction`` of the
    #: training trajectories (held out of the fit); false: the last epoch, fitted on every pair
    early_stopping: bool = False
    val_fraction: float = 0.1
    #: training steps with a non-finite loss or gradient or a failed solve are skipped; more
    #: than this fraction of all steps skipped raises NumericalError
    max_skip_fraction: float = 0.01

    def check(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"training.lr must be > 0, got {self.lr}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"training.val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 <= self.max_skip_fraction <= 1:
            raise ConfigError(f"training.max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")


@dataclass
class TrainRecord:
    """What :func:`train_incremental` did: the mean training loss of each epoch, and with
    validation pairs the validation RMSE of each epoch and the epoch kept (0-based), and the
    steps skipped as ``(epoch, batch, reason)``."""

    loss: list[float] = field(default_factory=list)
    val_rmse: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    skipped: list[tuple[int, int, str]] = field(default_factory=list)


def level_loss(prior: NeuralBandPrior, x: torch.Tensor, z0: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
               R: float | torch.Tensor, levels: list[float], conditional: bool = True) -> torch.Tensor:
    """Mean over levels, samples and entries of ``(A(z_k, y; s_k) - x)^2`` (objective (3.5)
    divided by ``l * N * d``); all inputs ``(B, d)``."""
    n = len(levels)
    s = torch.tensor(levels, dtype=x.dtype, device=x.device).repeat_interleave(x.shape[0])
    X = x.repeat(n, 1)
    Z = s.unsqueeze(-1) * z0.repeat(n, 1) + (1 - s.unsqueeze(-1)) * X
    if conditional:
        out = prior.assimilate(Z, y.repeat(n, 1), mask.repeat(n, 1), R, s)
    else:
        out = prior.mean(Z, s)
    return (out - X).pow(2).mean()


@torch.no_grad()
def validation_rmse(prior: NeuralBandPrior, val: tuple, R: float | torch.Tensor, levels: list[float],
                    conditional: bool = True, chunk: int = 4096) -> float:
    """Root of :func:`level_loss` over the pairs ``val = (x, z0, y, mask)`` (in chunks)."""
    x, z0, y, mask = val
    tot = 0.0
    for i in range(0, x.shape[0], chunk):
        sl = slice(i, i + chunk)
        tot += float(level_loss(prior, x[sl], z0[sl], y[sl], mask[sl], R, levels, conditional)) * x[sl].shape[0]
    return math.sqrt(tot / max(x.shape[0], 1))


def train_incremental(
    prior: NeuralBandPrior,
    x: torch.Tensor,
    z0: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    R: float | torch.Tensor,
    levels: list[float],
    settings: TrainSettings,
    conditional: bool = True,
    on_epoch: Callable[[int, float], None] | None = None,
    val: tuple | None = None,
) -> TrainRecord:
    """Train ``prior`` in place on pairs ``(x, z0, y, mask)`` ``(N, d)``; returns its
    :class:`TrainRecord`. With ``val = (x, z0, y, mask)`` the prior ends with the parameters
    of the epoch of lowest validation RMSE. ``on_epoch(epoch, loss)`` is called after each
    epoch (progress bars). Steps with a non-finite loss or gradient or a failed solve are
    skipped (module docstring); raises :class:`NumericalError` if more than
    ``settings.max_skip_fraction`` of the steps are."""
    settings.check()
    g = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.Adam(prior.parameters(), lr=settings.lr)
    N = x.shape[0]
    steps_per_epoch = max(1, math.ceil(N / settings.batch_size))
    total = settings.epochs * steps_per_epoch
    ratio = settings.lr_final / settings.lr

    def lr_at(step):
        return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    max_skips = int(settings.max_skip_fraction * total)
    history = TrainRecord()
    best_state = None
    prior.train()
    for epoch in range(settings.epochs):
        perm = torch.randperm(N, generator=g)
        tot, cnt = 0.0, 0
        for b in range(steps_per_epoch):
            idx = perm[b * settings.batch_size:(b + 1) * settings.batch_size]
            if idx.numel() == 0:
                continue
            opt.zero_grad(set_to_none=True)
            reason = None
            try:
                loss = level_loss(prior, x[idx], z0[idx], y[idx], mask[idx], R, levels, conditional)
                if not torch.isfinite(loss):
                    reason = f"loss {float(loss)}"
                else:
                    loss.backward()
                    gnorm = torch.nn.utils.clip_grad_norm_(prior.parameters(), settings.grad_clip)
                    if not torch.isfinite(gnorm):
                        reason = f"gradient norm {float(gnorm)}"
            except NumericalError as exc:
                reason = str(exc)
            if reason is not None:
                opt.zero_grad(set_to_none=True)  # Adam skips parameters without a gradient
                history.skipped.append((epoch, b, reason))
                log.warning("training step skipped (epoch %d, batch %d): %s", epoch, b, reason)
                if len(history.skipped) > max_skips:
                    raise NumericalError(
                        f"training: {len(history.skipped)} of {epoch * steps_per_epoch + b + 1} steps skipped "
                        f"(more than training.max_skip_fraction={settings.max_skip_fraction} of {total}); "
                        f"the last: {reason} (lower training.lr?)")
                continue
            opt.step()
            sched.step()
            tot += loss.item() * idx.numel()
            cnt += idx.numel()
        history.loss.append(tot / max(cnt, 1))
        if val is not None:
            prior.eval()
            try:
                history.val_rmse.append(validation_rmse(prior, val, R, levels, conditional))
            except NumericalError as exc:
                log.warning("validation failed at epoch %d (epoch not kept): %s", epoch, exc)
                history.val_rmse.append(math.inf)
            prior.train()
            if history.best_epoch is None or history.val_rmse[-1] < history.val_rmse[history.best_epoch]:
                history.best_epoch = epoch
                best_state = {k: v.detach().clone() for k, v in prior.state_dict().items()}
        if on_epoch is not None:
            on_epoch(epoch, history.loss[-1])
    if best_state is not None:
        prior.load_state_dict(best_state)
    prior.eval()
    return history
