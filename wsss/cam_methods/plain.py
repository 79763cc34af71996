"""The plain class activation map (Zhou et al., CVPR 2016; IRN's seeds): `CamMethod` as it is."""

from __future__ import annotations

from typing import Literal

from wsss.cam_methods.base import CamMethod, CamMethodParams, register


@register
class PlainCamParams(CamMethodParams):
    """The classifier's class score maps, trained by multi-label classification alone."""

    name: Literal["cam"] = "cam"

    def build(self, feature_channels: tuple[int, ...]) -> CamMethod:
        return CamMethod()
