"""Feature extractor shared by the classifier and AffinityNet: a torchvision ResNet without its
pooling and fc layers, at output stride 16 (or 8).

Like IRN, the output stride is reduced by setting the stride of the first block of the last
layer(s) to 1 rather than by dilation: torchvision's BasicBlock (resnet18) rejects dilation, and
this keeps the parameter layout identical to torchvision's, so its state dicts load unchanged.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping
from typing import BinaryIO, Literal

import torch
from torch import nn

from wsss.params import Params

BackboneName = Literal["resnet18", "resnet50", "resnet101"]

_LAYERS = ("layer1", "layer2", "layer3", "layer4")
_WEIGHTS_NAME = re.compile(r"^\w+_Weights\.\w+$")


class BackboneParams(Params):
    """Backbone architecture and its initial weights."""

    name: BackboneName = "resnet50"
    output_stride: Literal[8, 16] = 16
    # torchvision weights name ("ResNet50_Weights.IMAGENET1K_V1"), a local file or a URI (the
    # pipelines resolve URIs to bytes); None = random initialisation.
    weights: str | None = None
    # IRN freezes BatchNorm because it fine-tunes ImageNet statistics with small batches; from a
    # random initialisation the statistics must be learned, hence off by default.
    freeze_batchnorm: bool = False


class Backbone(nn.Module):
    """ResNet stem + layer1..layer4; `forward` returns the four layer outputs."""

    def __init__(
        self, name: BackboneName, output_stride: int = 16, freeze_batchnorm: bool = False
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        # Imported here: torchvision's import takes seconds (it loads torch._dynamo), and every
        # Ray worker that merely unpickles a run configuration would pay it.
        import torchvision

        try:
            resnet = getattr(torchvision.models, name)(weights=None)
        except AttributeError:
            raise ValueError(f"unknown backbone name {name!r}") from None
        self.name = name
        self.output_stride = output_stride
        self.freeze_batchnorm = freeze_batchnorm
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
        unstrided = ("layer4",) if output_stride == 16 else ("layer3", "layer4")
        for layer_name in unstrided:
            _remove_stride(getattr(self, layer_name)[0])
        strides, stride = [], 4
        for layer_name in _LAYERS:
            if layer_name != "layer1" and layer_name not in unstrided:
                stride *= 2
            strides.append(stride)
        self.strides: tuple[int, ...] = tuple(strides)
        self.channels: tuple[int, ...] = tuple(
            _out_channels(getattr(self, layer_name)) for layer_name in _LAYERS
        )
        if freeze_batchnorm:
            for module in self._batchnorms():
                for p in module.parameters():
                    p.requires_grad_(False)

    def _batchnorms(self) -> list[nn.BatchNorm2d]:
        return [m for m in self.modules() if isinstance(m, nn.BatchNorm2d)]

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        if self.freeze_batchnorm:
            for module in self._batchnorms():
                module.eval()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
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


def build_backbone(
    name: BackboneName, output_stride: int = 16, freeze_batchnorm: bool = False
) -> Backbone:
    """A randomly initialised backbone (never downloads anything)."""
    return Backbone(name, output_stride, freeze_batchnorm)


def backbone_from_params(params: BackboneParams) -> Backbone:
    """The backbone described by `params`, randomly initialised: weights are loaded separately
    (`load_backbone_weights`) because a URI needs the pipelines' storage layer."""
    return build_backbone(params.name, params.output_stride, params.freeze_batchnorm)


WeightsSource = str | bytes | BinaryIO | Mapping[str, torch.Tensor]


def load_backbone_weights(backbone: Backbone, source: WeightsSource) -> None:
    """Load weights into `backbone` in place.

    `source`: a torchvision weights name ("ResNet50_Weights.IMAGENET1K_V1"; downloaded, or read
    from the torch hub cache), a local file path, raw bytes, a binary file object, or a state
    dict already in memory. The state dict may be a torchvision ResNet's (its `fc.*` entries
    are ignored) or a `Backbone`'s.
    """
    state = _read_state_dict(source)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        raise ValueError(
            f"weights do not fit backbone {backbone.name!r}: "
            f"missing keys {_abbreviate(missing)}, unexpected keys {_abbreviate(unexpected)}, "
            f"shape mismatches {_abbreviate(mismatched)}"
        )
    backbone.load_state_dict(state)


def _abbreviate(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f"[{shown}{more}]"


def _read_state_dict(source: WeightsSource) -> Mapping[str, torch.Tensor]:
    if isinstance(source, Mapping):
        return source
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    elif isinstance(source, str) and not os.path.exists(source):
        if _WEIGHTS_NAME.match(source):
            return _torchvision_state_dict(source)
        if "://" in source:
            raise ValueError(
                f"cannot open URI {source!r} here: resolve it to bytes first "
                "(the pipelines' storage layer does this)"
            )
        raise FileNotFoundError(
            f"backbone weights {source!r}: no such file, and not a torchvision weights name "
            "like 'ResNet50_Weights.IMAGENET1K_V1'"
        )
    state = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"backbone weights must be a state dict, got {type(state).__name__}")
    return state


def _torchvision_state_dict(name: str) -> dict[str, torch.Tensor]:
    import torchvision

    try:
        weights = torchvision.models.get_weight(name)
    except (ValueError, KeyError):
        raise ValueError(f"unknown torchvision weights name {name!r}") from None
    try:
        return weights.get_state_dict(progress=False, weights_only=True)
    except OSError as err:  # URLError and socket errors are OSErrors
        raise RuntimeError(
            f"could not download torchvision weights {name!r} from {weights.url} (offline?): "
            f"{err}. Download the file elsewhere and pass a local path or a storage URI instead."
        ) from err
