"""What every pooling is: the class score maps (B, K, h, w) of a classifier in, its logits (B, K)
out, as an `nn.Module` (so a member may have parameters and behave differently in training)
built from its validated `PoolingParams`.

Adding a pooling: a module in `wsss/poolings/` with a `PoolingParams` subclass whose `name` is
a one-value `Literal` (the name users write in `classifier.model.pooling`) and whose `build`
returns the module, decorated `@register`, and its import in `wsss/poolings/__init__.py`;
docs/architecture.md walks through it.
"""

from __future__ import annotations

from torch import nn

from wsss.params import Params, registrar


class PoolingParams(Params):
    """A pooling's settings; `name` tells the members apart in the configuration."""

    name: str

    def build(self) -> nn.Module:
        """The pooling module: (B, K, h, w) score maps -> (B, K) logits."""
        raise NotImplementedError(f"{type(self).__name__} builds no pooling")


POOLINGS: dict[str, type[PoolingParams]] = {}
register = registrar(POOLINGS, "pooling")
