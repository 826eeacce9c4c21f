"""Cached-attention backends by name: which op implements the paged contract of ``cached_attention.py``.

``resolve_backend("auto", device, layers)`` picks FlashInfer when importable on CUDA and able to run every
layer, else Triton on CUDA, else the torch reference. Each backend says whether its op can be captured in a
CUDA graph, what in a graph's attention layers it cannot run, and (FlashInfer) how to make the per-step
planner the model runner calls before each step.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class AttentionLayerNeeds:
    """What one attention layer asks of a backend."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    dtype: torch.dtype
    sinks: bool = False
    alibi: bool = False
    chunked: bool = False


def _runs_anything(layers: Sequence[AttentionLayerNeeds]) -> str | None:
    return None


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    load_op: Callable[[], Any]
    is_available: Callable[[torch.device], bool]
    cuda_graph_safe: bool
    unsupported: Callable[[Sequence[AttentionLayerNeeds]], str | None] = _runs_anything
    load_planner_factory: Callable[[], Any] | None = None  # () -> make_planner(gm, spec, device, ...)

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


def _flashinfer_unsupported(layers: Sequence[AttentionLayerNeeds]) -> str | None:
    from .flashinfer_attention import unsupported_reason

    for layer in layers:
        reason = unsupported_reason(
            layer.head_dim, layer.v_head_dim, layer.dtype, layer.sinks or None, layer.alibi or None, layer.chunked or None
        )
        if reason is not None:
            return reason
    if len({(layer.num_q_heads, layer.num_kv_heads, layer.head_dim) for layer in layers}) > 1:
        return "layers with different head counts or sizes"
    return None


def _flashinfer_planner_factory():
    from .flashinfer_planner import make_planner

    return make_planner


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
    "flashinfer": AttentionBackend(
        "flashinfer",
        _flashinfer_op,
        _flashinfer_available,
        cuda_graph_safe=True,
        unsupported=_flashinfer_unsupported,
        load_planner_factory=_flashinfer_planner_factory,
    ),
}

AUTO_ORDER = ("flashinfer", "triton", "torch")


def resolve_backend(
    name: str, device: torch.device, layers: Sequence[AttentionLayerNeeds] = ()
) -> AttentionBackend:
    """The backend called ``name`` (or the best available for ``auto``) that can run every layer in ``layers``."""
    if name == "auto":
        if device.type != "cuda":
            return ATTENTION_BACKENDS["torch"]
        for candidate in AUTO_ORDER:
            backend = ATTENTION_BACKENDS[candidate]
            if backend.is_available(device) and backend.unsupported(layers) is None:
                return backend
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r}", hint=f"one of auto, {', '.join(ATTENTION_BACKENDS)}")
    backend = ATTENTION_BACKENDS[name]
    if not backend.is_available(device):
        raise ConfigError(
            f"attention backend {name!r} is not available on {device}",
            hint="use attn_backend=auto, or install the backend's package (pip install 'autodeploy[flashinfer]')",
        )
    reason = backend.unsupported(layers)
    if reason is not None:
        raise ConfigError(
            f"attention backend {name!r} cannot run this model's attention: {reason}",
            hint="use attn_backend=auto (it picks a backend that can) or attn_backend=triton",
        )
    return backend


def make_step_planner(
    gm, spec, kv_caches: Sequence[torch.Tensor], device: torch.device, block_size: int, max_pages_per_seq: int
) -> Any:
    """The per-step planner the runner must call before each step for ``spec.backend``, or None if it needs none."""
    backend = ATTENTION_BACKENDS.get(spec.backend)
    if backend is None or backend.load_planner_factory is None or not spec.layers:
        return None
    make_planner = backend.load_planner_factory()
    return make_planner(gm, spec, device, block_size, max_pages_per_seq, kv_caches[0].dtype)
