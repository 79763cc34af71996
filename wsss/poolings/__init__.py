"""The pooling family (`wsss.poolings.base`): each member one module, registered by name.

`Pooling` is the configuration's type for `classifier.model.pooling`: a union of the registered
members' `Params`, told apart by `name` (`wsss.params.registered_union`). A new member: its
module in this folder and its import below (docs/architecture.md).
"""

from wsss.params import registered_union
from wsss.poolings import global_pool, top_k  # noqa: F401  (importing registers the members)
from wsss.poolings.base import POOLINGS, PoolingParams, register

Pooling = registered_union(POOLINGS)

__all__ = ["POOLINGS", "Pooling", "PoolingParams", "register"]
