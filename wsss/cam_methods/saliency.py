"""Distinct class-specific saliency maps (Shimoda and Yanai, "Distinct Class-Specific Saliency
Maps for Weakly Supervised Semantic Segmentation", ECCV 2016; DCSM) as the seeds, in place of the
CAMs; the classifier trains as the plain CAM's.

For each class of the image, the derivatives of its classification score with respect to the
feature maps of several backbone levels (not the input image, as in Simonyan et al.): per level,
the largest absolute derivative over the channels at each position, scaled to [0, 1] over the
image, upsampled to the finest of the levels and summed over the levels. DCSM then subtracts the
other candidate classes' saliency from each class's, so that where two labelled objects both
explain a score, neither claims the other; the candidates here are the image's labels, and what
is subtracted is the strongest other class's saliency at each position (`subtract` times it).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from wsss.cam_methods.base import CamMethod, CamMethodParams, register


def strongest_other(maps: torch.Tensor) -> torch.Tensor:
    """Per position and class of non-negative maps (B, K, h, w), the largest value among the
    other classes (0 where there are none)."""
    if maps.shape[1] < 2:
        return torch.zeros_like(maps)
    top = maps.topk(2, dim=1).values
    return torch.where(maps >= top[:, :1], top[:, 1:], top[:, :1])


class GradientSaliency(CamMethod):
    def __init__(self, params: SaliencyParams) -> None:
        super().__init__()
        self.params = params

    def seed_maps(
        self, classifier: nn.Module, x: torch.Tensor, label_mask: torch.Tensor
    ) -> torch.Tensor:
        p = self.params
        with torch.enable_grad():  # the CAM stage runs without gradients; this method needs them
            # Through the input, the levels carry gradients even if the weights are frozen.
            levels, maps = classifier.levels_and_maps(x.detach().requires_grad_(True))
            logits = classifier.pool(maps)
            chosen = [levels[i] for i in p.levels]
            grid = max((level.shape[2:] for level in chosen), key=lambda size: size[0] * size[1])
            saliency = x.new_zeros(x.shape[0], logits.shape[1], *grid)
            for k in torch.nonzero(label_mask.any(dim=0)).flatten().tolist():
                # Images are independent in eval mode: the batch's sum has each image's gradient.
                grads = torch.autograd.grad(logits[:, k].sum(), chosen, retain_graph=True)
                for grad in grads:
                    level_map = grad.abs().amax(dim=1, keepdim=True)
                    level_map = level_map / (level_map.amax(dim=(2, 3), keepdim=True) + 1e-12)
                    saliency[:, k] += F.interpolate(
                        level_map, grid, mode="bilinear", align_corners=False
                    )[:, 0]
        saliency = saliency * label_mask[:, :, None, None].to(saliency.dtype)
        return F.relu(saliency - p.subtract * strongest_other(saliency))


@register
class SaliencyParams(CamMethodParams):
    """DCSM's gradient saliency as the seeds (module docstring); training is the plain CAM's."""

    name: Literal["saliency"] = "saliency"
    levels: tuple[int, ...] = Field(
        (1, 2, 3),
        description="the backbone's feature levels (0-3: strides 4, 8, 16, 16 at output stride "
        "16) whose derivatives are aggregated; the maps come at the finest one's grid",
    )
    subtract: float = Field(
        1.0, ge=0, description="weight of the strongest other labelled class's saliency taken off"
    )

    @field_validator("levels")
    @classmethod
    def _four_levels(cls, levels: tuple[int, ...]) -> tuple[int, ...]:
        if not levels or len(set(levels)) != len(levels) or not set(levels) <= {0, 1, 2, 3}:
            raise ValueError(f"levels must be distinct indices in 0..3 (four levels), got {levels}")
        return levels

    def build(self, feature_channels: tuple[int, ...]) -> CamMethod:
        return GradientSaliency(self)
