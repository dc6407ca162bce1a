"""4DVarNet: a trainable prior Phi, a variational cost and a ConvLSTM gradient solver step.

Fablet et al. (2021), "Learning variational data assimilation models and solvers"
(JAMES), and its SPDE extension (Beauchamp, Febvre, Fablet et al. 2024, "Bridging data
assimilation and SPDE-based generative modelling with 4DVarNet schemes"). On a patch of
normalised SSH ``x`` of shape ``(B, T, H, W)`` (time as channels), with observations ``y`` on the
observed cells ``Omega`` (a boolean ``mask``, varying per sample) and an ocean mask
``ocean`` ``(B, H, W)``, the inner variational cost of sample ``b`` is

.. math::

    J_b(x) = \\frac{w_{obs}}{n_{obs,b}} \\sum_{(t,i) \\in \\Omega_b} (x_{ti} - y_{ti})^2
           + \\frac{\\lambda}{T n_{ocean,b}} \\sum_{t, i \\in ocean_b} (x_{ti} - \\Phi(x)_{ti})^2

and ``J = sum_b J_b``, so that the gradient of one sample never depends on the rest of the
batch (a batch of one reproduces the anchor's ``F.mse_loss`` normalisation exactly).
Land is masked: land cells enter neither term, the state on land is held at zero (the
normalised mean) and the gradient is zeroed there.

Gradient (closed form for the observation term, one vector-Jacobian product for Phi):

.. math::

    \\nabla_x J_b = \\frac{2 w_{obs}}{n_{obs}} \\mathbb 1_\\Omega (x - y)
        + \\frac{2 \\lambda}{T n_{ocean}} \\left(r - J_\\Phi(x)^T r\\right),
    \\qquad r = \\mathbb 1_{ocean} (x - \\Phi(x)),

then multiplied by ``1_ocean``. ``create_graph=True`` keeps the graph of ``J_Phi^T r``
for end-to-end training (the solver output depends on Phi's weights through it).

Solver step k (of n), the anchor's update (4dvarnet-starter ``GradSolver.solver_step``):

.. math::

    x \\leftarrow x - \\left[\\frac{S(g / \\|g_0\\|)}{k + 1} + \\mathrm{lr}\\,\\frac{k+1}{n}\\, g\\right],
    \\qquad g = \\nabla_x J(x),

``S`` a 2-D ConvLSTM whose hidden state is carried from step to step, ``||g_0||`` the RMS of
the first gradient (per sample, over ocean cells). The ConvLSTM is
:mod:`oceanda.assim.convlstm`, the unrolled loop :mod:`oceanda.assim.unroll`, the checkpoint
reader :mod:`oceanda.assim.checkpoint`.

First guess (``ModelConfig.init``): ``"obs"`` starts from the observations (NaN -> 0, the
anchor); ``"oi"`` from the exact per-patch OI analysis of the same observations
(:func:`oi_first_guess`, settings stored in the checkpoint and recomputed by the method at
inference, so ``method=4dvarnet`` stays one self-contained method). Since ``S``'s output is
not rescaled by ``||g_0||`` while the raw-gradient part is ``O(1 / n_obs)`` small, a model
whose ``S`` output layer is zero (:meth:`FourDVarNet.zero_update_`) returns its first guess
almost exactly: trained from there, the network learns a correction of the OI.

Implementation notes (same arithmetic as the anchor; ``hpc/bench/fourdvarnet.py`` compares
both side by side with the same weights):

- the two bilinear branches of Phi (``bilin_1`` and ``bilin_21``/``bilin_22``) are one
  convolution with stacked output channels; the ConvLSTM's gate convolution on
  ``cat(g, h)`` is skipped for ``h`` at step 0 where ``h = 0``; ``tanh(z) = 2 sigmoid(2z) - 1``
  (torch's CPU sigmoid is several times faster than its tanh);
- Phi's vector-Jacobian product is written by hand (transposed convolutions, pooling and
  upsampling adjoints), so that inference runs without autograd (``torch.inference_mode``);
  the observation term's gradient is closed-form (no boolean indexing);
- the state is kept in ``channels_last`` memory format (oneDNN's native layout).

The model is FLOP-bound by the ConvLSTM gate convolution (~80 % of the multiply-adds, the
same in both implementations); in float32 oneDNN already runs it near the CPU's peak, so
float32 inference is only ~1.1-1.2x the starter's time and a training step on par. Two
runtime options (not in the state dict; :meth:`FourDVarNet.set_precision`,
``ModelConfig.precision`` / ``fuse_cell``, ``oceanda infer method.precision=...``):

- ``precision="bf16"``: the convolutions (prior, its vjp, ConvLSTM) in bfloat16 (2x the
  multiply-add rate with AVX512-BF16 / tensor cores); the state ``x``, the gradient of J,
  the gradient normalisation, the ConvLSTM cell state and the update stay float32, so the
  rounding does not accumulate over the unrolled steps. Float64 inputs ignore it.
- ``fuse_cell=True``: the ConvLSTM cell's ~10 pointwise passes over full-resolution
  activations as one ``torch.compile`` kernel (hand-written backward recomputing the
  activations); falls back to the eager cell if compiling fails.

``hpc/bench/fourdvarnet.py`` times every setting against the starter and (``--accuracy``)
measures what bf16 changes on a real OSSE next to the reconstruction error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oceanda.assim.base import PatchBatch, PatchResult
from oceanda.assim.checkpoint import read_model_checkpoint
from oceanda.assim.convlstm import ConvLSTMGradModulator, LSTMState
from oceanda.assim.nn_ops import (PRECISIONS, _compute_dtype, _conv, _conv_t, _ocean4d, _pool_adjoint, _upsample,
                                  _upsample_adjoint, native_bf16)
from oceanda.assim.registry import register
from oceanda.assim.unroll import UnrolledSolver
from oceanda.config_dataclass import dataclass_from_dict
from oceanda.errors import ConfigError, InputError

__all__ = [
    "BilinAEPrior",
    "UNetPrior",
    "ConvLSTMGradModulator",
    "LSTMState",
    "VariationalCost",
    "SolverStep",
    "FourDVarNet",
    "build_prior",
    "ModelConfig",
    "build_model",
    "read_checkpoint",
    "FourDVarNetMethod",
    "INITS",
    "OI_SETTINGS",
    "check_oi_settings",
    "oi_settings_kwargs",
    "oi_first_guess",
    "PRECISIONS",
    "native_bf16",
]

CHECKPOINT_FORMAT = "oceanda-4dvarnet"
CHECKPOINT_VERSION = 1
#: ModelConfig fields that do not change the weights (not compared against a checkpoint)
_RUNTIME_FIELDS = ("precision", "fuse_cell")


# ----------------------------------------------------------------------------- priors


class BilinAEPrior(nn.Module):
    """The anchor's bilinear auto-encoder prior ``Phi`` (4dvarnet-starter ``BilinAEPriorCost``).

    ``x (B, T, H, W) -> Phi(x) (B, T, H, W)``, time as channels; ``H, W`` divisible by
    ``downsample``. Ops: average-pool by ``downsample``; ``h = C_hid(relu(C_in(.)))``;
    ``z = C_out([C_1 h, (C_21 h)^2])`` (``quadratic=True``, the anchor's default) or
    ``C_out([C_1 h, C_21 h * C_22 h])``; bilinear upsampling (align_corners). All
    convolutions ``kernel_size`` 'same'. Parameters: ``conv_in (hidden, T)``, ``conv_hidden``,
    ``bilin`` (the stacked ``C_1, C_21[, C_22]``, ``(2 or 3) * hidden`` outputs), ``conv_out``.

    ``compute_dtype`` (attribute, not in the state dict; set by :class:`FourDVarNet`'s
    ``precision``): ``None`` runs everything in the input's dtype; ``torch.bfloat16`` runs the
    convolutions and the hidden activations in bfloat16, input and output (``Phi(x)`` and the
    vjp) staying in the input's dtype.
    """

    def __init__(self, n_time: int, hidden: int = 32, kernel_size: int = 3,
                 downsample: int = 2, quadratic: bool = True) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.n_time, self.hidden, self.downsample, self.quadratic = n_time, hidden, downsample, quadratic
        self.conv_in = nn.Conv2d(n_time, hidden, kernel_size, padding=pad)
        self.conv_hidden = nn.Conv2d(hidden, hidden, kernel_size, padding=pad)
        self.bilin = nn.Conv2d(hidden, (2 if quadratic else 3) * hidden, kernel_size, padding=pad)
        self.conv_out = nn.Conv2d(2 * hidden, n_time, kernel_size, padding=pad)
        self.compute_dtype: torch.dtype | None = None

    def _forward_parts(self, x: Tensor):
        k, n = self.downsample, self.hidden
        cd = self.compute_dtype if x.dtype == torch.float32 else None  # float64 stays exact
        a = F.avg_pool2d(x, k) if k > 1 else x
        h1 = _conv(a, self.conv_in, cd)
        h2 = _conv(torch.relu(h1), self.conv_hidden, cd)
        b = _conv(h2, self.bilin, cd)
        if self.quadratic:
            b1, b2 = b.split(n, dim=1)
            nonlin = b2 * b2
        else:
            b1, b2, b3 = b.split(n, dim=1)
            nonlin = b2 * b3
        z = _conv(torch.cat([b1, nonlin], dim=1), self.conv_out, cd).to(x.dtype)
        return _upsample(z, k), (a.shape[-2:], h1, b)

    def forward(self, x: Tensor) -> Tensor:
        """``Phi(x)``, shape of ``x``."""
        return self._forward_parts(x)[0]

    def forward_vjp(self, x: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
        """``(Phi(x), J_Phi(x)^T r)`` by hand (no autograd graph is needed for the vjp)."""
        phi, (size, h1, b) = self._forward_parts(x)
        return phi, self.vjp_from_parts(r, size, h1, b)

    def vjp_from_parts(self, r: Tensor, size, h1: Tensor, b: Tensor) -> Tensor:
        k, n = self.downsample, self.hidden
        rz = _upsample_adjoint(r, k, tuple(size)).to(b.dtype)
        rc = _conv_t(rz, self.conv_out.weight)  # (B, 2n, h, w): [d b1, d nonlin]
        rc1, rc2 = rc.split(n, dim=1)
        if self.quadratic:
            rb = torch.cat([rc1, 2.0 * rc2 * b.split(n, dim=1)[1]], dim=1)
        else:
            _, b2, b3 = b.split(n, dim=1)
            rb = torch.cat([rc1, rc2 * b3, rc2 * b2], dim=1)
        rh2 = _conv_t(rb, self.bilin.weight)
        rh1 = _conv_t(rh2, self.conv_hidden.weight) * (h1 > 0).to(rh2.dtype)
        ra = _conv_t(rh1, self.conv_in.weight).to(r.dtype)
        return _pool_adjoint(ra, k)


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, k, padding=k // 2), nn.ReLU(),
                         nn.Conv2d(cout, cout, k, padding=k // 2), nn.ReLU())


class UNetPrior(nn.Module):
    """A UNet prior ``Phi``: ``depth`` levels of (two 3x3 conv + ReLU), average-pool by 2
    going down, bilinear upsampling + skip concatenation going up, a linear 1x1 head.

    ``x (B, T, H, W) -> Phi(x)``, time as channels; ``H, W`` divisible by ``2**depth``.
    Widths ``hidden * 2**level``. Receptive-field radius about ``2 * 2**(depth+1)`` cells:
    patch overlaps should exceed it. Its vjp is taken by autograd.
    """

    def __init__(self, n_time: int, hidden: int = 32, depth: int = 2, kernel_size: int = 3) -> None:
        super().__init__()
        self.n_time, self.hidden, self.depth = n_time, hidden, depth
        widths = [hidden * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        cin = n_time
        for w in widths:
            self.down.append(_DoubleConv(cin, w, kernel_size))
            cin = w
        self.up = nn.ModuleList(
            _DoubleConv(widths[i + 1] + widths[i], widths[i], kernel_size) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], n_time, 1)
        self.compute_dtype: torch.dtype | None = None  # bf16: autocast (see BilinAEPrior)

    def forward(self, x: Tensor) -> Tensor:
        cd = self.compute_dtype
        if cd is not None and x.dtype == torch.float32:
            with torch.autocast(x.device.type, dtype=cd):
                return self._forward(x).to(x.dtype)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        skips = []
        h = x
        for i, block in enumerate(self.down):
            h = block(h)
            if i < self.depth:
                skips.append(h)
                h = F.avg_pool2d(h, 2)
        for block in self.up:
            s = skips.pop()
            h = block(torch.cat([F.interpolate(h, size=s.shape[-2:], mode="bilinear",
                                               align_corners=False), s], dim=1))
        return self.head(h)

    def forward_vjp(self, x: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            phi = self(xg)
            (v,) = torch.autograd.grad(phi, xg, grad_outputs=r)
        return phi.detach(), v


def build_prior(kind: str, n_time: int, hidden: int = 32, **kwargs) -> nn.Module:
    """Prior factory: ``kind`` in ``{"bilin_ae", "unet"}``; other kwargs to the class."""
    if kind == "bilin_ae":
        return BilinAEPrior(n_time, hidden, **kwargs)
    if kind == "unet":
        return UNetPrior(n_time, hidden, **kwargs)
    raise ConfigError(f"model.prior.kind={kind!r}: expected 'bilin_ae' or 'unet'")


# ----------------------------------------------------------------------------- cost


class VariationalCost(nn.Module):
    """``J(x) = w_obs ||x - y||^2_Omega / n_obs + lambda ||1_ocean (x - Phi(x))||^2 / (T n_ocean)``
    per sample, summed over the batch (see the module docstring); ``prior`` is ``Phi``."""

    def __init__(self, prior: nn.Module, lam: float = 1.0, w_obs: float = 1.0) -> None:
        super().__init__()
        self.prior, self.lam, self.w_obs = prior, float(lam), float(w_obs)

    @staticmethod
    def _counts(mask: Tensor, ocean4: Tensor | None, x: Tensor) -> tuple[Tensor, Tensor]:
        n_obs = mask.sum(dim=(1, 2, 3), keepdim=True).to(x.dtype).clamp_min(1.0)
        if ocean4 is None:
            n_oc = torch.full_like(n_obs, float(x.shape[-1] * x.shape[-2]))
        else:
            n_oc = ocean4.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1.0)
        return n_obs, n_oc * x.shape[1]

    def forward(self, x: Tensor, y: Tensor, mask: Tensor, ocean: Tensor | None = None) -> Tensor:
        """``J(x)`` (scalar, differentiable by autograd); ``y`` may hold NaN off ``mask``."""
        oc = _ocean4d(ocean, x)
        if oc is not None:
            mask = mask & (oc > 0)
        n_obs, n_pr = self._counts(mask, oc, x)
        d = torch.where(mask, x - torch.nan_to_num(y), torch.zeros_like(x))
        r = x - self.prior(x)
        if oc is not None:
            r = r * oc
        jo = (d * d).sum(dim=(1, 2, 3), keepdim=True) / n_obs
        jp = (r * r).sum(dim=(1, 2, 3), keepdim=True) / n_pr
        return (self.w_obs * jo + self.lam * jp).sum()

    def prior_cost(self, x: Tensor, ocean: Tensor | None = None) -> Tensor:
        """Batch mean of ``||1_ocean (x - Phi(x))||^2 / (T n_ocean)`` (a training regulariser)."""
        oc = _ocean4d(ocean, x)
        r = x - self.prior(x)
        if oc is not None:
            r = r * oc
            n = oc.sum(dim=(1, 2, 3)).clamp_min(1.0) * x.shape[1]
        else:
            n = torch.full((x.shape[0],), float(x[0].numel()), dtype=x.dtype, device=x.device)
        return ((r * r).sum(dim=(1, 2, 3)) / n).mean()

    def grad(self, x: Tensor, y: Tensor, mask: Tensor, ocean4: Tensor | None,
             create_graph: bool = False) -> Tensor:
        """``1_ocean * grad_x J(x)`` (closed form + Phi's vjp; see the module docstring).

        ``y`` must be NaN-free here (zeros off the mask); ``mask`` bool ``(B, T, H, W)``
        already restricted to ocean; ``ocean4`` ``(B, 1, H, W)`` float or None.
        With ``create_graph`` the result is differentiable w.r.t. ``x`` and Phi's weights.
        """
        n_obs, n_pr = self._counts(mask, ocean4, x)
        maskf = mask.to(x.dtype)
        g_obs = (2.0 * self.w_obs) * maskf * (x - y) / n_obs
        prior = self.prior
        if isinstance(prior, BilinAEPrior):
            phi, (size, h1, b) = prior._forward_parts(x)
            r = x - phi
            if ocean4 is not None:
                r = r * ocean4
            v = prior.vjp_from_parts(r, size, h1, b)
        else:  # generic prior: vjp by autograd (also inside inference_mode)
            with torch.inference_mode(False), torch.enable_grad():
                xg = x if (create_graph and x.requires_grad) else x.clone().detach().requires_grad_(True)
                phi = prior(xg)
                r = xg - phi if create_graph else (xg - phi).detach()
                if ocean4 is not None:
                    r = r * ocean4
                (v,) = torch.autograd.grad(phi, xg, grad_outputs=r, create_graph=create_graph)
            if not create_graph:
                v = v.detach()
        g = g_obs + (2.0 * self.lam) * (r - v) / n_pr
        if ocean4 is not None:
            g = g * ocean4
        return g


# ----------------------------------------------------------------------------- solver step


class SolverStep(nn.Module):
    """One 4DVarNet solver step (the anchor's update; see the module docstring).

    ``forward(x, lstm, k, y, mask, ocean4, create_graph)`` -> ``(x_new, lstm_new)`` with ``x``
    ``(B, T, H, W)``, ``y`` zero-filled observations, ``mask`` bool observed ocean cells,
    ``ocean4`` ``(B, 1, H, W)`` float or None, ``k`` the 0-based step index.
    """

    def __init__(self, cost: VariationalCost, grad_mod: ConvLSTMGradModulator,
                 n_steps: int, lr_grad: float = 0.2) -> None:
        super().__init__()
        self.cost, self.grad_mod = cost, grad_mod
        self.n_steps, self.lr_grad = int(n_steps), float(lr_grad)

    def forward(self, x: Tensor, lstm: LSTMState, k: int, y: Tensor, mask: Tensor,
                ocean4: Tensor | None, create_graph: bool = False) -> tuple[Tensor, LSTMState]:
        g = self.cost.grad(x, y, mask, ocean4, create_graph=create_graph)
        gm, lstm = self.grad_mod(g, lstm, ocean4)
        upd = gm / (k + 1) + (self.lr_grad * (k + 1) / self.n_steps) * g
        if ocean4 is not None:
            upd = upd * ocean4
        return x - upd, lstm


# ----------------------------------------------------------------------------- the model


class FourDVarNet(nn.Module):
    """Prior + ConvLSTM solver, unrolled ``n_steps`` times (:class:`oceanda.assim.unroll.UnrolledSolver`).

    ``forward(obs, ocean=None, x0=None)``: ``obs (B, T, H, W)`` normalised observations,
    NaN where unobserved; ``ocean (B, H, W)`` bool (None: all ocean); ``x0`` optional first
    guess (e.g. a normalised OI analysis), else the observations with NaN -> 0.
    Returns the reconstruction ``(B, T, H, W)`` (zero on land). Under ``torch.is_grad_enabled()``
    and ``self.training`` the graph through all steps is kept (``create_graph``) for training;
    otherwise the solver runs without autograd (call it under ``torch.inference_mode()``).
    """

    def __init__(self, n_time: int, prior: nn.Module | None = None, prior_hidden: int = 32,
                 lstm_hidden: int = 48, n_steps: int = 10, lr_grad: float = 0.2,
                 lam: float = 1.0, w_obs: float = 1.0, dropout: float = 0.1,
                 lstm_downsample: int = 1, channels_last: bool = True, precision: str = "float32",
                 fuse_cell: bool = False) -> None:
        super().__init__()
        self.n_time = int(n_time)
        prior = prior if prior is not None else BilinAEPrior(n_time, prior_hidden)
        self.cost = VariationalCost(prior, lam=lam, w_obs=w_obs)
        self.grad_mod = ConvLSTMGradModulator(n_time, lstm_hidden, dropout=dropout,
                                              downsample=lstm_downsample)
        self.step = SolverStep(self.cost, self.grad_mod, n_steps, lr_grad)
        self.solver = UnrolledSolver(self.step, n_steps)
        self.channels_last = bool(channels_last)
        self.precision = "float32"
        self.set_precision(precision, fuse_cell)

    def set_precision(self, precision: str, fuse_cell: bool | None = None) -> FourDVarNet:
        """Arithmetic of the convolutions: ``"float32"`` or ``"bf16"`` (bfloat16 convolutions
        in the prior, its vjp and the ConvLSTM, for float32 inputs; the state, the gradient of
        J, the cell state and the update stay float32). ``fuse_cell`` (None: unchanged): the
        ConvLSTM cell's pointwise ops as one ``torch.compile`` kernel (gate activations in
        float32; the first call of each input shape compiles, ~20-40 s on a CPU).
        Neither is part of the state dict: the same weights run in any setting. Returns ``self``."""
        cd = _compute_dtype(precision)
        self.precision = precision
        for m in (self.cost.prior, self.grad_mod):
            if hasattr(m, "compute_dtype"):
                m.compute_dtype = cd
        if fuse_cell is not None:
            self.grad_mod.fused_cell = bool(fuse_cell)
        return self

    @property
    def prior(self) -> nn.Module:
        return self.cost.prior

    @torch.no_grad()
    def zero_update_(self) -> FourDVarNet:
        """Zero the gradient modulator's output layer (weights and bias), so that ``S(.) = 0``
        and each step moves the state only by ``lr_grad (k+1)/n grad J``, which is O(1 /
        n_obs) and O(1 / (T n_ocean)) small: the solver then returns its first guess almost
        unchanged (exactly with ``lr_grad = 0``). A training start for ``init="oi"``: the
        untrained model is the OI and learns a correction of it (ReZero-like: the first
        optimiser steps move only ``conv_out``, then the rest follows). Returns ``self``."""
        self.grad_mod.conv_out.weight.zero_()
        self.grad_mod.conv_out.bias.zero_()
        return self

    def forward(self, obs: Tensor, ocean: Tensor | None = None, x0: Tensor | None = None) -> Tensor:
        mask = torch.isfinite(obs)
        if ocean is not None:
            mask = mask & ocean.unsqueeze(1)
        y = torch.where(mask, obs, torch.zeros_like(obs))
        x = y if x0 is None else torch.where(torch.isfinite(x0), x0, torch.zeros_like(x0))
        ocean4 = _ocean4d(ocean, obs)
        if ocean4 is not None:
            x = x * ocean4
        if self.channels_last and obs.dim() == 4:
            fmt = torch.channels_last
            x, y, mask = x.contiguous(memory_format=fmt), y.contiguous(memory_format=fmt), mask.contiguous(memory_format=fmt)
        create_graph = self.training and torch.is_grad_enabled()
        out = self.solver(x, y, mask, ocean4, create_graph=create_graph)
        return out.contiguous()

    def prior_cost(self, x: Tensor, ocean: Tensor | None = None) -> Tensor:
        return self.cost.prior_cost(x, ocean)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable scalars of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)



# ----------------------------------------------------------------------------- config, checkpoints


@dataclass
class ModelConfig:
    """Architecture of a 4DVarNet (stored in checkpoints). Anchor: bilinear AE hidden 32,
    ConvLSTM hidden 48, 10 steps, lr_grad 0.2, T = 15."""

    n_time: int = 15
    prior: str = "bilin_ae"        # bilin_ae | unet
    prior_hidden: int = 32
    prior_downsample: int = 2      # bilin_ae only
    unet_depth: int = 2            # unet only
    lstm_hidden: int = 48
    lstm_downsample: int = 1
    n_steps: int = 10
    lr_grad: float = 0.2
    lam: float = 1.0
    w_obs: float = 1.0
    dropout: float = 0.1
    #: arithmetic of the convolutions (see :meth:`FourDVarNet.set_precision`); not an
    #: architecture setting: a checkpoint runs in either, and inference may override it
    precision: str = "float32"
    #: ConvLSTM cell as one compiled kernel (``torch.compile``); runtime only, like precision
    fuse_cell: bool = False
    #: first guess of the solver: ``"obs"`` (the observations, NaN -> 0: the anchor, and every
    #: checkpoint written before this field existed) or ``"oi"`` (the exact per-patch OI
    #: analysis :func:`oceanda.assim.oi.oi_patch` of the same observations with the ``oi_*``
    #: settings below, computed by the method / the training patches themselves)
    init: str = "obs"
    oi_Lx_km: float = 100.0
    oi_Ly_km: float = 100.0
    oi_Lt_days: float = 10.0
    oi_noise_std: float = 0.05

    def __post_init__(self) -> None:
        _compute_dtype(self.precision)  # ConfigError naming the bad value
        if self.init not in INITS:
            raise ConfigError(f"model.init={self.init!r}: expected one of {list(INITS)}")
        check_oi_settings(self)

    def oi_kwargs(self) -> dict[str, float]:
        """Keyword arguments of :func:`oceanda.assim.oi.oi_patch` for the ``init="oi"`` first
        guess (prior mean and variance estimated per patch, as ``method=oi``'s defaults)."""
        return oi_settings_kwargs(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return dataclass_from_dict(cls, d, "model")


#: accepted values of ``ModelConfig.init``
INITS = ("obs", "oi")

#: a model config's settings of its per-patch OI analysis (``ModelConfig``'s first guess, the
#: SPDE-prior 4DVarNet's prior mean with ``mean="oi"``)
OI_SETTINGS = ("oi_Lx_km", "oi_Ly_km", "oi_Lt_days", "oi_noise_std")


def check_oi_settings(cfg: Any, where: str = "model.") -> None:
    """:class:`ConfigError` naming (after ``where``) the first of ``cfg``'s :data:`OI_SETTINGS`
    that is not a number > 0."""
    for key in OI_SETTINGS:
        v = getattr(cfg, key)
        if not (isinstance(v, (int, float)) and v > 0):
            raise ConfigError(f"{where}{key} must be > 0, got {v!r}")


def oi_settings_kwargs(cfg: Any) -> dict[str, float]:
    """Keyword arguments of :func:`oceanda.assim.oi.oi_patch` from ``cfg``'s :data:`OI_SETTINGS`
    (prior mean and variance estimated per patch, as ``method=oi``'s defaults)."""
    return {"Lx_km": float(cfg.oi_Lx_km), "Ly_km": float(cfg.oi_Ly_km),
            "Lt_days": float(cfg.oi_Lt_days), "R": float(cfg.oi_noise_std) ** 2}


def oi_first_guess(obs: Tensor, lon: Tensor, lat: Tensor, time: Tensor, cfg: Any,
                   max_obs: int | None = None, solver: str = "cg") -> Tensor:
    """The ``init="oi"`` first guess: the OI analysis of every patch of ``obs``
    ``(B, T, H, W)`` [physical units, NaN where unobserved] with ``lon (B, W)``, ``lat (B, H)``
    [deg], ``time (B, T)`` [days] (:func:`oceanda.assim.oi.oi_patches` with
    ``cfg.oi_kwargs()``, e.g. :meth:`ModelConfig.oi_kwargs`; prior mean and variance from each
    patch's observations;
    ``solver`` ``"cg"``, the fast solver, or ``"cholesky"``, the exact one).
    Returns ``(B, T, H, W)`` in ``obs``' dtype and device (float64 arithmetic on the CPU)."""
    from oceanda.assim.oi import oi_patches

    out = oi_patches(obs, lon, lat, time, max_obs=max_obs, solver=solver, **cfg.oi_kwargs())
    return out.to(device=obs.device, dtype=obs.dtype)


def build_model(cfg: ModelConfig) -> FourDVarNet:
    """The :class:`FourDVarNet` of ``cfg`` (fresh weights from torch's current RNG)."""
    if cfg.prior == "bilin_ae":
        prior = build_prior("bilin_ae", cfg.n_time, cfg.prior_hidden, downsample=cfg.prior_downsample)
    else:
        prior = build_prior(cfg.prior, cfg.n_time, cfg.prior_hidden, depth=cfg.unet_depth)
    return FourDVarNet(cfg.n_time, prior=prior, lstm_hidden=cfg.lstm_hidden, n_steps=cfg.n_steps,
                       lr_grad=cfg.lr_grad, lam=cfg.lam, w_obs=cfg.w_obs, dropout=cfg.dropout,
                       lstm_downsample=cfg.lstm_downsample, precision=cfg.precision,
                       fuse_cell=cfg.fuse_cell)


def read_checkpoint(path: str | os.PathLike, expect: ModelConfig | None = None) -> dict[str, Any]:
    """Read and validate a 4DVarNet checkpoint (written by ``oceanda train``).

    Returns its dict plus ``model`` (a :class:`FourDVarNet` with the weights loaded) and
    ``model_cfg``. Raises :class:`InputError` naming ``path`` when the file is missing,
    unreadable (truncated / corrupted), not a 4DVarNet checkpoint, of another version, has a
    bad normalisation, holds weights that do not fit its own model config, or (``expect``)
    was trained for another architecture.
    """
    return read_model_checkpoint(path, fmt=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION,
                                 config_cls=ModelConfig, build=build_model, expect=expect,
                                 ignore=_RUNTIME_FIELDS, what="4DVarNet")


@register("4dvarnet")
class FourDVarNetMethod:
    """``oceanda infer method=4dvarnet method.checkpoint=PATH``: a trained 4DVarNet per patch
    (``checkpoint``: a checkpoint file of :mod:`oceanda.train.fourdvarnet`).

    Observations are normalised with the checkpoint's training statistics, reconstructed
    under ``torch.inference_mode`` and de-normalised; land stays at the mean (ignored by
    the blender). The patch length must equal the model's ``n_time``; H and W must be
    divisible by the prior's downsampling. Deterministic and batch-independent (every
    normalisation in the solver is per patch). A checkpoint trained with ``init="oi"``
    starts its solver from the OI analysis of the same patch (:func:`oi_first_guess`,
    the checkpoint's ``oi_*`` settings), computed here: one method, nothing precomputed;
    ``oi_solver`` picks the OI's solver (``"cg"``: the fast one, equal to the exact
    ``"cholesky"`` to about 1e-8 of the OI increment).

    ``precision`` (``"float32"`` / ``"bf16"`` / ``"auto"``: bf16 where the device has native
    bfloat16 arithmetic — CUDA with bf16 support, a CPU with AVX512-BF16/AMX — else float32)
    and ``fuse_cell`` (default None: the checkpoint's setting) override the arithmetic
    (:meth:`FourDVarNet.set_precision`). ``hpc/bench/fourdvarnet.py --accuracy`` measures
    what bf16 changes (about 1 % of the reconstruction error of a trained model).
    """

    def __init__(self, checkpoint: str, precision: str | None = None,
                 fuse_cell: bool | None = None, oi_solver: str = "cg") -> None:
        from oceanda.assim.oi import SOLVERS

        if oi_solver not in SOLVERS:
            raise ConfigError(f"method.oi_solver must be one of {list(SOLVERS)}, got {oi_solver!r}")
        self.oi_solver = oi_solver
        # a path: the apps resolve null / "default" / "shipped:NAME" to the shipped weights
        # (oceanda.weights.resolve_checkpoint) before building the method
        ck = read_checkpoint(checkpoint)
        self.model = ck["model"].eval()
        if precision is not None and precision != "auto":
            _compute_dtype(precision)  # ConfigError naming a bad value
        self._auto = precision == "auto"
        if precision is not None or fuse_cell is not None:
            self.model.set_precision(self.model.precision if precision in (None, "auto") else precision,
                                     fuse_cell)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.cfg: ModelConfig = ck["model_cfg"]
        self.mean, self.std = float(ck["norm"]["mean"]), float(ck["norm"]["std"])
        self.checkpoint = str(checkpoint)
        self.trained_mode = (ck.get("extra") or {}).get("mode")

    def __call__(self, batch: PatchBatch) -> PatchResult:
        B, T, H, W = batch.shape
        if T != self.cfg.n_time:
            raise InputError(f"patch length {T} days does not fit the 4DVarNet checkpoint "
                             f"{self.checkpoint} (trained on {self.cfg.n_time}-day windows): set "
                             f"patch.size[0]={self.cfg.n_time}")
        k = self.cfg.prior_downsample if self.cfg.prior == "bilin_ae" else 2 ** self.cfg.unet_depth
        k = max(k, self.cfg.lstm_downsample)
        if H % k or W % k:
            raise InputError(f"patch of {H} x {W} cells: 4DVarNet needs sizes divisible by {k}")
        dev = batch.obs.device
        if next(self.model.parameters()).device != dev:
            self.model.to(dev)
        if self._auto:
            self.model.set_precision("bf16" if native_bf16(dev) else "float32")
            self._auto = False
        x0 = None
        if self.cfg.init == "oi":  # the OI analysis of the same observations, normalised
            # memory guard of method=oi (the m x m matrix): a ConfigError naming max_obs
            oi = oi_first_guess(batch.obs, batch.lon, batch.lat, batch.time, self.cfg, max_obs=20000,
                                solver=self.oi_solver)
            x0 = (oi.to(torch.float32) - self.mean) / self.std
        obs = (batch.obs.to(torch.float32) - self.mean) / self.std
        with torch.inference_mode():
            out = self.model(obs, batch.ocean.to(torch.bool), x0=x0)
        return PatchResult(mean=(out * self.std + self.mean).to(batch.obs.dtype))
