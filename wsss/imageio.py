"""Decoding images and class-index masks from bytes, and encoding masks as PNG.

Every failure is an `ImageDecodeError` (a `ValueError`) with a message that says what was wrong
with the bytes, because the labeling pipeline turns these errors into per-row error records.
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IGNORE_INDEX = 255  # mask value for "no class": unlabelled, boundary or uncertain
# What PIL raises on malformed data besides OSError; PIL's plugins are not consistent.
_DECODER_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)
_MASK_MODES = ("L", "P", "1", "I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (empty, not an image, truncated, corrupt)."""


class ImageTooLargeError(ImageDecodeError):
    """The image header declares more pixels than allowed."""


class MaskFormatError(ImageDecodeError):
    """The image decodes but is not a single-channel class-index mask."""


def decode_image(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """Decode any image PIL reads to an (H, W, 3) uint8 RGB array, EXIF orientation applied.

    Alpha is dropped (not composited). 16-bit images are scaled from 0..65535 to 0..255; 32-bit
    integer images likewise when their values fit 16 bits, and float images from 0..1 when their
    values lie in that range; otherwise those two are stretched from their own min..max (they have
    no nominal range), so nothing is clipped.
    """
    im = _open(data, max_pixels)
    if im.mode.startswith("I") or im.mode == "F":
        gray = _high_depth_to_uint8(np.asarray(im), nominal_max=1.0 if im.mode == "F" else 65535)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode in ("P", "PA") or "transparency" in im.info:
        # Palette transparency must go through RGBA (PIL warns otherwise); the alpha is dropped.
        im = im.convert("RGBA")
    try:
        rgb = im.convert("RGB")
    except ValueError as e:
        raise ImageDecodeError(f"unsupported image mode {im.mode!r}: {e}") from e
    return np.asarray(rgb, dtype=np.uint8).copy()


def decode_mask(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """Decode a class-index mask to an (H, W) uint8 array.

    Palette PNGs give their palette indices (not their colours), grayscale images their values,
    1-bit images 0/1; 16/32-bit single-channel images are accepted when every value fits 0..255.
    Multi-channel images (RGB, RGBA, LA, ...) are rejected: colours are not class indices.
    """
    im = _open(data, max_pixels)
    if im.mode not in _MASK_MODES:
        raise MaskFormatError(
            f"mask must be a single-channel image (mode L or P), got mode {im.mode!r} with "
            f"{len(im.getbands())} channels; convert colour masks to class indices first"
        )
    values = np.asarray(im)
    if values.dtype != np.uint8:
        lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if lo < 0 or hi > 255:
            raise MaskFormatError(
                f"mask of mode {im.mode!r} has values {lo}..{hi}; class indices must lie in 0..255"
            )
    return values.astype(np.uint8)


def check_mask(mask: np.ndarray) -> np.ndarray:
    """`mask` as an array, or a ValueError unless it is (H, W) integer class indices 0..255."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"mask must have an integer dtype, got {mask.dtype}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"mask values must lie in 0..255, got {mask.min()}..{mask.max()}")
    return mask


def encode_mask(mask: np.ndarray, palette: np.ndarray | None = None) -> bytes:
    """Encode an (H, W) integer mask with values 0..255 as an 8-bit PNG: grayscale (mode L),
    or with a (256, 3) uint8 `palette` a palette PNG (mode P, VOC's way) whose indices are the
    same values."""
    mask = check_mask(mask)
    image = Image.fromarray(mask.astype(np.uint8))
    if palette is not None:
        image = image.convert("P")  # L -> P keeps each pixel's value as its index
        image.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def read_image(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """`decode_image` of a local file; decode errors name the file."""
    return _read(path, decode_image, max_pixels)


def read_mask(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """`decode_mask` of a local file; decode errors name the file."""
    return _read(path, decode_mask, max_pixels)


def _read(path, decode, max_pixels: int | None) -> np.ndarray:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return decode(data, max_pixels)
    except ImageDecodeError as e:
        raise type(e)(f"{os.fspath(path)}: {e}") from e


def _open(data: bytes, max_pixels: int | None) -> Image.Image:
    """Open, check the declared size, fully decode and apply the EXIF orientation."""
    if len(data) == 0:
        raise ImageDecodeError("empty data (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"image too large: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError(
            f"not an image: unrecognised format ({len(data)} bytes starting {data[:8]!r})"
        ) from e
    except _DECODER_ERRORS as e:
        raise ImageDecodeError(f"corrupt image header: {e}") from e
    width, height = im.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"image too large: {width}x{height} = {width * height} pixels > max_pixels {max_pixels}"
        )
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        # Refused rather than labelled on its first frame: an image-level label says nothing
        # about which frame shows the classes, and a mask of one frame fits none of the others.
        raise ImageDecodeError(
            f"{im.format} image with {frames} frames (animated or multi-page): store the frame "
            "to label as an image of its own"
        )
    try:
        im.load()
    except _DECODER_ERRORS as e:
        what = "truncated" if "truncated" in str(e) else "corrupt"
        raise ImageDecodeError(f"{what} {im.format} image ({width}x{height}): {e}") from e
    try:
        return ImageOps.exif_transpose(im)
    except _DECODER_ERRORS as e:
        raise ImageDecodeError(f"corrupt EXIF orientation in {im.format} image: {e}") from e


def _high_depth_to_uint8(values: np.ndarray, nominal_max: float) -> np.ndarray:
    """Linearly map 0..nominal_max to 0..255 when the values fit; else their own min..max."""
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        raise ImageDecodeError("image has no finite pixel values")
    lo, hi = float(values[finite].min()), float(values[finite].max())
    if lo < 0 or hi > nominal_max:
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
    else:
        lo, scale = 0.0, 255.0 / nominal_max
    scaled = np.where(finite, (values - lo) * scale, 0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
