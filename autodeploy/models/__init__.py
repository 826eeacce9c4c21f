"""Model factory: sources (module, checkpoint folder, GGUF, config.json, the embedded default) to modules."""

from .default_model import default_model_path
from .factory import ModelFactory, resolve_device
from .source import ModelSource, resolve_source

__all__ = ["ModelFactory", "ModelSource", "default_model_path", "resolve_device", "resolve_source"]
