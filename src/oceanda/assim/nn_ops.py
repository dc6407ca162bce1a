"""Convolution arithmetic shared by the 4DVarNet networks: pooling / upsampling and their
adjoints, transposed convolution, convolutions in a chosen precision (bf16 where the device
has native bfloat16), the ocean mask in 4-D.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oceanda.errors import ConfigError

__all__ = ["PRECISIONS", "native_bf16"]


def _pool_adjoint(r: Tensor, k: int) -> Tensor:
    """Adjoint of ``avg_pool2d(., k)`` (input sizes divisible by ``k``): ``P^T r``."""
    if k == 1:
        return r
    return F.interpolate(r, scale_factor=k, mode="nearest") / (k * k)


def _upsample(x: Tensor, k: int) -> Tensor:
    """Bilinear upsampling by ``k`` with ``align_corners=True`` (``nn.UpsamplingBilinear2d``)."""
    if k == 1:
        return x
    return F.interpolate(x, scale_factor=k, mode="bilinear", align_corners=True)


def _upsample_adjoint(r: Tensor, k: int, size: tuple[int, int]) -> Tensor:
    """Adjoint of :func:`_upsample` applied to ``r`` (``U^T r``), ``size`` the coarse shape."""
    if k == 1:
        return r
    return torch.ops.aten.upsample_bilinear2d_backward(
        r, list(r.shape[-2:]), [r.shape[0], r.shape[1], *size], True, float(k), float(k)
    )


def _conv_t(r: Tensor, weight: Tensor) -> Tensor:
    """Adjoint of a stride-1 'same' 2-D convolution with ``weight`` (odd kernel): ``C^T r``.
    Computed in ``r``'s dtype (the weight is cast to it)."""
    return F.conv_transpose2d(r, weight.to(r.dtype), padding=weight.shape[-1] // 2)


#: accepted values of the ``precision`` option and the convolution dtype each one selects
PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bf16": torch.bfloat16}


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` runs bfloat16 convolutions natively (CUDA with bf16 support; a CPU
    whose oneDNN has bf16 kernels, i.e. AVX512-BF16 or AMX). Elsewhere bf16 is emulated
    and slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def _compute_dtype(precision: str) -> torch.dtype | None:
    if precision not in PRECISIONS:
        raise ConfigError(f"model.precision={precision!r}: expected one of {sorted(PRECISIONS)}")
    return PRECISIONS[precision]


def _conv(x: Tensor, conv: nn.Conv2d, dtype: torch.dtype | None, weight: Tensor | None = None,
          bias: Tensor | None = None) -> Tensor:
    """``conv(x)`` ('same' padding), run in ``dtype`` when given (input, weight and bias cast,
    result in ``dtype``; differentiable, parameter gradients arrive in the parameter's dtype),
    else in ``x``'s dtype. ``weight``/``bias`` override the module's (e.g. rescaled rows)."""
    w = conv.weight if weight is None else weight
    b = conv.bias if bias is None else bias
    if dtype is not None:
        x, w = x.to(dtype), w.to(dtype)
        b = None if b is None else b.to(dtype)
    return F.conv2d(x, w, b, padding=conv.padding)


def _ocean4d(ocean: Tensor | None, like: Tensor) -> Tensor | None:
    """``(B, H, W)`` bool ocean mask -> ``(B, 1, H, W)`` float in ``like``'s dtype/device."""
    if ocean is None:
        return None
    return ocean.to(device=like.device, dtype=like.dtype).unsqueeze(1)
