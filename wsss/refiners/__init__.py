"""The refiner family (`wsss.refiners.base`): each member one module, registered by name.

A new member: its module in this folder and its import below; nothing else changes (the
configuration's `refine` section, the shards' stage columns and the evaluation's rows follow
from the registry and the configured stages). See docs/architecture.md.
"""

from wsss.refiners import crf, deep_clustering, random_walk  # noqa: F401  (importing registers the members)
from wsss.refiners.base import (
    REFINERS,
    Refiner,
    Scores,
    build_refiners,
    check_names,
    networks_needed,
    register,
)

__all__ = [
    "REFINERS",
    "Refiner",
    "Scores",
    "build_refiners",
    "check_names",
    "networks_needed",
    "register",
]
