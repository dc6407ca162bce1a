"""SPDE-prior 4DVarNet ("4DVarNet-Gen"): a Gaussian SPDE prior term with parameters predicted
per patch, minimised by the unrolled ConvLSTM gradient solver, plus Matheron conditional
ensembles with the trained solver.

Beauchamp, Febvre, Fablet et al. (2024), "Bridging data assimilation and SPDE-based
generative modelling with 4DVarNet schemes" ("Towards a stochastic 4DVarNet", sections I-III
and the posterior/UQ slides).

Cost of patch ``b`` (normalised SSH ``x`` ``(T, H, W)``, observations ``y`` on the observed
ocean cells ``Omega_b``, ``N_b = T n_ocean,b``)::

    J_b(x) = [ sum_{(t,i) in Omega_b} (x_ti - y_ti)^2 / R  +  (x - mu)^T Q_Theta_b (x - mu) ] / N_b

``Q_Theta`` the trajectory precision of :class:`oceanda.priors.spde.SPDEPrior` on the patch
grid (block-tridiagonal in time, land cells closed), ``mu = 0`` (the normalisation mean;
``mean="obs"``: ``mu_b`` the mean of patch ``b``'s observations, a constant like OI's
``mean="patch"``, so that ``Theta``'s std is the local variability, not the basin's;
``mean="oi"``: ``mu_b`` the OI analysis of patch ``b``'s observations, a ``(T, H, W)`` field
computed as ``model=4dvarnet``'s ``init="oi"`` first guess with the ``oi_*`` settings, so that the
SPDE prior models the residual ``truth - OI`` and the untrained solver returns OI plus the SPDE
posterior correction; :meth:`SPDEFourDVarNet.forward` takes it as ``mean``),
``R`` a learned scalar observation-error variance (normalised units). The prior term equals
``SPDEPrior.quad`` exactly (tested); with ``F_k = I + dt A^alpha`` and ``S_k`` the noise
variances (diagonal ``s``)::

    (x-mu)^T Q (x-mu) = ||F_1 r_0||^2_{S^-1} - ||r_0||^2_{S^-1}  (init='stationary';
                        ||r_0||^2 / init_std^2 for 'white')  +  sum_k ||F r_k - r_{k-1}||^2_{S^-1}

and its gradient ``2 Q r`` is written in closed form with the transposed stencil ``F^T``:
``2 [F^T S^-1 F r_0 - S^-1 r_0]`` on frame 0 (stationary), ``+2 F^T e_k`` on frame ``k`` and
``-2 e_k`` on frame ``k - 1`` with ``e_k = S^-1 (F r_k - r_{k-1})``.

Parameters ``Theta`` (``kappa``, marginal ``std`` -> ``tau``; optionally a ``gamma`` field,
an advection field ``m = (mx, my)`` and an anisotropy direction ``v`` with ``H = gamma I +
gamma_0 v v^T``) are predicted by a small CNN from the *augmented observation state*
``[y (zero-filled), mask, ocean]``, never from the truth (in training the truth only enters
the loss). ``theta="patch"``: one value per patch (masked spatial mean of the CNN's output);
``"field"``: one value per cell; ``"global"``: one trained value for every patch (no CNN: the
raw parameters are a trained vector), the right inductive bias for a stationary truth whose
parameters are the same in every window (a maximum-likelihood estimate when trained by the
NLL; it depends on neither the truth nor the observations at inference). Transforms:
``kappa = kappa_0 exp(a)``, ``std = std_0 exp(a)`` with ``a = 3 tanh(raw / 3)``,
``gamma = gamma_0 exp(a)``, ``m = m_scale raw``, ``v = raw``;
``tau = std sqrt(8 pi gamma kappa^2 / abar)`` (:func:`oceanda.priors.spde.tau_for_std`,
``abar`` the mean ocean cell area). The last CNN layer starts at zero, so a fresh model
uses ``(kappa_0, std_0, gamma_0)``.

Solver step ``k`` (of ``n``), ``update="subspace"`` (default): since ``J`` is quadratic in
``x`` for a fixed ``Theta``, the step is ``x <- x + a d + b p`` with the ConvLSTM direction
``d = -(g_p + ||g_p0|| S(g_p / ||g_p0||))`` (``g_p = Q^{-1} grad J``), ``p`` the previous step
and ``(a, b)`` minimising ``J`` exactly on ``span{d, p}`` (one Hessian-vector product
``2 (H^T R^-1 H + Q) d / N`` and a 2 x 2 solve per sample). The ConvLSTM's output layer
starts at zero, so the untrained solver *is* preconditioned conjugate gradients (it reaches
the exact posterior mean as ``n`` grows, tested) and training learns corrections to its
directions. ``update="anchor"``: the anchor's update with the raw-gradient term normalised by
the first gradient's RMS ``||g_0||`` (the SPDE cost's gradient has no fixed scale)::

    x <- x - [ S(g / ||g_0||) / (k + 1) + lr_grad (k + 1) / n  g / ||g_0|| ],
    g = Q_Theta^{-1} 1_ocean grad_x J   (precond="prior", default)   or   1_ocean grad_x J   ("none")

``S`` the ConvLSTM of :class:`oceanda.assim.fourdvarnet.ConvLSTMGradModulator`, unrolled by
:class:`oceanda.assim.unroll.UnrolledSolver`. Land cells stay at zero (decoupled in ``Q``,
masked in the cost). ``precond="prior"`` (a better-conditioned update, measured in
``hpc/bench/spde_fourdvarnet.py``): the SPDE cost's Hessian ``2 (Q + H^T R^-1 H) / N`` has a
condition number ~1e5 on a 10 km grid with ``alpha = 2`` (``Q``'s spectrum spans
``(1 + dt (kappa^2 + gamma k^2)^2)^2``), which a 10-step solver cannot cover; preconditioned by
the prior covariance ``Q^{-1}`` (the same two SPDE sweeps that draw prior samples, held fixed
w.r.t. ``Theta`` in the backward pass) its spectrum lies in ``[1, 1 + prior var / R]``. The
state then starts from the prior mean (``mu``); with ``"none"`` from the zero-filled observations.
The preconditioner runs on CPU (scipy sparse LU per patch and forward pass).

Conditional ensembles (:meth:`SPDEFourDVarNet.members`): ``x_i = x*(y) + s_i - x*(H s_i +
eps_i)`` with ``s_i`` drawn from the SPDE prior with the ``Theta`` predicted from ``y`` (one
SPDE simulation each) and ``x*(.)`` the trained solver run with that *same* ``Theta``
(:func:`oceanda.assim.ensemble.matheron_members`). With a linear solver equal to the exact
posterior mean these are exact posterior draws (tested); with the trained solver they sample
its error distribution (the paper's 4DVarNet-Gen ensembles).

Measured (``hpc/bench/spde_fourdvarnet.py``, SPDE truth 32 x 32 x 5, 8.6 % observed, CPU,
64 held-out samples): with ``theta="global"`` and Theta / R by maximum likelihood
(``train.theta_init=mle``), 30 steps, the RMSE is 1.0066 +- 0.0011 x the exact OI's (the
same as the solver with the TRUE parameters; 1.0197 +- 0.0035 after one epoch of ConvLSTM
training at lr 1e-4, 1.32 at lr 2e-3: the learned corrections do not help on a Gaussian
truth), Matheron members' spread/skill 1.02 (exact posterior members 1.01). A per-patch CNN
Theta trained with the MSE: 1.04-1.10 (its Theta drifts along the flat kappa-std ridge of
the likelihood); the anchor's update without preconditioning: 1.215 and 6.2. On the QG OSSE
(``hpc/bench/spde_fourdvarnet_qg.py``) the raw members are over-dispersed (spread/skill 2.3 / 2.0
on two held-out draws of 16 patches): the ML prior std of an alpha = 2 SPDE fitted to the
smoother QG field is ~1.7x the local variability; with the spread calibration below
(``spread_mode="obs_std"``, ``c = 0.71`` fitted on 32 training-period patches) 1.10 / 1.02, CRPS
-30 % / -25 %, RMSE unchanged.

Spread calibration (``spread_scale`` ``c``, :func:`scale_members`): the method's members are
``x_i(c) = x*(y) + c (x_i - x*(y))``, the Matheron perturbations ``s_i - x*(H s_i + eps_i)``
multiplied by one scalar. For a linear solver equal to the exact posterior mean this is exactly
the Matheron ensemble of the prior with ``tau c`` and noise std ``sqrt(R) c`` (tested): the
posterior mean is unchanged by ``(Q, R) -> (Q / c^2, R c^2)`` and the posterior covariance is
multiplied by ``c^2``; so ``c`` recalibrates the *amplitude* of the prior (the one quantity the
ML fit gets wrong on the QG OSSE, see above) without touching the mean ``x*(y)`` or the spatial
structure of the uncertainty. ``c`` is fitted once, offline, on training-period patches only
(:func:`oceanda.train.spread.fit_spread_scale`: the closed-form root of
``(1 + 1/N) mean var_c = MSE(ensemble mean_c)``, the spread-error identity of an exchangeable
``N``-member ensemble, Fortin et al. 2014, QJRMS 140:1708) and stored in the checkpoint
(``spread_scale``, :func:`oceanda.train.spread.calibrate_spde_checkpoint`); at
inference the truth is never used. One global scalar is the smallest recalibration a
statistician would accept (one degree of freedom fitted on thousands of cells, a monotone map
of the spread); it is the variance-inflation factor of ensemble DA. ``spread_mode="obs_std"``
(:func:`spread_factors`) makes the factor of patch ``b`` ``c r_b``, ``r_b = sigma_y,b /
sigma_Theta,b`` the std of the patch's own observations (less the noise) over the predicted prior
std: the members' prior amplitude becomes ``c sigma_y,b``, still one fitted scalar, now
proportional to the local variability the observations see (on the QG OSSE the per-patch
optimal factor correlates with it: log-log correlation 0.78 on 32 training patches, and the
held-out period is less energetic than the training period). Checkpoints without these fields
use ``c = 1``, ``"global"`` (the uncalibrated members, as before); ``method.spread_scale`` /
``method.spread_mode`` override them.

Checkpoints (format ``oceanda-spde-4dvarnet``, :func:`read_spde_checkpoint`) hold the model
config, weights and normalisation (and optionally ``spread_scale``, ``spread_mode`` and the
``calibration`` record they were fitted with); ``oceanda infer method=spde_4dvarnet`` loads one.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from oceanda.assim.base import PatchBatch, PatchResult
from oceanda.assim.ensemble import matheron_members
from oceanda.assim.checkpoint import read_model_checkpoint
from oceanda.assim.convlstm import ConvLSTMGradModulator
from oceanda.assim.fourdvarnet import check_oi_settings, oi_first_guess, oi_settings_kwargs
from oceanda.assim.registry import register
from oceanda.assim.unroll import UnrolledSolver
from oceanda.config_dataclass import dataclass_from_dict
from oceanda.errors import ConfigError, InputError
from oceanda.linalg.stencil import Stencil
from oceanda.priors.spde import SPDEPrior
from oceanda.priors.spde.precision import precision_product

__all__ = [
    "SPDEModelConfig",
    "ThetaNet",
    "SPDEPrecisionBatch",
    "SPDECost",
    "SPDESolverStep",
    "SPDEFourDVarNet",
    "build_spde_model",
    "spde_conditional_members",
    "scale_members",
    "spread_factors",
    "SPREAD_MODES",
    "read_spde_checkpoint",
    "SPDEFourDVarNetMethod",
    "SPDE_CHECKPOINT_FORMAT",
    "SPDE_CHECKPOINT_VERSION",
]

SPDE_CHECKPOINT_FORMAT = "oceanda-spde-4dvarnet"
SPDE_CHECKPOINT_VERSION = 1
_PARAM_SETS = ("kappa", "std", "gamma", "m", "anisotropy")
#: accepted values of ``SPDEModelConfig.mean``
MEANS = ("zero", "obs", "oi")


# ----------------------------------------------------------------------------- config


@dataclass
class SPDEModelConfig:
    """Architecture of an SPDE-prior 4DVarNet (stored in checkpoints).

    Lengths in ``length_unit_m`` metres (km by default), time in days, SSH normalised.
    Defaults: range ``sqrt(8 gamma_0) / kappa_0 ~ 100 km``, correlation time ``~1/kappa_0^4
    ~ 11 days`` (as ``spde_oi``), marginal std 1 (the normalised field's).
    """

    n_time: int = 15
    alpha: int = 2                  # B = A^alpha
    dt: float = 1.0                 # days between frames
    init: str = "stationary"        # stationary | white (initial frame of the SPDE prior)
    kappa0: float = 0.55            # reference kappa [1/length unit]
    gamma0: float = 375.0           # reference diffusion [length unit^2]
    std0: float = 1.0               # reference marginal std (normalised units)
    m_scale: float = 10.0           # advection per unit of CNN output [length unit / day]
    params: list[str] = field(default_factory=lambda: ["kappa", "std"])  # + gamma, m, anisotropy
    theta: str = "patch"            # patch (one value per patch) | field (one per cell) | global (one trained value)
    theta_hidden: int = 32
    noise_std: float = 0.2          # initial observation-error std (normalised units)
    learn_noise: bool = True        # R is a trained scalar
    lstm_hidden: int = 32
    lstm_downsample: int = 1
    n_steps: int = 10
    lr_grad: float = 0.2
    dropout: float = 0.1
    precond: str = "prior"          # prior: the solver sees Q_Theta^{-1} grad J | none: grad J (the anchor's)
    update: str = "subspace"        # subspace: ConvLSTM direction + exact 2-D line search | anchor: 4DVarNet's update
    length_unit_m: float = 1000.0   # metres per length unit (the grid's dx_m, dy_m are divided by it)
    mean: str = "zero"              # prior mean: zero (the normalisation mean) | obs (mean of the patch's obs)
                                    # | oi (the patch's OI analysis, oi_* settings: the SPDE models truth - OI)
    oi_Lx_km: float = 100.0         # mean=oi: OI scales [km, days] and noise std [m], as model=4dvarnet's init=oi
    oi_Ly_km: float = 100.0
    oi_Lt_days: float = 10.0
    oi_noise_std: float = 0.05

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SPDEModelConfig:
        d = dict(d)
        d.pop("name", None)
        cfg = dataclass_from_dict(cls, d, "spde_4dvarnet model config")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if int(self.n_time) != self.n_time or self.n_time < 1:
            raise ConfigError(f"model.n_time must be an integer >= 1, got {self.n_time}")
        if self.alpha not in (1, 2):
            raise ConfigError(f"model.alpha must be 1 or 2, got {self.alpha}")
        if self.init not in ("stationary", "white"):
            raise ConfigError(f"model.init must be 'stationary' or 'white', got {self.init!r}")
        if self.precond not in ("prior", "none"):
            raise ConfigError(f"model.precond must be 'prior' or 'none', got {self.precond!r}")
        if self.update not in ("anchor", "subspace"):
            raise ConfigError(f"model.update must be 'anchor' or 'subspace', got {self.update!r}")
        if self.mean not in MEANS:
            raise ConfigError(f"model.mean must be one of {list(MEANS)}, got {self.mean!r}")
        check_oi_settings(self)
        if self.theta not in ("patch", "field", "global"):
            raise ConfigError(f"model.theta must be 'patch', 'field' or 'global', got {self.theta!r}")
        bad = [p for p in self.params if p not in _PARAM_SETS]
        if bad or "kappa" not in self.params or "std" not in self.params:
            raise ConfigError(f"model.params={list(self.params)}: must contain kappa and std, "
                              f"and only {list(_PARAM_SETS)}")
        for key in ("dt", "kappa0", "gamma0", "std0", "noise_std", "length_unit_m"):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"model.{key} must be > 0, got {v!r}")
        if self.n_steps < 1 or self.lstm_hidden < 1 or self.theta_hidden < 1:
            raise ConfigError("model.n_steps, model.lstm_hidden and model.theta_hidden must be >= 1")

    def oi_kwargs(self) -> dict[str, float]:
        """Keyword arguments of :func:`oceanda.assim.oi.oi_patch` for the ``mean="oi"`` prior mean
        (:func:`oceanda.assim.fourdvarnet.oi_first_guess` computes it at inference)."""
        return oi_settings_kwargs(self)

    @property
    def n_raw(self) -> int:
        """Number of CNN output channels."""
        return sum({"kappa": 1, "std": 1, "gamma": 1, "m": 2, "anisotropy": 2}[p] for p in self.params)


# ----------------------------------------------------------------------------- Theta


class ThetaNet(nn.Module):
    """CNN ``[y, mask, ocean] (B, 2T+1, H, W) -> raw parameters (B, P, H, W)``.

    Three 3x3 convolutions (dilations 1, 2, 4; ReLU) and a 1x1 head initialised at zero.
    Its input holds the observations only (zero where unobserved) and the masks.
    """

    def __init__(self, n_time: int, n_out: int, hidden: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(2 * n_time + 1, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=4, dilation=4), nn.ReLU(),
        )
        self.head = nn.Conv2d(hidden, n_out, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, y0: Tensor, mask: Tensor, ocean: Tensor) -> Tensor:
        oc = ocean.to(y0.dtype).unsqueeze(1)
        inp = torch.cat([y0 * oc, mask.to(y0.dtype) * oc, oc], dim=1)
        return self.head(self.body(inp))


def _bounded(a: Tensor) -> Tensor:
    return 3.0 * torch.tanh(a / 3.0)


# ----------------------------------------------------------------------------- precision


class SPDEPrecisionBatch:
    """The SPDE prior precisions of a batch of patches, for the cost: ``quad`` and ``grad``.

    Built from one :class:`SPDEPrior` per patch (so the operator is the prior's, exactly);
    their time-invariant stencils ``F = I + dt A^alpha`` and noise variances ``s`` are
    stacked over the batch to apply ``Q`` to ``(B, T, H, W)`` in one pass. Requires
    time-invariant parameters (``(ny, nx)`` fields or scalars).
    """

    def __init__(self, priors: list[SPDEPrior]) -> None:
        if not priors:
            raise ValueError("SPDEPrecisionBatch needs at least one prior")
        p0 = priors[0]
        for p in priors:
            if p.F.coef.shape[0] != 1 or p.s.shape[0] != 1:
                raise ValueError("SPDEPrecisionBatch: parameters must be time-invariant")
            if p.F.offsets != p0.F.offsets or p.init != p0.init or p.T != p0.T:
                raise ValueError("SPDEPrecisionBatch: priors of one batch must share T, init, alpha")
        self.priors = priors
        self.T, self.init, self.init_std = p0.T, p0.init, p0.init_std
        coef = torch.stack([p.F.coef[0] for p in priors])  # (B, H, W, K)
        self.F = Stencil(p0.F.offsets, coef[:, None])       # broadcast over frames
        self.FT = self.F.T
        self.sinv = torch.stack([1.0 / p.s[0] for p in priors])[:, None]  # (B, 1, H, W)
        self.mean = torch.stack([p.mean.expand(p.T, *p.shape) for p in priors])

    def residual(self, x: Tensor) -> Tensor:
        return x - self.mean.to(x.dtype)

    def quad(self, x: Tensor) -> Tensor:
        """``(x - mu)^T Q (x - mu)`` per patch: ``x (B, T, H, W) -> (B,)``."""
        r = self.residual(x)
        Fr = self.F.apply(r)
        si = self.sinv.to(x.dtype)
        if self.init == "white":
            q = (r[:, 0] ** 2).sum((-2, -1)) / self.init_std**2
        else:
            q = ((Fr[:, 0] ** 2 - r[:, 0] ** 2) * si[:, 0]).sum((-2, -1))
        if self.T > 1:
            e = Fr[:, 1:] - r[:, :-1]
            q = q + (e * e * si).sum((-3, -2, -1))
        return q

    def grad(self, x: Tensor) -> Tensor:
        """``2 Q (x - mu)`` (closed form; see the module docstring)."""
        return 2.0 * self.matvec(self.residual(x))

    def matvec(self, r: Tensor) -> Tensor:
        """``Q r`` for ``r (B, T, H, W)`` (:func:`~oceanda.priors.spde.precision.
        precision_product`, ``Q_0 = F^T S^{-1} F - S^{-1}`` applied in this factored form)."""
        si = self.sinv.to(r.dtype)
        if self.init == "white":
            def q0(r0):
                return r0 / self.init_std**2
        else:
            def q0(r0):
                return self.FT.apply(self.F.apply(r0) * si) - r0 * si
        return precision_product(r, self.F.apply, self.FT.apply, q0, si)


# ----------------------------------------------------------------------------- cost, step


def _cov_apply_np(priors: list[SPDEPrior], g: Tensor) -> Tensor:
    """``Q_b^{-1} g_b = W_b W_b^T g_b`` per patch (two SPDE sweeps with sparse LU factors,
    float64 on CPU, :meth:`~oceanda.priors.spde.precision.SPDEPrecision.solve`)."""
    B, T, H, W = g.shape
    G = g.detach().to("cpu", torch.float64).numpy().reshape(B, T, H * W, 1)
    out = np.stack([p.precision.solve(G[b]) for b, p in enumerate(priors)])
    return torch.as_tensor(out.reshape(B, T, H, W), dtype=g.dtype, device=g.device)


class _PriorCovariance(torch.autograd.Function):
    """``g -> Q^{-1} g`` with the prior covariance held fixed (symmetric: the backward applies
    the same operator). Differentiable in ``g`` only; ``Theta`` reaches the solver's output
    through the cost gradient, not through the preconditioner."""

    @staticmethod
    def forward(ctx, g: Tensor, priors: list[SPDEPrior]) -> Tensor:  # type: ignore[override]
        ctx.priors = priors
        return _cov_apply_np(priors, g)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        return _PriorCovariance.apply(grad_out, ctx.priors), None


class SPDECost:
    """``J_b(x) = [||x - y||^2_{Omega, R} + (x-mu)^T Q_b (x-mu)] / (T n_ocean,b)``, bound to one
    batch (precisions, observations, masks); ``R`` a positive scalar tensor."""

    def __init__(self, prec: SPDEPrecisionBatch, y: Tensor, mask: Tensor, ocean4: Tensor,
                 R: Tensor, precond: list[SPDEPrior] | None = None) -> None:
        self.prec, self.y, self.mask, self.ocean4, self.R = prec, y, mask, ocean4, R
        self.precond = precond  # float64 priors whose Q^{-1} preconditions the gradient
        T = y.shape[1]
        self.n = (ocean4.sum(dim=(1, 2, 3), keepdim=True) * T).clamp_min(1.0)

    def value(self, x: Tensor) -> Tensor:
        """``(B,)`` cost values."""
        d = torch.where(self.mask, x - self.y, torch.zeros_like(x))
        jo = (d * d).sum(dim=(1, 2, 3)) / self.R
        return (jo + self.prec.quad(x)) / self.n.view(-1)

    def grad(self, x: Tensor) -> Tensor:
        """``1_ocean grad_x J_b`` ``(B, T, H, W)``."""
        g = 2.0 * self.mask.to(x.dtype) * (x - self.y) / self.R + self.prec.grad(x)
        return g * self.ocean4 / self.n

    def hessian_vec(self, d: Tensor) -> Tensor:
        """``grad^2 J d = 2 (H^T R^-1 H + Q) d / N`` on ocean cells (J is quadratic in x)."""
        h = 2.0 * (self.mask.to(d.dtype) * d / self.R + self.prec.matvec(d))
        return h * self.ocean4 / self.n

    def search_direction(self, x: Tensor) -> Tensor:
        """What the solver sees: ``Q^{-1} grad J`` (``precond``) or ``grad J``, on ocean cells."""
        g = self.grad(x)
        if self.precond is not None:
            g = _PriorCovariance.apply(g, self.precond) * self.ocean4
        return g


class SPDESolverStep(nn.Module):
    """One solver step (module docstring): ConvLSTM-modulated normalised gradient.

    ``forward(x, lstm, k, cost, create_graph)`` -> ``(x_new, lstm_new)``.
    """

    def __init__(self, grad_mod: ConvLSTMGradModulator, n_steps: int, lr_grad: float,
                 update: str = "anchor") -> None:
        super().__init__()
        self.grad_mod, self.n_steps, self.lr_grad = grad_mod, int(n_steps), float(lr_grad)
        self.update = update

    def forward(self, x: Tensor, lstm, k: int, cost: SPDECost,
                create_graph: bool = False):
        if self.update == "subspace":
            return self._subspace(x, lstm, k, cost)
        g = cost.search_direction(x)
        gm, lstm = self.grad_mod(g, lstm, cost.ocean4)
        upd = gm / (k + 1) + (self.lr_grad * (k + 1) / self.n_steps) * g / lstm.norm
        return x - upd * cost.ocean4, lstm

    def _subspace(self, x: Tensor, state, k: int, cost: SPDECost):
        """``x <- x + a d + b p``: ``d = -(g_p + ||g_p0|| S(g_p / ||g_p0||))`` (``g_p`` the
        preconditioned gradient), ``p`` the previous step, ``(a, b)`` minimising the quadratic
        ``J`` exactly on ``span{d, p}`` (a 2 x 2 solve per sample). With ``S = 0`` this is
        preconditioned conjugate gradients; ``state = (lstm, p)``."""
        lstm, p = state if isinstance(state, tuple) else (state, None)
        g = cost.grad(x)
        gp = _PriorCovariance.apply(g, cost.precond) * cost.ocean4 if cost.precond is not None else g
        gm, lstm = self.grad_mod(gp, lstm, cost.ocean4)
        d = -(gp + lstm.norm * gm) * cost.ocean4
        dot = lambda a, b: (a * b).sum(dim=(1, 2, 3))  # noqa: E731
        Hd = cost.hessian_vec(d)
        if p is None:
            a = -dot(g, d) / dot(d, Hd).clamp_min(torch.finfo(d.dtype).tiny)
            step = a.view(-1, 1, 1, 1) * d
        else:
            Hp = cost.hessian_vec(p)
            A = torch.stack([torch.stack([dot(d, Hd), dot(d, Hp)], -1),
                             torch.stack([dot(p, Hd), dot(p, Hp)], -1)], -2)  # (B, 2, 2)
            rhs = -torch.stack([dot(g, d), dot(g, p)], -1)
            ab = _solve2_or_first(A, rhs)
            step = ab[:, 0].view(-1, 1, 1, 1) * d + ab[:, 1].view(-1, 1, 1, 1) * p
        return x + step, (lstm, step)


def _solve2_or_first(A: Tensor, r: Tensor) -> Tensor:
    """Per sample ``A^{-1} r`` for SPD ``(B, 2, 2)`` ``A`` in closed form; where ``A`` is
    (numerically) singular (``d`` parallel to ``p``, or both zero once converged) the step
    along the first direction only, ``(r_0 / A_00, 0)``, or zero when ``A_00 = 0``.
    Differentiable: the branches not taken see safe denominators."""
    a00, a01, a10, a11 = A[:, 0, 0], A[:, 0, 1], A[:, 1, 0], A[:, 1, 1]
    det = a00 * a11 - a01 * a10
    eps = 64 * torch.finfo(A.dtype).eps
    ok2 = det > eps * (a00 * a11).abs()
    safe = torch.where(ok2, det, torch.ones_like(det))
    two = torch.stack([(a11 * r[:, 0] - a01 * r[:, 1]) / safe, (a00 * r[:, 1] - a10 * r[:, 0]) / safe], -1)
    ok1 = a00 > 0
    first = torch.where(ok1, r[:, 0] / torch.where(ok1, a00, torch.ones_like(a00)), torch.zeros_like(a00))
    one = torch.stack([first, torch.zeros_like(first)], -1)
    return torch.where(ok2.unsqueeze(-1), two, one)


# ----------------------------------------------------------------------------- model


class SPDEFourDVarNet(nn.Module):
    """SPDE-prior 4DVarNet (see the module docstring).

    ``forward(obs, ocean, dx, dy, theta=None, R=None)``: ``obs (B, T, H, W)`` normalised
    observations (NaN unobserved), ``ocean (B, H, W)`` bool, ``dx, dy (B, H, W)`` cell sizes in
    the model's length unit; ``theta`` (optional) a dict of parameters to use instead of the
    predicted ones (Matheron members), ``R`` (optional) an observation-error variance instead
    of the model's :attr:`R`. Returns the reconstruction ``(B, T, H, W)``.
    """

    def __init__(self, cfg: SPDEModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        if cfg.theta == "global":  # one trained raw vector; starts at the reference values
            self.theta_net = None
            self.theta_global = nn.Parameter(torch.zeros(cfg.n_raw))
        else:
            self.theta_net = ThetaNet(cfg.n_time, cfg.n_raw, cfg.theta_hidden)
        self.grad_mod = ConvLSTMGradModulator(cfg.n_time, cfg.lstm_hidden, dropout=cfg.dropout,
                                              downsample=cfg.lstm_downsample)
        self.step = SPDESolverStep(self.grad_mod, cfg.n_steps, cfg.lr_grad, cfg.update)
        if cfg.update == "subspace":  # start as preconditioned CG: the ConvLSTM's output is zero
            nn.init.zeros_(self.grad_mod.conv_out.weight)
            nn.init.zeros_(self.grad_mod.conv_out.bias)
        self.solver = UnrolledSolver(self.step, cfg.n_steps)
        self.log_noise = nn.Parameter(torch.tensor(math.log(cfg.noise_std)),
                                      requires_grad=bool(cfg.learn_noise))

    # -- parameters
    @property
    def R(self) -> Tensor:
        """Observation-error variance (normalised units)."""
        return torch.exp(2.0 * self.log_noise)

    @staticmethod
    def _inputs(obs: Tensor, ocean: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        if ocean is None:
            ocean = torch.ones(obs.shape[0], *obs.shape[-2:], dtype=torch.bool, device=obs.device)
        ocean = ocean.to(torch.bool)
        mask = torch.isfinite(obs) & ocean.unsqueeze(1)
        y = torch.where(mask, obs, torch.zeros_like(obs))
        return y, mask, ocean

    def predict_theta(self, obs: Tensor, ocean: Tensor | None = None) -> dict[str, Tensor]:
        """Parameters from the observations only: dict of ``(B,)`` (``theta="patch"``) or
        ``(B, H, W)`` (``"field"``) tensors: ``kappa``, ``std`` and, as configured,
        ``gamma``, ``mx``, ``my``, ``vx``, ``vy``; ``theta="global"``: ``(B,)`` tensors holding
        the one trained value. ``mean="obs"`` adds ``mean`` ``(B,)``: the prior mean, the mean
        of each patch's observations (0 without any); ``mean="oi"``'s field is not predicted here
        but given (:meth:`with_mean`)."""
        y, mask, ocean = self._inputs(obs, ocean)
        if self.cfg.theta == "global":
            raw = self.theta_global.to(y.dtype).expand(y.shape[0], -1)  # (B, P)
        elif self.cfg.theta == "patch":
            raw = self.theta_net(y, mask, ocean)  # (B, P, H, W)
            oc = ocean.to(raw.dtype).unsqueeze(1)
            raw = (raw * oc).sum((-2, -1)) / oc.sum((-2, -1)).clamp_min(1.0)  # (B, P)
        else:
            raw = self.theta_net(y, mask, ocean).movedim(1, -1)  # (B, H, W, P)
        c, out, i = self.cfg, {}, 0
        for p in c.params:
            if p == "kappa":
                out["kappa"] = c.kappa0 * torch.exp(_bounded(raw[..., i]))
            elif p == "std":
                out["std"] = c.std0 * torch.exp(_bounded(raw[..., i]))
            elif p == "gamma":
                out["gamma"] = c.gamma0 * torch.exp(_bounded(raw[..., i]))
            elif p == "m":
                out["mx"], out["my"] = c.m_scale * raw[..., i], c.m_scale * raw[..., i + 1]
                i += 1
            elif p == "anisotropy":
                out["vx"], out["vy"] = raw[..., i], raw[..., i + 1]
                i += 1
            i += 1
        if c.mean == "obs":
            m = mask.to(y.dtype)
            out["mean"] = (y * m).sum((1, 2, 3)) / m.sum((1, 2, 3)).clamp_min(1.0)
        return out

    def priors(self, theta: dict[str, Tensor], ocean: Tensor, dx: Tensor, dy: Tensor,
               dtype: torch.dtype | None = None) -> list[SPDEPrior]:
        """One :class:`SPDEPrior` per patch with parameters ``theta`` (autograd kept)."""
        c = self.cfg
        dtype = dtype or theta["kappa"].dtype
        out = []
        for b in range(dx.shape[0]):
            th = {k: v[b].to(dtype) for k, v in theta.items()}
            mean = th.pop("mean", 0.0)
            oc = ocean[b].to(torch.bool)
            area = (dx[b] * dy[b]).to(dtype)
            abar = area[oc].mean() if bool(oc.any()) else area.mean()
            gamma = th.get("gamma", torch.as_tensor(c.gamma0, dtype=dtype))
            kw = dict(kappa=th["kappa"], gamma=gamma,
                      tau=th["std"] * torch.sqrt(8.0 * math.pi * gamma * th["kappa"] ** 2 / abar))
            if "mx" in th:
                kw.update(mx=th["mx"], my=th["my"])
            if "vx" in th:
                kw.update(beta=c.gamma0, vx=th["vx"], vy=th["vy"])
            out.append(SPDEPrior(dx[b].to(dtype), dy[b].to(dtype), oc, T=c.n_time, dt=c.dt,
                                 alpha=c.alpha, init=c.init, mean=mean, dtype=dtype,
                                 device=dx.device, **kw))
        return out

    # -- solve
    def with_mean(self, theta: dict[str, Tensor], mean: Tensor | None,
                  shape: tuple[int, ...]) -> dict[str, Tensor]:
        """``theta`` plus the ``mean="oi"`` prior mean ``mean`` (the patches' OI analyses,
        normalised, of the observations' ``shape`` ``(B, T, H, W)``) as its ``"mean"`` entry;
        other models: ``theta`` (``mean`` must be None). :class:`InputError` when ``mean="oi"``
        and neither ``theta`` nor ``mean`` holds it, or it has another shape."""
        if self.cfg.mean != "oi":
            if mean is not None:
                raise InputError(f"a prior mean field was given to a model with model.mean={self.cfg.mean!r} "
                                 "(only model.mean=oi takes one)")
            return theta
        if mean is None:
            if "mean" in theta:
                return theta
            raise InputError("model.mean=oi: the prior mean (each patch's OI analysis, normalised, "
                             "(B, T, H, W)) was not given")
        if tuple(mean.shape) != tuple(shape):
            raise InputError(f"model.mean=oi: the prior mean must have the observations' shape {tuple(shape)}, "
                             f"got {tuple(mean.shape)}")
        return {**theta, "mean": mean}

    def forward(self, obs: Tensor, ocean: Tensor | None, dx: Tensor, dy: Tensor,
                theta: dict[str, Tensor] | None = None, return_theta: bool = False,
                R: Tensor | float | None = None, mean: Tensor | None = None):
        y, mask, ocean = self._inputs(obs, ocean)
        if obs.shape[1] != self.cfg.n_time:
            raise InputError(f"window of {obs.shape[1]} frames; the model has n_time={self.cfg.n_time}")
        if theta is None:
            theta = self.predict_theta(obs, ocean)
        theta = self.with_mean(theta, mean, tuple(obs.shape))
        prec = SPDEPrecisionBatch(self.priors(theta, ocean, dx, dy, dtype=obs.dtype))
        ocean4 = ocean.to(obs.dtype).unsqueeze(1)
        precond = None
        if self.cfg.precond == "prior":  # float64: Q_0's stencil cancels badly in float32
            precond = self.priors({k: v.detach().double() for k, v in theta.items()}, ocean,
                                  dx.double(), dy.double(), torch.float64)
        R = self.R if R is None else torch.as_tensor(R, device=obs.device)
        cost = SPDECost(prec, y, mask, ocean4, R.to(obs.dtype), precond=precond)
        create_graph = self.training and torch.is_grad_enabled()
        x0 = prec.mean.to(y.dtype) * ocean4 if self.cfg.precond == "prior" else y * ocean4
        out = self.solver(x0, cost, create_graph=create_graph)
        return (out, theta) if return_theta else out

    # -- ensembles
    def members(self, obs: Tensor, ocean: Tensor, dx: Tensor, dy: Tensor, n_members: int,
                R: float | None = None, seeds: list | None = None, chunk: int = 16,
                mean: Tensor | None = None):
        """Matheron conditional members per patch (module docstring); ``mean``: the prior mean
        of a ``mean="oi"`` model (as :meth:`forward`).

        Returns ``(mean, members)``: ``(B, T, H, W)`` the solver's reconstruction and
        ``(B, N, T, H, W)`` the members (normalised units, dtype of ``obs``). ``R``: the
        pseudo-observation noise variance (default: the model's). ``seeds[b]`` seeds patch
        ``b`` (prior draws and noise).
        """
        if int(n_members) != n_members or n_members < 2:
            raise ConfigError(f"members must be an integer >= 2, got {n_members}")
        y, mask, ocean = self._inputs(obs, ocean)
        R = float(self.R.detach()) if R is None else float(R)
        means, mems = [], []
        with torch.no_grad():
            theta = self.with_mean(self.predict_theta(obs, ocean), mean, tuple(obs.shape))
            for b in range(obs.shape[0]):
                th = {k: v[b:b + 1] for k, v in theta.items()}
                prior = self.priors({k: v.double() for k, v in th.items()}, ocean[b:b + 1],
                                    dx[b:b + 1].double(), dy[b:b + 1].double(), torch.float64)[0]
                rng = np.random.default_rng(None if seeds is None else seeds[b])

                def reconstruct(Y, b=b, th=th):
                    Yt = torch.as_tensor(Y, dtype=obs.dtype, device=obs.device)
                    outs = []
                    for i in range(0, Yt.shape[0], chunk):
                        Yc = Yt[i:i + chunk]
                        k = Yc.shape[0]
                        rep = lambda t: t.expand(k, *t.shape[1:])  # noqa: E731
                        outs.append(self(Yc, rep(ocean[b:b + 1]), rep(dx[b:b + 1]), rep(dy[b:b + 1]),
                                         theta={n: rep(v) for n, v in th.items()}))
                    return torch.cat(outs).double().cpu().numpy()

                yb = torch.where(mask[b], y[b], torch.nan).double().cpu().numpy()
                m, xm = spde_conditional_members(reconstruct, prior, yb, mask[b].cpu().numpy(), R,
                                                 int(n_members), rng)
                means.append(torch.as_tensor(xm))
                mems.append(torch.as_tensor(m))
        to = dict(dtype=obs.dtype, device=obs.device)
        oc = ocean.to(obs.dtype)[:, None]
        return torch.stack(means).to(**to) * oc, torch.stack(mems).to(**to) * oc[:, None]


def spde_conditional_members(reconstruct, prior: SPDEPrior, y: np.ndarray, mask: np.ndarray,
                             R, n_members: int, rng: np.random.Generator | int | None = None):
    """Matheron members ``x_i = x*(y) + s_i - x*(H s_i + eps_i)`` of one patch.

    ``s_i`` are ``n_members`` draws of ``prior`` (SPDE simulation), ``eps_i ~ N(0, R)`` on
    ``mask``, ``reconstruct`` maps ``(k, T, H, W)`` observation fields (NaN off ``mask``) to
    reconstructions. Returns ``(members (N, T, H, W), x*(y))`` (numpy float64). With the
    exact posterior mean as ``reconstruct`` the members are exact posterior draws.
    """
    rng = np.random.default_rng(rng)
    S = prior.sample(int(n_members), rng=rng)
    return matheron_members(reconstruct, y, mask, R, S, rng=rng, include_mean=True)


SPREAD_MODES = ("global", "obs_std")


def scale_members(mean, members, spread_scale, axis: int = 1):
    """Calibrated members ``mean + c (members - mean)`` (module docstring, "Spread calibration").

    ``members`` carry the member dimension at ``axis`` (``(B, N, T, H, W)`` by default), ``mean``
    (the solver's ``x*(y)``) lacks it; numpy arrays or tensors. ``c``: a number, or per-entry
    factors broadcastable to ``mean`` (e.g. ``(B, 1, 1, 1)`` per patch). ``c = 1`` returns
    ``members``.
    """
    if isinstance(spread_scale, (int, float)):
        c = float(spread_scale)
        if not (math.isfinite(c) and c > 0):
            raise ConfigError(f"spread_scale must be a finite number > 0, got {spread_scale!r}")
        if c == 1.0:
            return members
    else:
        c = spread_scale
        ok = torch.isfinite(c).all() & (c > 0).all() if isinstance(c, Tensor) else \
            np.isfinite(c).all() and (np.asarray(c) > 0).all()
        if not bool(ok):
            raise ConfigError("spread_scale factors must be finite and > 0")
        c = c.unsqueeze(axis) if isinstance(c, Tensor) else np.expand_dims(c, axis)
    m = mean.unsqueeze(axis) if isinstance(mean, Tensor) else np.expand_dims(mean, axis)
    return m + c * (members - m)


def spread_factors(obs: Tensor, ocean: Tensor, prior_std: Tensor, R: float, mode: str) -> Tensor:
    """Per-patch spread factors ``r_b`` ``(B,)`` (before the global ``c``; module docstring).

    ``mode="global"``: ones. ``"obs_std"``: ``sigma_y,b / sigma_Theta,b`` with ``sigma_y,b^2 =
    max(var(y_b) - R, R)`` the variance of patch ``b``'s observations (ocean cells, all frames,
    ``n - 1`` denominator) less the noise variance ``R`` (floored at ``R``) and ``sigma_Theta,b``
    the predicted prior std (``prior_std`` ``(B,)``, or ``(B, H, W)`` averaged over the ocean),
    all in the same (normalised) units; patches with fewer than 2 observations get 1. The
    members' prior amplitude then becomes ``c sigma_y,b``: the local variability seen by the
    observations, never the truth.
    """
    if mode not in SPREAD_MODES:
        raise ConfigError(f"spread_mode must be one of {list(SPREAD_MODES)}, got {mode!r}")
    B = obs.shape[0]
    if mode == "global":
        return torch.ones(B, dtype=torch.float64)
    oc = ocean.to(torch.bool)
    ps = prior_std.detach().double().cpu()
    if ps.ndim == 3:
        w = oc.double().cpu()
        ps = (ps * w).sum((-2, -1)) / w.sum((-2, -1)).clamp_min(1.0)
    out = torch.ones(B, dtype=torch.float64)
    for b in range(B):
        v = obs[b][torch.isfinite(obs[b]) & oc[b].unsqueeze(0)].double().cpu()
        if v.numel() >= 2:
            out[b] = torch.sqrt(torch.clamp(v.var() - float(R), min=float(R))) / ps[b]
    return out


def build_spde_model(cfg: SPDEModelConfig) -> SPDEFourDVarNet:
    """A fresh :class:`SPDEFourDVarNet` (weights from torch's current RNG)."""
    return SPDEFourDVarNet(cfg)


# ----------------------------------------------------------------------------- checkpoints


def spde_checkpoint_state(model: SPDEFourDVarNet, norm: dict[str, float], **extra: Any) -> dict[str, Any]:
    """The dict written to an SPDE-4DVarNet checkpoint (plus ``extra`` entries)."""
    return {"format": SPDE_CHECKPOINT_FORMAT, "version": SPDE_CHECKPOINT_VERSION,
            "model_config": asdict(model.cfg),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "norm": {"mean": float(norm["mean"]), "std": float(norm["std"])}, **extra}


def read_spde_checkpoint(path: str | os.PathLike, expect: SPDEModelConfig | None = None) -> dict[str, Any]:
    """Read and validate an SPDE-4DVarNet checkpoint; adds ``model`` and ``model_cfg``.

    Raises :class:`InputError` naming ``path`` when the file is missing, unreadable
    (truncated / corrupted), of another format or version, has a bad normalisation, holds
    weights that do not fit its model config, or (``expect``) does not fit that config.
    """
    ck = read_model_checkpoint(path, fmt=SPDE_CHECKPOINT_FORMAT, version=SPDE_CHECKPOINT_VERSION,
                               config_cls=SPDEModelConfig, build=build_spde_model, expect=expect,
                               what="SPDE-4DVarNet",
                               hint="a plain 4DVarNet checkpoint goes with method=4dvarnet")
    c = ck.get("spread_scale", 1.0)  # absent (checkpoints before the calibration): 1, the raw members
    try:
        ok = math.isfinite(float(c)) and float(c) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"SPDE-4DVarNet checkpoint {path}: spread_scale must be a finite number > 0, "
                         f"got {c!r} (re-run the calibration)")
    ck["spread_scale"] = float(c)
    mode = ck.get("spread_mode", "global")  # absent: one global factor (c = 1: the raw members)
    if mode not in SPREAD_MODES:
        raise InputError(f"SPDE-4DVarNet checkpoint {path}: spread_mode must be one of "
                         f"{list(SPREAD_MODES)}, got {mode!r}")
    ck["spread_mode"] = mode
    return ck


# ----------------------------------------------------------------------------- method


@register("spde_4dvarnet")
class SPDEFourDVarNetMethod:
    """``oceanda infer method=spde_4dvarnet method.checkpoint=PATH [method.members=N]``.

    Per patch: normalise the observations with the checkpoint's statistics, predict
    ``Theta`` from them (never from a truth), run the trained solver; with ``members = N >= 2``
    also ``N`` Matheron members (``std`` = their standard deviation; ``members`` returned
    when ``return_members``). Land cells are closed boundaries of the SPDE and masked in the
    cost. ``noise_std`` [m]: pseudo-observation noise of the members (default: the model's
    learned one). Members of a patch depend only on ``seed`` and the patch's coordinates.
    ``spread_scale`` ``c``: members ``x* + c r_b (x_i - x*)`` (:func:`scale_members`, std times
    ``c r_b``) with ``r_b`` from ``spread_mode`` (:func:`spread_factors`: ``"global"`` 1,
    ``"obs_std"`` the patch's observed std over its predicted prior std); ``None``: the
    checkpoint's calibrated values (``c = 1``, ``"global"`` when it has none: the raw members).
    A checkpoint with ``mean="oi"`` takes as prior mean the OI analysis of the same patch
    (:func:`oceanda.assim.fourdvarnet.oi_first_guess` with its ``oi_*`` settings, computed here
    as ``method=4dvarnet`` does for its ``init="oi"``; ``oi_solver`` its solver).
    """

    def __init__(self, checkpoint: str, members: int = 0, return_members: bool = False,
                 seed: int = 0, noise_std: float | None = None, member_batch: int = 16,
                 spread_scale: float | None = None, spread_mode: str | None = None,
                 oi_solver: str = "cg") -> None:
        from oceanda.assim.oi import SOLVERS

        if oi_solver not in SOLVERS:
            raise ConfigError(f"spde_4dvarnet: oi_solver must be one of {list(SOLVERS)}, got {oi_solver!r}")
        self.oi_solver = oi_solver
        if int(members) != members or members < 0 or members == 1:
            raise ConfigError(f"spde_4dvarnet: members must be 0 or an integer >= 2, got {members}")
        if noise_std is not None and not noise_std > 0:
            raise ConfigError(f"spde_4dvarnet: noise_std must be > 0 or null, got {noise_std}")
        if int(member_batch) < 1:
            raise ConfigError(f"spde_4dvarnet: member_batch must be >= 1, got {member_batch}")
        if spread_scale is not None and not (isinstance(spread_scale, (int, float))
                                             and math.isfinite(spread_scale) and spread_scale > 0):
            raise ConfigError(f"spde_4dvarnet: spread_scale must be a finite number > 0 or null, "
                              f"got {spread_scale!r}")
        if spread_mode is not None and spread_mode not in SPREAD_MODES:
            raise ConfigError(f"spde_4dvarnet: spread_mode must be one of {list(SPREAD_MODES)} or null, "
                              f"got {spread_mode!r}")
        ck = read_spde_checkpoint(checkpoint)
        self.spread_scale = float(ck["spread_scale"] if spread_scale is None else spread_scale)
        self.spread_mode = str(ck["spread_mode"] if spread_mode is None else spread_mode)
        self.model: SPDEFourDVarNet = ck["model"].eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.cfg: SPDEModelConfig = ck["model_cfg"]
        self.mean, self.std = float(ck["norm"]["mean"]), float(ck["norm"]["std"])
        self.checkpoint = str(checkpoint)
        self.members, self.return_members, self.seed = int(members), bool(return_members), int(seed)
        self.noise_std, self.member_batch = noise_std, int(member_batch)

    def __call__(self, batch: PatchBatch) -> PatchResult:
        B, T, H, W = batch.shape
        if T != self.cfg.n_time:
            raise InputError(f"patch length {T} days does not fit the SPDE-4DVarNet checkpoint "
                             f"{self.checkpoint} (trained on {self.cfg.n_time}-day windows): set "
                             f"patch.size[0]={self.cfg.n_time}")
        k = self.cfg.lstm_downsample
        if H % k or W % k:
            raise InputError(f"patch of {H} x {W} cells: the model needs sizes divisible by {k}")
        dev = batch.obs.device
        self.model.to(dev)
        obs = (batch.obs.to(torch.float32) - self.mean) / self.std
        u = self.cfg.length_unit_m
        dx, dy = (batch.dx_m / u).to(torch.float32), (batch.dy_m / u).to(torch.float32)
        ocean = batch.ocean.to(torch.bool)
        mu = None
        if self.cfg.mean == "oi":  # the prior mean: the OI analysis of the same observations, normalised
            # memory guard of method=oi (the m x m matrix): a ConfigError naming max_obs
            oi = oi_first_guess(batch.obs, batch.lon, batch.lat, batch.time, self.cfg, max_obs=20000,
                                solver=self.oi_solver)
            mu = (oi.to(torch.float32) - self.mean) / self.std
        if not self.members:
            with torch.no_grad():
                out = self.model(obs, ocean, dx, dy, mean=mu)
            return PatchResult(mean=(out * self.std + self.mean).to(batch.obs.dtype))
        seeds = [[self.seed, int(round(float(batch.lon[b, 0]) * 1e4)) % (1 << 31),
                  int(round(float(batch.lat[b, 0]) * 1e4)) % (1 << 31),
                  int(round(float(batch.time[b, 0]) * 1e3)) % (1 << 31)] for b in range(B)]
        R = None if self.noise_std is None else (self.noise_std / self.std) ** 2
        mean, mem = self.model.members(obs, ocean, dx, dy, self.members, R=R, seeds=seeds,
                                       chunk=self.member_batch, mean=mu)
        if self.spread_mode == "global":
            mem = scale_members(mean, mem, self.spread_scale)
        else:
            with torch.no_grad():
                prior_std = self.model.predict_theta(obs, ocean)["std"]
            Rn = float(self.model.R) if R is None else R
            r = spread_factors(obs, ocean, prior_std, Rn, self.spread_mode) * self.spread_scale
            mem = scale_members(mean, mem, r.to(mem).view(B, 1, 1, 1))
        dt = batch.obs.dtype
        mem_phys = mem * self.std + self.mean
        return PatchResult(mean=(mean * self.std + self.mean).to(dt),
                           std=(mem.std(dim=1, unbiased=True) * self.std).to(dt),
                           members=mem_phys.to(dt) if self.return_members else None)
