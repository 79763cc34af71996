"""Class activation maps, IRN style: the classifier's seed maps (the plain CAM: relu of its class
score maps; `wsss.cam_methods`) summed over scales and horizontal flips, upsampled, each labelled
class divided by its maximum, unlabelled classes zeroed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from wsss import kept_seeds
from wsss.cam_methods import multi_hot
from wsss.params import Params
from wsss.transforms import check_image, normalize

Maps = TypeVar("Maps", np.ndarray, torch.Tensor)


class BackgroundParams(Params):
    """The background score set beside foreground scores in [0, 1]: a constant `threshold`
    (IRN), `(1 - max_c score) ** alpha` (PSA), or "otsu": per image, the Otsu threshold of
    max_c score over its pixels. Where it beats every class, a pixel is background; the CAM
    stage and the random walk each have their own.

    The constants fit one score distribution (IRN's 0.15 fits ResNet-50 CAMs on VOC); a
    pretrained backbone's CAMs are far more diffuse and their best constant moved to 0.7 on the
    synthetic set (docs/benchmarks.md). Otsu's threshold follows each image's own split between
    high (object) and low (background) scores, so it needs no constant."""

    method: Literal["threshold", "power", "otsu"] = "otsu"
    threshold: float = Field(default=0.15, ge=0, le=1)
    alpha: float = Field(default=16.0, gt=0)


# The constant backgrounds a sweep compares (IRN reports the best of such a sweep), over the
# whole useful range: with a pretrained backbone the best sat at 0.7-0.8 (docs/benchmarks.md).
CONSTANT_BACKGROUNDS = {
    t: BackgroundParams(method="threshold", threshold=t)
    for t in (round(float(x), 2) for x in np.arange(0.05, 1.0, 0.05))
}


class CamParams(Params):
    """Multi-scale inference and the background score used to turn CAMs into a segmentation."""

    scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
    flip: bool = True
    # IRN evaluates CAMs with a constant background of 0.15.
    background: BackgroundParams = BackgroundParams()

    @field_validator("scales")
    @classmethod
    def _check_scales(cls, scales: tuple[float, ...]) -> tuple[float, ...]:
        if not scales:
            raise ValueError("scales must not be empty")
        if any(not s > 0 for s in scales):
            raise ValueError(f"scales must all be positive, got {scales}")
        return scales


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def compute_cams_batch(
    model: nn.Module,
    images: torch.Tensor,
    label_mask: torch.Tensor,
    params: CamParams,
    output_size: tuple[int, int],
) -> torch.Tensor:
    """CAMs (B, K, oh, ow) of same-size normalised images (B, 3, H, W).

    `model` needs `seed_maps(x, label_mask) -> (B, K, h, w)` (a `Classifier`: its CAM method's,
    at any grid); it runs in eval mode on its own device (the result stays there). `label_mask`
    (B, K) bool marks each image's classes; the others are zero, labelled ones peak at 1 (unless
    the class never activates, then they stay 0).
    """
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"images must be a float (B, 3, H, W) tensor, got {images.dtype} {tuple(images.shape)}"
        )
    if label_mask.ndim != 2 or label_mask.shape[0] != images.shape[0]:
        raise ValueError(
            f"label_mask must be (B={images.shape[0]}, K), got {tuple(label_mask.shape)}"
        )
    model.eval()
    device = _model_device(model)
    images = images.to(device)
    batch, _, height, width = images.shape
    mask = label_mask.to(device)
    if params.flip:  # the flipped copies of the images have the same labels
        mask = torch.cat([mask, mask])
    total = None
    for scale in params.scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        x = images
        if size != (height, width):
            x = F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=scale < 1)
        if params.flip:  # both orientations in one forward pass
            x = torch.cat([x, x.flip(-1)])
        maps = model.seed_maps(x, mask)
        if params.flip:
            maps = maps[:batch] + maps[batch:].flip(-1)
        maps = F.interpolate(maps, output_size, mode="bilinear", align_corners=False)
        total = maps if total is None else total + maps
    if total.shape[1] != label_mask.shape[1]:
        raise ValueError(
            f"label_mask has {label_mask.shape[1]} classes, the model {total.shape[1]}"
        )
    total = total * label_mask.to(device=device, dtype=total.dtype)[:, :, None, None]
    return total / (total.amax(dim=(2, 3), keepdim=True) + 1e-5)


def compute_cams(
    model: nn.Module,
    image: np.ndarray,
    labels: Sequence[int],
    params: CamParams,
    device: torch.device | str | None = None,
    output_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """CAMs float32 (K, H, W) (or `output_size`) of one uint8 (H, W, 3) image with class
    indices `labels` in 1..K. `model` needs `seed_maps` and `n_classes`; it is moved to
    `device` when one is given, else it runs where it is."""
    check_image(image)
    if device is not None:
        model.to(device)
    label_mask = torch.from_numpy(multi_hot(labels, model.n_classes) > 0)[None]
    images = torch.from_numpy(normalize(image))[None]
    size = output_size if output_size is not None else image.shape[:2]
    cams = compute_cams_batch(model, images, label_mask, params, tuple(size))
    return cams[0].cpu().numpy()


def image_cams(
    model: nn.Module,
    image: np.ndarray,
    labels: Sequence[int],
    params: CamParams,
    kept: Mapping[int, np.ndarray] | None = None,
) -> np.ndarray:
    """The CAM stage's maps float32 (K, H, W) of one image: from the maps its CAM method kept
    while training on it (`kept`, {class: uint8 map}: OAA's; `wsss.kept_seeds.cams`) where it
    has them, else `compute_cams`."""
    if not kept:
        return compute_cams(model, image, labels, params)
    return kept_seeds.cams(
        kept,
        labels,
        image.shape[:2],
        model.n_classes,
        lambda: compute_cams(model, image, labels, params),
    )


def add_background(cams_fg: Maps, params: BackgroundParams) -> Maps:
    """Prepend a background channel to foreground CAMs (K, H, W) or (B, K, H, W): the constant
    `threshold`, or `(1 - max_c cam) ** alpha`. Numpy in, numpy out; tensor in, tensor out.
    """
    cams = torch.from_numpy(cams_fg) if isinstance(cams_fg, np.ndarray) else cams_fg
    if cams.ndim not in (3, 4) or cams.shape[-3] == 0:
        raise ValueError(f"cams must be (K, H, W) or (B, K, H, W) with K >= 1, got {cams.shape}")
    fg_max = cams.amax(dim=-3, keepdim=True)
    if params.method == "threshold":
        background = torch.full_like(fg_max, params.threshold)
    elif params.method == "otsu":
        background = otsu_threshold(fg_max).expand_as(fg_max)
    else:
        background = (1 - fg_max).clamp(0, 1) ** params.alpha
    out = torch.cat([background, cams], dim=-3)
    return out.numpy() if isinstance(cams_fg, np.ndarray) else out


def otsu_threshold(scores: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """Otsu's threshold of each map of `scores` (..., h, w), values in [0, 1]: the level that
    maximises the between-class variance of the values below and above it. Shape (..., 1, 1).
    """
    lead = scores.shape[:-2]
    flat = scores.reshape(-1, scores.shape[-2] * scores.shape[-1]).clamp(0, 1).float()
    index = (flat * (bins - 1)).round().long()
    hist = torch.zeros(flat.shape[0], bins, dtype=torch.float32, device=flat.device)
    hist.scatter_add_(1, index, torch.ones_like(flat))
    hist = hist / hist.sum(dim=1, keepdim=True)
    levels = torch.linspace(0, 1, bins, device=flat.device)
    weight_low = hist.cumsum(dim=1)
    mass_low = (hist * levels).cumsum(dim=1)
    total = mass_low[:, -1:]
    weight_high = 1 - weight_low
    between = (total * weight_low - mass_low) ** 2 / (weight_low * weight_high).clamp_min(1e-12)
    # Every level in a gap between the values splits them alike: take the gap's middle, the
    # midpoint between the last level of the low class and the first of the high one.
    between = between[:, :-1]
    near = between >= between.amax(dim=1, keepdim=True) * (1 - 1e-6)
    first = near.float().argmax(dim=1)
    last = near.shape[1] - 1 - near.flip(1).float().argmax(dim=1)
    threshold = ((levels[first] + levels[last + 1]) / 2).to(scores.dtype)
    return threshold.reshape(*lead, 1, 1)
