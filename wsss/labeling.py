"""The method applied to one image: the seed stage (the classifier's CAMs, or a trained
segmentation network's probabilities: `SeedStage`), then each configured refiner in order
(`wsss.refiners`: e.g. the random walk, then the dense CRF), then the pseudo-label.

`Labeler` splits the work in two at the point where a distributed job hands it from accelerator
to CPU: `seed` runs the CAMs and the refiners that run beside the networks (`accelerated`, e.g.
the walk with AffinityNet) and returns a small `Partial`; `finish` runs the remaining refiners
(e.g. the CRF) and makes the final mask. The in-process run and the Ray pipeline both call
exactly these two methods, so they produce the same masks.

Channels: scores carry only the classes present in the image, channel 0 the background and
channel i the i-th labelled class (`channels` maps them back to class indices).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from wsss.cam import BackgroundParams, CamParams, add_background, compute_cams
from wsss.classifier import Classifier
from wsss.pseudo_label import PseudoLabelParams, finalize
from wsss.refiners import Refiner, Scores

CAM_STAGE = "cam"  # the method's seed stage: the classifier's CAMs
PSEUDO_LABEL_STAGE = "pseudo_label"  # what a failure making the final mask is recorded as


@dataclass(frozen=True)
class Partial:
    """What the accelerator part hands to the CPU part for one image: the latest scores, the
    mask of each stage done so far, and how many refiners are done."""

    scores: Scores
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    refined: int = 0  # -1: a background-only image, which has nothing to refine


@dataclass(frozen=True)
class Labelled:
    masks: dict[str, np.ndarray]  # stage -> (H, W) uint8 class indices, in stage order
    mask: np.ndarray  # (H, W) uint8 final pseudo-label, 255 = ignore
    confidence: float
    ignore_fraction: float


class StageError(RuntimeError):
    """A stage failed on one image; `stage` names it, the cause is chained (`__cause__`)."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(f"{stage}: {type(cause).__name__}: {cause}")
        self.stage = stage


def cam_mask(cams_fg: np.ndarray, background: BackgroundParams) -> np.ndarray:
    """Segmentation (H, W) class indices from foreground CAMs (K, H, W) and a background."""
    return add_background(cams_fg, background).argmax(axis=0).astype(np.uint8)


class SeedStage(Protocol):
    """The first stage of a labeling: an image and its labels (class indices 1..K, at least one)
    -> scores over the background and those classes, and the stage's mask (H, W)."""

    name: str

    def seed(
        self, image: np.ndarray, labels: list[int], cams_fg: np.ndarray | None = None
    ) -> tuple[Scores, np.ndarray]: ...


class CamSeeds:
    """The method's seed stage: the classifier's CAMs (`wsss.cam`) with a background. `classifier`
    may be None for a caller that always passes the CAMs (`cams_fg`)."""

    name = CAM_STAGE

    def __init__(self, classifier: Classifier | None, params: CamParams) -> None:
        self.classifier = classifier
        self.params = params

    def seed(
        self, image: np.ndarray, labels: list[int], cams_fg: np.ndarray | None = None
    ) -> tuple[Scores, np.ndarray]:
        if cams_fg is None:
            if self.classifier is None:
                raise ValueError("a CAM stage without a classifier needs the CAMs (cams_fg)")
            cams_fg = compute_cams(self.classifier, image, labels, self.params)
        fg = cams_fg[[c - 1 for c in labels]]
        scores = Scores((0, *labels), add_background(fg, self.params.background))
        return scores, cam_mask(cams_fg, self.params.background)


class Labeler:
    """The configured method: the `seeds` stage, the `refiners` in order, and `pl_params` for
    the final mask."""

    def __init__(
        self, seeds: SeedStage, refiners: Sequence[Refiner], pl_params: PseudoLabelParams
    ) -> None:
        self.seeds = seeds
        self.refiners = list(refiners)
        self.pl_params = pl_params
        # The refiners run beside the networks up to the first one that runs on CPUs.
        self.split = next(
            (i for i, r in enumerate(self.refiners) if not r.accelerated), len(self.refiners)
        )

    @property
    def stages(self) -> tuple[str, ...]:
        """The stage names in order: the seed stage's ("cam"), then each refiner's."""
        return (self.seeds.name, *(r.name for r in self.refiners))

    def prepare(self, image: np.ndarray) -> dict[str, Any]:
        """Each refiner's `prepare(image)` by name: what does not depend on its params, for a
        caller that labels one image with many settings (calibration)."""
        return {r.name: r.prepare(image) for r in self.refiners}

    @torch.no_grad()
    def seed(
        self,
        image: np.ndarray,
        labels: Sequence[int],
        cams_fg: np.ndarray | None = None,
        prepared: Mapping[str, Any] | None = None,
    ) -> Partial:
        """The seed stage of uint8 (H, W, 3) `image` with class indices `labels` (1..K) and the
        accelerated refiners after them. `cams_fg` (K, H, W) skips computing the CAMs;
        `prepared` maps a refiner's name to its `prepare(image)`, computed once by a caller
        that labels an image many times."""
        labels = sorted(set(int(c) for c in labels))
        size = image.shape[:2]
        if not labels:  # a background-only image: nothing to compute or refine
            return Partial(Scores((0,), np.ones((1, *size), np.float32)), refined=-1)
        try:
            scores, mask = self.seeds.seed(image, labels, cams_fg)
        except Exception as exc:  # e.g. out of memory on a huge image
            raise StageError(self.seeds.name, exc) from exc
        partial = Partial(scores, {self.seeds.name: mask})
        return self._refine(image, partial, self.split, prepared)

    def finish(
        self, image: np.ndarray, partial: Partial, prepared: Mapping[str, Any] | None = None
    ) -> Labelled:
        """The remaining refiners and the final mask from the last stage's scores."""
        partial = self._refine(image, partial, len(self.refiners), prepared)
        size = image.shape[:2]
        if partial.refined < 0:  # background only: every stage's mask is background
            masks = {stage: np.zeros(size, np.uint8) for stage in self.stages}
        else:
            masks = partial.masks
        scores = partial.scores
        try:
            probs = scores.full_probabilities(size)
            mask, confidence, ignore_fraction = finalize(probs, scores.channels, self.pl_params)
        except Exception as exc:
            raise StageError(PSEUDO_LABEL_STAGE, exc) from exc
        return Labelled(masks, mask, confidence, ignore_fraction)

    def label(
        self, image: np.ndarray, labels: Sequence[int], cams_fg: np.ndarray | None = None
    ) -> Labelled:
        """Every stage of one image in this process."""
        return self.finish(image, self.seed(image, labels, cams_fg))

    def _refine(
        self, image: np.ndarray, partial: Partial, until: int, prepared: Mapping[str, Any] | None
    ) -> Partial:
        if partial.refined < 0:
            return partial
        scores, masks = partial.scores, dict(partial.masks)
        for refiner in self.refiners[partial.refined : until]:
            try:
                scores = refiner.refine(image, scores, (prepared or {}).get(refiner.name))
                masks[refiner.name] = scores.mask(image.shape[:2])
            except Exception as exc:
                raise StageError(refiner.name, exc) from exc
        return Partial(scores, masks, max(partial.refined, until))
