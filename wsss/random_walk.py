"""Random walk on AffinityNet's affinities (stage 5): CAM scores, background included, are
averaged over the radius neighbourhood with transition T = D^-1 A, A = a^beta, for 2**logt steps.

The walk keeps T sparse (N + 2 * pairs stored entries, N = h * w) and applies it step by step,
so memory is linear in pixels. PSA and IRN instead square a dense N x N matrix logt times,
which gives the same result but needs O(N^2) memory and O(N^3) time per squaring.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from pydantic import Field

from wsss.cam import BackgroundParams
from wsss.neighbourhood import offsets, pair_valid
from wsss.params import Params


class RandomWalkParams(Params):
    """Sharpening and length of the walk (PSA's defaults), and the background it is seeded with.

    Background "power" (PSA, alpha 16) walks (1 - max cam)^alpha as a channel of its own;
    "threshold" (IRN) walks the foreground alone, rescales each class to peak at 1 and then
    compares it with the constant threshold (IRN uses 0.25 there); "otsu" does as "threshold"
    with each image's Otsu threshold of the walked scores.
    """

    beta: float = Field(8.0, gt=0, description="exponent applied to affinities: A = a**beta")
    # PSA's 256 steps (logt 8) suit its stride-8 grid on ~500 px VOC images; on a grid of a
    # few dozen cells a side they spread every class over the image: synthetic set, Lite0,
    # stride 8: random walk 44.7 / CRF 65.0 mIoU at logt 4, 41.1 / 55.3 at 6 (docs/benchmarks.md).
    logt: int = Field(4, ge=0, le=16, description="log2 of the number of walk steps")
    # IRN's way with the per-image Otsu threshold in place of its constant 0.25: PSA's power
    # background is ~0 wherever diffuse CAMs are, and the walk then floods it (issue 14).
    background: BackgroundParams = BackgroundParams(method="otsu", threshold=0.25, alpha=16.0)

    @property
    def steps(self) -> int:
        return 2**self.logt


def transition_matrix(affinity: torch.Tensor, radius: int, beta: float) -> torch.Tensor:
    """Row-stochastic T = D^-1 A as a sparse CSR (N, N) tensor, N = h * w in raster order.

    A holds a**beta for both directions of every in-bounds pair of the radius neighbourhood and
    a self loop of weight 1 (as PSA), so it is symmetric with N + 2 * pairs stored entries.
    `affinity` is (P, h, w) with affinity[k, y, x] = a(p, p + offsets(radius)[k]), p = (y, x);
    entries whose partner falls outside the grid are ignored.
    """
    offs = offsets(radius)
    if affinity.dim() != 3 or affinity.shape[0] != len(offs):
        raise ValueError(
            f"affinity must have shape (P, h, w) with P = {len(offs)} offsets for radius "
            f"{radius}, got {tuple(affinity.shape)}"
        )
    p, h, w = affinity.shape
    n, device = h * w, affinity.device
    valid = pair_valid(h, w, radius).to(device)
    bad = valid & ~((affinity >= 0) & (affinity <= 1))
    if bool(bad.any()):
        k, y, x = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"affinity[{k}, {y}, {x}] = {float(affinity[k, y, x])} is not in [0, 1] "
            f"(pair offset {offs[k]} from pixel ({y}, {x}))"
        )

    # Row i of A as a stencil of 2P + 1 slots: i - o for each forward offset o (reversed), i,
    # i + o. The flat displacement dy * w + dx grows along this order, so the columns of a row's
    # stored entries ascend and the CSR arrays come out directly, without sorting.
    nodes = torch.arange(n, device=device)
    step = torch.tensor([dy * w + dx for dy, dx in offs], device=device)[:, None]
    forward = torch.where(valid, affinity**beta, 0.0).reshape(p, n)
    forward_stored = valid.reshape(p, n)
    # i - o lies on the grid exactly where the forward mask, turned by 180 degrees, is True.
    backward_stored = valid.flip(1, 2).reshape(p, n)
    backward_columns = nodes - step
    # A[i, i - o] = A[i - o, i], the forward weight kept at pixel i - o.
    backward = torch.where(backward_stored, forward.gather(1, backward_columns.clamp(0, n - 1)), 0)

    weights = torch.cat([backward.flip(0), torch.ones_like(forward[:1]), forward]).T
    stored = torch.cat(
        [backward_stored.flip(0), torch.ones_like(forward_stored[:1]), forward_stored]
    ).T
    columns = torch.cat([backward_columns.flip(0), nodes[None], nodes + step]).T
    values = (weights / weights.sum(dim=1, keepdim=True))[stored]
    row_starts = torch.zeros(n + 1, dtype=torch.int64, device=device)
    torch.cumsum(stored.sum(dim=1), dim=0, out=row_starts[1:])
    with warnings.catch_warnings():
        # torch flags every sparse CSR construction as beta; the operations used here are stable.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            row_starts, columns[stored], values, (n, n), check_invariants=False
        )


def propagate(
    scores: torch.Tensor, affinity: torch.Tensor, radius: int, params: RandomWalkParams
) -> torch.Tensor:
    """Walk every channel of `scores` (C, h, w) for 2**logt steps: x_{t+1} = T x_t.

    Runs on the device of the inputs in the dtype of `scores`; never forms a dense N x N matrix.
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must have shape (C, h, w), got {tuple(scores.shape)}")
    if affinity.dim() != 3 or affinity.shape[1:] != scores.shape[1:]:
        raise ValueError(
            f"affinity grid {tuple(affinity.shape[1:])} does not match scores grid "
            f"{tuple(scores.shape[1:])}"
        )
    if affinity.device != scores.device:
        raise ValueError(f"affinity is on {affinity.device} but scores on {scores.device}")
    c, h, w = scores.shape
    transition = transition_matrix(affinity.to(scores.dtype), radius, params.beta)
    x = scores.reshape(c, h * w).T.contiguous()
    for _ in range(params.steps):
        x = transition @ x
    return x.T.reshape(c, h, w)


def upsample(scores: torch.Tensor, stride: int, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear map of a stride-`stride` score map (C, ceil(H/s), ceil(W/s)) to (C, H, W).

    The grid covers the image padded up to a multiple of the stride, so scale by the stride and
    crop the padding away, as IRN does.
    """
    height, width = size
    grid = (math.ceil(height / stride), math.ceil(width / stride))
    if scores.dim() != 3 or tuple(scores.shape[1:]) != grid:
        raise ValueError(
            f"scores must have shape (C, {grid[0]}, {grid[1]}) for image size {size} at stride "
            f"{stride}, got {tuple(scores.shape)}"
        )
    scaled = F.interpolate(scores[None], scale_factor=stride, mode="bilinear", align_corners=False)
    return scaled[0, :, :height, :width]
