"""Selection observation operators on gridded observations (numpy or torch).

Gridded observations ``obs`` (e.g. ``(B, T, H, W)``) carry NaN where unobserved. The
observation operator ``H`` selects the observed entries, so it is represented by the
boolean ``mask = isfinite(obs)`` (it varies per sample and per day); ``H^T y`` is the
NaN-free field with zeros where unobserved, and ``H^T H x = mask * x``.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def mask_from_gridded(obs: Array) -> Array:
    """Boolean mask of observed entries, ``isfinite(obs)``, same shape and library."""
    if isinstance(obs, torch.Tensor):
        return torch.isfinite(obs)
    return np.isfinite(np.asarray(obs))


def fill_unobserved(obs: Array, value: float = 0.0) -> Array:
    """``H^T y``: a copy of ``obs`` with unobserved (non-finite) entries set to ``value``."""
    if isinstance(obs, torch.Tensor):
        return torch.where(torch.isfinite(obs), obs, torch.full_like(obs, value))
    obs = np.asarray(obs)
    return np.where(np.isfinite(obs), obs, np.asarray(value, dtype=obs.dtype))


def selection(obs: Array, value: float = 0.0) -> tuple[Array, Array]:
    """``(y_filled, mask)``: the pair methods take (``y`` ignored where ``mask`` is False)."""
    return fill_unobserved(obs, value), mask_from_gridded(obs)


def apply_selection(x: Array, mask: Array) -> Array:
    """``H^T H x``: ``x`` where observed, 0 elsewhere."""
    if isinstance(x, torch.Tensor):
        return torch.where(mask, x, torch.zeros_like(x))
    return np.where(mask, x, np.zeros((), dtype=np.asarray(x).dtype))
