"""The FlashInfer attention backend: its planner's paged layout, backend choice, and the engine running on it.

On CPU the ``flashinfer`` package is replaced by ``fake_flashinfer`` (the wrappers computed in torch from the
planned layout only), so the planner, the op and the runner's planning hook are exercised end to end against
Hugging Face's greedy tokens. On a GPU with flashinfer installed the real kernels are checked against the torch
reference op.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

import numpy as np
import pytest
import torch

import fake_flashinfer
from autodeploy.custom_ops import attention_backends, flashinfer_attention
from autodeploy.custom_ops.attention_backends import AttentionLayerNeeds, resolve_backend
from autodeploy.custom_ops.flashinfer_planner import FlashInferPlanner, paged_layout
from autodeploy.custom_ops.step_layout import StepLayout
from autodeploy.errors import ConfigError
from autodeploy.models.tiny import tiny_model
from engine_utils import build_engine, greedy, hf_greedy, random_prompts


@pytest.fixture
def fake_flashinfer_on_cpu(monkeypatch):
    """FlashInfer 'available' on CPU, backed by the torch stand-in, for float32 and tiny head sizes."""
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer)
    backend = dataclasses.replace(attention_backends.ATTENTION_BACKENDS["flashinfer"], is_available=lambda d: True)
    monkeypatch.setitem(attention_backends.ATTENTION_BACKENDS, "flashinfer", backend)
    monkeypatch.setattr(flashinfer_attention, "SUPPORTED_DTYPES", (torch.float32, torch.float16, torch.bfloat16))
    monkeypatch.setattr(flashinfer_attention, "SUPPORTED_HEAD_DIMS", (8, 16, 32, 64, 128, 256))


def test_paged_layout_lists_each_sequences_pages():
    layout = StepLayout(
        seq_lens=np.array([5, 1, 1]),
        cache_lens=np.array([0, 7, 0]),  # the last row is CUDA-graph padding: one token, no cache
        cu_seqlens=np.array([0, 5, 6, 7]),
        page_table=np.array([[3, 9, 0], [4, 1, 2], [0, 0, 0]], dtype=np.int32),
        num_prefill=1,
        graph_bucket=None,
    )
    paged = paged_layout(layout, page_size=4)
    assert paged.kv_indptr.tolist() == [0, 2, 4, 5]
    assert paged.kv_indices.tolist() == [3, 9, 4, 1, 0]
    assert paged.kv_last_page_len.tolist() == [1, 4, 1]


def _needs(**kw):
    base = dict(num_q_heads=8, num_kv_heads=2, head_dim=128, v_head_dim=128, dtype=torch.bfloat16)
    return AttentionLayerNeeds(**{**base, **kw})


def test_auto_skips_flashinfer_for_what_it_cannot_run(monkeypatch):
    backend = dataclasses.replace(attention_backends.ATTENTION_BACKENDS["flashinfer"], is_available=lambda d: True)
    monkeypatch.setitem(attention_backends.ATTENTION_BACKENDS, "flashinfer", backend)
    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda, [_needs()]).name == "flashinfer"
    for layer in (_needs(sinks=True), _needs(alibi=True), _needs(chunked=True), _needs(head_dim=80, v_head_dim=80)):
        assert resolve_backend("auto", cuda, [layer]).name == "triton"
    with pytest.raises(ConfigError, match="attention sinks"):
        resolve_backend("flashinfer", cuda, [_needs(), _needs(sinks=True)])
    with pytest.raises(ConfigError, match="different head counts"):
        resolve_backend("flashinfer", cuda, [_needs(), _needs(num_q_heads=16)])


def test_graph_bucket_wrappers_are_fixed_per_bucket(fake_flashinfer_on_cpu):
    planner = FlashInferPlanner(
        [(None, 0, 0.0, 1.0)], num_q_heads=4, num_kv_heads=2, head_dim=16, page_size=4, max_pages_per_seq=3,
        q_dtype=torch.float32, kv_dtype=torch.float32, device=torch.device("cpu"),
    )  # fmt: skip

    def decode(batch: int, bucket: int | None) -> StepLayout:
        return StepLayout(
            np.ones(batch, dtype=np.int64), np.full(batch, 6), np.arange(batch + 1), np.zeros((batch, 3), np.int32),
            0, bucket,
        )  # fmt: skip

    planner.plan(decode(4, 4))
    first = planner.wrapper((None, 0, 0.0, 1.0))
    planner.plan(decode(4, 4))
    assert planner.wrapper((None, 0, 0.0, 1.0)) is first and first.use_cuda_graph and first.plans == 2
    planner.plan(decode(3, None))
    assert not planner.wrapper((None, 0, 0.0, 1.0)).use_cuda_graph
    with pytest.raises(RuntimeError, match="not planned"):
        planner.wrapper((0.5, 0, 0.0, 1.0))


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])  # gemma2: windowed and global layers, soft-cap
def test_engine_on_flashinfer_gives_hf_greedy_tokens(fake_flashinfer_on_cpu, model_type):
    model = tiny_model(model_type)
    engine = build_engine(model, attn_backend="flashinfer", max_num_tokens=16)  # 16: prompts are chunked
    graph = engine.runner.gm.graph
    targets = {n.target for n in graph.nodes if n.op == "call_function"}
    assert torch.ops.autodeploy.flashinfer_cached_attention.default in targets
    expected_variants = 2 if model_type == "gemma2" else 1
    assert len(engine.runner.attention_planner.variants) == expected_variants
    prompts = random_prompts([3, 17, 41], model.config.vocab_size)
    outputs = engine.generate(prompts, greedy(12))
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(model, prompt, 12)


_HAS_FLASHINFER = importlib.util.find_spec("flashinfer") is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not _HAS_FLASHINFER, reason="needs the flashinfer package")
@pytest.mark.parametrize("window, cap", [(0, 0.0), (24, 30.0)])  # each variant JIT-builds its own kernels
@pytest.mark.parametrize("mixed", [True, False])  # prefill + decode rows (prefill wrapper) / decode only
def test_flashinfer_kernels_match_the_torch_reference(window, cap, mixed):
    from autodeploy.custom_ops.flashinfer_planner import make_planner  # noqa: F401  (real flashinfer)

    torch.manual_seed(0)
    dev, dt, page, n_q, n_kv, d = torch.device("cuda"), torch.bfloat16, 16, 32, 8, 128
    seq_lens, cache_lens = ([37, 5, 1, 1, 1], [0, 20, 50, 3, 130]) if mixed else ([1] * 5, [0, 20, 50, 3, 130])
    num_prefill = 2 if mixed else 0
    pages_per_seq = 12
    num_blocks = len(seq_lens) * pages_per_seq
    page_table = torch.randperm(num_blocks, dtype=torch.int32).view(len(seq_lens), pages_per_seq)
    k_cache = torch.randn(num_blocks, page, n_kv, d, device=dev, dtype=dt)
    v_cache = torch.randn_like(k_cache)
    total = sum(seq_lens)
    q = torch.randn(1, total, n_q, d, device=dev, dtype=dt)
    k = torch.randn(1, total, n_kv, d, device=dev, dtype=dt)
    v = torch.randn(1, total, n_kv, d, device=dev, dtype=dt)
    cu = np.concatenate([[0], np.cumsum(seq_lens)])
    positions = np.concatenate([np.arange(c, c + n) for c, n in zip(cache_lens, seq_lens)])
    seq_of = np.repeat(np.arange(len(seq_lens)), seq_lens)
    slots = page_table.numpy()[seq_of, positions // page].astype(np.int64) * page + positions % page
    meta = [
        torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        torch.tensor(cu, dtype=torch.int32, device=dev),
        torch.tensor(cache_lens, dtype=torch.int32, device=dev),
        page_table.to(dev),
        torch.tensor(slots, device=dev),
        torch.tensor([num_prefill, int(cu[num_prefill]), len(seq_lens) - num_prefill], dtype=torch.int32),
    ]
    key = flashinfer_attention.variant_key(None, window, cap, 1.0)
    planner = FlashInferPlanner(
        [key], num_q_heads=n_q, num_kv_heads=n_kv, head_dim=d, page_size=page, max_pages_per_seq=pages_per_seq,
        q_dtype=dt, kv_dtype=dt, device=dev,
    )  # fmt: skip
    bucket = None if mixed else len(seq_lens)  # decode steps plan the CUDA-graph wrapper of their bucket
    layout = StepLayout(np.array(seq_lens), np.array(cache_lens), cu, page_table.numpy(), num_prefill, bucket)
    planner.plan(layout)
    args = (None, window or None, cap or None)
    ref_caches = (k_cache.clone(), v_cache.clone())
    out = torch.ops.autodeploy.flashinfer_cached_attention(q, k, v, k_cache, v_cache, *meta, *args)
    ref = torch.ops.autodeploy.torch_cached_attention(q, k, v, *ref_caches, *meta, *args)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(k_cache, ref_caches[0])
