"""Multi-label image classifier whose 1x1 convolution head gives the class activation maps:
backbone -> head maps -> class score maps (B, K, h, w) -> pooling -> logits (B, K); logit k <->
class k + 1. The CAM method (`wsss.cam_methods`) says how many head maps each class has, how the
classifier trains and what its seed maps are."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pydantic import Field, SerializerFunctionWrapHandler, model_serializer
from torch import nn

from wsss.backbones import BackboneParams, backbone_from_params
from wsss.cam_methods import CAM_METHODS, CamMethodChoice, multi_hot
from wsss.cam_methods.plain import PlainCamParams
from wsss.kept_seeds import KeptMaps, Key, merge
from wsss.params import Params
from wsss.poolings import POOLINGS, Pooling
from wsss.poolings.global_pool import GapParams
from wsss.training import Batch, EpochEnd, OptimParams, check_samples, train_in_process
from wsss.transforms import AugmentParams, check_image, normalize


class ClassifierParams(Params):
    """Classifier architecture; the number of classes comes from the dataset's class list."""

    backbone: BackboneParams = BackboneParams()
    pooling: Pooling = Field(
        GapParams(),
        description="How the class score maps become logits: a pooling's name "
        f"({', '.join(POOLINGS)}) or its settings with `name` (wsss.poolings).",
    )
    method: CamMethodChoice = Field(
        PlainCamParams(),
        description="The CAM method: what it adds to training and how it makes the seed maps; "
        f"a method's name ({', '.join(CAM_METHODS)}) or its settings with `name` "
        "(wsss.cam_methods).",
    )

    @model_serializer(mode="wrap")
    def _without_the_plain_cam(self, write: SerializerFunctionWrapHandler) -> dict:
        # The plain CAM is written by omission, so configurations and model records from
        # before the family was added keep their hashes (a changed hash retrains the networks).
        written = write(self)
        if written.get("method") in ("cam", {"name": "cam"}):
            del written["method"]
        return written


class Classifier(nn.Module):
    """Backbone + bias-free 1x1 convolution head + pooling, and the CAM method that shapes the
    head, the training loss and the seed maps (`wsss.cam_methods`)."""

    def __init__(self, n_classes: int, params: ClassifierParams | None = None) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1 (foreground classes), got {n_classes}")
        params = params or ClassifierParams()
        self.n_classes = n_classes
        self.params = params
        self.backbone = backbone_from_params(params.backbone)
        self.method = params.method.build(self.backbone.channels)
        # No bias: a CAM is then exactly the head applied to the features at each position.
        maps = n_classes * self.method.maps_per_class
        self.head = nn.Conv2d(self.backbone.channels[-1], maps, kernel_size=1, bias=False)
        self.pool = params.pooling.build()

    def levels_and_maps(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The backbone's feature levels of images x, and the raw class scores (B, K, h, w) at
        its output stride, before any relu."""
        levels = self.backbone(x)
        return levels, self.method.class_maps(self.head(levels[-1]))

    def score_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Raw class scores (B, K, h, w) at the backbone's output stride, before any relu."""
        return self.levels_and_maps(x)[1]

    def seed_maps(self, x: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
        """The CAM method's non-negative seed maps (B, K, h', w') of one scale of images x whose
        classes `label_mask` (B, K) bool marks."""
        return self.method.seed_maps(self, x, label_mask)

    def begin_epoch(self, epoch: int) -> None:
        """Before training epoch `epoch`: the CAM method's hook (`CamMethod.keeps_seeds`)."""
        self.method.begin_epoch(epoch)

    def epoch_seeds(self) -> KeptMaps | None:
        """The seeds the CAM method kept in the epoch just trained, if it keeps any."""
        return self.method.epoch_seeds()

    def forward(self, x: torch.Tensor, with_maps: bool = False, with_levels: bool = False):
        """Logits (B, K); with `with_maps`, (logits, class score maps), and with `with_levels`
        also the backbone's feature levels after them: for methods whose loss reads the maps
        (a call, so that data-parallel training sees it)."""
        levels, maps = self.levels_and_maps(x)
        if with_levels:
            return self.pool(maps), maps, levels
        return (self.pool(maps), maps) if with_maps else self.pool(maps)


def classifier_step_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """`step_loss` for `wsss.training.fit`: the loss of the classifier's CAM method on a batch of
    its examples (`model.method`: the network's, also through a data-parallel wrapper)."""
    return model.method.loss(model, batch)


def train_classifier(
    model: Classifier,
    samples: Sequence[tuple[np.ndarray, Sequence[int]]],
    augment_params: AugmentParams,
    optim_params: OptimParams,
    seed: int,
    device: torch.device | str | None = None,
    on_epoch_end: EpochEnd | None = None,
    kept: dict[Key, np.ndarray] | None = None,
) -> Classifier:
    """Train `model` (`wsss.networks.initial_network`) in this process on (image uint8 HWC,
    labels 1..K) samples. Epoch e's shuffling and augmentation depend only on (seed, e).
    When the CAM method keeps seeds (OAA), each epoch's are merged into `kept` (rows: the
    samples' positions; `wsss.kept_seeds`). Returns the model in eval mode."""
    n_classes, method = model.n_classes, model.params.method

    def check(sample: tuple[np.ndarray, Sequence[int]]) -> None:
        check_image(sample[0])
        multi_hot(sample[1], n_classes)

    check_samples(samples, check)

    def make_example(
        sample: tuple[int, tuple[np.ndarray, Sequence[int]]], rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        row, (image, labels) = sample
        return method.example(image, labels, n_classes, rng, augment_params) | {
            "row": np.int64(row)
        }

    def epoch_end(epoch: int, metrics: dict[str, float]) -> None:
        epoch_seeds = model.epoch_seeds()
        if epoch_seeds is not None and kept is not None:
            merge([epoch_seeds], kept)
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)

    return train_in_process(
        model,
        list(enumerate(samples)),
        make_example,
        classifier_step_loss,
        optim_params,
        seed,
        device,
        epoch_end,
        on_epoch_start=model.begin_epoch,
    )


@torch.no_grad()
def image_scores(model: Classifier, images: Sequence[np.ndarray]) -> np.ndarray:
    """Sigmoid class probabilities (N, K) of whole, unaugmented images, on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    scores = [
        torch.sigmoid(model(torch.from_numpy(normalize(image))[None].to(device)))[0].cpu()
        for image in images
    ]
    return torch.stack(scores).numpy() if scores else np.zeros((0, model.n_classes), np.float32)
