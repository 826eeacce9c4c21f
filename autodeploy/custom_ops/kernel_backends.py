"""Kernel backends of the row/elementwise op families (rmsnorm, rope, glu): a dict lookup from config.

``kernel_op("torch_rmsnorm", "auto", device)`` is the op to call: the Triton twin (``triton/TRITON_OPS``) when
the backend is ``triton`` (``auto`` = Triton on CUDA), else the torch reference itself.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Literal

import torch

from ..errors import ConfigError

KernelBackend = Literal["auto", "torch", "triton"]


def triton_usable(device: torch.device) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_kernel_backend(backend: KernelBackend, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_usable(device) else "torch"
    if backend == "triton" and not triton_usable(device):
        raise ConfigError(f"the triton kernel backend needs triton and a CUDA device (got {device})")
    return backend


def kernel_op(reference: str, backend: KernelBackend, device: torch.device) -> Any:
    """The ``OpOverload`` implementing ``torch.ops.autodeploy.<reference>`` on the chosen backend."""
    if resolve_kernel_backend(backend, device) == "triton":
        from .triton import TRITON_OPS

        return getattr(torch.ops.autodeploy, TRITON_OPS[reference]).default
    return getattr(torch.ops.autodeploy, reference).default
