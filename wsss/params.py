"""Base class for the parameter sections of each method stage.

Each stage module of `wsss` defines its own `...Params` model next to the mathematics it
parameterises, so the defaults and bounds live in exactly one place. The run configuration
in `pipelines.config` composes these sections; nothing here knows about files or Ray.
"""

from pydantic import BaseModel, ConfigDict


class Params(BaseModel):
    """Frozen, strictly validated parameter section: unknown fields are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)
