"""The random walk as a refiner (PSA, IRN): the CAMs' scores spread over AffinityNet's
affinities (`wsss.random_walk.propagate`), on the affinity network's grid."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from wsss.affinity import AffinityNet, predict_affinity
from wsss.cam import add_background
from wsss.random_walk import RandomWalkParams, propagate
from wsss.refiners.base import Refiner, Scores, register


def grid_scores(scores: torch.Tensor, stride: int) -> torch.Tensor:
    """Average-pool full-resolution scores (C, H, W) onto the stride grid (C, ceil(H/s),
    ceil(W/s)) that covers the image padded to a multiple of s, as AffinityNet's grid does.
    Padding replicates the border so edge cells are not diluted."""
    height, width = scores.shape[-2:]
    pad = (0, -width % stride, 0, -height % stride)
    padded = F.pad(scores[None], pad, mode="replicate") if any(pad) else scores[None]
    return F.avg_pool2d(padded, stride)[0]


@register
class RandomWalk(Refiner):
    """Walks the foreground channels it is given (their background is replaced by its own,
    `RandomWalkParams.background`); returns scores on the affinity grid."""

    name = "random_walk"
    params_type = RandomWalkParams
    networks = ("affinity",)
    accelerated = True

    @property
    def affinity_net(self) -> AffinityNet:
        return self.network("affinity")

    @torch.no_grad()
    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """AffinityNet's affinities (P, h, w) of the image, on the network's device."""
        return predict_affinity(self.affinity_net, image)

    @torch.no_grad()
    def refine(self, image: np.ndarray, scores: Scores, prepared: Any = None) -> Scores:
        params: RandomWalkParams = self.params
        net = self.affinity_net
        device = next(net.parameters()).device
        affinity = (self.prepare(image) if prepared is None else prepared).to(device)
        fg = torch.from_numpy(scores.full_resolution(image.shape[:2])[1:])
        # PSA ("power") walks the background as a channel of its own; IRN ("threshold") walks
        # the classes alone, rescales each to peak at 1 and then sets the constant background.
        power = params.background.method == "power"
        seeds = grid_scores(
            (add_background(fg, params.background) if power else fg).to(device), net.stride
        )
        walked = propagate(seeds, affinity, net.params.radius, params)
        if not power:
            walked = walked / walked.amax(dim=(1, 2), keepdim=True).clamp_min(1e-5)
            walked = add_background(walked, params.background)
        return Scores(scores.channels, walked.float().cpu().numpy(), net.stride)
