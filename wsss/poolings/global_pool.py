"""Global poolings without settings: the mean (CAM, IRN) and the maximum (FCN-MIL) over the
positions of each class score map."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from wsss.poolings.base import PoolingParams, register


class _GlobalAverage(nn.Module):
    def forward(self, score_maps: torch.Tensor) -> torch.Tensor:
        return score_maps.mean(dim=(2, 3))


class _GlobalMax(nn.Module):
    def forward(self, score_maps: torch.Tensor) -> torch.Tensor:
        return score_maps.amax(dim=(2, 3))


@register
class GapParams(PoolingParams):
    """Global average pooling (CAM, IRN): every position counts alike, so training spreads the
    class evidence over the object."""

    name: Literal["gap"] = "gap"

    def build(self) -> nn.Module:
        return _GlobalAverage()


@register
class GmpParams(PoolingParams):
    """Global max pooling (FCN-MIL): the best position alone, so the maps peak on the most
    discriminative part."""

    name: Literal["gmp"] = "gmp"

    def build(self) -> nn.Module:
        return _GlobalMax()
