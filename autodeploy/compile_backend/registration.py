"""The ``"autodeploy"`` Dynamo backend name, registered without importing torch.

``import autodeploy`` must stay light (the executor's scheduler and block manager are torch-free), yet
``torch.compile(model, backend="autodeploy")`` must work right after it. Two lazy mechanisms, both pointing at
``autodeploy_backend`` below, which imports the real backend only when Dynamo first calls it:

1. the ``torch_dynamo_backends`` entry point in ``pyproject.toml`` — torch's own plug-in mechanism: torch reads it
   the first time a backend name is looked up, so the name works in any process where the package is installed,
   even without ``import autodeploy`` (e.g. ``TrainingArguments(torch_compile_backend="autodeploy")``);
2. ``install()``, called by ``autodeploy/__init__.py``: registers the name with ``torch._dynamo.register_backend``
   at once if torch's backend registry is already imported, else from a one-shot import hook that fires when torch
   imports it (``torch.compile`` does, on first use). This covers source checkouts whose installed metadata
   predates the entry point, and costs nothing until then.

Whichever runs first wins; the other sees the name taken and does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any

BACKEND_NAME = "autodeploy"
_REGISTRY_MODULE = "torch._dynamo.backends.registry"


def autodeploy_backend(gm: Any, example_inputs: Any, **kwargs: Any) -> Any:
    """The registered Dynamo backend (see ``compile_backend.backend.autodeploy_backend``)."""
    from .backend import autodeploy_backend as compile_graph

    return compile_graph(gm, example_inputs, **kwargs)


def _register(registry: Any) -> None:
    if BACKEND_NAME in getattr(registry, "_COMPILER_FNS", {}):
        return
    registry.register_backend(compiler_fn=autodeploy_backend, name=BACKEND_NAME)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of torch's backend registry to register our name after it runs."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _REGISTRY_MODULE:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # one shot
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            _register(module)

        loader.exec_module = exec_then_register  # type: ignore[method-assign]  (this spec's own loader)
        return spec


def install() -> None:
    """Make ``backend="autodeploy"`` resolvable: now if torch's registry is loaded, else when it loads."""
    registry = sys.modules.get(_REGISTRY_MODULE)
    if registry is not None:
        _register(registry)
    elif not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
