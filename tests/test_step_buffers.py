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
