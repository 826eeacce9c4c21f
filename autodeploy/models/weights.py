"""Streaming safetensors weights into a (transformed) module whose parameters are still on the meta device.

Tensors are read one at a time (``safe_open``), cast and placed on the target device, so peak host memory
stays near one tensor. A module may register ``_autodeploy_weight_hooks`` — a dict from parameter name to a
function ``(full_tensor) -> tensor_for_this_module`` — so transforms that reshape parameters (sharding,
quantization) receive the checkpoint tensor and store their own form of it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..errors import ModelLoadError

logger = logging.getLogger("autodeploy.models")

WEIGHT_HOOKS_ATTR = "_autodeploy_weight_hooks"


def _checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors in {folder}", hint="convert the checkpoint to safetensors")
    return files


def _set_tensor(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    old = getattr(owner, attr)
    if isinstance(old, torch.nn.Parameter):
        setattr(owner, attr, torch.nn.Parameter(value, requires_grad=False))
    else:
        owner.register_buffer(attr, value)


def load_safetensors_into(
    module: torch.nn.Module,
    folder: Path,
    device: torch.device,
    dtype: torch.dtype,
    tied: dict[str, str] | None = None,
    known: dict[str, torch.Tensor] | None = None,
) -> int:
    """Fill the meta tensors of ``module`` from ``folder``; raise if any stays unfilled. Returns the count.

    ``tied`` maps a weight that checkpoints omit (a tied output embedding) to the one it shares; ``known``
    holds tensors computed at construction rather than stored (rotary frequencies and other buffers).
    """
    wanted = {
        name: t
        for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers()]
        if t.is_meta
    }
    hooks: dict[str, Callable[[torch.Tensor], torch.Tensor]] = getattr(module, WEIGHT_HOOKS_ATTR, {})
    for name, tensor in (known or {}).items():
        if name in wanted:
            _set_tensor(module, name, tensor.to(device))
            del wanted[name]
    loaded = 0
    files = _checkpoint_files(folder)
    with tqdm(total=len(wanted), desc="Loading weights", unit="tensor", disable=None) as bar:
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key not in wanted:
                        continue
                    tensor = f.get_tensor(key)
                    if tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    if key in hooks:
                        tensor = hooks[key](tensor)
                    _set_tensor(module, key, tensor.to(device))
                    del wanted[key]
                    loaded += 1
                    bar.update(1)
    for name, source in (tied or {}).items():
        if name in wanted:
            _set_tensor(module, name, module.get_parameter(source))
            del wanted[name]
    return loaded


def fill_from_state_dict(
    module: torch.nn.Module, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> int:
    """Fill the meta tensors of ``module`` from an in-memory state dict (same names). Returns the count."""
    hooks: dict[str, Callable[[torch.Tensor], torch.Tensor]] = getattr(module, WEIGHT_HOOKS_ATTR, {})
    filled = 0
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers()]:
        if t.is_meta and name in state:
            tensor = state[name].to(dtype) if state[name].is_floating_point() else state[name]
            if name in hooks:
                tensor = hooks[name](tensor)
            _set_tensor(module, name, tensor.to(device))
            filled += 1
    return filled


def meta_tensor_names(module: torch.nn.Module) -> list[str]:
    return [n for n, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers()] if t.is_meta]
