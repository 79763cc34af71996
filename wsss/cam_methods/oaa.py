"""OAA, online attention accumulation (Jiang et al., "Integral Object Mining via Online Attention
Accumulation", ICCV 2019; PengtaoJiang/OAA-PyTorch). The plain CAM's training, but the CAMs the
classifier makes of each training image are kept along the way. Over the epochs a class's CAM
moves between parts of the object, so their pointwise maximum covers more of it than any one
epoch's. The accumulated maps are the seeds.

In every epoch from `from_epoch` on, each labelled class's CAM of each training example is kept:
relu'd, divided by its maximum over the crop, and warped back from the augmented crop onto the
image's own grid (`wsss.kept_seeds.grid_shape`; cells the crop did not see stay 0). With
`predicted_only` (the reference's filter) a class counts in an epoch only if it is among the
image's n top-scoring classes, n being the image's label count. The training loops store each
epoch's maps and merge them by maximum (`wsss.kept_seeds`), so accumulation survives resumed runs
and data-parallel workers that see the images in any order. The CAM stage then reads an image's
merged maps in place of its CAMs, and falls back to the classifier's CAMs for images or classes
it has none of.

Not built: the reference's second, "integral" classifier trained on the accumulated maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from wsss.cam_methods.base import (
    CamMethod,
    CamMethodParams,
    classification_loss,
    multi_hot,
    register,
)
from wsss.kept_seeds import KeptMaps, grid_shape
from wsss.training import Batch
from wsss.transforms import AugmentParams, Placement, draw_placement, place


def to_image_grid(
    maps: torch.Tensor, placement: Placement, crop: int, grid: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps (C, s, s) over an augmented crop of `crop` x `crop` pixels (`placement`) -> maps
    (C, h, w) on the grid of the original image (`grid_shape(size, grid)`), sampled bilinearly
    at the cells' centres, and the bool (h, w) cells whose centre the crop holds (the others
    are 0)."""
    rows, cols = grid_shape(placement.size, grid)
    (height, width), (src_y, src_x) = placement.resized, placement.source
    (dst_y, dst_x), (extent_h, extent_w) = placement.target, placement.extent
    # The cells' centres in the resized (and flipped) image's continuous pixel coordinates.
    ys = (torch.arange(rows, dtype=torch.float32) + 0.5) * (height / rows)
    xs = (torch.arange(cols, dtype=torch.float32) + 0.5) * (width / cols)
    if placement.flip:
        xs = width - xs
    seen = ((ys >= src_y) & (ys < src_y + extent_h))[:, None] & (
        (xs >= src_x) & (xs < src_x + extent_w)
    )[None, :]
    # ... in the crop's, then as grid_sample's [-1, 1] (align_corners=False: -1 and 1 are the
    # crop's outer edges).
    gy = 2 * (ys - src_y + dst_y) / crop - 1
    gx = 2 * (xs - src_x + dst_x) / crop - 1
    where = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)  # (h, w, (x, y))
    sampled = F.grid_sample(
        maps[None],
        where[None].to(maps),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )[0]
    seen = seen.to(maps.device)
    return sampled * seen, seen


class AccumulatedCam(CamMethod):
    keeps_seeds = True

    def __init__(self, params: OaaParams) -> None:
        super().__init__()
        self.params = params
        self._epoch = 0
        self._kept: list[tuple[int, int, np.ndarray]] = []

    def begin_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._kept = []

    def epoch_seeds(self) -> KeptMaps:
        kept, self._kept = KeptMaps.from_entries(self._kept), []
        return kept

    def loss(self, classifier: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        logits, maps = classifier(batch["image"], with_maps=True)
        if self.training and self._epoch >= self.params.from_epoch and "row" in batch:
            with torch.no_grad():
                self._keep(logits, maps, batch)
        return classification_loss(logits, batch["targets"]), {}

    def _keep(self, logits: torch.Tensor, maps: torch.Tensor, batch: Batch) -> None:
        """Keep the batch's labelled classes' CAMs on their images' grids (`self._kept`)."""
        keep = batch["targets"] > 0
        if self.params.predicted_only:
            rank = logits.argsort(dim=1, descending=True).argsort(dim=1)
            keep = keep & (rank < keep.sum(dim=1, keepdim=True))
        maps = F.relu(maps.float())
        maps = maps / (maps.amax(dim=(2, 3), keepdim=True) + 1e-5)
        crop = batch["image"].shape[-1]
        placements = batch["placement"].cpu().numpy()
        rows = batch["row"].cpu().tolist()
        for b, row in enumerate(rows):
            classes = keep[b].nonzero()[:, 0]
            if len(classes) == 0:
                continue
            on_grid, _ = to_image_grid(
                maps[b, classes], Placement.from_array(placements[b]), crop, self.params.grid
            )
            quantised = (on_grid.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            for c, kept in zip(classes.tolist(), quantised, strict=True):
                self._kept.append((int(row), c + 1, kept))


@register
class OaaParams(CamMethodParams):
    """The plain CAM's training; each training image's CAMs accumulated over the epochs by their
    pointwise maximum are its seeds."""

    name: Literal["oaa"] = "oaa"
    grid: int = Field(
        32,
        ge=4,
        description="Cells along the long side of each image's accumulated maps (upsampled to "
        "the image at labeling); a few per cell of the training CAMs.",
    )
    from_epoch: int = Field(
        1,
        ge=0,
        description="The first epoch (0-based) whose CAMs accumulate; OAA skips the first, whose "
        "CAMs are still poor. At or past classifier.optim.epochs nothing accumulates and the "
        "seeds are the plain CAMs.",
    )
    predicted_only: bool = Field(
        True,
        description="Accumulate a labelled class's CAM only in the epochs where it is among the "
        "image's n top-scoring classes (n: its label count), as OAA's reference does.",
    )

    def build(self, feature_channels: tuple[int, ...]) -> CamMethod:
        return AccumulatedCam(self)

    def example(
        self,
        image: np.ndarray,
        labels: Sequence[int],
        n_classes: int,
        rng: np.random.Generator,
        augment_params: AugmentParams,
    ) -> dict[str, np.ndarray]:
        placement = draw_placement(image.shape[:2], rng, augment_params)
        return {
            "image": place(image, placement, augment_params.crop_size),
            "targets": multi_hot(labels, n_classes),
            "placement": placement.as_array(),
        }
