"""Deep clustering as a refiner: the incoming scores, as probabilities, re-decided per
superpixel by a clustering of the classifier's features (`wsss.deep_clustering`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from wsss.classifier import Classifier
from wsss.deep_clustering import DeepClusteringParams, refine_by_clustering
from wsss.refiners.base import Refiner, Scores, register
from wsss.transforms import normalize


@register
class DeepClustering(Refiner):
    name = "deep_clustering"
    params_type = DeepClusteringParams
    networks = ("classifier",)
    accelerated = True

    @torch.no_grad()
    def prepare(self, image: np.ndarray) -> list[torch.Tensor]:
        """The classifier's feature levels of the image, on the network's device."""
        net: Classifier = self.network("classifier")
        net.eval()
        device = next(net.parameters()).device
        x = torch.from_numpy(normalize(image))[None].to(device)
        return [level[0] for level in net.backbone(x)]

    def refine(self, image: np.ndarray, scores: Scores, prepared: Any = None) -> Scores:
        levels = self.prepare(image) if prepared is None else prepared
        levels = [levels[i] for i in self.params.levels]
        probs = scores.full_probabilities(image.shape[:2])
        refined = refine_by_clustering(image, probs, levels, self.params)
        return Scores(scores.channels, refined, probabilities=True)
