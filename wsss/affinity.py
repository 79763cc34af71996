"""Affinity labels from CAMs and AffinityNet (PSA / IRN; docs/architecture.md).

Stage 3 turns CAMs into a three-way label map (confident foreground class, confident background,
ignore) and, from it, labels for the pixel pairs of the radius neighbourhood: both background,
same foreground class, or different classes. Stage 4 trains AffinityNet, an embedding f whose
predicted affinity a_ij = exp(-mean_c |f_i - f_j|) should be high for the first two kinds of pair
and low for the third. Pairs and their (P, h, w) layout come from `wsss.neighbourhood`, shared
with the random walk: affinity[k, y, x] = a(p, p + offsets[k]) for p = (y, x).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field, model_validator
from torch import nn

from wsss.backbones import BackboneParams, backbone_from_params
from wsss.cam import otsu_threshold
from wsss.crf import CrfParams, dense_crf
from wsss.imageio import IGNORE_INDEX
from wsss.neighbourhood import offsets, shifted
from wsss.params import Params
from wsss.training import Batch, EpochEnd, OptimParams, check_samples, train_in_process
from wsss.transforms import AugmentParams, augment, check_image, normalize

# --- stage 3: affinity labels -----------------------------------------------------------------


class AffinityLabelParams(Params):
    """Thresholds that split CAMs into confident foreground, confident background and ignore.

    "absolute" (IRN) pads the background at the constants conf_fg / conf_bg. "otsu" places them
    per image around t, the Otsu threshold of m = max_c cam (`wsss.cam.otsu_threshold`): conf_fg
    becomes t + conf_fg * (max m - t), conf_bg becomes t - conf_bg * (t - min m), fractions of
    the way from t to the image's extremes, so confident regions are the upper and lower parts
    of each image's own two modes wherever its scores lie. IRN's constants
    fit ResNet-50 CAMs on VOC; on a pretrained Lite0's diffuse CAMs they marked half of all
    pixels foreground at 18-46% precision (docs/benchmarks.md).
    """

    mode: Literal["absolute", "otsu"] = "otsu"
    conf_fg: float = Field(0.30, gt=0, lt=1, description="background score padded for fg")
    conf_bg: float = Field(0.50, gt=0, lt=1, description="background score padded for bg")
    radius: int = Field(5, ge=1, description="pairs (i, j) with |i - j| < radius")
    use_crf: bool = Field(False, description="refine both padded maps with the dense CRF")
    crf: CrfParams = CrfParams()

    @model_validator(mode="after")
    def _bg_below_fg(self) -> AffinityLabelParams:
        if self.mode == "absolute" and self.conf_bg >= self.conf_fg:
            raise ValueError(f"conf_bg ({self.conf_bg}) must be below conf_fg ({self.conf_fg})")
        return self


def affinity_label_map(
    cams_fg: np.ndarray,
    labels: Sequence[int],
    params: AffinityLabelParams,
    image: np.ndarray | None = None,
) -> np.ndarray:
    """Affinity label map uint8 (h, w) of foreground CAMs (K, h, w) in [0, 1] (IRN).

    A pixel is its class c where c wins the argmax over [conf_fg, cams of the image's classes];
    else background (0) where the background wins with conf_bg padded instead, i.e. every CAM is
    at most conf_bg; else ignore (255). With `params.use_crf` each padded map is refined by the
    dense CRF on `image` (resized to the CAM grid) before its argmax, as IRN and PSA do.

    `labels` are the image's class indices in 1..K (CAM k belongs to class k + 1); CAMs of other
    classes are not used. The map has the CAMs' resolution: for AffinityNet training compute it
    at image resolution and let `train_affinity_net` reduce it to the feature grid.
    """
    cams_fg = np.asarray(cams_fg)
    if cams_fg.ndim != 3 or not np.issubdtype(cams_fg.dtype, np.floating):
        raise ValueError(
            f"cams_fg must be a float (K, h, w) array, got {cams_fg.dtype} {cams_fg.shape}"
        )
    n_classes, height, width = cams_fg.shape
    classes = sorted(set(int(c) for c in labels))
    for c in classes:
        if not 1 <= c <= n_classes:
            raise ValueError(f"label {c} is not a foreground class index in 1..{n_classes}")
    if params.use_crf:
        if image is None:
            raise ValueError("use_crf needs the image")
        check_image(image)
        if image.shape[:2] != (height, width):
            image = np.asarray(
                Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR)
            )
    # Channel 0 is background, channel i the i-th present class; class_of maps channels back.
    class_of = np.array([0, *classes], dtype=np.uint8)
    present = cams_fg[[c - 1 for c in classes]]

    def winner(background: float) -> np.ndarray:
        scores = np.concatenate([np.full((1, height, width), background, cams_fg.dtype), present])
        if params.use_crf:
            # dense_crf's unary is -log(score); a per-pixel scale would not change its result,
            # so the padded scores need no normalisation (PSA passes them as they are).
            scores = dense_crf(image, scores, params.crf)
        return class_of[scores.argmax(axis=0)]

    conf_fg, conf_bg = params.conf_fg, params.conf_bg
    if params.mode == "otsu" and classes:
        fg_max = present.max(axis=0)
        t = float(otsu_threshold(torch.from_numpy(fg_max)))
        low, high = float(fg_max.min()), float(fg_max.max())
        conf_fg, conf_bg = t + conf_fg * (high - t), t - conf_bg * (t - low)
    foreground = winner(conf_fg)
    out = np.where(winner(conf_bg) == 0, 0, IGNORE_INDEX).astype(np.uint8)
    out[foreground > 0] = foreground[foreground > 0]
    return out


def pair_labels(
    label_map: torch.Tensor | np.ndarray, radius: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels of the forward pairs of an affinity label map (..., h, w): bool tensors
    (bg_pos, fg_pos, neg), each (..., P, h, w) with P = len(offsets(radius)).

    Entry [..., k, y, x] is about the pair (p, p + offsets(radius)[k]), p = (y, x); a pair counts
    only when both ends are inside the grid and not ignore (255). bg_pos: both background;
    fg_pos: both the same foreground class; neg: different classes.
    """
    if isinstance(label_map, np.ndarray):
        label_map = label_map.copy()  # a flipped view has negative strides, which torch rejects
    labels = torch.as_tensor(label_map)
    if labels.ndim < 2 or labels.dtype != torch.uint8:
        raise ValueError(
            f"label_map must be uint8 (..., h, w), got {labels.dtype} {tuple(labels.shape)}"
        )
    known = labels != IGNORE_INDEX
    bg_pos, fg_pos, neg = [], [], []
    for dy, dx in offsets(radius):
        partner = shifted(labels, dy, dx, fill=IGNORE_INDEX)
        both = known & (partner != IGNORE_INDEX)
        same = both & (labels == partner)
        bg_pos.append(same & (labels == 0))
        fg_pos.append(same & (labels != 0))
        neg.append(both & (labels != partner))
    return tuple(torch.stack(group, dim=-3) for group in (bg_pos, fg_pos, neg))


def reduce_label_map(label_map: np.ndarray, stride: int) -> np.ndarray:
    """A full-resolution label map (H, W) on the stride-`stride` grid (ceil(H/s), ceil(W/s)).

    Cell (i, j) takes the label at pixel (i*s + s//2, j*s + s//2), the cell's centre, as nearest
    neighbour downsampling does (IRN); the grid covers the map padded with ignore to a multiple
    of the stride, like the image AffinityNet sees.
    """
    padded = pad_to_multiple(label_map, stride, IGNORE_INDEX)
    return np.ascontiguousarray(padded[stride // 2 :: stride, stride // 2 :: stride])


def pad_to_multiple(array: np.ndarray, stride: int, fill: float) -> np.ndarray:
    """Pad the last two axes of `array` at the bottom and right up to multiples of `stride`."""
    height, width = array.shape[-2:]
    pad = [(0, 0)] * (array.ndim - 2) + [(0, -height % stride), (0, -width % stride)]
    return np.pad(array, pad, constant_values=fill)


# --- stage 4: AffinityNet -------------------------------------------------------------------


class AffinityNetParams(Params):
    """AffinityNet architecture: the backbone, the pair radius and the embedding."""

    backbone: BackboneParams = BackboneParams()
    radius: int = Field(5, ge=1, description="pairs (i, j) with |i - j| < radius on the grid")
    # Stride of the grid the affinities (and the random walk) live on: 4 or 8 (PSA). 4 costs
    # about 3.5x the training time, but on the ~200 px synthetic images a stride-8 grid is too
    # coarse: the walk reaches 0.55 mIoU even with perfect affinities there, 0.87 at stride 4.
    feature_stride: int = Field(4, description="stride of the affinity grid: 4 or 8")
    # Channels each of layer1..layer4 is projected to; the embedding has their sum. PSA uses
    # 64 + 128 + 256 from three levels of ResNet-38.
    level_dims: tuple[int, int, int, int] = (32, 64, 128, 256)
    norm_groups: int = Field(8, ge=1, description="GroupNorm groups of each projection")

    @model_validator(mode="after")
    def _check(self) -> AffinityNetParams:
        if self.feature_stride not in (4, 8):
            raise ValueError(f"feature_stride must be 4 or 8, got {self.feature_stride}")
        for i, dim in enumerate(self.level_dims):
            if dim < 1 or dim % self.norm_groups:
                raise ValueError(
                    f"level_dims[{i}] = {dim} must be a positive multiple of norm_groups "
                    f"({self.norm_groups})"
                )
        return self

    @property
    def embed_dim(self) -> int:
        return sum(self.level_dims)


def _pair_slices(height: int, width: int, dy: int, dx: int) -> tuple[tuple, tuple]:
    """Index tuples (p, q) selecting every in-grid pixel p and its partner q = p + (dy, dx)."""
    # Empty when the offset reaches past the grid (stop clamped to start: no negative indices).
    rows = slice(0, max(0, height - dy))
    col_start = max(0, -dx)
    cols = slice(col_start, max(col_start, min(width, width - dx)))
    partner_rows = slice(rows.start + dy, rows.stop + dy)
    partner_cols = slice(cols.start + dx, cols.stop + dx)
    return (..., rows, cols), (..., partner_rows, partner_cols)


class PairwiseL1(torch.autograd.Function):
    """mean_c |f[p] - f[p + o_k]| for every offset o_k: (B, D, h, w) -> (B, P, h, w), 0 where
    p + o_k is off the grid.

    Written by hand because autograd would keep a shifted copy and a (B, D, h, w) difference per
    offset (P = 34 at radius 5) for the backward pass: at stride 4 that memory traffic cost ~45x
    the backbone. Here differences are taken between overlapping slices, and the backward pass
    recomputes them from f alone.
    """

    @staticmethod
    def forward(ctx, f: torch.Tensor, radius: int) -> torch.Tensor:
        ctx.save_for_backward(f)
        ctx.radius = radius
        batch, channels, height, width = f.shape
        out = f.new_zeros(batch, len(offsets(radius)), height, width)
        for k, (dy, dx) in enumerate(offsets(radius)):
            p, q = _pair_slices(height, width, dy, dx)
            out[:, k][p] = (f[p] - f[q]).abs_().mean(dim=1)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (f,) = ctx.saved_tensors
        height, width = f.shape[-2:]
        grad_f = torch.zeros_like(f)
        for k, (dy, dx) in enumerate(offsets(ctx.radius)):
            p, q = _pair_slices(height, width, dy, dx)
            g = (f[p] - f[q]).sign_().mul_(grad[:, k : k + 1][p] / f.shape[1])
            grad_f[p] += g  # d|f[p] - f[q]| / df[p] = sign
            grad_f[q] -= g  # and / df[q] = -sign
        return grad_f, None


class AffinityNet(nn.Module):
    """Backbone levels layer1..layer4, each projected (1x1 conv, GroupNorm, ReLU) and resized to
    the feature-stride grid, concatenated and mixed by a 1x1 conv into the embedding f."""

    def __init__(self, params: AffinityNetParams | None = None) -> None:
        super().__init__()
        params = params or AffinityNetParams()
        self.params = params
        self.backbone = backbone_from_params(params.backbone)
        self.projections = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, dim, kernel_size=1, bias=False),
                nn.GroupNorm(params.norm_groups, dim),
                nn.ReLU(inplace=True),
            )
            for channels, dim in zip(self.backbone.channels, params.level_dims, strict=True)
        )
        # No bias: it cancels in f_i - f_j.
        self.mix = nn.Conv2d(params.embed_dim, params.embed_dim, kernel_size=1, bias=False)

    @property
    def stride(self) -> int:
        return self.params.feature_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding (B, D, H/s, W/s) of images (B, 3, H, W) whose sides are multiples of s."""
        height, width = x.shape[-2:]
        if height % self.stride or width % self.stride:
            raise ValueError(
                f"image size {(height, width)} must be a multiple of the feature stride "
                f"{self.stride} (pad it with pad_to_multiple)"
            )
        grid = (height // self.stride, width // self.stride)
        levels = [
            F.interpolate(project(level), grid, mode="bilinear", align_corners=False)
            for project, level in zip(self.projections, self.backbone(x), strict=True)
        ]
        return self.mix(torch.cat(levels, dim=1))

    def affinities(self, f: torch.Tensor) -> torch.Tensor:
        """Affinities (B, P, h, w) of embeddings (B, D, h, w): entry [b, k, y, x] is
        exp(-mean_c |f[p] - f[p + offsets[k]]|), p = (y, x); meaningless where p + offsets[k]
        is off the grid (pair labels and the random walk skip those)."""
        return torch.exp(-PairwiseL1.apply(f, self.params.radius))


def affinity_loss(
    aff: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """PSA's loss bg_pos/4 + fg_pos/4 + neg/2: -log(a) over positive pairs, -log(1 - a) over
    negative ones, each averaged over its own pairs (a kind with no pairs adds 0).

    `aff` and the three bool masks share one shape, e.g. (B, P, h, w). Returns the loss and the
    three terms as floats.
    """
    for name, mask in (("bg_pos", bg_pos), ("fg_pos", fg_pos), ("neg", neg)):
        if mask.shape != aff.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"{name} must be a bool tensor of the affinities' shape {tuple(aff.shape)}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
    # The clamp keeps the log finite when an affinity saturates at 0 or 1.
    eps = 1e-5
    pos_cost = -torch.log(aff.clamp(min=eps))
    neg_cost = -torch.log((1 - aff).clamp(min=eps))

    def mean_over(cost: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (cost * mask).sum() / mask.sum().clamp(min=1)

    terms = {
        "bg_pos": mean_over(pos_cost, bg_pos),
        "fg_pos": mean_over(pos_cost, fg_pos),
        "neg": mean_over(neg_cost, neg),
    }
    loss = terms["bg_pos"] / 4 + terms["fg_pos"] / 4 + terms["neg"] / 2
    return loss, {name: term.item() for name, term in terms.items()}


def affinity_step_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """`step_loss` for `wsss.training.fit`: batch "image" (B, 3, H, W) with sides multiples of
    the feature stride, "label" (B, H/s, W/s) uint8 affinity label maps on the feature grid."""
    aff = model.affinities(model(batch["image"]))
    if batch["label"].shape[-2:] != aff.shape[-2:]:
        raise ValueError(
            f"label grid {tuple(batch['label'].shape[-2:])} does not match the feature grid "
            f"{tuple(aff.shape[-2:])}"
        )
    return affinity_loss(aff, *pair_labels(batch["label"], model.params.radius))


def affinity_example(
    image: np.ndarray,
    label_map: np.ndarray,
    rng: np.random.Generator,
    augment_params: AugmentParams,
    stride: int,
) -> dict[str, np.ndarray]:
    """One training example from an image and its full-resolution affinity label map: augmented
    jointly, padded to a multiple of `stride`, the label map then reduced to the feature grid.
    {"image": float32 (3, S, S), "label": uint8 (S/s, S/s)}."""
    image_chw, (label_crop,) = augment(image, rng, augment_params, masks=(label_map,))
    return {
        "image": pad_to_multiple(image_chw, stride, 0.0),
        "label": reduce_label_map(label_crop, stride),
    }


def _check_sample(sample: tuple[np.ndarray, np.ndarray]) -> None:
    image, label_map = sample
    check_image(image)
    if not isinstance(label_map, np.ndarray) or label_map.dtype != np.uint8:
        raise ValueError(f"label map must be a uint8 array, got {label_map!r:.60}")
    if label_map.shape != image.shape[:2]:
        raise ValueError(
            f"label map shape {label_map.shape} differs from the image's {image.shape[:2]}"
        )


def train_affinity_net(
    model: AffinityNet,
    samples: Sequence[tuple[np.ndarray, np.ndarray]],
    augment_params: AugmentParams,
    optim_params: OptimParams,
    seed: int,
    device: torch.device | str | None = None,
    on_epoch_end: EpochEnd | None = None,
) -> AffinityNet:
    """Train `model` (`wsss.networks.initial_network`, its backbone e.g. the trained
    classifier's) in this process on (image uint8 (H, W, 3), affinity label map uint8 (H, W))
    samples, label maps at image resolution (`affinity_label_map` on full-size CAMs). Epoch e's
    shuffling and augmentation depend only on (seed, e). Returns the model in eval mode."""
    check_samples(samples, _check_sample)

    def make_example(
        sample: tuple[np.ndarray, np.ndarray], rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        return affinity_example(*sample, rng, augment_params, model.stride)

    return train_in_process(
        model, samples, make_example, affinity_step_loss, optim_params, seed, device, on_epoch_end
    )


@torch.no_grad()
def predict_affinity(
    model: AffinityNet, image: np.ndarray, device: torch.device | str | None = None
) -> torch.Tensor:
    """Affinities float32 (P, ceil(H/s), ceil(W/s)) of one uint8 (H, W, 3) image, on the CPU,
    for the random walk. The image is padded to a multiple of the stride s, so the grid covers
    it as `wsss.random_walk.upsample` expects. `model` moves to `device` when one is given, else
    it runs where it is."""
    check_image(image)
    if device is not None:
        model.to(device)
    model.eval()
    x = torch.from_numpy(pad_to_multiple(normalize(image), model.stride, 0.0))[None]
    x = x.to(next(model.parameters()).device)
    return model.affinities(model(x))[0].float().cpu()
