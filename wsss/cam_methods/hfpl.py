"""HFPL's two training losses (Jonnarth et al., "High-fidelity Pseudo-labels for Boosting Weakly-
Supervised Segmentation", WACV 2024; arvijj/hfpl), added to the plain CAM; the seeds are the plain
CAM's.

- *Importance sampling*: each class's sigmoid probability map is a distribution over positions;
  `samples` positions are drawn from it (with replacement) and each drawn position's logit is
  classified against the image label. Mixed with the pooled logits' loss by `sampling_weight`.
  Drawing where the class is likely rewards maps that are high on the whole object and low
  elsewhere, not only a high mean.
- *Feature similarity*: for pairs of positions, the squared difference of their (max-normalised)
  class maps is penalised where their colours are alike and rewarded where they differ, so map
  edges follow colour edges:
      loss = -1/(B h w) * sum over ordered pairs (i, j) of
             g(|i - j|) * 1/2 |y_i - y_j|^2 * tanh(mu + log(c_ij / (1 - c_ij))),
  c_ij the mean absolute RGB difference in [0, 1], g a 2-D Gaussian of width `sigma` cells.
  The reference sums all pairs of the grid (quadratic memory); here the pairs are those within
  `radius` cells (`wsss.neighbourhood`, as the affinities use), where g has nearly all its mass.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from wsss.cam_methods.base import (
    CamMethod,
    CamMethodParams,
    classification_loss,
    label_maps,
    register,
)
from wsss.neighbourhood import offsets, pair_valid, shifted
from wsss.training import Batch
from wsss.transforms import IMAGENET_MEAN, IMAGENET_STD


def sampled_logits(score_maps: torch.Tensor, samples: int) -> torch.Tensor:
    """Logits (B, K, samples) at positions drawn per image and class in proportion to the
    class's sigmoid probability map; `score_maps` (B, K, h, w)."""
    batch, classes, height, width = score_maps.shape
    flat = score_maps.reshape(batch * classes, height * width)
    with torch.no_grad():
        # + 1e-5 as in the reference: a map whose probabilities all underflow can still draw.
        positions = torch.multinomial(torch.sigmoid(flat) + 1e-5, samples, replacement=True)
    return flat.gather(1, positions).view(batch, classes, samples)


def image_colours(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """ImageNet-normalised images (B, 3, H, W) -> RGB in [0, 1] averaged over each cell of an
    h x w grid (B, 3, h, w)."""
    mean = torch.as_tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return F.adaptive_avg_pool2d(images * std + mean, size).clamp(0.0, 1.0)


def feature_similarity_loss(
    colours: torch.Tensor, maps: torch.Tensor, mu: float, sigma: float, radius: int
) -> torch.Tensor:
    """The feature similarity loss (module docstring) of maps (B, C, h, w) against colours
    (B, 3, h, w) in [0, 1], over the pairs within `radius` cells."""
    batch, _, height, width = maps.shape
    valid = pair_valid(height, width, radius).to(maps.device)
    total = maps.new_zeros(())
    for k, (dy, dx) in enumerate(offsets(radius)):
        colour_gap = (colours - shifted(colours, dy, dx)).abs().mean(dim=1).clamp(0.0, 1.0)
        alike = torch.tanh(mu + torch.log((colour_gap + 1e-5) / (1 - colour_gap + 1e-5)))
        map_gap = 0.5 * (maps - shifted(maps, dy, dx)).pow(2).sum(dim=1)
        weight = math.exp(-0.5 * (dy * dy + dx * dx) / sigma**2) / (2 * math.pi * sigma**2)
        total = total + weight * (map_gap * alike * valid[k]).sum()
    # Each offset stands for the unordered pair; the reference sums ordered pairs: twice.
    return -2 * total / (batch * height * width)


class HfplCam(CamMethod):
    def __init__(self, params: HfplParams) -> None:
        super().__init__()
        self.params = params

    def loss(self, classifier: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        p = self.params
        images, targets = batch["image"], batch["targets"]
        logits, score_maps = classifier(images, with_maps=True)
        pooled = classification_loss(logits, targets)
        sampled = sampled_logits(score_maps, p.samples)
        drawn = F.binary_cross_entropy_with_logits(sampled, targets[:, :, None].expand_as(sampled))
        classification = (1 - p.sampling_weight) * pooled + p.sampling_weight * drawn
        similarity = feature_similarity_loss(
            image_colours(images, score_maps.shape[2:]),
            label_maps(score_maps, targets),
            p.mu,
            p.sigma,
            p.radius,
        )
        loss = classification + p.similarity_weight * similarity
        return loss, {"classification": classification.item(), "similarity": similarity.item()}


@register
class HfplParams(CamMethodParams):
    """The plain CAM trained with HFPL's importance-sampling and feature-similarity losses
    (defaults: the reference's VOC settings; `sigma` and `radius` in cells of the score maps)."""

    name: Literal["hfpl"] = "hfpl"
    samples: int = Field(10, ge=1, description="positions drawn per image and class")
    sampling_weight: float = Field(
        0.2, ge=0, le=1, description="share of the sampled positions' loss in classification"
    )
    similarity_weight: float = Field(1.0, ge=0, description="weight of the similarity loss")
    mu: float = Field(
        2.5,
        description="colour-gap bias: map differences are penalised below a gap of "
        "1 / (1 + e^mu) (0.076 at 2.5) and rewarded above it",
    )
    sigma: float = Field(1.5, gt=0, description="width of the pairs' Gaussian weight, in cells")
    radius: int = Field(4, ge=1, description="pairs closer than this many cells")

    @model_validator(mode="after")
    def _radius_covers_sigma(self) -> HfplParams:
        if self.radius < 2 * self.sigma:
            raise ValueError(
                f"radius ({self.radius}) must be at least 2 * sigma ({2 * self.sigma:g}): "
                "the pairs left out would carry much of the Gaussian's weight"
            )
        return self

    def build(self, feature_channels: tuple[int, ...]) -> CamMethod:
        return HfplCam(self)
