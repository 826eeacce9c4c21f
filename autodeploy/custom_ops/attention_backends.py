"""Cached-attention backends by name: which op implements the paged contract of ``cached_attention.py``.

``resolve_backend("auto", device)`` picks FlashInfer when importable on CUDA, else Triton on CUDA, else the
torch reference. Each backend says whether its op can be captured in a CUDA graph.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    load_op: Callable[[], Any]
    is_available: Callable[[torch.device], bool]
    cuda_graph_safe: bool

    @property
    def op(self) -> Any:
        return self.load_op()


def _torch_op():
    from . import cached_attention  # noqa: F401

    return torch.ops.autodeploy.torch_cached_attention.default


def _triton_op():
    from .triton import cached_attention  # noqa: F401

    return torch.ops.autodeploy.triton_cached_attention.default


def _flashinfer_op():
    from . import flashinfer_attention  # noqa: F401

    return torch.ops.autodeploy.flashinfer_cached_attention.default


def _triton_available(device: torch.device) -> bool:
    """On CUDA; on CPU only under the Triton interpreter (tests)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _flashinfer_available(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("flashinfer") is not None


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "torch": AttentionBackend("torch", _torch_op, lambda device: True, cuda_graph_safe=False),
    "triton": AttentionBackend("triton", _triton_op, _triton_available, cuda_graph_safe=True),
    "flashinfer": AttentionBackend("flashinfer", _flashinfer_op, _flashinfer_available, cuda_graph_safe=True),
}

AUTO_ORDER = ("flashinfer", "triton", "torch")


def resolve_backend(name: str, device: torch.device) -> AttentionBackend:
    if name == "auto":
        if device.type != "cuda":
            return ATTENTION_BACKENDS["torch"]
        for candidate in AUTO_ORDER:
            if ATTENTION_BACKENDS[candidate].is_available(device):
                return ATTENTION_BACKENDS[candidate]
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r}", hint=f"one of auto, {', '.join(ATTENTION_BACKENDS)}")
    backend = ATTENTION_BACKENDS[name]
    if not backend.is_available(device):
        raise ConfigError(
            f"attention backend {name!r} is not available on {device}",
            hint="use attn_backend=auto, or install the backend's package (pip install 'autodeploy[flashinfer]')",
        )
    return backend
