"""Pixel pairs within a radius on a feature grid, shared by affinity labels, AffinityNet and the
random walk so that all three agree on which pairs exist and in which order."""

from __future__ import annotations

import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=32)
def offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """Offsets (dy, dx) to the neighbours of a pixel within Euclidean `radius`, one per
    unordered pair: the "forward" half-disk (dy > 0, or dy == 0 and dx > 0).

    The pair (p, p + o) for each o here covers every unordered pair {p, q} with
    0 < |p - q| < radius exactly once (the bound is strict, as in PSA and IRN).
    """
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    out = []
    for dy in range(0, radius):
        for dx in range(-radius + 1, radius):
            if dy == 0 and dx <= 0:
                continue
            if dy * dy + dx * dx < radius * radius:
                out.append((dy, dx))
    return tuple(out)


def pair_indices(height: int, width: int, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (src, dst) of every in-bounds pair on a height x width grid.

    Pairs are ordered offset-major: all pairs of offsets(radius)[0] first (in raster order of
    src), then offsets[1], and so on; `pair_valid` gives the same layout as a dense
    (P, height, width) mask so per-offset maps can be flattened to these pairs with
    `maps[valid]`.
    """
    valid = pair_valid(height, width, radius)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    src_all = (ys * width + xs).reshape(-1)
    srcs, dsts = [], []
    for k, (dy, dx) in enumerate(offsets(radius)):
        m = valid[k].reshape(-1)
        s = src_all[m]
        srcs.append(s)
        dsts.append(s + dy * width + dx)
    return torch.cat(srcs), torch.cat(dsts)


def pair_valid(height: int, width: int, radius: int) -> torch.Tensor:
    """Bool mask (P, height, width): True where pixel + offset k lies inside the grid."""
    offs = offsets(radius)
    valid = np.zeros((len(offs), height, width), dtype=bool)
    for k, (dy, dx) in enumerate(offs):
        # Clamped at 0: an offset longer than the grid has no valid pixel (a negative slice
        # end would wrap around instead).
        y1 = max(0, height - dy)
        x0, x1 = max(0, -dx), max(0, min(width, width - dx))
        valid[k, :y1, x0:x1] = True
    return torch.from_numpy(valid)


def shifted(maps: torch.Tensor, dy: int, dx: int, fill: float = 0.0) -> torch.Tensor:
    """maps[..., y + dy, x + dx] at [..., y, x], `fill` where that falls outside the grid."""
    h, w = maps.shape[-2:]
    out = torch.full_like(maps, fill)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    ys, yd = slice(max(0, dy), min(h, h + dy)), slice(max(0, -dy), min(h, h - dy))
    xs, xd = slice(max(0, dx), min(w, w + dx)), slice(max(0, -dx), min(w, w - dx))
    out[..., yd, xd] = maps[..., ys, xs]
    return out
