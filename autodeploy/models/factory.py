"""Model factory: a model source in, an ``nn.Module`` (real or meta), its config, tokenizer and stop tokens out.

- ``module``: the user's ``PreTrainedModel``, moved to the engine's device and dtype.
- ``checkpoint`` (safetensors folder): built with parameters on the meta device (buffers real), exported and
  transformed without weights; ``load_weights`` streams the tensors into the final graph afterwards.
- ``gguf``: converted once by transformers into a checkpoint folder in the cache (``gguf_cache.py``), which is
  then loaded as a checkpoint; loaded (and dequantised) by transformers directly when the cache is off.
- ``config`` (a bare ``config.json``): random weights built directly on the device (benchmarks).
"""

from __future__ import annotations

import json
import logging
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..errors import ModelLoadError, UnsupportedArchitectureError
from .architecture import check_config, check_modules
from .gguf_cache import cached_checkpoint
from .source import ModelSource, resolve_source
from .weights import fill_from_state_dict, load_safetensors_into, meta_tensor_names

logger = logging.getLogger("autodeploy.models")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _tied_output_embedding(model: torch.nn.Module) -> dict[str, str]:
    """``{output embedding weight name: input embedding weight name}`` when the model ties them."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None or not getattr(model.config, "tie_word_embeddings", False):
        return {}
    emb_in, emb_out = get_in(), get_out()
    names = {id(m): n for n, m in model.named_modules()}
    if emb_in is None or emb_out is None or id(emb_in) not in names or id(emb_out) not in names:
        return {}
    return {f"{names[id(emb_out)]}.weight": f"{names[id(emb_in)]}.weight"}


class ModelFactory:
    def __init__(
        self,
        model: torch.nn.Module | str | Path | None,
        *,
        dtype: str = "auto",
        device: str = "auto",
        random_weights: bool = False,
        tokenizer: Any = None,
        trust_remote_code: bool = False,
        load_eagerly: bool = False,
    ):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.source: ModelSource = cached_checkpoint(resolve_source(model))
        self.device = resolve_device(device)
        self._dtype_request = dtype
        self.random_weights = random_weights or self.source.kind == "config"
        self._tokenizer_arg = tokenizer
        self.trust_remote_code = trust_remote_code
        self.load_eagerly = load_eagerly
        self._tied: dict[str, str] = {}
        self._computed_buffers: dict[str, torch.Tensor] = {}

    # ---- config -------------------------------------------------------------------------------------------
    @cached_property
    def config(self) -> PretrainedConfig:
        src = self.source
        try:
            if src.kind == "module":
                return src.module.config
            if src.kind == "config":
                raw = json.loads(src.path.read_text())
                model_type = raw.pop("model_type", None)
                if model_type is None:
                    raise ModelLoadError(f"{src.path} has no model_type", hint="add the model_type field")
                return AutoConfig.for_model(model_type, **raw)
            kwargs = {"gguf_file": src.gguf_file} if src.kind == "gguf" else {}
            return AutoConfig.from_pretrained(str(src.path), trust_remote_code=self.trust_remote_code, **kwargs)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"cannot read the model config of {src.name}: {e}") from e

    @cached_property
    def dtype(self) -> torch.dtype:
        if self._dtype_request != "auto":
            return _DTYPES[self._dtype_request]
        if self.device.type == "cpu":
            return torch.float32
        if self.source.kind == "module":
            param = next(iter(self.source.module.parameters()), None)
            native = param.dtype if param is not None else torch.float32
        else:
            native = getattr(self.config, "dtype", None) or torch.float32
            native = _DTYPES.get(native, native) if isinstance(native, str) else native
        return torch.bfloat16 if native == torch.float32 else native

    @property
    def max_position_embeddings(self) -> int | None:
        cfg = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "max_seq_len"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def check_supported(self) -> None:
        """Refuse, before anything is built or exported, what is not a decoder-only text transformer."""
        model_type = getattr(self.config, "model_type", None)
        if self.source.kind != "module" and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r} has no causal-LM class in transformers",
                hint="autodeploy runs decoder-only text models (AutoModelForCausalLM)",
            )
        check_config(self.config, self._model_class())

    def _model_class(self) -> type | None:
        if self.source.kind == "module":
            return type(self.source.module)
        try:
            return AutoModelForCausalLM._model_mapping[type(self.config)]
        except (KeyError, ValueError):
            return None

    # ---- model --------------------------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        """The model to export: real weights on ``self.device``, or meta parameters for a checkpoint folder."""
        self.check_supported()
        model = self._build_model()
        check_modules(model)
        return model

    def _build_model(self) -> torch.nn.Module:
        src = self.source
        if src.kind == "module":
            return src.module.to(device=self.device, dtype=self.dtype).eval()
        if src.kind == "gguf":
            logger.info("loading %s (GGUF, dequantised by transformers)", src.gguf_file)
            model = AutoModelForCausalLM.from_pretrained(str(src.path), gguf_file=src.gguf_file, dtype=self.dtype)
            return model.to(self.device).eval()
        if src.kind == "checkpoint" and self.load_eagerly and not self.random_weights:
            model = AutoModelForCausalLM.from_pretrained(
                str(src.path), dtype=self.dtype, trust_remote_code=self.trust_remote_code
            )
            return model.to(self.device).eval()
        if self.random_weights:
            with torch.device(self.device):
                model = AutoModelForCausalLM.from_config(
                    self.config, dtype=self.dtype, trust_remote_code=self.trust_remote_code
                )
            return model.eval()
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(
                self.config, dtype=self.dtype, trust_remote_code=self.trust_remote_code
            )
        self._tied = _tied_output_embedding(model)
        self._computed_buffers = {name: b for name, b in model.named_buffers()}  # not in checkpoints
        return model.to("meta").eval()

    def load_weights(self, module: torch.nn.Module) -> int:
        """Fill every meta parameter of ``module`` (the transformed graph) from the checkpoint. Returns how many."""
        if self.source.kind != "checkpoint" or self.random_weights or self.load_eagerly:
            return 0
        loaded = load_safetensors_into(
            module, self.source.path, self.device, self.dtype, self._tied, self._computed_buffers
        )
        missing = meta_tensor_names(module)
        if missing:  # names differ from the checkpoint's: let transformers convert them (whole model in memory)
            logger.info("%d tensors need transformers' checkpoint conversion; loading with from_pretrained", len(missing))
            reference = AutoModelForCausalLM.from_pretrained(
                str(self.source.path), dtype=self.dtype, trust_remote_code=self.trust_remote_code
            )
            state = dict(reference.named_parameters(remove_duplicate=False))
            state.update(reference.named_buffers())
            loaded += fill_from_state_dict(module, state, self.device, self.dtype)
            del reference, state
        return loaded

    # ---- tokenizer and stop tokens ------------------------------------------------------------------------
    @cached_property
    def tokenizer(self) -> Any:
        if self._tokenizer_arg is not None and not isinstance(self._tokenizer_arg, (str, Path)):
            return self._tokenizer_arg
        src = self.source
        location, kwargs = None, {}
        if isinstance(self._tokenizer_arg, (str, Path)):
            location = str(self._tokenizer_arg)
        elif src.kind == "gguf":
            location, kwargs = str(src.path), {"gguf_file": src.gguf_file}
        elif src.kind == "checkpoint":
            location = str(src.path)
        elif src.kind == "config" and (src.path.parent / "tokenizer.json").exists():
            location = str(src.path.parent)
        elif src.kind == "module":
            name = getattr(src.module.config, "_name_or_path", "")
            location = name if name and Path(name).is_dir() else None
        if location is None:
            return None
        try:
            return AutoTokenizer.from_pretrained(location, trust_remote_code=self.trust_remote_code, **kwargs)
        except Exception as e:
            logger.warning("no tokenizer loaded from %s: %s", location, e)
            return None

    @cached_property
    def eos_token_ids(self) -> list[int]:
        ids: list[int] = []

        def add(value: Any) -> None:
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(v, int) and v not in ids:
                    ids.append(v)

        src = self.source
        if src.kind in ("checkpoint",) and (src.path / "generation_config.json").exists():
            add(GenerationConfig.from_pretrained(str(src.path)).eos_token_id)
        if src.kind == "module" and getattr(src.module, "generation_config", None) is not None:
            add(src.module.generation_config.eos_token_id)
        add(getattr(self.config, "eos_token_id", None))
        if self.tokenizer is not None:
            add(self.tokenizer.eos_token_id)
        return ids
