"""Multi-label image classifier whose 1x1 convolution head gives the class activation maps:
backbone -> score maps (B, K, h, w) -> pooling -> logits (B, K); logit k <-> class k + 1."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from wsss.backbone import BackboneParams, backbone_from_params
from wsss.params import Params
from wsss.poolings import POOLINGS, Pooling
from wsss.poolings.global_pool import GapParams
from wsss.training import Batch, EpochEnd, OptimParams, check_samples, train_in_process
from wsss.transforms import AugmentParams, augment, check_image, normalize


class ClassifierParams(Params):
    """Classifier architecture; the number of classes comes from the dataset's class list."""

    backbone: BackboneParams = BackboneParams()
    pooling: Pooling = Field(
        GapParams(),
        description="How the class score maps become logits: a pooling's name "
        f"({', '.join(POOLINGS)}) or its settings with `name` (wsss.poolings).",
    )


class Classifier(nn.Module):
    """Backbone + bias-free 1x1 convolution head + pooling."""

    def __init__(self, n_classes: int, params: ClassifierParams | None = None) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1 (foreground classes), got {n_classes}")
        params = params or ClassifierParams()
        self.n_classes = n_classes
        self.params = params
        self.backbone = backbone_from_params(params.backbone)
        # No bias: a CAM is then exactly the head applied to the features at each position.
        self.head = nn.Conv2d(self.backbone.channels[-1], n_classes, kernel_size=1, bias=False)
        self.pool = params.pooling.build()

    def score_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Raw class scores (B, K, h, w) at the backbone's output stride, before any relu."""
        return self.head(self.backbone(x)[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.score_maps(x))


def classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Multi-label soft-margin loss of logits (B, K) against multi-hot targets (B, K)."""
    return F.multilabel_soft_margin_loss(logits, targets)


def classifier_step_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """`step_loss` for `wsss.training.fit`: batch "image" (B, 3, H, W), "targets" (B, K)."""
    return classification_loss(model(batch["image"]), batch["targets"]), {}


def multi_hot(labels: Sequence[int], n_classes: int) -> np.ndarray:
    """Class indices 1..K -> float32 (K,) targets (class k at position k - 1)."""
    targets = np.zeros(n_classes, dtype=np.float32)
    for label in labels:
        if not 1 <= label <= n_classes:
            raise ValueError(
                f"label {label} is not a foreground class index in 1..{n_classes} "
                "(0 is background and is never an image label)"
            )
        targets[label - 1] = 1.0
    return targets


def classification_example(
    image: np.ndarray,
    labels: Sequence[int],
    n_classes: int,
    rng: np.random.Generator,
    augment_params: AugmentParams,
) -> dict[str, np.ndarray]:
    """One augmented training example: {"image": float32 (3, S, S), "targets": float32 (K,)}."""
    augmented, _ = augment(image, rng, augment_params)
    return {"image": augmented, "targets": multi_hot(labels, n_classes)}


def train_classifier(
    model: Classifier,
    samples: Sequence[tuple[np.ndarray, Sequence[int]]],
    augment_params: AugmentParams,
    optim_params: OptimParams,
    seed: int,
    device: torch.device | str | None = None,
    on_epoch_end: EpochEnd | None = None,
) -> Classifier:
    """Train `model` (`wsss.networks.initial_network`) in this process on (image uint8 HWC,
    labels 1..K) samples. Epoch e's shuffling and augmentation depend only on (seed, e).
    Returns the model in eval mode."""
    n_classes = model.n_classes

    def check(sample: tuple[np.ndarray, Sequence[int]]) -> None:
        check_image(sample[0])
        multi_hot(sample[1], n_classes)

    check_samples(samples, check)

    def make_example(
        sample: tuple[np.ndarray, Sequence[int]], rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        return classification_example(*sample, n_classes, rng, augment_params)

    return train_in_process(
        model, samples, make_example, classifier_step_loss, optim_params, seed, device, on_epoch_end
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
