"""Deep clustering refinement (Wang, Ma & You, Neurocomputing 2020), per image.

The image is cut into superpixels (SLIC, scikit-image); each region is described by the mean of
the classifier's features over its pixels and labelled by the mean of the incoming scores over
it. The most confident regions of each class train a small embedding and classifier: cross-
entropy separates the classes, the centre loss (Wen et al. 2016) pulls each class's embeddings
to its centre, so the regions the seeds miss are claimed by the class whose seeds they resemble.
The predicted regions become the next round's labels; after the last round the regions'
probabilities are the refined scores, constant inside each superpixel so that masks follow its
edges.

The paper trains its clustering over a dataset; here it is fitted on each image alone (a few
hundred regions, some milliseconds), so that it stays a refiner: scores in, scores out, with no
state between images.
"""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from skimage.segmentation import slic

from wsss.params import Params


class DeepClusteringParams(Params):
    """The superpixels, the region features and the clustering of `refine_by_clustering`."""

    levels: tuple[Annotated[int, Field(ge=0, le=3)], ...] = Field(
        (1, 2),
        min_length=1,
        description="The classifier's feature levels that describe a region (0: the finest, "
        "stride 4; 3: the deepest). The middle ones measured best on both datasets: the deepest "
        "see past a region's edges and carry a class's features into its surroundings.",
    )
    segments: int = Field(
        200, ge=2, le=100_000, description="Superpixels SLIC aims for in one image."
    )
    compactness: float = Field(
        10.0,
        gt=0,
        description="SLIC's balance of colour and space: higher gives squarer superpixels.",
    )
    seed_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Of the regions each class claims, the most confident fraction that trains "
        "the clustering (each labelled class keeps at least its best region).",
    )
    embedding: int = Field(32, ge=2, le=1024, description="Dimensions of the region embedding.")
    centre_weight: float = Field(
        0.1, ge=0, description="Weight of the centre loss next to the cross-entropy."
    )
    steps: int = Field(100, ge=1, le=10_000, description="Optimiser steps in each round.")
    rounds: int = Field(
        2, ge=1, le=20, description="Clustering rounds; each trains on the last one's labels."
    )
    learning_rate: float = Field(0.05, gt=0, description="Adam's step size.")
    seed: int = Field(0, ge=0, description="Seed of the embedding's initial weights.")


def superpixels(image: np.ndarray, params: DeepClusteringParams) -> np.ndarray:
    """SLIC regions of uint8 (H, W, 3) `image`: int64 (H, W) ids 0..R-1, each id used."""
    regions = slic(
        image,
        n_segments=params.segments,
        compactness=params.compactness,
        start_label=0,
        channel_axis=-1,
    )
    # SLIC can leave ids unused; number the regions that exist 0..R-1.
    _, dense = np.unique(regions, return_inverse=True)
    return dense.reshape(regions.shape).astype(np.int64)


def region_means(values: torch.Tensor, regions: torch.Tensor, n_regions: int) -> torch.Tensor:
    """The mean (R, D) over each region of `values` (D, H, W); `regions` (H, W) ids 0..R-1.
    `values` at a coarser grid than `regions` are upsampled (bilinear) channel block by channel
    block, so that memory stays at a block of full-resolution channels."""
    size = tuple(regions.shape)
    flat = regions.reshape(-1)
    counts = torch.zeros(n_regions, device=values.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.float32)
    )
    blocks = []
    for block in values.float().split(64):
        if tuple(block.shape[1:]) != size:
            block = F.interpolate(block[None], size, mode="bilinear", align_corners=False)[0]
        sums = torch.zeros(n_regions, block.shape[0], device=values.device)
        blocks.append(sums.index_add_(0, flat, block.reshape(block.shape[0], -1).T))
    return torch.cat(blocks, dim=1) / counts.clamp_min(1)[:, None]


def region_features(
    levels: list[torch.Tensor], regions: torch.Tensor, n_regions: int
) -> torch.Tensor:
    """Each region's features (R, D): the mean of each level (C_l, h_l, w_l) over the region,
    each level's vector scaled to unit length, concatenated."""
    return torch.cat(
        [F.normalize(region_means(level, regions, n_regions), dim=1) for level in levels], dim=1
    )


