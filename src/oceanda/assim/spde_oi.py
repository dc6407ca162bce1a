"""``spde_oi``: exact posterior mean with the SPDE prior, plus Matheron conditional members.

Per DAW patch: prior :class:`~oceanda.priors.spde.SPDEPrior` on the patch grid (metric
factors ``dx_m``, ``dy_m`` expressed in ``length_unit_m``; land / padding cells closed),
observations ``y`` = the finite entries of ``obs`` with error variance ``noise_std^2``;
the analysis is the exact posterior mean (one of the solvers of
:mod:`oceanda.priors.spde.posterior` to relative residual ``rtol``,
:meth:`SPDEPrior.posterior_mean`; in the exact spectral modes of the prior
when it is separable: open-ocean patches of a regular lon/lat grid, also those overhanging the
domain, whose ocean cells fill a rectangle, :meth:`SPDEOptimalInterpolation.patch`).
With ``members = N > 0``
it also draws ``N`` prior trajectories (simulating the SPDE, or spectrally when separable),
conditions them by Matheron's rule
(:func:`oceanda.assim.ensemble.matheron_members`; the ``N + 1`` solves share one block
CG with ``N + 1`` right-hand sides) and returns the ensemble standard deviation (and the members
if ``return_members``). The members are exact posterior draws, so ``std`` estimates the
posterior standard deviation with relative Monte-Carlo error ``~ 1/sqrt(2 (N - 1))``.

Units: lengths in ``length_unit_m`` metres (default km), time in days (``dt`` = days
between frames), SSH in metres. The marginal prior standard deviation is ``std`` (sets
``tau`` by :func:`oceanda.priors.spde.tau_for_std`, ``alpha = 2``) unless ``tau`` is given.

Randomness: the members of a patch depend only on ``seed`` and the patch's own coordinates
(first lon/lat/time), not on the other patches in the batch.
"""

from __future__ import annotations

import numpy as np
import torch

from oceanda.assim.base import PatchBatch, PatchResult
from oceanda.assim.ensemble import matheron_members
from oceanda.assim.fourdvarnet import check_oi_settings, oi_settings_kwargs
from oceanda.assim.registry import register
from oceanda.errors import ConfigError, InputError
from oceanda.priors.spde import SPDEPrior, tau_for_std
from oceanda.priors.spde.posterior import SOLVERS


