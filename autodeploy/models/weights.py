"""Streaming safetensors weights into a (transformed) module whose parameters are still on the meta device.

Tensors are read one at a time (``safe_open``), cast and placed on the target device, so peak host memory
stays near one tensor. A module may register ``_autodeploy_weight_hooks`` — a dict from checkpoint key to a
function ``(full_tensor) -> tensor_for_this_module`` — so transforms that reshape parameters (sharding,
quantization) receive the checkpoint tensor and store their own form of it. A hooked tensor arrives as stored
and the hook's result is cast to the dtype of the (meta) parameter it fills, so fp8 codes and float32 scales
stay exact; a hook's key need not name a parameter of the module, and a hook may return
``{parameter name: tensor}`` to fill several parameters (a weight and its scale) at once.

A module may also register ``_autodeploy_param_hooks`` — a dict from parameter name to a function
``(tensor) -> tensor`` applied to whatever fills that parameter, after any checkpoint hook (tensor parallelism
keeps this rank's slice of a weight, including the quantized forms a checkpoint hook produces).
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
PARAM_HOOKS_ATTR = "_autodeploy_param_hooks"


def _checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors in {folder}", hint="convert the checkpoint to safetensors")
    return files


WeightHook = Callable[[torch.Tensor], "torch.Tensor | dict[str, torch.Tensor]"]
ParamHook = Callable[[torch.Tensor], torch.Tensor]


def _apply_hook(module: torch.nn.Module, key: str, tensor: torch.Tensor, dtype: torch.dtype,
                targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{parameter name: tensor}`` for one checkpoint tensor: the tensor cast to ``dtype``, or the checkpoint
    hook's result with each floating tensor cast to the dtype of its ``targets`` entry (the meta parameter it
    fills); then each parameter's own hook, if it has one."""
    hook = getattr(module, WEIGHT_HOOKS_ATTR, {}).get(key)
    if hook is None:
        result = {key: tensor.to(dtype) if tensor.is_floating_point() else tensor}
    else:
        result = hook(tensor)
        result = result if isinstance(result, dict) else {key: result}
    param_hooks: dict[str, ParamHook] = getattr(module, PARAM_HOOKS_ATTR, {})
    out = {}
    for name, value in result.items():
        target = targets.get(name)
        if hook is not None and target is not None and value.is_floating_point() and target.is_floating_point():
            value = value.to(target.dtype)
        out[name] = param_hooks[name](value) if name in param_hooks else value
    return out


def checkpoint_tensor_names(folder: Path) -> set[str]:
    """Every tensor name stored in the safetensors checkpoint ``folder`` (headers only)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    names: set[str] = set()
    for path in _checkpoint_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names.update(f.keys())
    return names


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
    hooks: dict[str, WeightHook] = getattr(module, WEIGHT_HOOKS_ATTR, {})
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
                    if key not in wanted and key not in hooks:
                        continue
                    filled = _apply_hook(module, key, f.get_tensor(key), dtype, wanted)
                    for name, tensor in filled.items():
                        _set_tensor(module, name, tensor.to(device))
                        if wanted.pop(name, None) is not None:
                            bar.update(1)
                    loaded += 1
    for name, source in (tied or {}).items():
        if name in wanted:
            _set_tensor(module, name, module.get_parameter(source))
            del wanted[name]
    return loaded


def fill_from_state_dict(
    module: torch.nn.Module, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> int:
    """Fill the meta tensors of ``module`` from an in-memory state dict (same names). Returns the count."""
    hooks: dict[str, WeightHook] = getattr(module, WEIGHT_HOOKS_ATTR, {})
    filled = 0
    meta = {n: t for n, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers()] if t.is_meta}
    for key in [k for k in state if k in meta or k in hooks]:
        for name, tensor in _apply_hook(module, key, state[key], dtype, meta).items():
            _set_tensor(module, name, tensor.to(device))
        filled += 1
    return filled


def meta_tensor_names(module: torch.nn.Module) -> list[str]:
    return [n for n, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers()] if t.is_meta]
