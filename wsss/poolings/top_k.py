"""WILDCAT's spatial pooling (Durand et al., CVPR 2017): each class score is the mean of its
map's k+ highest positions plus alpha times the mean of its k- lowest (negative evidence).
Between GMP (k+ = one position, alpha = 0) and GAP (k+ = every position)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from wsss.poolings.base import PoolingParams, register


def positions(k: float, n: int) -> int:
    """k as a number of positions out of n: k < 1 a share of them (at least one), else a count
    (at most n)."""
    if k <= 0:
        return 0
    return max(1, round(k * n)) if k < 1 else min(int(k), n)


class TopKPooling(nn.Module):
    def __init__(self, params: TopKParams) -> None:
        super().__init__()
        self.params = params

    def forward(self, score_maps: torch.Tensor) -> torch.Tensor:
        flat = score_maps.flatten(2)  # (B, K, n)
        n = flat.shape[-1]
        kmax, kmin = positions(self.params.kmax, n), positions(self.params.kmin, n)
        scores = flat.topk(kmax, dim=-1).values.mean(-1)
        if kmin and self.params.alpha:
            lowest = flat.topk(kmin, dim=-1, largest=False).values.mean(-1)
            scores = scores + self.params.alpha * lowest
        return scores


@register
class TopKParams(PoolingParams):
    """WILDCAT's pooling; k+ and k- below 1 are shares of the map's positions, from 1 counts."""

    name: Literal["top_k"] = "top_k"
    kmax: float = Field(0.2, gt=0, description="k+: the highest positions averaged")
    kmin: float = Field(0.2, ge=0, description="k-: the lowest positions averaged (0: none)")
    alpha: float = Field(0.7, ge=0, description="weight of the lowest positions' mean")

    def build(self) -> nn.Module:
        return TopKPooling(self)
