"""Base class for the parameter sections of each method stage.

Each stage module of `wsss` defines its own `...Params` model next to the mathematics it
parameterises, so the defaults and bounds live in exactly one place. The run configuration
in `pipelines.config` composes these sections; nothing here knows about files or Ray.
"""

from collections.abc import Callable
from typing import Annotated, Any, TypeVar, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer


class Params(BaseModel):
    """Frozen, strictly validated parameter section: unknown fields are an error, and so are
    infinite and NaN numbers (a bound like `gt=0` lets +inf through otherwise)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


P = TypeVar("P", bound=Params)


def registrar(registry: dict[str, type[P]], family: str) -> Callable[[type[P]], type[P]]:
    """The `@register` decorator of a family whose members are `Params` models told apart by a
    `name` field with a one-value default: it makes a member selectable by that name."""

    def register(cls: type[P]) -> type[P]:
        name = cls.model_fields["name"].default
        if not isinstance(name, str) or name in registry:
            raise ValueError(f"a {family} needs a new `name` with a default, got {name!r}")
        registry[name] = cls
        return cls

    return register


def _by_name(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


def _as_written(params: Params) -> str | dict:
    settings = params.model_dump(mode="json")
    return params.name if settings.keys() == {"name"} else settings


def registered_union(registry: dict[str, type[P]]) -> Any:
    """The configuration's type for a family: the union of its registered members, told apart by
    `name`. A bare name stands for that member with its defaults, and a member without settings
    is written back as its bare name, so configurations and model records written before a
    family gained members read and hash as they did. Build it after the members are imported."""
    return Annotated[
        Union[tuple(registry.values())],  # noqa: UP007  (a union built from the registry)
        Field(discriminator="name"),
        BeforeValidator(_by_name),
        PlainSerializer(_as_written, when_used="json"),
    ]
