"""Bootstrap particle smoother: the Monte-Carlo minimum-RMSE reference ``E[x | y]``.

State-space model of the validation experiments (trajectories ``(B, T, phi)``, time-major):

    x_0 ~ p_0 (given by samples: for Lorenz-63 the attractor sampler),
    x_{t+1} = m(x_t) + eta_t,  eta_t ~ N(0, diag(q)),
    y_t[i] = x_t[i] + e_t[i],  e ~ N(0, R)  for the observed entries (``mask``).

The bootstrap filter (Gordon, Salmond & Smith 1993) propagates ``P`` particles with the
true model and noise, weights them by the observation likelihood at the observed times and
resamples (systematic resampling, Kitagawa 1996) *whole paths* ``x_{0:t}`` whenever the
effective sample size ``ESS = 1 / sum_i w_i^2`` falls below ``resample_threshold * P``. The
weighted paths at the end of the window approximate the joint smoothing distribution
``p(x_{0:T-1} | y_{0:T-1})`` (Kitagawa's filter-smoother, Doucet & Johansen 2009, Sec. 4.5),
whose mean is the Bayes-optimal (minimum mean-square error) estimate; it converges as
``P -> infinity`` for the true model, unlike any variational or learned method.

Path degeneracy (few distinct ancestors at early times) is the smoother's failure mode; it
is reported: ``ess_min`` (smallest ESS of the weights at an observed time, before
resampling) and ``n_unique0`` (distinct initial states among the final paths). Windows are
processed in chunks of at most ``max_bytes`` of stored particles; everything is vectorised in
torch over windows and particles and runs on any device (the particles follow ``y``'s device
and dtype). The default holds one window of 10^5 L63 particles per chunk (memory stays
low; on CPU larger chunks were no faster per window); on a GPU pass a larger ``max_bytes``
so that many windows run at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from oceanda.errors import InputError


@dataclass
class ParticleSmootherResult:
    """``mean``, ``std`` ``(B, T, phi)``: weighted mean and standard deviation of the final
    paths; ``ess_min`` ``(B,)``: smallest effective sample size at an observed time (``P``
    for a window without observations); ``n_unique0`` ``(B,)``: distinct initial states
    among the final paths; ``n_particles``: ``P``."""

    mean: torch.Tensor
    std: torch.Tensor
    ess_min: torch.Tensor
    n_unique0: torch.Tensor
    n_particles: int


def systematic_resample(logw: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Ancestor indices ``(B, P)`` by systematic resampling of normalised log-weights
    ``logw`` ``(B, P)``: one uniform ``u ~ U[0, 1)`` per row, index ``i`` chosen for the
    points ``(u + j) / P`` falling in its slice of the cumulative weights (Kitagawa 1996).
    Every particle is copied ``floor(P w_i)`` or ``ceil(P w_i)`` times."""
    B, P = logw.shape
    w = torch.softmax(logw, dim=-1)
    cdf = torch.cumsum(w, dim=-1)
    cdf[:, -1] = 1.0  # guard against round-off below 1
    u = torch.rand(B, 1, generator=generator, dtype=w.dtype, device=w.device)
    points = (u + torch.arange(P, dtype=w.dtype, device=w.device)) / P
    idx = torch.searchsorted(cdf, points, right=True)
    return idx.clamp_max(P - 1)


def _ess(logw: torch.Tensor) -> torch.Tensor:
    w = torch.softmax(logw, dim=-1)
    return 1.0 / (w * w).sum(-1)


