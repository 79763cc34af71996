"""Image preprocessing for training and inference: numpy + PIL only, so that Ray Data can run it
in plain CPU tasks. Randomness comes from an explicit `np.random.Generator`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydantic import Field, model_validator

from wsss.imageio import IGNORE_INDEX
from wsss.params import Params

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class AugmentParams(Params):
    """Training augmentation. IRN on VOC (~500 px images): resize-long (320, 640), crop 512;
    the defaults scale that to the ~200 px synthetic images."""

    # The long side is resized to a length drawn uniformly from this closed range.
    resize_long: tuple[int, int] = (128, 256)
    flip: bool = True
    # Square crop; smaller images are padded (image with 0 after normalisation, masks with 255).
    crop_size: int = Field(default=192, gt=0)

    @model_validator(mode="after")
    def _check_resize_long(self) -> AugmentParams:
        low, high = self.resize_long
        if not 0 < low <= high:
            raise ValueError(f"resize_long must satisfy 0 < low <= high, got {self.resize_long}")
        return self


def check_image(image: np.ndarray) -> None:
    """Raise a ValueError unless `image` is a uint8 (H, W, 3) array."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"image must be a uint8 (H, W, 3) array, got {_describe(image)}")
    if image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image must be a non-empty (H, W, 3) array, got shape {image.shape}")


def _describe(array: object) -> str:
    if isinstance(array, np.ndarray):
        return f"{array.dtype} array of shape {array.shape}"
    return type(array).__name__


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> float32 (3, H, W) normalised with the ImageNet mean and std."""
    check_image(image)
    out = (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(out.transpose(2, 0, 1))


@dataclass(frozen=True)
class Placement:
    """Where an augmented crop's pixels come from: the (H, W) image resized to `resized` (h, w),
    flipped horizontally when `flip`, then the window of `extent` (h, w) at `source` (y, x) of
    it pasted at `target` (y, x) of the square crop."""

    size: tuple[int, int]
    resized: tuple[int, int]
    flip: bool
    source: tuple[int, int]
    target: tuple[int, int]
    extent: tuple[int, int]

    def as_array(self) -> np.ndarray:
        """float32 (11,): size, resized, flip, source, target, extent (a batchable example)."""
        values = (*self.size, *self.resized, float(self.flip), *self.source, *self.target)
        return np.array([*values, *self.extent], dtype=np.float32)

    @classmethod
    def from_array(cls, values: Sequence[float]) -> Placement:
        v = [int(round(float(x))) for x in values]
        return cls(
            (v[0], v[1]), (v[2], v[3]), bool(v[4]), (v[5], v[6]), (v[7], v[8]), (v[9], v[10])
        )


def draw_placement(
    size: tuple[int, int], rng: np.random.Generator, params: AugmentParams
) -> Placement:
    """A random resize-long, horizontal flip and square crop of an image of `size` (H, W)."""
    height, width = size
    long_side = int(rng.integers(params.resize_long[0], params.resize_long[1] + 1))
    scale = long_side / max(height, width)
    resized = (max(1, round(height * scale)), max(1, round(width * scale)))
    flip = bool(params.flip and rng.random() < 0.5)
    (src_y, dst_y, h), (src_x, dst_x, w) = (_crop_window(n, params.crop_size, rng) for n in resized)
    return Placement(size, resized, flip, (src_y, src_x), (dst_y, dst_x), (h, w))


def place(image: np.ndarray, placement: Placement, crop: int) -> np.ndarray:
    """uint8 (H, W, 3) image -> normalised float32 (3, crop, crop) as `placement` says, 0
    (the mean after normalisation) where the crop leaves the image."""
    out = np.zeros((3, crop, crop), dtype=np.float32)
    window = _window(_resized(image, placement, Image.Resampling.BILINEAR), placement)
    (dst_y, dst_x), (h, w) = placement.target, placement.extent
    out[:, dst_y : dst_y + h, dst_x : dst_x + w] = normalize(np.ascontiguousarray(window))
    return out


def _resized(array: np.ndarray, placement: Placement, resample: Image.Resampling) -> np.ndarray:
    height, width = placement.resized
    out = np.asarray(Image.fromarray(array).resize((width, height), resample))
    return out[:, ::-1] if placement.flip else out


def _window(array: np.ndarray, placement: Placement) -> np.ndarray:
    (src_y, src_x), (h, w) = placement.source, placement.extent
    return array[src_y : src_y + h, src_x : src_x + w]


def augment(
    image: np.ndarray,
    rng: np.random.Generator,
    params: AugmentParams,
    masks: Sequence[np.ndarray] = (),
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Random resize-long, horizontal flip and square crop (`draw_placement`), applied jointly
    to the image and its uint8 (H, W) masks (nearest-neighbour for masks).

    Returns the image as normalised float32 (3, crop, crop) and the masks as uint8
    (crop, crop), padded with 0 and 255 (ignore) respectively where the crop leaves the image.
    """
    check_image(image)
    height, width = image.shape[:2]
    for i, mask in enumerate(masks):
        shape = getattr(mask, "shape", None)
        if not isinstance(mask, np.ndarray) or mask.dtype != np.uint8 or shape != (height, width):
            raise ValueError(
                f"masks[{i}] must be a uint8 array of shape {(height, width)}, "
                f"got {_describe(mask)}"
            )
    placement = draw_placement((height, width), rng, params)
    crop = params.crop_size
    out_masks = []
    (dst_y, dst_x), (h, w) = placement.target, placement.extent
    for m in masks:
        out = np.full((crop, crop), IGNORE_INDEX, dtype=np.uint8)
        out[dst_y : dst_y + h, dst_x : dst_x + w] = _window(
            _resized(m, placement, Image.Resampling.NEAREST), placement
        )
        out_masks.append(out)
    return place(image, placement, crop), tuple(out_masks)


def _crop_window(length: int, crop: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """(source offset, destination offset, extent) along one axis: a random window of the image
    when it is longer than the crop, else the whole image at a random place in the crop."""
    extent = min(length, crop)
    src = int(rng.integers(0, length - extent + 1))
    dst = int(rng.integers(0, crop - extent + 1))
    return src, dst, extent
