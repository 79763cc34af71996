"""Which classes image-level labels can localise, told per class to the user.

Image-level labels teach a classifier where a class is only by contrast with images that lack
it. A class labelled in nearly every image (skin, hair and shoes in street-fashion photos) has
almost no such images, so its CAM follows whatever else co-occurs with it, background included,
and the pseudo-labels paint it over large parts of the image. Two numbers show it, neither needs
ground truth:

- presence: the fraction of images labelled with the class;
- area: the mean fraction of an image that a mask (the CAMs', the final pseudo-label) gives the
  class, over the images labelled with it.

A class is flagged when its presence or its area in the final mask exceeds `ClassReportParams`;
the report says which and why rather than leaving the user to find it in the masks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from pydantic import Field

from wsss.params import Params


class ClassReportParams(Params):
    """When a class is flagged as one that image-level labels cannot localise."""

    # With fewer than 1 image in 10 lacking a class the classifier has little to contrast it
    # with. Measured (docs/benchmarks.md): on CCP the classes at or above 0.9 (skin 1.00, shoes
    # 0.95, hair 0.92) have their CAM's peak on the class in 0-1% of images; dress (0.29) in 63%.
    max_presence: float = Field(
        0.9, gt=0, le=1, description="flag a class labelled in more than this fraction of images"
    )
    max_area: float = Field(
        0.5,
        gt=0,
        le=1,
        description="flag a class that the final masks give more than this fraction of the "
        "images labelled with it, on average",
    )


class ClassAreas:
    """Mergeable per-class sums: images labelled with each class and the fraction of each
    image's pixels that a mask gives it. Classes are indices 0..n_classes-1, 0 = background."""

    def __init__(self, n_classes: int, sums: np.ndarray | None = None) -> None:
        # Row 0: images labelled with the class; row 1: sum of its area fractions in them.
        self.n_classes = n_classes
        self.sums = np.zeros((2, n_classes)) if sums is None else np.asarray(sums, dtype=float)
        if self.sums.shape != (2, n_classes):
            raise ValueError(f"sums must have shape (2, {n_classes}), got {self.sums.shape}")

    def update(self, mask: np.ndarray, labels: Iterable[int]) -> None:
        """Add one image: its mask (H, W) of class indices and its labelled classes."""
        labels = sorted(set(int(c) for c in labels))
        if not labels:
            return
        counts = np.bincount(np.asarray(mask).ravel(), minlength=256)[: self.n_classes]
        self.sums[0, labels] += 1
        self.sums[1, labels] += counts[labels] / max(np.asarray(mask).size, 1)

    def merge(self, other: ClassAreas) -> ClassAreas:
        return ClassAreas(self.n_classes, self.sums + other.sums)

    def mean_area(self) -> np.ndarray:
        """Mean area fraction per class over the images labelled with it; NaN where none."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.sums[0] > 0, self.sums[1] / self.sums[0], np.nan)


def class_report(
    classes: Sequence[str],
    presence: np.ndarray,
    areas: dict[str, ClassAreas],
    params: ClassReportParams,
    final: str,
) -> list[dict]:
    """One entry per foreground class: its presence, its mean area in each mask of `areas`
    (e.g. {"cam": ..., "crf": ...}) and, when flagged, why. `final` names the mask whose area
    decides the flag. `presence` holds the fraction of images labelled with each class."""
    rows = []
    mean_areas = {stage: a.mean_area() for stage, a in areas.items()}
    for c in range(1, len(classes)):
        reasons = []
        if presence[c] > params.max_presence:
            reasons.append(
                f"labelled in {100 * presence[c]:.0f}% of images (> "
                f"{100 * params.max_presence:.0f}%): too few images without it to learn where "
                "it is"
            )
        final_area = mean_areas[final][c] if final in mean_areas else np.nan
        if final_area > params.max_area:
            reasons.append(
                f"covers {100 * final_area:.0f}% of the images labelled with it (> "
                f"{100 * params.max_area:.0f}%)"
            )
        rows.append(
            {
                "class": classes[c],
                "presence": round(float(presence[c]), 4),
                "area": {
                    stage: None if np.isnan(a[c]) else round(float(a[c]), 4)
                    for stage, a in mean_areas.items()
                },
                "flagged": bool(reasons),
                "why": "; ".join(reasons),
            }
        )
    return rows


def presence_rates(label_sets: Iterable[Iterable[int]], n_classes: int) -> np.ndarray:
    """Fraction of images labelled with each class index 0..n_classes-1 (background: 0)."""
    counts, images = np.zeros(n_classes), 0
    for labels in label_sets:
        images += 1
        for c in set(int(c) for c in labels):
            counts[c] += 1
    return counts / max(images, 1)


def format_class_report(rows: list[dict]) -> str:
    """Markdown table of `class_report` rows, in percent; flagged classes say why."""
    stages = list(rows[0]["area"]) if rows else []
    header = ["class", "labelled in", *(f"area ({s})" for s in stages), "localisable?"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        area_cells = [
            "-" if row["area"][s] is None else f"{100 * row['area'][s]:.0f}%" for s in stages
        ]
        verdict = f"NO: {row['why']}" if row["flagged"] else "yes"
        cells = [row["class"], f"{100 * row['presence']:.0f}%", *area_cells, verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