def training_regions(
    probs: torch.Tensor, labels: torch.Tensor, fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The regions that train a round, bool (R,), and the labels (R,) they train on: for each
    class, the `fraction` of the regions labelled with it whose probability of it is highest; a
    class no region is labelled with takes its most probable region (the image has each
    labelled class, so each keeps at least one region)."""
    labels = labels.clone()
    for c in range(probs.shape[1]):
        if not bool((labels == c).any()):
            labels[probs[:, c].argmax()] = c
    chosen = torch.zeros_like(labels, dtype=torch.bool)
    for c in labels.unique():
        members = (labels == c).nonzero()[:, 0]
        keep = max(1, math.ceil(fraction * len(members)))
        chosen[members[probs[members, c].argsort(descending=True)[:keep]]] = True
    return chosen, labels


def cluster_regions(
    features: torch.Tensor, probs: torch.Tensor, sizes: torch.Tensor, params: DeepClusteringParams
) -> torch.Tensor:
    """Refined probabilities (R, C) of regions with `features` (R, D), incoming probabilities
    `probs` (R, C) and pixel counts `sizes` (R,): `params.rounds` rounds of fitting an
    embedding and classifier to the confident regions' labels (cross-entropy + centre loss,
    regions weighted by size), each round's predictions the next one's labels."""
    n_regions, dims = features.shape
    n_classes = probs.shape[1]
    if n_classes == 1:
        return torch.ones_like(probs)
    generator = torch.Generator().manual_seed(params.seed)
    device = features.device
    labels = probs.argmax(dim=1)
    for _ in range(params.rounds):
        chosen, labels = training_regions(probs, labels, params.seed_fraction)
        weights = sizes[chosen] / sizes[chosen].sum()
        target = labels[chosen]
        # The embedding (w1, b1) and the classifier on it (w2, b2), drawn from the seeded
        # generator so that a refined image does not depend on torch's global random state.
        w1 = torch.randn(dims, params.embedding, generator=generator) / math.sqrt(dims)
        w2 = torch.randn(params.embedding, n_classes, generator=generator)
        w2 = w2 / math.sqrt(params.embedding)
        w1, w2 = w1.to(device).requires_grad_(), w2.to(device).requires_grad_()
        b1 = torch.zeros(params.embedding, device=device, requires_grad=True)
        b2 = torch.zeros(n_classes, device=device, requires_grad=True)
        centres = torch.zeros(n_classes, params.embedding, device=device, requires_grad=True)
        optimiser = torch.optim.Adam([w1, b1, w2, b2, centres], lr=params.learning_rate)
        x = features[chosen]
        with torch.enable_grad():
            for _ in range(params.steps):
                z = x @ w1 + b1
                logits = z @ w2 + b2
                cross_entropy = (F.cross_entropy(logits, target, reduction="none") * weights).sum()
                centre = (((z - centres[target]) ** 2).sum(dim=1) * weights).sum()
                loss = cross_entropy + params.centre_weight * centre
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        with torch.no_grad():
            probs = ((features @ w1 + b1) @ w2 + b2).softmax(dim=1)
        labels = probs.argmax(dim=1)
    return probs


def refine_by_clustering(
    image: np.ndarray,
    probs: np.ndarray,
    levels: list[torch.Tensor],
    params: DeepClusteringParams,
) -> np.ndarray:
    """Refined probabilities (C, H, W) float32 of uint8 (H, W, 3) `image` from its incoming
    per-pixel probabilities `probs` (C, H, W) and a network's feature levels of it (each
    (C_l, h_l, w_l), on the device the clustering runs on)."""
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be (C, *{image.shape[:2]}), got {probs.shape}")
    device = levels[0].device
    regions = torch.from_numpy(superpixels(image, params)).to(device)
    n_regions = int(regions.max()) + 1
    features = region_features(levels, regions, n_regions)
    region_probs = region_means(torch.from_numpy(probs).to(device), regions, n_regions)
    sizes = torch.bincount(regions.reshape(-1), minlength=n_regions).float()
    refined = cluster_regions(features, region_probs, sizes, params)
    return refined[regions].permute(2, 0, 1).float().cpu().numpy()
