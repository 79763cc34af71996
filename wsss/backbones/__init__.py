"""The backbone family (`wsss.backbones.base`): one member per library of networks, registered
by its name; `BackboneParams` and `backbone_from_params` in `wsss.backbones.params`."""

from wsss.backbones.base import (
    LIBRARIES,
    PACKAGED_WEIGHTS,
    Backbone,
    WeightsSource,
    load_backbone_weights,
    packaged_weights_path,
    register,
)
from wsss.backbones.params import BackboneParams, backbone_from_params, build_backbone

__all__ = [
    "LIBRARIES",
    "PACKAGED_WEIGHTS",
    "Backbone",
    "BackboneParams",
    "WeightsSource",
    "backbone_from_params",
    "build_backbone",
    "load_backbone_weights",
    "packaged_weights_path",
    "register",
]
