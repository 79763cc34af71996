"""The method's trained networks, each named by the stage that trains it: how each is built,
and where its training starts from. Training (in process and under Ray Train), the labeling
actors, `wsss run-local` and the model records all build networks here.

A new network (a CAM method's second classifier) is one entry in
`NETWORKS`: its `Params` model and a builder taking them and the number of foreground classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from wsss.affinity import AffinityNet, AffinityNetParams
from wsss.backbones import WeightsSource, load_backbone_weights
from wsss.classifier import Classifier, ClassifierParams
from wsss.params import Params
from wsss.segmentation import SegmentationNet, SegmentationParams


@dataclass(frozen=True)
class NetworkKind:
    params_type: type[Params]
    build: Callable[[Params, int], nn.Module]  # (params, number of foreground classes)


NETWORKS: dict[str, NetworkKind] = {
    "classifier": NetworkKind(
        ClassifierParams, lambda params, n_classes: Classifier(n_classes, params)
    ),
    "affinity": NetworkKind(AffinityNetParams, lambda params, _: AffinityNet(params)),
    "segmentation": NetworkKind(
        SegmentationParams, lambda params, n_classes: SegmentationNet(n_classes, params)
    ),
}


def build_network(stage: str, params: Params | dict, n_classes: int) -> nn.Module:
    """The network of `stage` for `params` (a Params model, or its JSON as a model record keeps
    it), randomly initialised; `n_classes` foreground classes."""
    if stage not in NETWORKS:
        raise ValueError(f"no network is trained by the stage {stage!r}; known: {sorted(NETWORKS)}")
    kind = NETWORKS[stage]
    return kind.build(kind.params_type.model_validate(params), n_classes)


def initial_network(
    stage: str,
    params: Params,
    n_classes: int,
    backbone_weights: WeightsSource | None = None,
    seed: int | None = None,
) -> nn.Module:
    """The network of `stage` as its training starts: the backbone from `backbone_weights` when
    given (AffinityNet from the trained classifier's), else from `params.backbone.weights` when
    set (a local file, packaged or torchvision weights; URIs are the pipelines' business). With
    `seed`, torch's generator is seeded first, so the new layers (and the training after, which
    draws on) repeat run for run."""
    if seed is not None:
        torch.manual_seed(seed)
    model = build_network(stage, params, n_classes)
    weights = backbone_weights if backbone_weights is not None else params.backbone.weights
    if weights is not None:
        load_backbone_weights(model.backbone, weights)
    return model
