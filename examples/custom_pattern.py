"""Register your own fusion with ``autodeploy.register_pattern``; ``match_custom_patterns`` applies it.

GPT-2 writes its tanh GELU out by hand (transformers' ``NewGELUActivation``): eight aten ops in every MLP. This
example gives that GELU one custom op of its own, ``my_ops::gelu_tanh`` (a torch reference plus a fake for
export, where a real deployment would call its fused kernel), registers the written-out formula as the search
pattern and the op as its replacement, and runs the ``match_custom_patterns`` transform of the default pipeline on
a tiny GPT-2. The search function is transformers' own module, so the pattern is exactly what the model exports.

    python examples/custom_pattern.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import NewGELUActivation

import autodeploy
from autodeploy.config import build_config
from autodeploy.export import export_causal_lm
from autodeploy.models.tiny import tiny_model
from autodeploy.transforms import SharedContext, build_transforms, get_history, run_transforms

GROUP = "example_gelu_tanh"


@torch.library.custom_op("my_ops::gelu_tanh", mutates_args=())
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


@gelu_tanh.register_fake
def _gelu_tanh_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def search(x: torch.Tensor) -> torch.Tensor:
    return NewGELUActivation()(x)  # 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))


def replace(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.my_ops.gelu_tanh(x)


# the example input is only traced: the pattern holds no sizes, so it matches the GELU of any shape
autodeploy.register_pattern(GROUP, search, replace, [torch.randn(2, 3, 8)])


def main() -> int:
    """Export a tiny GPT-2, apply the pattern, check the logits; returns the number of matches."""
    torch.manual_seed(0)
    model = tiny_model("gpt2")
    gm = export_causal_lm(model)

    config = build_config({"transforms.match_custom_patterns.groups": [GROUP]})
    transforms = [
        t for t in build_transforms(config) if t.name in ("cleanup_noop_ops", "match_custom_patterns")
    ]
    gm = run_transforms(gm, transforms, SharedContext())

    info = get_history(gm)["match_custom_patterns"]
    print(f"match_custom_patterns: {info.num_matches} matches {info.details['matches_by_pattern']}")
    for node in gm.graph.nodes:
        if node.target == torch.ops.my_ops.gelu_tanh.default:
            print(f"  {node.name} = my_ops.gelu_tanh({node.args[0].name})")

    ids = torch.randint(0, model.config.vocab_size, (3, 11))
    pos = torch.arange(11).expand(3, 11)
    with torch.no_grad():
        expected = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(gm(ids, pos), expected, atol=1e-5, rtol=1e-5)
    print("logits match the model's")
    return info.num_matches


if __name__ == "__main__":
    raise SystemExit(0 if main() > 0 else 1)
