"""cleanup_noop_ops through the shared harness."""

from __future__ import annotations

import torch

from autodeploy.models.tiny import tiny_model
from transform_harness import check_transforms

aten = torch.ops.aten


def test_cleanup_removes_noops_and_keeps_outputs():
    _, history = check_transforms(
        tiny_model("llama"), ["cleanup_noop_ops"], absent=[aten._assert_tensor_metadata.default, aten.alias.default]
    )
    assert history["cleanup_noop_ops"].num_matches > 0
