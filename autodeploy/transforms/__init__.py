"""Graph transforms: the base class, the registry and the pipeline. One transform per file."""

from .. import custom_ops  # noqa: F401  (transforms emit and match the autodeploy:: ops)

from .base import SharedContext, Stage, Transform, TransformConfig, TransformInfo, TransformRegistry, get_history
from .pipeline import build_transforms, run_transforms

__all__ = [
    "SharedContext",
    "Stage",
    "Transform",
    "TransformConfig",
    "TransformInfo",
    "TransformRegistry",
    "build_transforms",
    "get_history",
    "run_transforms",
]
