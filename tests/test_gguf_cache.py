"""The embedded GGUF model is converted once into a checkpoint folder in the cache, and read from there after."""

from __future__ import annotations

from autodeploy.models import default_model_path
from autodeploy.models.factory import ModelFactory
from autodeploy.models.gguf_cache import CACHE_ENV, GGUF_CACHE_ENV

TEXT = "Hello , world! Don't split   spaces.\n日本語 😀"


def test_conversion_is_cached_reused_and_equivalent(tmp_path, monkeypatch):
    gguf = default_model_path()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    first = ModelFactory(gguf, device="cpu")
    folder = first.source.path
    assert first.source.kind == "checkpoint" and folder.parent == tmp_path / "gguf"
    assert first.source.name == gguf.name  # what the user named, in messages
    weights = folder / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert {p.name for p in folder.iterdir()} >= {"config.json", "generation_config.json", "tokenizer.json"}
    assert not list(tmp_path.glob("gguf/.*.tmp"))

    again = ModelFactory(gguf, device="cpu")
    assert again.source.path == folder and weights.stat().st_mtime_ns == written  # read, not converted again

    monkeypatch.setenv(GGUF_CACHE_ENV, "0")
    direct = ModelFactory(gguf, device="cpu")
    assert direct.source.kind == "gguf"
    assert again.eos_token_ids == direct.eos_token_ids
    assert again.tokenizer(TEXT).input_ids == direct.tokenizer(TEXT).input_ids
    assert again.config.num_hidden_layers == direct.config.num_hidden_layers
    assert again.tokenizer.chat_template == direct.tokenizer.chat_template


def test_an_unwritable_cache_reads_the_gguf_file(tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocker))
    assert ModelFactory(default_model_path(), device="cpu").source.kind == "gguf"
