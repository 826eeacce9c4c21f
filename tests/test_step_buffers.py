"""The runner's step buffers: shape-determined layouts, aligned regions, graph inputs first."""

from __future__ import annotations

import torch

from autodeploy.executor.step_buffers import ALIGN, REGIONS, StepBuffers, step_layout


def test_layout_depends_on_the_shape_and_keeps_graph_inputs_before_the_fill_rows():
    layout, end = step_layout(tokens=5, seqs=3, logits=2, fills=2, pages=7)
    same_graph, _ = step_layout(tokens=5, seqs=3, logits=2, fills=0, pages=7)
    graph_regions = [name for name, _, _ in REGIONS if not name.startswith("fill_")]
    assert all(layout[name] == same_graph[name] for name in graph_regions)
    spans = sorted((off, off + n * dtype.itemsize) for off, n, dtype in layout.values())
    assert all(off % ALIGN == 0 for off, _ in spans)
    assert all(a_end <= b_off for (_, a_end), (b_off, _) in zip(spans, spans[1:]))  # no overlap
    assert end >= spans[-1][1] and end < 2048  # a small step moves a few hundred bytes, not the capacity
    assert layout["page_table"][1] == 3 * 7 and layout["cu_seqlens"][1] == 4


def test_host_and_device_views_are_typed_regions_of_one_buffer():
    buffers = StepBuffers(max_tokens=64, max_seqs=8, max_pages=4, device=torch.device("cpu"))
    buffers.begin(tokens=6, seqs=2, logits=2, fills=1)
    buffers.host("input_ids")[:] = torch.arange(6)
    buffers.host("page_table")[:] = 9
    buffers.upload()
    assert buffers.device("input_ids").dtype == torch.int64 and buffers.device("page_table").dtype == torch.int32
    assert buffers.device("input_ids").tolist() == list(range(6))
    assert buffers.device("page_table").tolist() == [9] * 8
    assert buffers.device("seq_lens").numel() == 2 and buffers.device("fill_rows").numel() == 1


def test_a_padded_step_finds_its_inputs_where_the_graph_was_captured():
    """Capture packs empty steps of each bucket; a real step padded to that bucket must land at the same
    addresses (the CUDA graph reads them), whatever its own sizes and tokens still on the device."""
    from autodeploy.executor.model_runner import StepEntry, TokenFill
    from autodeploy.models.tiny import tiny_model
    from engine_utils import build_engine

    runner = build_engine(tiny_model("llama"), device="cpu", max_batch_size=8).runner
    captured = {name: t.data_ptr() for name, t in runner._pack([], 0, pad_to=4).items()
                if isinstance(t, torch.Tensor) and t.numel()}
    decodes = [StepEntry([5], 3, [0], True), StepEntry([0], 7, [1], True)]
    fill = TokenFill([1], [0], torch.tensor([42]))
    step = runner._pack(decodes, 0, pad_to=4, fill=fill)
    assert {name: step[name].data_ptr() for name in captured} == captured
    assert step["input_ids"][0, :2].tolist() == [5, 42] and step["seq_lens"].tolist() == [1, 1, 1, 1]
