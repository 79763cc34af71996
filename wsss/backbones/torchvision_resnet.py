"""torchvision's ResNets as backbones (`library: torchvision`). Like IRN, the output stride is
reduced by setting the stride of the first block of the last layer(s) to 1 rather than by
dilation: torchvision's BasicBlock (resnet18) rejects dilation, and this keeps the parameter
layout identical to torchvision's, so its state dicts load unchanged."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from wsss.backbones.base import Backbone, register
from wsss.transforms import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from wsss.backbones.params import BackboneParams

TORCHVISION_RESNETS = ("resnet18", "resnet50", "resnet101")
_LAYERS = ("layer1", "layer2", "layer3", "layer4")


@register
class ResNetBackbone(Backbone):
    """torchvision ResNet stem + layer1..layer4, with torchvision's parameter names."""

    library = "torchvision"

    def __init__(self, params: BackboneParams) -> None:
        super().__init__(params, IMAGENET_MEAN, IMAGENET_STD)
        # Imported here: torchvision's import takes seconds (it loads torch._dynamo), and every
        # Ray worker that merely unpickles a run configuration would pay it.
        import torchvision

        resnet = getattr(torchvision.models, params.name)(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = (
            resnet.conv1,
            resnet.bn1,
            resnet.relu,
            resnet.maxpool,
        )
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            resnet.layer1,
            resnet.layer2,
            resnet.layer3,
            resnet.layer4,
        )
        unstrided = ("layer4",) if params.output_stride == 16 else ("layer3", "layer4")
        for layer_name in unstrided:
            _remove_stride(getattr(self, layer_name)[0])
        strides, stride = [], 4
        for layer_name in _LAYERS:
            if layer_name != "layer1" and layer_name not in unstrided:
                stride *= 2
            strides.append(stride)
        self.strides = tuple(strides)
        self.channels = tuple(_out_channels(getattr(self, layer_name)) for layer_name in _LAYERS)
        self._freeze_batchnorm()

    @classmethod
    def check_name(cls, name: str) -> None:
        if name not in TORCHVISION_RESNETS:
            raise ValueError(
                f"torchvision backbone must be one of {', '.join(TORCHVISION_RESNETS)}, "
                f"got {name!r} (other networks: library timm)"
            )

    @classmethod
    def claims(cls, name: str) -> bool:
        return name in TORCHVISION_RESNETS

    def levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for layer_name in _LAYERS:
            x = getattr(self, layer_name)(x)
            features.append(x)
        return features


def _remove_stride(block: nn.Module) -> None:
    """Set every stride-2 convolution of a residual block (its main path and shortcut) to 1."""
    for module in block.modules():
        if isinstance(module, nn.Conv2d) and module.stride != (1, 1):
            module.stride = (1, 1)
    block.stride = 1


def _out_channels(layer: nn.Sequential) -> int:
    last_block = layer[-1]
    last_bn = last_block.bn3 if hasattr(last_block, "bn3") else last_block.bn2
    return last_bn.num_features
