"""The pooling family (`wsss.poolings.base`): each member one module, registered by name.

`Pooling` is the configuration's type for `classifier.model.pooling`: a union of the registered
members' `Params`, told apart by `name`; a bare name (`gap`) stands for that member with its
defaults, and a member without settings is written back as its bare name, so configurations and
model records from before the family read and hash as they did. A new member: its module in
this folder and its import below (docs/architecture.md).
"""

from typing import Annotated, Any, Union

from pydantic import BeforeValidator, Field, PlainSerializer

from wsss.poolings import global_pool, top_k  # noqa: F401  (importing registers the members)
from wsss.poolings.base import POOLINGS, PoolingParams, register


def _by_name(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


def _as_written(params: PoolingParams) -> str | dict:
    settings = params.model_dump(mode="json")
    return params.name if settings.keys() == {"name"} else settings


Pooling = Annotated[
    Union[tuple(POOLINGS.values())],  # noqa: UP007  (a union built from the registry)
    Field(discriminator="name"),
    BeforeValidator(_by_name),
    PlainSerializer(_as_written, when_used="json"),
]

__all__ = ["POOLINGS", "Pooling", "PoolingParams", "register"]