@register("spde_oi")
class SPDEOptimalInterpolation:
    """Posterior mean (and conditional ensemble) with the SPDE prior; see module docstring.

    Args:
        kappa, gamma, beta, vx, vy, mx, my: SPDE parameters (stationary), in
            ``length_unit_m`` and days.
        std: marginal prior std [m] (used when ``tau`` is None).
        tau: noise amplitude (overrides ``std``).
        alpha, dt, init: as :class:`SPDEPrior`.
        noise_std: observation-error std [m].
        mean: prior mean [m], ``"patch"`` (mean of the patch's observations) or ``"oi"`` (the
            patch's OI analysis, :func:`oceanda.assim.oi.oi_patch` of the same observations with
            ``oi_Lx_km``, ``oi_Ly_km``, ``oi_Lt_days``, ``oi_noise_std``, prior mean and variance per
            patch as ``method=oi``'s defaults: the SPDE prior then models the residual truth - OI,
            as the SPDE-prior 4DVarNet's ``model.mean=oi``).
        oi_Lx_km, oi_Ly_km, oi_Lt_days, oi_noise_std: the ``mean="oi"`` OI's scales [km, days] and
            observation-error std [m] (defaults: ``configs/method/oi.yaml``'s).
        members: ensemble size (0: mean only, no std).
        return_members: also return the members.
        seed: base seed of the ensemble.
        rtol, maxiter: CG stopping rule.
        coarse: ``[h, ht]`` coarse space-time spacing of the two-level CG (None: plain
            prior-preconditioned CG); see :meth:`SPDEPrior.posterior_mean`.
        length_unit_m: metres per length unit of the parameters.
        factor: factorisation of ``F = I + dt A^alpha`` (``"auto"``: the complex first-order
            factor for ``alpha = 2``), see :class:`SPDEPrior`.
        threads: threads for the sweeps (``None``: 1); see ``threads`` / ``backend`` of
            :class:`SPDEPrior`.
        backend: ``"auto"`` / ``"superlu"`` / ``"numba"`` triangular solves (numba: the grid's
            strips on ``threads`` threads), see :class:`SPDEPrior`.
        solver: posterior solver, ``"auto"`` (``"spectral"`` when the patch's prior is
            separable: no land, parameters constant along rows; otherwise the single-precision
            prior-preconditioned PCG for the mean alone, block CG on the whitened system for
            ensembles, the two-level PCG when ``coarse`` is set) or a key of
            :data:`oceanda.priors.spde.posterior.SOLVERS`; see
            :meth:`SPDEPrior.posterior_mean`. Prior draws for the members use the spectral
            sampler when the prior is separable (``SPDEPrior.sample(method="auto")``).
        block_size: right-hand sides per block CG for the ensemble (memory: about 8 arrays
            of ``T n block_size`` float64; ``None``: as many as fit in 1 GiB).
    """

    def __init__(self, kappa: float = 0.55, gamma: float = 375.0, beta: float = 0.0,
                 vx: float = 0.0, vy: float = 0.0, mx: float = 0.0, my: float = 0.0,
                 std: float = 0.1, tau: float | None = None, alpha: int = 2, dt: float = 1.0,
                 init: str = "stationary", noise_std: float = 0.02, mean="patch",
                 members: int = 0, return_members: bool = False, seed: int = 0,
                 rtol: float = 1e-8, maxiter: int = 5000, length_unit_m: float = 1000.0,
                 coarse: list[int] | None = None, factor: str = "auto",
                 threads: int | None = None, block_size: int | None = None,
                 backend: str = "auto", solver: str = "auto", oi_Lx_km: float = 100.0,
                 oi_Ly_km: float = 100.0, oi_Lt_days: float = 10.0, oi_noise_std: float = 0.05):
        if not noise_std > 0:
            raise ConfigError(f"spde_oi: noise_std must be > 0, got {noise_std}")
        if int(members) != members or members < 0 or members == 1:
            raise ConfigError(f"spde_oi: members must be 0 or an integer >= 2, got {members}")
        if tau is None and not std > 0:
            raise ConfigError(f"spde_oi: std must be > 0, got {std}")
        if not length_unit_m > 0:
            raise ConfigError(f"spde_oi: length_unit_m must be > 0, got {length_unit_m}")
        if not (mean in ("patch", "oi") or isinstance(mean, (int, float))):
            raise ConfigError(f"spde_oi: mean must be a number, 'patch' or 'oi', got {mean!r}")
        self.oi_Lx_km, self.oi_Ly_km, self.oi_Lt_days, self.oi_noise_std = oi_Lx_km, oi_Ly_km, oi_Lt_days, oi_noise_std
        check_oi_settings(self, "spde_oi: ")
        self.params = dict(kappa=kappa, gamma=gamma, beta=beta, vx=vx, vy=vy, mx=mx, my=my)
        self.std, self.tau, self.alpha, self.dt, self.init = std, tau, alpha, dt, init
        self.R = float(noise_std) ** 2
        self.mean, self.members, self.return_members = mean, int(members), return_members
        self.seed, self.rtol, self.maxiter = int(seed), rtol, maxiter
        self.length_unit_m = float(length_unit_m)
        if coarse is not None and (len(coarse) != 2 or min(int(c) for c in coarse) < 1):
            raise ConfigError(f"spde_oi: coarse must be null or [h, ht] >= 1, got {coarse}")
        self.coarse = None if coarse is None else tuple(int(c) for c in coarse)
        if threads is not None and (int(threads) != threads or threads < 1):
            raise ConfigError(f"spde_oi: threads must be null or an integer >= 1, got {threads}")
        if block_size is not None and (int(block_size) != block_size or block_size < 1):
            raise ConfigError(f"spde_oi: block_size must be null or an integer >= 1, got "
                              f"{block_size}")
        if solver != "auto" and solver not in SOLVERS:
            raise ConfigError(f"spde_oi: solver must be 'auto' or one of "
                              f"{', '.join(map(repr, SOLVERS))}, got {solver!r}")
        if coarse is not None and solver not in ("auto", "two_level"):
            raise ConfigError(f"spde_oi: coarse is the option of solver 'two_level', not "
                              f"{solver!r}")
        self.factor, self.threads, self.block_size = factor, threads, block_size
        self.backend, self.solver = backend, solver
        # validate the SPDE parameters once, on a tiny grid
        self._prior(np.ones((2, 2)), np.ones((2, 2)), np.ones((2, 2), bool), 2, 0.0)

    def _prior(self, dx, dy, ocean, T, mean) -> SPDEPrior:
        area = float(np.mean((dx * dy)[ocean])) if ocean.any() else float(np.mean(dx * dy))
        tau = self.tau if self.tau is not None else tau_for_std(
            self.std, self.params["kappa"], self.params["gamma"], area)
        return SPDEPrior(dx, dy, ocean, T=T, dt=self.dt, alpha=self.alpha, tau=tau,
                         init=self.init, mean=mean, factor=self.factor, threads=self.threads,
                         backend=self.backend, **self.params)

    def patch(self, obs: np.ndarray, ocean: np.ndarray, dx_m: np.ndarray, dy_m: np.ndarray,
              seed: int | list[int] | None = None, prior_mean: np.ndarray | None = None):
        """Analysis of one patch: ``obs`` ``(T, H, W)`` (NaN = unobserved) -> mean, std, members
        (numpy float64; std / members None without an ensemble). ``prior_mean`` ``(T, H, W)``:
        the ``mean="oi"`` prior mean (the patch's OI analysis, :meth:`__call__` computes it).

        When the ocean cells fill a rectangle and the rest is closed (the padding of a patch
        that overhangs the domain, or a straight coast), the prior is solved on that rectangle
        alone: the closed cells are decoupled with no-flux faces, so the posterior on the ocean
        cells is the same, and on an open-ocean rectangle of a regular lon/lat grid the prior
        is separable, which gives the fast spectral solver (``solver`` auto or spectral). Off
        that rectangle the mean is then the prior mean (as in the whole-patch solve) and the
        std and members are NaN (not computed; the blend ignores closed cells)."""
        mask = np.isfinite(obs) & ocean[None]
        if self.mean == "oi":
            if prior_mean is None or prior_mean.shape != obs.shape:
                raise InputError(f"spde_oi: mean='oi' needs the patch's OI analysis of shape {obs.shape} "
                                 f"as prior_mean, got {None if prior_mean is None else prior_mean.shape}")
            mean = np.asarray(prior_mean, np.float64)
        else:
            mean = float(np.mean(obs[mask])) if (self.mean == "patch" and mask.any()) else (
                0.0 if self.mean == "patch" else float(self.mean))
        dx, dy = dx_m / self.length_unit_m, dy_m / self.length_unit_m
        crop = _ocean_rectangle(ocean) if (self.solver in ("auto", "spectral")
                                           and self.coarse is None) else None
        if crop is not None:
            ys, xs = crop
            P = self._prior(dx[crop], dy[crop], ocean[crop], obs.shape[0],
                            mean[:, ys, xs] if isinstance(mean, np.ndarray) else mean)
            if P.precision.spectrum() is not None:
                m, s, mem = self._solve(P, obs[:, ys, xs], mask[:, ys, xs], seed)
                out_m = np.array(np.broadcast_to(mean, obs.shape), np.float64)
                out_m[:, ys, xs] = m
                if s is None:
                    return out_m, None, None
                out_s = np.full(obs.shape, np.nan)
                out_s[:, ys, xs] = s
                out_mem = np.full((mem.shape[0], *obs.shape), np.nan)
                out_mem[:, :, ys, xs] = mem
                return out_m, out_s, out_mem
        return self._solve(self._prior(dx, dy, ocean, obs.shape[0], mean), obs, mask, seed)

    def _solve(self, P: SPDEPrior, obs: np.ndarray, mask: np.ndarray, seed):
        """Mean, std and members with the prior ``P`` for the observations ``obs`` on ``mask``."""
        y = np.where(mask, obs, 0.0)

        def reconstruct(Y):
            return P.posterior_mean(Y, mask, self.R, rtol=self.rtol,  # reads Y where mask
                                    maxiter=self.maxiter, coarse=self.coarse,
                                    block_size=self.block_size, solver=self.solver)

        if not self.members:
            return reconstruct(y[None])[0], None, None
        rng = np.random.default_rng(seed)
        S = P.sample(self.members, rng=rng, method="auto")
        members, xm = matheron_members(reconstruct, y, mask, self.R, S, rng=rng,
                                       include_mean=True)
        return xm, members.std(axis=0, ddof=1), members

    def __call__(self, batch: PatchBatch) -> PatchResult:
        B, T, H, W = batch.shape
        means, stds, mems = [], [], []
        for b in range(B):
            obs = batch.obs[b].detach().cpu().double().numpy()
            ocean = batch.ocean[b].detach().cpu().numpy().astype(bool)
            mu = None
            if self.mean == "oi":  # the OI analysis of the same observations (as method=oi computes it)
                from oceanda.assim.oi import oi_patch

                mu = oi_patch(obs, *(v[b].detach().cpu().double().numpy() for v in (batch.lon, batch.lat, batch.time)),
                              **oi_settings_kwargs(self))
            key = [self.seed, int(round(float(batch.lon[b, 0]) * 1e4)) % (1 << 31),
                   int(round(float(batch.lat[b, 0]) * 1e4)) % (1 << 31),
                   int(round(float(batch.time[b, 0]) * 1e3)) % (1 << 31)]
            m, s, mem = self.patch(obs, ocean, batch.dx_m[b].detach().cpu().double().numpy(),
                                   batch.dy_m[b].detach().cpu().double().numpy(), seed=key, prior_mean=mu)
            means.append(m)
            stds.append(s)
            mems.append(mem)
        dt, dev = batch.obs.dtype, batch.obs.device
        to = lambda a: torch.as_tensor(np.stack(a), dtype=dt, device=dev)  # noqa: E731
        return PatchResult(mean=to(means),
                           std=to(stds) if self.members else None,
                           members=to(mems) if (self.members and self.return_members) else None)


def _ocean_rectangle(ocean: np.ndarray) -> tuple[slice, slice] | None:
    """``(rows, cols)`` of the rectangle the ocean cells fill when some cells lie outside it
    (all closed), else ``None`` (no ocean, all ocean, or an irregular coast)."""
    rows, cols = np.flatnonzero(ocean.any(1)), np.flatnonzero(ocean.any(0))
    if rows.size == 0:
        return None
    crop = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    n = (crop[0].stop - crop[0].start) * (crop[1].stop - crop[1].start)
    if n == ocean.size or int(ocean.sum()) != n:
        return None
    return crop
