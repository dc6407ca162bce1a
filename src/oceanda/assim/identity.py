"""The ``identity`` method (``configs/method/identity.yaml``): no assimilation, the observations.

A reference for the runtime rather than for the ocean: blending its output over a fully
observed field must give that field back exactly (tests of tiling, halos, restarts and ranks),
and its optional constant ``std`` / shifted ``members`` exercise the blending of uncertainty
outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oceanda.assim.base import PatchBatch, PatchResult
from oceanda.assim.registry import register


@register("identity")
@dataclass(frozen=True)
class IdentityMethod:
    """Returns the observations (NaN -> ``fill``): the blend of a fully observed field must
    reproduce it exactly. With ``std`` it also returns that constant standard deviation,
    with ``members = N`` the members ``x + i * member_step`` (i = 0..N-1), to test the
    blending of uncertainty outputs."""

    fill: float = 0.0
    std: float | None = None
    members: int = 0
    member_step: float = 0.01

    def __call__(self, batch: PatchBatch) -> PatchResult:
        mean = torch.nan_to_num(batch.obs, nan=self.fill)
        std = None if self.std is None else torch.full_like(mean, float(self.std))
        mem = None
        if self.members:
            steps = self.member_step * torch.arange(self.members, dtype=mean.dtype, device=mean.device)
            mem = mean[:, None] + steps[None, :, None, None, None]
        return PatchResult(mean=mean, std=std, members=mem)
