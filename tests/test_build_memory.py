"""The build frees what it replaces: the source model's modules (which hold reference cycles) are collected right
after export, so weights the transforms fuse or quantize do not wait for the garbage collector."""

from __future__ import annotations

import gc
import json

import torch

from autodeploy.config import build_config
from autodeploy.models import ModelFactory
from autodeploy.transforms.pipeline import export_and_transform

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
    "max_position_embeddings": 512, "torch_dtype": "float32",
}


def _source_objects() -> set[int]:
    """Ids of the live source-model layers and float32 linears (other tests' models may still be alive)."""
    return {id(o) for o in gc.get_objects()
            if type(o).__name__ in ("LlamaMLP", "LlamaAttention")
            or (isinstance(o, torch.nn.Linear) and o.weight.dtype == torch.float32)}


def test_source_model_is_freed_during_the_build(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    factory = ModelFactory(str(tmp_path / "config.json"), device="cpu", random_weights=True)
    config = build_config({"quantize": "fp8", "max_batch_size": 4, "max_seq_len": 128})
    gc.collect()
    before = _source_objects()
    enabled = gc.isenabled()
    gc.disable()  # only the build's own collection may free the source model
    try:
        gm, _ = export_and_transform(factory, config)
        left = _source_objects() - before
    finally:
        if enabled:
            gc.enable()
    assert not left
    assert any(p.dtype == torch.float8_e4m3fn for p in gm.parameters())
