"""What every CAM method is: what it adds to the classifier's training (the examples made of an
image, the loss of a batch) and how it makes an image's seed maps at inference.

The classifier (`wsss.classifier.Classifier`) holds its method as a module. The method says how
many maps its 1x1 head gives per class and how they become one map per class (`class_maps`),
the training loss of a batch (`loss`), and the maps the CAM stage turns into seeds (`seed_maps`:
one image scale and orientation; `wsss.cam` sums scales and flips, upsamples and normalises them
alike for every method). `CamMethod` is the plain CAM's behaviour (Zhou et al.; IRN); a member
overrides what it changes. Every path trains and labels through these hooks: the in-process loop,
the Ray Train job and the labeling actors never ask which method it is.

Adding a CAM method: a module in `wsss/cam_methods/` with a `CamMethodParams` subclass whose
`name` is a one-value `Literal` (the name users write in `classifier.model.method`) and whose
`build` returns its `CamMethod`, decorated `@register`, and its import in
`wsss/cam_methods/__init__.py`; docs/architecture.md walks through it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsss.kept_seeds import KeptMaps
from wsss.params import Params, registrar
from wsss.training import Batch
from wsss.transforms import AugmentParams, augment


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


def classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Multi-label soft-margin loss of logits (B, K) against multi-hot targets (B, K)."""
    return F.multilabel_soft_margin_loss(logits, targets)


def max_norm(maps: torch.Tensor) -> torch.Tensor:
    """Maps (B, C, h, w) relu'd and scaled to [0, 1] over each map's range (SEAM's max_norm)."""
    maps = F.relu(maps)
    low = maps.amin(dim=(2, 3), keepdim=True)
    high = maps.amax(dim=(2, 3), keepdim=True)
    return F.relu(maps - low - 1e-5) / (high - low + 1e-5)


def label_maps(score_maps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, K + 1, h, w): the labelled classes' maps (`max_norm`; unlabelled classes 0), and
    the background 1 - their maximum in channel 0."""
    return background_first(max_norm(score_maps) * targets[:, :, None, None])


def background_first(maps: torch.Tensor) -> torch.Tensor:
    """Foreground maps (B, K, h, w) in [0, 1] -> (B, K + 1, h, w), the background 1 - their
    maximum in channel 0."""
    return torch.cat([1 - maps.amax(dim=1, keepdim=True), maps], dim=1)


class CamMethod(nn.Module):
    """The plain CAM: one head map per class, trained by multi-label classification of the
    pooled maps, seeds = relu of the class score maps."""

    maps_per_class = 1
    # A method whose seeds are maps it keeps per training image (OAA) says so here: the training
    # loops then call `begin_epoch` before each epoch and store `epoch_seeds` after it, and the
    # CAM stage takes an image's seeds from the merged maps (`wsss.kept_seeds`), where it has any.
    keeps_seeds = False

    def begin_epoch(self, epoch: int) -> None:
        """Called before training epoch `epoch` (0-based) by a method that `keeps_seeds`."""

    def epoch_seeds(self) -> KeptMaps | None:
        """What the epoch just trained kept, keyed by the examples' "row" (and forgotten here)."""
        return None

    def class_maps(self, head_maps: torch.Tensor) -> torch.Tensor:
        """The head's maps (B, K * maps_per_class, h, w) -> one score map per class (B, K, h, w)."""
        return head_maps

    def seed_maps(
        self, classifier: nn.Module, x: torch.Tensor, label_mask: torch.Tensor
    ) -> torch.Tensor:
        """Non-negative seed maps (B, K, h, w) of normalised images x (B, 3, H, W), whose
        classes `label_mask` (B, K) bool marks (the CAM stage zeroes the others afterwards)."""
        return F.relu(classifier.score_maps(x))

    def loss(self, classifier: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss of a batch of `CamMethodParams.example`s, and metrics to report.
        `classifier` is called (not its parts), so that data-parallel training sees the call."""
        return classification_loss(classifier(batch["image"]), batch["targets"]), {}


class CamMethodParams(Params):
    """A CAM method's settings; `name` tells the members apart in the configuration."""

    name: str

    def build(self, feature_channels: tuple[int, ...]) -> CamMethod:
        """The method's module, held by the classifier, whose backbone's feature levels have
        `feature_channels` (for methods with layers of their own on them)."""
        raise NotImplementedError(f"{type(self).__name__} builds no CAM method")

    def example(
        self,
        image: np.ndarray,
        labels: Sequence[int],
        n_classes: int,
        rng: np.random.Generator,
        augment_params: AugmentParams,
    ) -> dict[str, np.ndarray]:
        """One training example of uint8 (H, W, 3) `image` with class indices `labels`: by
        default {"image": float32 (3, S, S) augmented, "targets": float32 (K,)}; a method with
        extra views or inputs adds them here and uses them in its `loss`. The training loops add
        "row", the image's int64 position in the training set."""
        augmented, _ = augment(image, rng, augment_params)
        return {"image": augmented, "targets": multi_hot(labels, n_classes)}


CAM_METHODS: dict[str, type[CamMethodParams]] = {}
register = registrar(CAM_METHODS, "CAM method")
