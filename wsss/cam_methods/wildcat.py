"""WILDCAT's multi-map head (Durand et al., CVPR 2017): the 1x1 head gives M maps per class (its
"modalities", e.g. parts or views of the class), averaged into the class's map before the spatial
pooling; the class maps are the seeds. WILDCAT as published pools them with its top-k pooling
(`classifier.model.pooling: top_k`) and M = 8 on VOC 2007."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from wsss.cam_methods.base import CamMethod, CamMethodParams, register


class MultiMapCam(CamMethod):
    def __init__(self, maps_per_class: int) -> None:
        super().__init__()
        self.maps_per_class = maps_per_class

    def class_maps(self, head_maps: torch.Tensor) -> torch.Tensor:
        batch, maps, height, width = head_maps.shape
        per_class = head_maps.view(
            batch, maps // self.maps_per_class, self.maps_per_class, height, width
        )
        return per_class.mean(dim=2)


@register
class WildcatParams(CamMethodParams):
    """M head maps per class, averaged (WILDCAT's class-wise pooling)."""

    name: Literal["wildcat"] = "wildcat"
    maps_per_class: int = Field(8, ge=1, description="M: head maps per class, averaged")

    def build(self, feature_channels: tuple[int, ...]) -> CamMethod:
        return MultiMapCam(self.maps_per_class)
