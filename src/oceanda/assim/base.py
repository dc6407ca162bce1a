"""Method interface of ``oceanda infer``: one DAW patch batch in, one analysis batch out.

A *method* maps a batch of data-assimilation-window (DAW) patches of gridded observations to
analysis patches. The distributed runtime (:mod:`oceanda.parallel`) cuts the basin into
patches, calls the method batch by batch and blends the outputs; methods know nothing about
ranks, tiles or files and never import mpi4py.

Shapes (``B`` patches, ``T`` days, ``H`` rows = latitudes, ``W`` columns = longitudes):

========  ================  ==========================================================
field     shape             meaning
========  ================  ==========================================================
obs       (B, T, H, W)      observed SSH [m], NaN where unobserved (and outside domain)
ocean     (B, H, W) bool    True on ocean cells inside the domain (land/padding False)
lon       (B, W)            cell-centre longitudes [deg], regular, extrapolated in padding
lat       (B, H)            cell-centre latitudes [deg]
time      (B, T)            days (float, any fixed origin) of the window's days
dx_m      (B, H, W)         zonal cell size [m]
dy_m      (B, H, W)         meridional cell size [m]
========  ================  ==========================================================

:class:`PatchResult` holds ``mean`` (B, T, H, W) and optionally ``std`` (B, T, H, W) and
``members`` (B, N, T, H, W). Values on land / padding are ignored by the blender.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class PatchBatch:
    """A batch of DAW patches (see the module docstring for shapes and units)."""

    obs: torch.Tensor
    ocean: torch.Tensor
    lon: torch.Tensor
    lat: torch.Tensor
    time: torch.Tensor
    dx_m: torch.Tensor
    dy_m: torch.Tensor

    def __post_init__(self) -> None:
        if self.obs.ndim != 4:
            raise ValueError(f"PatchBatch.obs must be (B, T, H, W), got {tuple(self.obs.shape)}")
        B, T, H, W = self.obs.shape
        expected = {
            "ocean": (B, H, W), "lon": (B, W), "lat": (B, H), "time": (B, T),
            "dx_m": (B, H, W), "dy_m": (B, H, W),
        }
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"PatchBatch.{name} must have shape {shape}, got {got}")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, T, H, W)``."""
        return tuple(self.obs.shape)  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> PatchBatch:
        """The same batch with every tensor moved to ``device``."""
        return PatchBatch(**{k: getattr(self, k).to(device) for k in
                             ("obs", "ocean", "lon", "lat", "time", "dx_m", "dy_m")})


@dataclass(frozen=True)
class PatchResult:
    """Analysis of a batch: ``mean`` (B, T, H, W); optional ``std`` (B, T, H, W) and
    ``members`` (B, N, T, H, W)."""

    mean: torch.Tensor
    std: torch.Tensor | None = None
    members: torch.Tensor | None = None


@runtime_checkable
class Method(Protocol):
    """An assimilation method: ``method(batch) -> PatchResult``.

    Deterministic: the output for one patch must not depend on which other patches share
    its batch (the runtime's rank-count invariance relies on it).
    """

    def __call__(self, batch: PatchBatch) -> PatchResult: ...
