"""The ConvLSTM gradient modulator ``S`` of the 4DVarNet solvers (4dvarnet-starter
``ConvLstmGradModel``), shared by :mod:`oceanda.assim.fourdvarnet` and
:mod:`oceanda.assim.spde_fourdvarnet`: its state, its cell (eager, or fused into one
``torch.compile`` kernel with a hand-written backward) and the module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oceanda.assim.nn_ops import _conv, _upsample

__all__ = ["LSTMState", "ConvLSTMGradModulator"]


@dataclass
class LSTMState:
    """Hidden and cell state ``(B, hidden, h, w)`` of the ConvLSTM, and the per-sample
    gradient scale ``norm (B, 1, 1, 1)`` fixed at the first step."""

    hidden: Tensor | None = None
    cell: Tensor | None = None
    norm: Tensor | None = None


def _lstm_cell(gates: Tensor, cell: Tensor | None, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """ConvLSTM cell update from the gate pre-activations ``gates (B, 4n, H, W)`` ordered
    ``[i, f, o, c~]``, the cell-candidate rows pre-scaled by 2 (``tanh(z) = 2 sigmoid(2z) - 1``,
    so one sigmoid covers all four gates). Returns ``(hidden, cell)``: ``hidden`` in
    ``gates``' dtype (it only enters the next convolutions), ``cell`` in ``dtype``."""
    i, f, o, sc = torch.sigmoid(gates).split(n, dim=1)  # split: one cat in backward
    c_new = 2.0 * sc - 1.0  # tanh of the cell-candidate pre-activation
    if cell is None:
        cell = (i * c_new).to(dtype)
    else:  # cell kept in `dtype` (type promotion with low-precision gates)
        cell = torch.addcmul(i * c_new, f, cell)
    hidden = torch.addcmul(-o, o, torch.sigmoid(2.0 * cell), value=2.0)  # o tanh(cell)
    return hidden.to(gates.dtype), cell


