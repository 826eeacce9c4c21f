"""User extensions: ``register_transform`` (whole transforms) next to ``register_pattern`` (search/replace pairs).

A registered transform is used by naming it in the config's ``transforms`` section (with its ``stage``);
``register_transform`` also accepts a plain function ``fn(gm, ctx) -> int`` (the number of matches).
"""

from __future__ import annotations

from collections.abc import Callable

from torch.fx import GraphModule

from .patterns import register_pattern
from .transforms.base import SharedContext, Transform, TransformInfo, TransformRegistry

GraphFunction = Callable[[GraphModule, SharedContext], int]


def register_transform(name: str, transform: type[Transform] | GraphFunction) -> type[Transform]:
    """Register ``transform`` (a ``Transform`` subclass, or a function returning its match count) as ``name``."""
    if isinstance(transform, type) and issubclass(transform, Transform):
        return TransformRegistry.register(name)(transform)

    fn = transform

    class FunctionTransform(Transform):
        __doc__ = fn.__doc__

        def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
            return TransformInfo(num_matches=int(fn(gm, ctx)))

    FunctionTransform.__name__ = f"FunctionTransform[{name}]"
    return TransformRegistry.register(name)(FunctionTransform)


__all__ = ["register_pattern", "register_transform"]