def particle_smoother(
    step: Callable[[torch.Tensor], torch.Tensor],
    model_noise_std: float | torch.Tensor,
    x0_particles: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    R: float | torch.Tensor,
    generator: torch.Generator | None = None,
    resample_threshold: float = 0.5,
    max_bytes: float = 6.4e7,
) -> ParticleSmootherResult:
    """Bootstrap particle smoother (module docstring) on windows ``y``, ``mask`` ``(B, T, phi)``.

    ``step``: ``x (..., phi) -> m(x)``, the deterministic model step; ``model_noise_std``:
    std of the additive model noise per step, scalar or ``(phi,)``; ``x0_particles``
    ``(P, phi)``: samples of the initial-state distribution, shared by every window (each
    window propagates its own copies); ``R``: observation-error variance, scalar or
    ``(phi,)``; ``generator``: random stream on ``y``'s device; ``resample_threshold``:
    resample when ``ESS < threshold * P`` (``1`` resamples at every observed time);
    ``max_bytes``: memory of the particles stored per chunk of windows.
    """
    if y.dim() != 3 or mask.shape != y.shape:
        raise InputError(f"particle smoother: y and mask must be (B, T, phi) of one shape, got "
                         f"{tuple(y.shape)} and {tuple(mask.shape)}")
    Bn, T, phi = y.shape
    if x0_particles.dim() != 2 or x0_particles.shape[1] != phi:
        raise InputError(f"particle smoother: x0_particles must be (P, {phi}), got {tuple(x0_particles.shape)}")
    if not 0.0 < resample_threshold <= 1.0:
        raise InputError(f"particle smoother: resample_threshold must be in (0, 1], got {resample_threshold}")
    P = x0_particles.shape[0]
    kw = dict(dtype=y.dtype, device=y.device)
    q = torch.as_tensor(model_noise_std, **kw)
    Rv = torch.as_tensor(R, **kw).expand(phi)
    x0p = x0_particles.to(**kw)
    per_window = P * T * (phi * y.element_size() + 8)  # particles of every step + ancestor indices
    chunk = max(1, int(max_bytes // per_window))
    means, stds, ess_all, uniq = [], [], [], []
    for c0 in range(0, Bn, chunk):
        yc, mc = y[c0:c0 + chunk], mask[c0:c0 + chunk]
        b = yc.shape[0]
        # particles of every step before resampling, and the ancestors drawn at each step
        # (None: no resampling then); the paths are rebuilt backwards at the end
        xs = torch.empty(b, T, P, phi, **kw)
        anc: list[torch.Tensor | None] = [None] * T
        logw = torch.zeros(b, P, **kw)
        ess_min = torch.full((b,), float(P), **kw)
        x = x0p.expand(b, P, phi)
        for t in range(T):
            if t > 0:
                x = step(x) + q * torch.randn(b, P, phi, generator=generator, **kw)
            xs[:, t] = x
            obs = mc[:, t]  # (b, phi)
            if not bool(obs.any()):
                continue
            r = torch.where(obs.unsqueeze(1), x - yc[:, t].unsqueeze(1), torch.zeros_like(x))
            logw = logw - 0.5 * (r * r / Rv).sum(-1)
            logw = logw - logw.amax(-1, keepdim=True)
            has = obs.any(-1)
            ess = _ess(logw)
            ess_min = torch.where(has, torch.minimum(ess_min, ess), ess_min)
            need = has & (ess < resample_threshold * P)
            if bool(need.any()):
                a = torch.arange(P, device=y.device).expand(b, P).clone()
                rows = need.nonzero().squeeze(-1)
                a[rows] = systematic_resample(logw[rows], generator)
                anc[t] = a
                logw[rows] = 0.0
                x = torch.gather(xs[:, t], 1, a.unsqueeze(-1).expand(b, P, phi))
        # backwards through the genealogy: idx[i] = the particle of step t on final path i
        w = torch.softmax(logw, dim=-1).unsqueeze(-1)  # (b, P, 1)
        idx = torch.arange(P, device=y.device).expand(b, P)
        mean = torch.empty(b, T, phi, **kw)
        var = torch.empty(b, T, phi, **kw)
        for t in range(T - 1, -1, -1):
            if anc[t] is not None:
                idx = torch.gather(anc[t], 1, idx)
            xt = torch.gather(xs[:, t], 1, idx.unsqueeze(-1).expand(b, P, phi))
            mean[:, t] = (w * xt).sum(1)
            var[:, t] = (w * (xt - mean[:, t].unsqueeze(1)) ** 2).sum(1)
        means.append(mean)
        stds.append(var.clamp_min(0).sqrt())
        ess_all.append(ess_min)
        alive = w.squeeze(-1) > 0
        uniq.append(torch.tensor([int(torch.unique(idx[i][alive[i]]).numel()) for i in range(b)],
                                 device=y.device))
        del xs
    return ParticleSmootherResult(torch.cat(means), torch.cat(stds), torch.cat(ess_all), torch.cat(uniq), P)

