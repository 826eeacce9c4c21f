"""CLI subcommands. Each module has ``add_parser(subparsers, name)`` and ``run(args) -> int``."""

from __future__ import annotations

import importlib
from types import ModuleType


class _Lazy:
    """Imports a command's module only when it is used (``autodeploy run`` needs no FastAPI)."""

    def __init__(self, module: str):
        self.module = module

    def _load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def add_parser(self, sub, name: str) -> None:
        self._load().add_parser(sub, name)

    def run(self, args) -> int:
        return self._load().run(args)


COMMANDS = {
    "run": _Lazy("autodeploy.commands.run"),
    "inspect": _Lazy("autodeploy.commands.inspect"),
    "bench": _Lazy("autodeploy.bench.cli"),
    "serve": _Lazy("autodeploy.serve.cli"),
    "coverage": _Lazy("autodeploy.commands.coverage"),
}
