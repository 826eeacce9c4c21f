"""autodeploy: unmodified Hugging Face causal LMs in, a fast engine out.

    import autodeploy
    llm = autodeploy.LLM("path/to/checkpoint")            # or a PreTrainedModel, a config.json, or None
    out = llm.generate(["The capital of France is"], autodeploy.SamplingParams(temperature=0, max_tokens=16))

Importing the package itself is light (no torch): the engine, the transforms and the ``autodeploy::`` custom
ops load on first use of ``LLM``, ``optimize``, ``register_pattern`` or ``register_transform``, and the
``torch.compile`` backend (``backend="autodeploy"``, see ``compile_backend/``) on first use by Dynamo.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    AutoDeployError,
    ConfigError,
    ExportError,
    KVCacheExhaustedError,
    ModelLoadError,
    PromptTooLongError,
    RequestError,
    TransformError,
    UnsupportedArchitectureError,
    VerificationError,
)
from .compile_backend.registration import install as _install_compile_backend
from .executor.sampling_params import SamplingParams

if TYPE_CHECKING:
    from .api import LLM, optimize
    from .extensions import register_pattern, register_transform

_LAZY = {"LLM": "api", "optimize": "api", "register_pattern": "extensions", "register_transform": "extensions"}

__version__ = "0.1.0"

_install_compile_backend()  # torch.compile(..., backend="autodeploy"), without importing torch here


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'autodeploy' has no attribute {name!r}")


__all__ = [
    "LLM",
    "AutoDeployError",
    "ConfigError",
    "ExportError",
    "KVCacheExhaustedError",
    "ModelLoadError",
    "PromptTooLongError",
    "RequestError",
    "SamplingParams",
    "TransformError",
    "UnsupportedArchitectureError",
    "VerificationError",
    "optimize",
    "register_pattern",
    "register_transform",
]
