"""What every refiner is: scores in, better scores out, for one image.

A refiner is one stage after the CAMs (the random walk, the dense CRF; later clustering or a
segmentation network's inference). It receives the image's `Scores` (channel 0 the background,
channel i the i-th labelled class) and returns new ones; the labeling method (`wsss.labeling`)
chains the configured refiners in order and takes a mask after each, so every refiner is a stage
with its own mask and its own row in the evaluation.

Adding a refiner: a module in `wsss/refiners/` with a `Refiner` subclass decorated `@register`
(its `name` is the stage name and the configuration section of its `params_type`), imported in
`wsss/refiners/__init__.py`; docs/architecture.md walks through it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from wsss.params import Params
from wsss.pseudo_label import normalize_scores
from wsss.random_walk import upsample


@dataclass(frozen=True)
class Scores:
    """Non-negative scores (C, h, w) float32 of one image's channels, covering it at `stride`
    (1: full resolution; s: a grid of ceil(H/s) x ceil(W/s) cells over the image padded to a
    multiple of s). `channels` maps channel i to its class index, the background (0) first.
    `probabilities`: each pixel's scores already sum to 1 (a CRF's marginals)."""

    channels: tuple[int, ...]
    values: np.ndarray
    stride: int = 1
    probabilities: bool = False

    def full_resolution(self, size: tuple[int, int]) -> np.ndarray:
        """The scores (C, H, W) at the image's size `size`, negative values clipped to 0."""
        values = torch.from_numpy(self.values)
        if self.stride != 1 or tuple(values.shape[1:]) != tuple(size):
            values = upsample(values, self.stride, size)
        return values.clamp_min(0).numpy()

    def full_probabilities(self, size: tuple[int, int]) -> np.ndarray:
        """Per-pixel probabilities (C, H, W) at the image's size `size`: the scores at full
        resolution, normalised unless they are probabilities already."""
        values = self.full_resolution(size)
        return values if self.probabilities else normalize_scores(values)

    def mask(self, size: tuple[int, int]) -> np.ndarray:
        """(H, W) uint8: the class of the best channel at each pixel."""
        best = self.full_resolution(size).argmax(axis=0)
        return np.asarray(self.channels, dtype=np.uint8)[best]


class Refiner(ABC):
    """One refinement stage, built from its validated `params` and the trained networks it
    names in `networks` (e.g. the walk's "affinity"); `accelerated`: it runs beside the
    networks (on the GPU when there is one) rather than in the CPU part of a labeling job."""

    name: ClassVar[str]
    params_type: ClassVar[type[Params]]
    networks: ClassVar[tuple[str, ...]] = ()
    accelerated: ClassVar[bool] = False

    def __init__(self, params: Params, networks: Mapping[str, nn.Module] | None = None) -> None:
        if not isinstance(params, self.params_type):
            raise TypeError(f"{self.name} takes {self.params_type.__name__}, got {params!r}")
        self.params = params
        # Only the part of a labeling job that runs this refiner loads its networks.
        self.models = {n: m for n, m in (networks or {}).items() if n in self.networks}

    def network(self, name: str) -> nn.Module:
        if name not in self.models:
            raise ValueError(f"the {self.name} refiner needs the {name} network, not loaded here")
        return self.models[name]

    def prepare(self, image: np.ndarray) -> Any:
        """What this refiner computes from the image and its networks alone, whatever its
        params (the walk: the affinities), so that a caller trying many params (calibration)
        computes it once. Passed back to `refine`; None by default."""
        return None

    @abstractmethod
    def refine(self, image: np.ndarray, scores: Scores, prepared: Any = None) -> Scores:
        """Refined scores of `image` (H, W, 3) uint8; `prepared` from `prepare(image)` when the
        caller has it, else None (then the refiner prepares itself)."""


REFINERS: dict[str, type[Refiner]] = {}


def register(cls: type[Refiner]) -> type[Refiner]:
    """Class decorator: make `cls` selectable by its `name` in `refine.stages`."""
    if cls.name in REFINERS or cls.name == "cam":
        raise ValueError(f"a refiner named {cls.name!r} is registered already")
    REFINERS[cls.name] = cls
    return cls


def check_names(names: Sequence[str]) -> None:
    """ValueError unless every name in `names` is a registered refiner."""
    unknown = [name for name in names if name not in REFINERS]
    if unknown:
        raise ValueError(f"unknown refiner(s) {unknown}; registered: {sorted(REFINERS)}")


def networks_needed(names: Sequence[str]) -> list[str]:
    """The trained networks the refiners `names` need, in order, each once."""
    return list(dict.fromkeys(n for name in names for n in REFINERS[name].networks))


def build_refiners(
    stages: Sequence[tuple[str, Params]], networks: Mapping[str, nn.Module] | None = None
) -> list[Refiner]:
    """The refiners of `stages`, (registered name, its params) in order."""
    check_names([name for name, _ in stages])
    return [REFINERS[name](params, networks) for name, params in stages]
