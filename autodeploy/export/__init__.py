"""``torch.export`` of Hugging Face causal LMs with dynamic batch and sequence, plus the export patches."""

from .export import export_causal_lm
from .patches import EXPORT_PATCHES, register_export_patch

__all__ = ["EXPORT_PATCHES", "export_causal_lm", "register_export_patch"]
