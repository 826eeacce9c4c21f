"""Export patches: small, named context managers active while ``torch.export`` traces a model.

A patch is keyed on structure (the model uses an interface, a module has some attribute), never on a model's
class name. ``EXPORT_PATCHES`` is ordered; ``export.patches.<name>.enabled=false`` turns one off. Each yields
whether it applied, so the export report can say which patches were used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import ContextManager

import torch

from .route_attention import route_attention
from .route_experts import route_experts

ExportPatch = Callable[[torch.nn.Module], ContextManager[bool]]

EXPORT_PATCHES: dict[str, ExportPatch] = {
    "route_attention": route_attention,
    "route_experts": route_experts,
}


def register_export_patch(name: str, patch: ExportPatch) -> None:
    EXPORT_PATCHES[name] = patch


@contextlib.contextmanager
def apply_export_patches(model: torch.nn.Module, disabled: frozenset[str] = frozenset()) -> Iterator[list[str]]:
    """Enter every enabled patch; yields the names of those that applied."""
    applied: list[str] = []
    with contextlib.ExitStack() as stack:
        for name, patch in EXPORT_PATCHES.items():
            if name in disabled:
                continue
            if stack.enter_context(patch(model)):
                applied.append(name)
        yield applied
