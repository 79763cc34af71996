"""Pictures of masks and score maps: colourised masks, overlays, heatmaps and contact sheets.

Every function takes and returns numpy arrays ((H, W, 3) uint8 RGB for pictures) so the same code
renders the synthetic-data preview, the demo gallery and debugging dumps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from wsss.imageio import IGNORE_INDEX, check_mask


def _voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map (bits of the index spread over R, G, B from the top bit down),
    with the ignore index shown white instead of VOC's beige."""
    index = np.arange(256)
    palette = np.zeros((256, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    palette[IGNORE_INDEX] = (255, 255, 255)
    return palette.astype(np.uint8)


PALETTE = _voc_palette()
"""(256, 3) uint8: colour of each class index; 0 (background) is black, 255 (ignore) white."""

# Jet-like colour ramp for scores: dark blue (0) -> cyan -> yellow -> dark red (1).
_HEAT_STOPS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_HEAT_COLOURS = np.array(
    [(0, 0, 128), (0, 0, 255), (0, 255, 255), (255, 255, 0), (255, 0, 0), (128, 0, 0)],
    dtype=np.float64,
)


def colorize(mask: np.ndarray) -> np.ndarray:
    """(H, W) class indices (0..255) -> (H, W, 3) uint8 RGB in the `PALETTE` colours."""
    return PALETTE[check_mask(mask)]


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the class colours of `mask` over `image` with weight `alpha`; background (0) pixels
    keep the image so the scene stays readable."""
    image = _check_rgb(image, "image")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    colours = colorize(mask)
    if colours.shape != image.shape:
        raise ValueError(f"mask shape {np.shape(mask)} does not match image shape {image.shape}")
    blended = (1.0 - alpha) * image + alpha * colours.astype(np.float64)
    out = np.where((np.asarray(mask) != 0)[..., None], blended, image)
    return np.rint(out).astype(np.uint8)


def heatmap(score_map: np.ndarray) -> np.ndarray:
    """(H, W) scores in [0, 1] (a normalised CAM, a probability) -> (H, W, 3) uint8 RGB on a
    jet-like ramp from dark blue (0) to dark red (1)."""
    scores = np.asarray(score_map, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"score_map must be 2-D (H, W), got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("score_map contains NaN or infinite values")
    if scores.size and (scores.min() < -1e-6 or scores.max() > 1 + 1e-6):
        raise ValueError(
            f"score_map values must lie in [0, 1], got {scores.min():.4g}..{scores.max():.4g}; "
            "normalise or clip first"
        )
    channels = [np.interp(scores, _HEAT_STOPS, _HEAT_COLOURS[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def contact_sheet(
    rows: Sequence[Sequence[np.ndarray]],
    captions: Sequence[Sequence[str]] | None = None,
    tile_size: tuple[int, int] = (160, 160),
    pad: int = 4,
    font_size: int = 11,
) -> np.ndarray:
    """A grid of RGB tiles, each fitted into a `tile_size` (height, width) cell keeping its aspect
    ratio, with an optional caption (word-wrapped, PIL's default font) under each tile.

    `captions`, when given, has the shape of `rows`. Rows may differ in length; the sheet is as
    wide as the longest.
    """
    if not rows or not any(rows):
        raise ValueError("contact_sheet needs at least one tile")
    if captions is not None:
        if len(captions) != len(rows):
            raise ValueError(f"{len(captions)} caption rows for {len(rows)} tile rows")
        for r, (tiles, texts) in enumerate(zip(rows, captions, strict=True)):
            if len(texts) != len(tiles):
                raise ValueError(f"row {r}: {len(texts)} captions for {len(tiles)} tiles")
    tile_h, tile_w = tile_size
    if tile_h < 1 or tile_w < 1 or pad < 0:
        raise ValueError(f"tile_size must be positive and pad >= 0, got {tile_size}, {pad}")
    font = ImageFont.load_default(size=font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = font_size + 3
    wrapped = [[_wrap(text, font, measure, tile_w) for text in texts] for texts in (captions or [])]
    caption_h = line_h * max((len(lines) for row in wrapped for lines in row), default=0)

    n_cols = max(len(tiles) for tiles in rows)
    cell_h, cell_w = tile_h + caption_h + pad, tile_w + pad
    sheet = Image.new("RGB", (n_cols * cell_w + pad, len(rows) * cell_h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for r, tiles in enumerate(rows):
        for c, tile in enumerate(tiles):
            picture = Image.fromarray(_check_rgb(tile, f"tile (row {r}, column {c})"))
            scale = min(tile_h / picture.height, tile_w / picture.width)
            fitted = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
            # Nearest keeps mask edges and feature-grid cells crisp when enlarging.
            resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BOX
            picture = picture.resize(fitted, resample)
            left = pad + c * cell_w + (tile_w - fitted[0]) // 2
            top = pad + r * cell_h + (tile_h - fitted[1]) // 2
            sheet.paste(picture, (left, top))
            if captions is not None:
                for k, line in enumerate(wrapped[r][c]):
                    y = pad + r * cell_h + tile_h + k * line_h
                    draw.text((pad + c * cell_w, y), line, fill=(0, 0, 0), font=font)
    return np.asarray(sheet)


def _wrap(text: str, font, draw: ImageDraw.ImageDraw, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels (a single over-long word keeps its own line)."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=font) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


def _check_rgb(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(
            f"{what} must be (H, W, 3) uint8 RGB, got shape {array.shape} dtype {array.dtype}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{what} is empty: shape {array.shape}")
    return array
