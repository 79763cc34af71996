"""SEAM (Wang et al., "Self-supervised Equivariant Attention Mechanism for Weakly Supervised
Semantic Segmentation", CVPR 2020; YudeWang/SEAM): the plain CAM trained on two views of each
image, the batch and a rescaled (optionally flipped) copy, with three losses besides
classification, and seeds refined by its pixel correlation module (PCM).

- *PCM*: each position's maps become a convex combination of all positions' maps, weighted by
  the relu'd cosine similarity of an embedding of the image's colours and two backbone levels
  (the two before the head's; SEAM's conv4/conv5): maps where the features say "same object"
  spread to each other. Its input is the max-normalised CAM of the labelled classes with the
  background 1 - max and every class but the strongest zeroed at each position, detached.
- *Equivariant regularisation* (ER): the CAMs of the rescaled view equal the rescaled CAMs of
  the original (mean absolute difference, labelled classes, after max-normalisation).
- *Equivariant cross regularisation* (ECR): each view's PCM output matches the other view's
  CAM, strongest class kept per position (detached), on the 20% worst positions and channels.
- *Min pooling*: the quarter of positions where the PCM output of the labelled classes is
  lowest is pushed to 0 (SEAM: it moves the best background score, not the best mIoU).

loss = (classification + min pooling) averaged over the two views + ER + ECR, as the reference.
The views are compared at the rescaled view's image size, as in the reference.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from wsss.cam_methods.base import (
    CamMethod,
    CamMethodParams,
    background_first,
    classification_loss,
    label_maps,
    max_norm,
    register,
)
from wsss.training import Batch


def strongest_only(maps: torch.Tensor) -> torch.Tensor:
    """Maps (B, 1 + K, h, w), background first, with each position's foreground channels
    zeroed but the strongest (SEAM's max_onehot: values kept, the background untouched)."""
    foreground = maps[:, 1:]
    strongest = foreground >= foreground.amax(dim=1, keepdim=True)
    return torch.cat([maps[:, :1], foreground * strongest], dim=1)


def lowest_quarter_loss(maps: torch.Tensor) -> torch.Tensor:
    """Mean of the relu'd per-position maximum of maps (B, C, h, w) over the quarter of
    positions where it is lowest (SEAM's adaptive min pooling loss)."""
    strongest = maps.amax(dim=1).flatten(1)
    k = max(1, strongest.shape[1] // 4)
    return F.relu(torch.topk(strongest, k, dim=1, largest=False).values).mean()


def top_share_mean(errors: torch.Tensor, share: float) -> torch.Tensor:
    """Mean of the largest `share` of each image's values of errors (B, C, h, w)."""
    flat = errors.flatten(1)
    return torch.topk(flat, max(1, int(flat.shape[1] * share)), dim=1).values.mean()


class PixelCorrelation(nn.Module):
    """SEAM's PCM on the grid of the class maps: channels 64 and 128 from the two backbone
    levels (detached, as the reference), the image's colours, a 192-channel embedding."""

    def __init__(self, level_channels: tuple[int, int]) -> None:
        super().__init__()
        self.reduce = nn.ModuleList(
            nn.Conv2d(c, out, 1, bias=False)
            for c, out in zip(level_channels, (64, 128), strict=True)
        )
        self.embed = nn.Conv2d(3 + 64 + 128, 192, 1, bias=False)
        for conv in self.reduce:
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.embed.weight, gain=4)  # the reference's initialisation

    def forward(
        self, maps: torch.Tensor, levels: list[torch.Tensor], images: torch.Tensor
    ) -> torch.Tensor:
        """Maps (B, C, h, w) -> (B, C, h, w): position j's maps the affinity-weighted mean of
        every position's, weights over the source positions summing to 1."""
        size = maps.shape[2:]
        # 1x1 convolutions commute with bilinear resizing: resizing first is cheaper.
        parts = [F.interpolate(images, size, mode="bilinear", align_corners=True)]
        for conv, level in zip(self.reduce, levels, strict=True):
            resized = F.interpolate(level.detach(), size, mode="bilinear", align_corners=True)
            parts.append(F.relu(conv(resized)))
        features = self.embed(torch.cat(parts, dim=1)).flatten(2)  # (B, 192, n)
        features = features / (features.norm(dim=1, keepdim=True) + 1e-5)
        affinity = F.relu(features.transpose(1, 2) @ features)  # (B, n, n), symmetric
        affinity = affinity / (affinity.sum(dim=1, keepdim=True) + 1e-5)
        return (maps.flatten(2) @ affinity).view_as(maps)


class SeamCam(CamMethod):
    def __init__(self, params: SeamParams, feature_channels: tuple[int, ...]) -> None:
        super().__init__()
        if len(feature_channels) < 3:
            raise ValueError(
                f"SEAM's PCM reads the two feature levels before the last; the backbone has "
                f"{len(feature_channels)}"
            )
        self.params = params
        self.pcm = PixelCorrelation((feature_channels[-3], feature_channels[-2]))

    def refined(
        self,
        images: torch.Tensor,
        levels: list[torch.Tensor],
        maps: torch.Tensor,
        labelled: torch.Tensor,
    ) -> torch.Tensor:
        """PCM's output (B, 1 + K, h, w), background first, from raw class maps (B, K, h, w)
        of images whose classes `labelled` (B, K) marks with 1. The reference lets every class
        compete for each position; here only the labelled ones do (in training and seeding
        alike), so that an unlabelled class's stronger map cannot erase a labelled one's seeds.
        """
        with torch.no_grad():
            start = strongest_only(label_maps(maps, labelled))
        return self.pcm(start, levels[-3:-1], images)

    def seed_maps(
        self, classifier: nn.Module, x: torch.Tensor, label_mask: torch.Tensor
    ) -> torch.Tensor:
        levels, maps = classifier.levels_and_maps(x)
        return F.relu(self.refined(x, levels, maps, label_mask.to(maps.dtype))[:, 1:])

    def loss(self, classifier: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        p = self.params
        images, targets = batch["image"], batch["targets"]
        small = F.interpolate(images, scale_factor=p.scale, mode="bilinear", align_corners=True)
        if p.flip:
            small = small.flip(-1)
        size = small.shape[2:]

        def to_small(maps: torch.Tensor, transform: bool) -> torch.Tensor:
            maps = F.interpolate(maps, size, mode="bilinear", align_corners=True)
            return maps.flip(-1) if transform and p.flip else maps

        labelled = targets[:, :, None, None]
        with_background = F.pad(targets, (1, 0), value=1.0)[:, :, None, None]
        cams, refined, classification, min_pooling = [], [], 0.0, 0.0
        for view, original in ((images, True), (small, False)):
            logits, maps, levels = classifier(view, with_levels=True)
            view_refined = self.refined(view, levels, maps, targets)
            classification = classification + classification_loss(logits, targets) / 2
            min_pooling = min_pooling + lowest_quarter_loss(view_refined[:, 1:] * labelled) / 2
            cams.append(background_first(to_small(max_norm(maps) * labelled, original)))
            refined.append(to_small(max_norm(view_refined) * with_background, original))
        equivariance = (cams[0][:, 1:] - cams[1][:, 1:]).abs().mean()
        cross = top_share_mean(
            (strongest_only(cams[1].detach()) - refined[0]).abs(), p.cross_share
        ) + top_share_mean((strongest_only(cams[0].detach()) - refined[1]).abs(), p.cross_share)
        loss = classification + min_pooling + equivariance + cross
        return loss, {
            "classification": classification.item(),
            "equivariance": equivariance.item(),
            "cross": cross.item(),
        }


@register
class SeamParams(CamMethodParams):
    """SEAM's second view, equivariance losses and PCM-refined seeds (module docstring)."""

    name: Literal["seam"] = "seam"
    scale: float = Field(
        0.5,
        gt=0,
        description="the second view's size relative to the crop (the reference: 0.3 of 448 px "
        "crops; 0.5 here, where crops are about 200 px and the maps at stride 16)",
    )
    flip: bool = Field(False, description="also flip the second view (the reference does not)")
    cross_share: float = Field(
        0.2, gt=0, le=1, description="share of the positions and channels ECR is computed on"
    )

    @field_validator("scale")
    @classmethod
    def _a_different_size(cls, scale: float) -> float:
        if scale == 1.0:
            raise ValueError("scale must differ from 1: the second view would equal the first")
        return scale

    def build(self, feature_channels: tuple[int, ...]) -> CamMethod:
        return SeamCam(self, feature_channels)
