"""The last step of the method: a segmentation network trained on the pseudo-labels (or, for the
fully supervised upper bound, on ground-truth masks), and used to label images in one forward
pass instead of CAM + walk + CRF.

The network is one of the project's backbones with a head from torchvision (`DeepLabHead`:
DeepLabV3's ASPP; `LRASPPHead`: the light head of MobileNetV3's LR-ASPP, which reads a
stride-8 level beside the last one). torchvision is a dependency already and keeps both heads;
segmentation-models-pytorch would add a package for heads we do not need and its own backbone
registry beside ours.

Training: cross-entropy over background + K classes, pixels of value 255 ignored. Inference:
class probabilities at full resolution, averaged with the flipped image's, restricted to the
background and the image's labelled classes when they are known (`labelled_only`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.lraspp import LRASPPHead

from wsss.backbones import BackboneParams, backbone_from_params
from wsss.imageio import IGNORE_INDEX
from wsss.params import Params
from wsss.pseudo_label import PseudoLabelParams, finalize
from wsss.refiners import Scores
from wsss.training import Batch
from wsss.transforms import AugmentParams, augment, normalize

SEGMENTATION_STAGE = "segmentation"  # the stage name of masks the network makes


class SegmentationParams(Params):
    """Segmentation network architecture; the number of classes comes from the dataset."""

    backbone: BackboneParams = BackboneParams()
    head: Literal["deeplabv3", "lraspp"] = Field(
        "deeplabv3",
        description="deeplabv3: DeepLabV3's ASPP on the last feature level; lraspp: LR-ASPP, "
        "lighter, adding the stride-8 level (torchvision's heads).",
    )
    lraspp_channels: int = Field(128, gt=0, description="Inner channels of the LR-ASPP head.")


class SegmentationInferenceParams(Params):
    """How the trained network labels an image."""

    flip: bool = Field(True, description="Average the probabilities with the flipped image's.")
    labelled_only: bool = Field(
        True,
        description="Only the background and the image's labelled classes compete (image-level "
        "labels are known when labeling); off: every class does.",
    )


class SegmentationNet(nn.Module):
    """Backbone + segmentation head -> logits (B, 1 + K, H, W) at the input's size; channel 0
    is the background, channel k class k."""

    def __init__(self, n_classes: int, params: SegmentationParams | None = None) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1 (foreground classes), got {n_classes}")
        params = params or SegmentationParams()
        self.n_classes = n_classes
        self.params = params
        self.backbone = backbone_from_params(params.backbone)
        channels, outputs = self.backbone.channels, n_classes + 1
        if params.head == "deeplabv3":
            # DeepLabV3's rates: 6/12/18 at output stride 16, doubled at 8.
            rates = (6, 12, 18) if params.backbone.output_stride == 16 else (12, 24, 36)
            self.head = DeepLabHead(channels[-1], outputs, atrous_rates=rates)
        else:
            self.head = LRASPPHead(channels[1], channels[-1], outputs, params.lraspp_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = self.backbone(x)
        if self.params.head == "deeplabv3":
            logits = self.head(levels[-1])
        else:
            logits = self.head({"low": levels[1], "high": levels[-1]})
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def segmentation_example(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, augment_params: AugmentParams
) -> dict[str, np.ndarray]:
    """One training example: image and mask (uint8 (H, W), 255 = ignore) augmented jointly.
    {"image": float32 (3, S, S), "mask": uint8 (S, S)}; the crop's padding is ignored."""
    image_chw, (mask_crop,) = augment(image, rng, augment_params, masks=(mask,))
    return {"image": image_chw, "mask": mask_crop}


def segmentation_step_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """`step_loss` for `wsss.training.fit`: pixel-wise cross-entropy, 255 ignored; reports the
    pixel accuracy on the labelled pixels too."""
    logits = model(batch["image"])
    target = batch["mask"].long()
    labelled = target != IGNORE_INDEX
    if not bool(labelled.any()):  # a batch of ignored pixels only: nothing to learn from
        return logits.sum() * 0.0, {"pixel_accuracy": float("nan")}
    loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    with torch.no_grad():
        correct = (logits.argmax(1) == target)[labelled].float().mean().item()
    return loss, {"pixel_accuracy": correct}


@torch.no_grad()
def segment(
    model: SegmentationNet,
    image: np.ndarray,
    labels: Sequence[int] | None,
    params: SegmentationInferenceParams,
) -> Scores:
    """Class probabilities of uint8 (H, W, 3) `image` at full resolution as `Scores`: the
    background and `labels` (class indices 1..K) when `params.labelled_only` and labels are
    given (softmax over those channels alone), else every class."""
    model.eval()
    device = next(model.parameters()).device
    x = torch.from_numpy(normalize(image))[None].to(device)
    logits = model(x)[0]
    if params.flip:
        logits = (logits + model(x.flip(-1))[0].flip(-1)) / 2
    if params.labelled_only and labels is not None:
        channels = (0, *sorted(set(int(c) for c in labels)))
        logits = logits[list(channels)]
    else:
        channels = tuple(range(model.n_classes + 1))
    probs = torch.softmax(logits.float(), dim=0).cpu().numpy()
    return Scores(channels, probs, probabilities=True)


class SegmentationSeeds:
    """The seed stage of labeling with a trained segmentation network (`wsss.labeling`): its
    probabilities and their argmax, in one forward pass (two with `flip`)."""

    name = SEGMENTATION_STAGE

    def __init__(self, model: SegmentationNet, params: SegmentationInferenceParams) -> None:
        self.model = model
        self.params = params

    def seed(
        self, image: np.ndarray, labels: list[int], cams_fg: np.ndarray | None = None
    ) -> tuple[Scores, np.ndarray]:
        if cams_fg is not None:
            raise ValueError("the segmentation network's stage takes no CAMs")
        scores = segment(self.model, image, labels, self.params)
        return scores, scores.mask(image.shape[:2])


def confident_label_map(scores: Scores, size: tuple[int, int], confident: float) -> np.ndarray:
    """Affinity label map uint8 (H, W) of a segmentation network's `scores` on an image of
    `size`, as iterative affinity learning (Wang et al., IJCV 2020) trains its affinity network
    from the unary: the pseudo-label thresholded at `confident`, each pixel its most probable
    class where that probability is at least `confident`, else ignored (255)."""
    if not 0 < confident < 1:
        raise ValueError(f"confident must be in (0, 1), got {confident}")
    probs = scores.full_probabilities(size)
    return finalize(probs, scores.channels, PseudoLabelParams(confidence_threshold=confident))[0]