def _lstm_cell_fusable(gates: Tensor, cell: Tensor | None, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """:func:`_lstm_cell` written for one fused kernel (all arithmetic in ``dtype``)."""
    i, f, o, sc = torch.sigmoid(gates.to(dtype)).split(n, dim=1)
    c = i * (2.0 * sc - 1.0)
    if cell is not None:
        c = c + f * cell
    hidden = o * torch.tanh(c)
    return hidden.to(gates.dtype), c


def _lstm_cell_fusable_backward(gates: Tensor, cell: Tensor | None, c: Tensor, dh: Tensor, dc: Tensor,
                                n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """Vector-Jacobian product of :func:`_lstm_cell_fusable` (gate activations recomputed
    from ``gates``): ``(d gates, d cell)`` for the output cotangents ``(dh, dc)``."""
    i, f, o, sc = torch.sigmoid(gates.to(dtype)).split(n, dim=1)
    t = torch.tanh(c)
    dct = dc.to(dtype) + dh.to(dtype) * o * (1.0 - t * t)
    di = dct * (2.0 * sc - 1.0) * i * (1.0 - i)
    do = dh.to(dtype) * t * o * (1.0 - o)
    dsc = dct * i * 2.0 * sc * (1.0 - sc)
    if cell is None:
        df = torch.zeros_like(di)
        dcell = None
    else:
        df = dct * cell * f * (1.0 - f)
        dcell = dct * f
    dg = torch.cat([di, df, do, dsc], dim=1).to(gates.dtype)
    if gates.dim() == 4:
        dg = dg.contiguous(memory_format=torch.channels_last)
    return dg, dcell


_COMPILED: dict[str, Any] = {}


def _compiled(name: str, fn):
    """``torch.compile(fn)`` (inductor: one loop over the pixels instead of ~8 passes over
    memory), built on first use and cached by ``name``."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[name]


class _FusedLSTMCell(torch.autograd.Function):
    """:func:`_lstm_cell_fusable` as two compiled kernels, forward and a hand-written backward
    that recomputes the activations (saves 4 full-resolution activations per step)."""

    @staticmethod
    def forward(ctx, gates, cell, n, dtype):
        h, c = _compiled("cell", _lstm_cell_fusable)(gates, cell, n, dtype)
        ctx.n, ctx.dtype, ctx.has_cell = n, dtype, cell is not None
        ctx.save_for_backward(gates, cell if cell is not None else c, c)
        return h, c

    @staticmethod
    def backward(ctx, dh, dc):
        gates, cell, c = ctx.saved_tensors
        if gates.dim() == 4:  # one memory layout for all operands: vectorised kernel
            dh, dc = (t.contiguous(memory_format=torch.channels_last) for t in (dh, dc))
        dg, dcell = _compiled("cell_bwd", _lstm_cell_fusable_backward)(
            gates, cell if ctx.has_cell else None, c, dh, dc, ctx.n, ctx.dtype)
        return dg, dcell, None, None


def _fused_lstm_cell():
    """The fused cell ``(gates, cell, n, dtype) -> (hidden, cell)`` (see :class:`_FusedLSTMCell`)."""
    return _FusedLSTMCell.apply


_FUSED_CELL_WORKS = False


def _run_fused_cell(mod: nn.Module, gates: Tensor, cell: Tensor | None, n: int, dtype: torch.dtype):
    """The fused cell; if compiling it fails before it ever worked in this process (no C++
    compiler, an unsupported platform), warn once and fall back to the eager cell for ``mod``."""
    global _FUSED_CELL_WORKS
    if _FUSED_CELL_WORKS:
        return _fused_lstm_cell()(gates, cell, n, dtype)
    try:
        out = _fused_lstm_cell()(gates, cell, n, dtype)
    except Exception as exc:  # compiler / backend failure: the eager cell computes the same
        import warnings

        warnings.warn(f"fuse_cell: torch.compile of the ConvLSTM cell failed ({type(exc).__name__}: "
                      f"{str(exc)[:200]}); using the eager cell", RuntimeWarning, stacklevel=2)
        mod.fused_cell = False
        return _lstm_cell(gates, cell, n, dtype)
    _FUSED_CELL_WORKS = True
    return out


class ConvLSTMGradModulator(nn.Module):
    """2-D ConvLSTM gradient modulator ``S`` (4dvarnet-starter ``ConvLstmGradModel``).

    ``g (B, T, H, W)`` -> ``S(g / ||g_0||) (B, T, H, W)``: dropout, optional average-pool by
    ``downsample``, gates ``[i, f, o, c~] = C_x g + C_h h + b`` (the anchor's single conv on
    ``cat(g, h)``, split in two), ``c <- f c + i c~``, ``h <- o tanh(c)`` (sigmoid on i, f, o,
    tanh on c~), output ``C_out h`` upsampled back. Functional: the state is passed in and out.

    ``compute_dtype`` (attribute, not in the state dict): ``torch.bfloat16`` runs the two
    convolutions and the gate non-linearities in bfloat16 (float32 inputs only); the cell
    state, the normalisation and the output stay float32; the hidden state is stored in
    bfloat16 (it only ever enters bfloat16 convolutions).
    """

    def __init__(self, n_time: int, hidden: int = 48, kernel_size: int = 3,
                 dropout: float = 0.1, downsample: int = 1) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.n_time, self.hidden_dim, self.downsample = n_time, hidden, downsample
        self.gates_x = nn.Conv2d(n_time, 4 * hidden, kernel_size, padding=pad)
        self.gates_h = nn.Conv2d(hidden, 4 * hidden, kernel_size, padding=pad, bias=False)
        self.conv_out = nn.Conv2d(hidden, n_time, kernel_size, padding=pad)
        self.dropout = nn.Dropout(dropout)
        self.compute_dtype: torch.dtype | None = None
        self.fused_cell = False

    def forward(self, g: Tensor, state: LSTMState, ocean: Tensor | None = None) -> tuple[Tensor, LSTMState]:
        """One step. ``ocean`` ``(B, 1, H, W)`` float restricts the RMS used for ``||g_0||``."""
        norm = state.norm
        if norm is None:
            sq = g * g
            if ocean is None:
                ms = sq.mean(dim=(1, 2, 3), keepdim=True)
            else:
                n = ocean.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1.0) * g.shape[1]
                ms = (sq * ocean).sum(dim=(1, 2, 3), keepdim=True) / n
            norm = ms.sqrt().clamp_min(torch.finfo(g.dtype).tiny ** 0.5)
        u = self.dropout(g / norm)
        k = self.downsample
        if k > 1:
            u = F.avg_pool2d(u, k)
        # tanh(z) = 2 sigmoid(2 z) - 1: torch's CPU sigmoid is several times faster than its
        # tanh, so the cell-candidate rows of the gate weights are doubled (exact in floating
        # point) and ONE sigmoid covers all four gates.
        n = self.hidden_dim
        cd = self.compute_dtype if g.dtype == torch.float32 else None
        scale = torch.ones(4 * n, 1, 1, 1, dtype=u.dtype, device=u.device)
        scale[3 * n:] = 2.0
        wx, bias = self.gates_x.weight * scale, self.gates_x.bias * scale.view(-1)
        if state.hidden is None:  # h = 0: only the input part of the gate convolution
            gates = _conv(u, self.gates_x, cd, wx, bias)
        else:  # one convolution on cat(u, h), as the anchor (cheaper than two + an add)
            w = torch.cat([wx, self.gates_h.weight * scale], dim=1)
            uh = torch.cat([u if cd is None else u.to(cd), state.hidden], dim=1)
            gates = _conv(uh, self.gates_x, cd, w, bias)
        if self.fused_cell:
            hidden, cell = _run_fused_cell(self, gates, state.cell, n, g.dtype)
        else:
            hidden, cell = _lstm_cell(gates, state.cell, n, g.dtype)
        out = _conv(hidden, self.conv_out, cd).to(g.dtype)
        if k > 1:
            out = _upsample(out, k)
        return out, LSTMState(hidden, cell, norm)
