"""GGUF files converted once into a Hugging Face checkpoint folder, which later loads read instead.

transformers parses a GGUF file's metadata on every config, model and tokenizer load (five times for one engine:
about 28 s for the embedded SmolLM2 on a 2-core CPU) and dequantises its weights each time. The first load of a
GGUF file saves the dequantised float32 weights (``safetensors.torch.save_model``: transformers refuses to
``save_pretrained`` a model it loaded from GGUF), its config, generation config and tokenizer under
``cache_root()/gguf/<key>`` (key: the file's resolved path, size and modification time); every later load of that
file reads the folder as an ordinary safetensors checkpoint. The folder appears atomically (written under
a temporary name, then renamed), so concurrent first loads are safe. ``AUTODEPLOY_CACHE`` moves the cache (default
``$XDG_CACHE_HOME/autodeploy``, else ``~/.cache/autodeploy``); ``AUTODEPLOY_GGUF_CACHE=0`` turns it off. A cache
that cannot be written (a read-only home) only costs the speed: the GGUF file is then read directly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch

from .source import ModelSource

logger = logging.getLogger("autodeploy.models")

CACHE_ENV = "AUTODEPLOY_CACHE"
GGUF_CACHE_ENV = "AUTODEPLOY_GGUF_CACHE"


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "autodeploy"


def converted_folder(gguf: Path) -> Path:
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def _convert(gguf: Path, folder: Path) -> None:
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)  # an unwritable cache fails here, before the slow load
    logger.info("converting %s once into a checkpoint folder: %s", gguf.name, folder)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"))  # tied weights stored once
        config = model.config
        if hasattr(config, "quantization_config"):  # the GGUF marker: the saved weights are plain float32
            del config.quantization_config
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first: its folder is the same conversion
            if not (folder / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_checkpoint(source: ModelSource) -> ModelSource:
    """``source`` (a GGUF file) as its converted checkpoint folder, converting on first use; other sources, or
    a cache turned off or not writable, come back unchanged."""
    if source.kind != "gguf" or os.environ.get(GGUF_CACHE_ENV, "1") == "0":
        return source
    gguf = source.path / source.gguf_file
    folder = converted_folder(gguf)
    if not (folder / "config.json").exists():
        try:
            _convert(gguf, folder)
        except OSError as e:
            logger.warning("cannot cache the conversion of %s (%s); reading the GGUF file directly", gguf.name, e)
            return source
    return ModelSource("checkpoint", folder, origin=source.gguf_file)
