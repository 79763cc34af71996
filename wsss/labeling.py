"""The method applied to one image: CAM -> random walk -> dense CRF -> pseudo-label.

Split in two at the point where a distributed job hands work from accelerator to CPU:
`walk` runs the two networks (CAM and affinities) and the random walk, and returns small
grid-resolution scores; `finish` upsamples them, runs the CRF and writes the masks. The in-process
run and the Ray pipeline both call exactly these two functions, so they produce the same masks.

Channels: refined maps carry only the classes present in the image, channel 0 the background and
channel i the i-th labelled class (`channels` maps them back to class indices).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from wsss import random_walk
from wsss.affinity import AffinityNet, predict_affinity
from wsss.cam import BackgroundParams, CamParams, add_background, compute_cams
from wsss.classifier import Classifier
from wsss.crf import CrfParams, dense_crf
from wsss.pseudo_label import PseudoLabelParams, finalize, normalize_scores


@dataclass(frozen=True)
class Walked:
    """What the accelerator stage hands to the CPU stage for one image."""

    channels: tuple[int, ...]  # class index of each channel, background first
    cam_mask: np.ndarray  # (H, W) uint8: argmax of the CAMs with the constant background
    rw_scores: np.ndarray  # (C, h, w) float32 random-walk scores on the affinity grid
    stride: int  # of the affinity grid


@dataclass(frozen=True)
class Labelled:
    cam_mask: np.ndarray  # (H, W) uint8 class indices
    rw_mask: np.ndarray  # (H, W) uint8 class indices
    mask: np.ndarray  # (H, W) uint8 final pseudo-label, 255 = ignore
    confidence: float
    ignore_fraction: float


def cam_mask(cams_fg: np.ndarray, background: BackgroundParams) -> np.ndarray:
    """Segmentation (H, W) class indices from foreground CAMs (K, H, W) and a background."""
    return add_background(cams_fg, background).argmax(axis=0).astype(np.uint8)


def grid_scores(scores: torch.Tensor, stride: int) -> torch.Tensor:
    """Average-pool full-resolution scores (C, H, W) onto the stride grid (C, ceil(H/s),
    ceil(W/s)) that covers the image padded to a multiple of s, as AffinityNet's grid does.
    Padding replicates the border so edge cells are not diluted."""
    height, width = scores.shape[-2:]
    pad = (0, -width % stride, 0, -height % stride)
    padded = F.pad(scores[None], pad, mode="replicate") if any(pad) else scores[None]
    return F.avg_pool2d(padded, stride)[0]


@torch.no_grad()
def walk(
    image: np.ndarray,
    labels: Sequence[int],
    classifier: Classifier | None,
    affinity_net: AffinityNet,
    cam_params: CamParams,
    rw_params: random_walk.RandomWalkParams,
    cams_fg: np.ndarray | None = None,
    affinity: torch.Tensor | None = None,
) -> Walked:
    """CAMs, affinities and the random walk for one uint8 (H, W, 3) image with class indices
    `labels` (1..K). Runs on the models' device; returns CPU numpy arrays. `cams_fg` (K, H, W)
    and `affinity` (P, h, w) skip computing them when the caller has them already (then
    `classifier` may be None)."""
    labels = sorted(set(int(c) for c in labels))
    channels = (0, *labels)
    stride = affinity_net.stride
    if not labels:  # a background-only image: nothing to compute
        grid = tuple(-(-side // stride) for side in image.shape[:2])
        return Walked(
            channels, np.zeros(image.shape[:2], np.uint8), np.ones((1, *grid), np.float32), stride
        )
    if cams_fg is None:
        if classifier is None:
            raise ValueError("walk needs the classifier or the CAMs (cams_fg)")
        cams_fg = compute_cams(classifier, image, labels, cam_params)
    fg = torch.from_numpy(cams_fg[[c - 1 for c in labels]])
    background = rw_params.background
    device = next(affinity_net.parameters()).device
    if affinity is None:
        affinity = predict_affinity(affinity_net, image)
    affinity = affinity.to(device)
    # PSA ("power") walks the background as a channel of its own; IRN ("threshold") walks the
    # classes alone, rescales each to peak at 1 and then sets the constant background.
    power = background.method == "power"
    seeds = grid_scores((add_background(fg, background) if power else fg).to(device), stride)
    walked = random_walk.propagate(seeds, affinity, affinity_net.params.radius, rw_params)
    if not power:
        walked = walked / walked.amax(dim=(1, 2), keepdim=True).clamp_min(1e-5)
        walked = add_background(walked, background)
    return Walked(
        channels=channels,
        cam_mask=cam_mask(cams_fg, cam_params.background),
        rw_scores=walked.float().cpu().numpy(),
        stride=stride,
    )


def finish(
    image: np.ndarray, walked: Walked, crf_params: CrfParams, pl_params: PseudoLabelParams
) -> Labelled:
    """Upsample the walk to the image, run the dense CRF and make the final mask."""
    height, width = image.shape[:2]
    scores = random_walk.upsample(
        torch.from_numpy(walked.rw_scores), walked.stride, (height, width)
    )
    scores = scores.clamp_min(0).numpy()
    channels = np.asarray(walked.channels, dtype=np.uint8)
    probs = dense_crf(image, normalize_scores(scores), crf_params)
    mask, confidence, ignore_fraction = finalize(probs, walked.channels, pl_params)
    return Labelled(
        cam_mask=walked.cam_mask,
        rw_mask=channels[scores.argmax(axis=0)],
        mask=mask,
        confidence=confidence,
        ignore_fraction=ignore_fraction,
    )
