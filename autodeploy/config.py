"""Engine and pipeline configuration (pydantic, ``extra="forbid"``) read from ``configs/default.yaml``.

Overrides are plain keys or dotted paths (``"transforms.match_rope.enabled"``, ``"kv_cache.block_size"``), from
Python keyword arguments or the CLI's ``--set key=value``. ``config_hash()`` is stable across runs so caches
can key on it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError

DEFAULT_CONFIG = "default.yaml"
SHARDING_TRANSFORMS = ("detect_sharding", "shard_attention", "shard_mlp", "shard_moe", "shard_vocab")
QUANTIZE_TRANSFORMS = ("quantize_fp8_linear", "quantize_int8_linear", "quantize_int4_linear", "quantize_fp8_moe")


class KVCacheConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    block_size: int = Field(16, ge=1)
    free_memory_fraction: float = Field(0.85, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    dtype: Literal["auto", "fp8"] = "auto"
    scale: float = Field(1.0, gt=0.0)  # fp8 caches store k / scale and v / scale (per-tensor)


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    example_batch: int = Field(2, ge=2)
    example_seq: int = Field(8, ge=2)
    disabled_patches: list[str] = Field(default_factory=list)


class TorchCompileConfig(BaseModel):
    """``torch.compile`` of the non-attention glue of the cached graph (``executor/compile_glue.py``)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    backend: Literal["inductor", "aot_eager"] = "inductor"
    mode: str | None = None  # an Inductor mode, e.g. "max-autotune-no-cudagraphs"


class AutoDeployConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    random_weights: bool = False
    tokenizer: str | None = None
    trust_remote_code: bool = False
    max_batch_size: int = Field(64, ge=1)
    max_num_tokens: int = Field(8192, ge=1)
    max_seq_len: int | None = Field(None, ge=2)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    kv_cache: KVCacheConfig = Field(default_factory=KVCacheConfig)
    attn_backend: Literal["auto", "torch", "triton", "flashinfer"] = "auto"
    cuda_graphs: bool = True
    prefill_cuda_graph_tokens: int = Field(2048, ge=0)  # prefill-only steps up to this many tokens replay graphs
    torch_compile: TorchCompileConfig = Field(default_factory=TorchCompileConfig)
    async_scheduling: bool = True
    quantize: Literal[None, "fp8", "int8_weight_only", "int4_weight_only"] = None
    tensor_parallel_size: int = Field(1, ge=1)
    all_reduce: Literal["auto", "nccl"] = "auto"  # auto: symmetric memory for decode-sized CUDA messages
    seed: int = 0
    export: ExportConfig = Field(default_factory=ExportConfig)
    transforms: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def config_hash(self) -> str:
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_default_dict(name: str = DEFAULT_CONFIG) -> dict[str, Any]:
    text = resources.files("autodeploy.configs").joinpath(name).read_text()
    return yaml.safe_load(text) or {}


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "a.b.c", 1)`` sets ``d["a"]["b"]["c"] = 1``, creating the dicts on the way."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def merge_dicts(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge; dicts merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_cli_value(text: str) -> Any:
    """``--set k=v`` values are YAML scalars: ``true``, ``8``, ``0.5``, ``null``, ``[1, 2]`` or a string."""
    return yaml.safe_load(text)


def build_config(
    overrides: dict[str, Any] | None = None, base: dict[str, Any] | None = None
) -> AutoDeployConfig:
    """The default YAML (or ``base``), then ``overrides`` (plain, nested or dotted keys), validated."""
    tree = copy.deepcopy(base) if base is not None else load_default_dict()
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and "." not in key and isinstance(tree.get(key), dict):
            tree[key] = merge_dicts(tree[key], value)
        else:
            set_dotted(tree, key, value)
    try:
        config = AutoDeployConfig(**tree)
    except ValidationError as e:
        fields = ", ".join(".".join(str(p) for p in err["loc"]) for err in e.errors())
        raise ConfigError(f"invalid configuration ({fields}): {e}", hint="see autodeploy/configs/default.yaml") from e
    cached = config.transforms.get("insert_cached_attention")
    if cached is not None:
        cached.setdefault("backend", config.attn_backend)
        if config.kv_cache.dtype == "fp8":
            cached.setdefault("kv_cache_scale", config.kv_cache.scale)
    for name in QUANTIZE_TRANSFORMS:  # each acts when the flag names its format (or the checkpoint is quantized)
        quantize = config.transforms.get(name)
        if quantize is not None:
            quantize.setdefault("quantize", config.quantize)
    for name in SHARDING_TRANSFORMS:  # on only for tensor parallelism, unless a key says otherwise
        sharding = config.transforms.get(name)
        if sharding is not None:
            sharding.setdefault("enabled", config.tensor_parallel_size > 1)
    return config
