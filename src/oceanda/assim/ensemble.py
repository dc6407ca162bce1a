"""Conditional ensembles by Matheron's rule (conditioning prior samples on observations).

For a Gaussian prior and a *linear* (affine) reconstruction ``x*(y)`` that equals the exact
posterior mean (``x*(y) = mu + K (y - H mu)``), the members::

    x_i = x*(y) + (s_i - x*(H s_i + eps_i)),   s_i ~ prior,  eps_i ~ N(0, R)

are exact independent posterior draws: ``s_i - x*(H s_i + eps_i) = (I - K H)(s_i - mu) -
K eps_i`` has the posterior covariance ``(I - K H) P``. With a non-optimal linear
reconstruction (e.g. a trained 4DVarNet used as ``x*``) the members sample the error
distribution of that reconstruction (Beauchamp et al., 2024, "4DVarNet-Gen").

Generic over the reconstruction: any callable mapping a batch of observation fields to a
batch of states, the same mask for the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from oceanda.errors import InputError


def matheron_members(
    reconstruct: Callable,
    y,
    mask,
    R,
    prior_samples,
    *,
    rng: np.random.Generator | int | None = None,
    include_mean: bool = False,
):
    """Posterior members ``x_i = x*(y) + s_i - x*(H s_i + eps_i)``.

    Args:
        reconstruct: ``Y (k, *obs_shape) -> X (k, *state_shape)``, linear in ``Y``; values
            of ``Y`` where ``mask`` is False are NaN (unobserved) and must be ignored.
        y: observations ``obs_shape`` (unobserved entries ignored).
        mask: bool ``obs_shape`` (``H`` selects where True; ``obs_shape == state_shape``).
        R: observation-error variance, scalar or ``obs_shape``.
        prior_samples: ``(N, *state_shape)`` draws ``s_i`` of the prior.
        rng: seed / generator for the pseudo-observation noise ``eps_i``.
        include_mean: also return ``x*(y)``.
    Returns:
        members ``(N, *state_shape)`` (numpy or torch like ``prior_samples``), and
        ``x*(y)`` if ``include_mean``. One call of ``reconstruct`` on ``N + 1`` fields.
    """
    is_torch = isinstance(prior_samples, torch.Tensor)
    S = prior_samples.detach().cpu().numpy() if is_torch else np.asarray(prior_samples)
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    mask = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    R = R.detach().cpu().numpy() if isinstance(R, torch.Tensor) else np.asarray(R, float)
    mask = mask.astype(bool)
    if S.shape[1:] != mask.shape or y.shape != mask.shape:
        raise InputError(f"matheron_members: prior samples {S.shape}, y {y.shape} and mask "
                         f"{mask.shape} must share the field shape")
    rng = np.random.default_rng(rng)
    N = S.shape[0]
    # pseudo-observations only where observed (noise drawn there alone)
    Y = np.full((N + 1, *mask.shape), np.nan)
    Y[0][mask] = y[mask]
    noise = rng.standard_normal((N, int(mask.sum()))) * np.sqrt(np.broadcast_to(R, mask.shape)[mask])
    Y[1:, mask] = S[:, mask] + noise
    if is_torch:
        X = reconstruct(torch.as_tensor(Y, dtype=prior_samples.dtype,
                                        device=prior_samples.device))
        X = X.detach().cpu().numpy()
    else:
        X = np.asarray(reconstruct(Y))
    if X.shape != (N + 1, *S.shape[1:]):
        raise InputError(f"matheron_members: reconstruct returned {X.shape}, expected "
                         f"{(N + 1, *S.shape[1:])}")
    members = X[0][None] + S - X[1:]
    if is_torch:
        members = torch.as_tensor(members, dtype=prior_samples.dtype,
                                  device=prior_samples.device)
        xm = torch.as_tensor(X[0], dtype=prior_samples.dtype, device=prior_samples.device)
    else:
        xm = X[0]
    return (members, xm) if include_mean else members

