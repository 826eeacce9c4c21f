"""The transform interface: ``Stage``, ``TransformConfig``, ``TransformInfo``, ``Transform``, the registry.

A transform is one class in one file, registered under its name (= its YAML key = its file name). It
implements ``_apply(gm, ctx) -> TransformInfo`` and mutates ``gm`` in place. The base class owns what every
transform needs: skipping when disabled, timing, node counts, graph clean-up (dead code, recompile), shape
propagation after a change, logging, and the history kept in ``gm.meta["autodeploy_history"]``.

A transform reads only its own config and the ``SharedContext`` handed to it, never a global.
"""

from __future__ import annotations

import enum
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.fx import GraphModule

from ..custom_ops.kernel_backends import KernelBackend
from ..errors import AutoDeployError, ConfigError, TransformError
from .graph import canonicalize_graph, count_nodes, run_shape_prop

logger = logging.getLogger("autodeploy.transforms")

HISTORY_KEY = "autodeploy_history"


class Stage(str, enum.Enum):
    """Pipeline stages in the order they run (DESIGN.md, "The pipeline")."""

    FACTORY = "factory"
    EXPORT = "export"
    POST_EXPORT = "post_export"
    PATTERN_MATCHER = "pattern_matcher"
    QUANTIZATION = "quantization"
    SHARDING = "sharding"
    WEIGHT_LOAD = "weight_load"
    FUSION = "fusion"
    CACHE_INIT = "cache_init"
    COMPILE = "compile"

    @property
    def order(self) -> int:
        return list(Stage).index(self)


class TransformConfig(BaseModel):
    """Config every transform has; subclasses add typed fields. Unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    stage: Stage
    enabled: bool = True


class KernelBackendConfig(TransformConfig):
    """Config of a transform that swaps in an op family's kernels: ``auto`` is Triton on CUDA, the torch
    reference elsewhere."""

    backend: KernelBackend = "auto"


class TransformInfo(BaseModel):
    """What one transform did to the graph."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    stage: Stage | None = None
    skipped: bool = False
    num_matches: int = 0
    nodes_before: int = 0
    nodes_after: int = 0
    time_s: float = 0.0
    details: dict[str, Any] = Field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return not self.skipped and self.num_matches > 0


@dataclass
class SharedContext:
    """What transforms may know about the world beyond their config.

    ``factory`` builds the model and loads weights; ``cache`` describes the paged KV cache once the cache stage
    has set it up; ``device``/``dtype`` are where and in what precision the engine runs; ``rank``/``world_size``
    place this process in the tensor-parallel group (the sharding stage reads them); ``extras`` is for
    user transforms.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    factory: Any = None
    cache: Any = None
    runtime: Any = None
    rank: int = 0
    world_size: int = 1
    extras: dict[str, Any] = field(default_factory=dict)


class Transform(ABC):
    """Base class of every graph transform. Subclasses set ``config_class`` and implement ``_apply``."""

    config_class: ClassVar[type[TransformConfig]] = TransformConfig
    name: ClassVar[str] = ""

    def __init__(self, config: TransformConfig | dict[str, Any]):
        if isinstance(config, dict):
            config = self.parse_config(config)
        self.config = config

    @classmethod
    def parse_config(cls, raw: dict[str, Any]) -> TransformConfig:
        try:
            return cls.config_class(**raw)
        except Exception as e:  # pydantic.ValidationError carries the field names
            raise ConfigError(
                f"invalid config for transform {cls.name!r}: {e}", hint="check the keys under this transform in the YAML"
            ) from e

    def __call__(self, gm: GraphModule, ctx: SharedContext) -> GraphModule:
        info = TransformInfo(name=self.name, stage=self.config.stage, nodes_before=count_nodes(gm))
        if not self.config.enabled:
            info.skipped = True
        else:
            start = time.perf_counter()
            try:
                result = self._apply(gm, ctx)
            except AutoDeployError:
                raise
            except Exception as e:
                raise TransformError(
                    f"transform {self.name!r} failed: {type(e).__name__}: {e}",
                    where=f"stage {self.config.stage.value}",
                    hint=f"disable it with transforms.{self.name}.enabled=false and report the model",
                ) from e
            info = info.model_copy(update=result.model_dump(exclude={"name", "stage", "nodes_before"}))
            if info.changed:
                canonicalize_graph(gm)
                if self.requires_shape_prop:
                    run_shape_prop(gm, new_nodes_only=self.preserves_node_values)
            info.time_s = time.perf_counter() - start
        info.nodes_after = count_nodes(gm)
        gm.meta.setdefault(HISTORY_KEY, {})[self.name] = info
        logger.info(
            "%-28s %s matches=%d nodes %d->%d %.3fs",
            self.name,
            "skipped" if info.skipped else "       ",
            info.num_matches,
            info.nodes_before,
            info.nodes_after,
            info.time_s,
        )
        return gm

    #: shape propagation after a change; transforms whose later consumers need no ``meta["val"]`` turn it off
    requires_shape_prop: ClassVar[bool] = True
    #: the rewrite leaves what every surviving node computes unchanged (matching, fusion, cleanup), so only the
    #: new nodes need values; transforms that change shapes or dtypes in place (sharding) keep the full pass
    preserves_node_values: ClassVar[bool] = False

    @abstractmethod
    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        """Rewrite ``gm`` in place; return what was done (``num_matches`` > 0 means the graph changed)."""


class TransformRegistry:
    """Transforms by name. ``@TransformRegistry.register("match_rope")`` on the class."""

    _registry: ClassVar[dict[str, type[Transform]]] = {}

    @classmethod
    def register(cls, name: str):
        def decorator(transform_cls: type[Transform]) -> type[Transform]:
            transform_cls.name = name
            cls._registry[name] = transform_cls
            return transform_cls

        return decorator

    @classmethod
    def get(cls, name: str) -> type[Transform]:
        try:
            return cls._registry[name]
        except KeyError:
            raise ConfigError(
                f"unknown transform {name!r}",
                hint=f"known transforms: {', '.join(sorted(cls._registry))}; user transforms must be registered "
                "with autodeploy.register_transform before the pipeline is built",
            ) from None

    @classmethod
    def names(cls) -> list[str]:
        return sorted(cls._registry)


def get_history(gm: GraphModule) -> dict[str, TransformInfo]:
    return gm.meta.get(HISTORY_KEY, {})
