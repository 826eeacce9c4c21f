"""What a model source is: a ``PreTrainedModel``, a checkpoint folder, a GGUF file, a ``config.json``, or None.

``resolve_source`` turns the user's argument into a ``ModelSource`` without loading anything heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..errors import ModelLoadError
from .default_model import default_model_path

SourceKind = Literal["module", "checkpoint", "gguf", "config"]


@dataclass
class ModelSource:
    kind: SourceKind
    path: Path | None = None  # folder (checkpoint/gguf) or config.json file
    gguf_file: str | None = None
    module: torch.nn.Module | None = None
    origin: str | None = None  # what the user named, when this source stands in for it (a converted GGUF file)

    @property
    def name(self) -> str:
        if self.module is not None:
            return type(self.module).__name__
        if self.origin:
            return self.origin
        if self.gguf_file:
            return self.gguf_file
        return str(self.path)


def resolve_source(model: torch.nn.Module | str | Path | None) -> ModelSource:
    if model is None:
        gguf = default_model_path()
        return ModelSource("gguf", gguf.parent, gguf.name)
    if isinstance(model, torch.nn.Module):
        return ModelSource("module", module=model)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {str(path)!r} does not exist",
            hint="pass a checkpoint folder, a .gguf file, a config.json, a PreTrainedModel, or nothing for the "
            "embedded default (models are never downloaded from a hub)",
        )
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", path.parent, path.name)
    if path.is_file() and path.suffix == ".json":
        return ModelSource("config", path)
    if path.is_dir():
        if any(path.glob("*.safetensors")) or any(path.glob("*.bin")):
            return ModelSource("checkpoint", path)
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return ModelSource("gguf", path, ggufs[0].name)
        if (path / "config.json").exists():
            return ModelSource("config", path / "config.json")
    raise ModelLoadError(
        f"{str(path)!r} is neither a checkpoint folder (safetensors), a GGUF file nor a config.json",
        hint="point --model at the folder holding config.json and *.safetensors",
    )
