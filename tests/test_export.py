"""Export: graph contract, dynamic shapes, routed canonical ops, typed errors."""

from __future__ import annotations

import pytest
import torch

from autodeploy.errors import ExportError
from autodeploy.export import export_causal_lm
from autodeploy.models.tiny import tiny_model
from autodeploy.transforms.graph import find_nodes

MODELS = {
    "llama": {"autodeploy.torch_attention"},
    "gemma2": {"autodeploy.torch_attention"},
    "mixtral": {"autodeploy.torch_attention", "autodeploy.torch_moe"},
    "gpt_oss": {"autodeploy.torch_attention", "autodeploy.torch_moe"},
}


def _inputs(batch: int, seq: int, vocab: int = 512):
    ids = torch.randint(0, vocab, (batch, seq))
    return ids, torch.arange(seq).expand(batch, seq).contiguous()


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_export_matches_eager_on_new_shapes(model_type):
    model = tiny_model(model_type)
    gm = export_causal_lm(model)
    for batch, seq in [(1, 5), (3, 11)]:  # neither is the example shape (2, 8)
        ids, pos = _inputs(batch, seq)
        ref = model(input_ids=ids, position_ids=pos).logits
        torch.testing.assert_close(gm(ids, pos), ref, atol=1e-4, rtol=1e-4)
    layers = model.config.num_hidden_layers
    for op_name in MODELS[model_type]:
        op = getattr(torch.ops.autodeploy, op_name.split(".")[1]).default
        assert len(find_nodes(gm, op)) == layers


def test_parameters_keep_checkpoint_names():
    model = tiny_model("llama")
    gm = export_causal_lm(model)
    names = dict(gm.named_parameters())
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert names["model.layers.0.self_attn.q_proj.weight"] is model.model.layers[0].self_attn.q_proj.weight


def test_export_failure_is_typed():
    class Branchy(torch.nn.Module):
        config = None

        def forward(self, input_ids, position_ids, use_cache=False):
            if input_ids.sum() > 0:  # data-dependent control flow cannot be exported
                return input_ids.float()
            return -input_ids.float()

    with pytest.raises(ExportError) as info:
        export_causal_lm(Branchy())
    assert "Branchy" in str(info.value)
    assert "What to try" in str(info.value)
