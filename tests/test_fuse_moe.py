"""``fuse_moe``: which ``torch_moe`` nodes become ``triton_moe``, on tiny models and after ``shard_moe``.

The kernel's numerics are ``test_moe_kernels.py``'s; here the graphs still compute what the model did (the
harness compares logits with HF eager), and a sharded layer (expert or tensor mode, each rank's graph built by
the real ``detect_sharding`` + ``shard_moe``) sums over the ranks to the unsharded layer on the fused op.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from transform_harness import check_transforms, count_op, make_transforms  # noqa: E402

import autodeploy.custom_ops.triton  # noqa: E402,F401  (registers the triton ops)
import autodeploy.distributed  # noqa: E402,F401  (registers autodeploy::all_reduce)
from autodeploy.export import export_causal_lm  # noqa: E402
from autodeploy.models.tiny import tiny_model  # noqa: E402
from autodeploy.transforms import SharedContext, run_transforms  # noqa: E402

ops = torch.ops.autodeploy
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON = {"fuse_moe": {"backend": "triton"}}


def test_fuse_moe_swaps_every_layer_gpt_oss():
    """gpt-oss: biases, interleaved gate/up, clamped ``swiglu_oai``, transposed expert weights.
    (Mixtral and Qwen3-MoE run through the whole engine in ``test_moe_engine.py``.)"""
    model = tiny_model("gpt_oss")
    layers = model.config.num_hidden_layers
    _, history = check_transforms(
        model, ["cleanup_noop_ops", "fuse_moe"], {ops.triton_moe.default: layers}, [ops.torch_moe.default],
        overrides=TRITON,
    )
    assert history["fuse_moe"].num_matches == layers


def test_fuse_moe_with_shared_experts_after_the_other_fusions():
    """Qwen2-MoE: a dense shared expert (with its sigmoid gate) beside the experts goes through the linear
    fusions and stays dense while the experts become ``triton_moe``."""
    model = tiny_model("qwen2_moe")
    layers = model.config.num_hidden_layers
    canonical = ["cleanup_noop_ops", "match_attention", "match_rope", "match_rmsnorm", "match_glu"]
    fusion = ["fuse_parallel_linears", "fuse_glu", "fuse_add_rmsnorm", "fuse_rope", "fuse_moe"]
    _, history = check_transforms(
        model,
        [*canonical, "match_moe", *fusion],
        {ops.triton_moe.default: layers},
        [ops.torch_moe.default],
        overrides=TRITON,
        reexport=False,
    )
    assert history["fuse_moe"].details["backend"] == "triton"


def test_fuse_moe_keeps_the_reference():
    """``backend: torch`` (and ``auto`` off CUDA) leave ``torch_moe`` in place."""
    gm = export_causal_lm(tiny_model("mixtral"))
    backends = ["torch"] if DEVICE.type == "cuda" else ["torch", "auto"]
    for backend in backends:
        transforms = make_transforms(["fuse_moe"], {"fuse_moe": {"backend": backend}})
        gm = run_transforms(gm, transforms, SharedContext())
        info = gm.meta["autodeploy_history"]["fuse_moe"]
        assert info.num_matches == 0 and info.details["backend"] == "torch"
        assert count_op(gm, ops.torch_moe.default) == 2 and count_op(gm, ops.triton_moe.default) == 0


def test_fuse_moe_keeps_what_the_kernel_cannot_run():
    """float64 experts stay on the reference (listed in the details); the graph still computes the same."""

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w_up = torch.nn.Parameter(torch.randn(4, 32, 16, dtype=torch.float64))
            self.w_down = torch.nn.Parameter(torch.randn(4, 16, 16, dtype=torch.float64))

        def forward(self, x, ids, weights):
            return ops.torch_moe(x, ids, weights, self.w_up, self.w_down)

    inputs = (torch.randn(5, 16, dtype=torch.float64), torch.randint(0, 4, (5, 2)), torch.rand(5, 2))
    gm = torch.export.export(Experts(), inputs).module()
    expected = gm(*inputs)
    gm = run_transforms(gm, make_transforms(["fuse_moe"], TRITON), SharedContext())
    info = gm.meta["autodeploy_history"]["fuse_moe"]
    assert info.num_matches == 0 and len(info.details["kept"]) == 1
    torch.testing.assert_close(gm(*inputs), expected)


class Experts(torch.nn.Module):
    """One MoE layer as the canonical op: what ``match_moe`` / export routing leave in a model's graph."""

    def __init__(self, experts: int, hidden: int, inter: int, dtype: torch.dtype, gpt_oss: bool = False):
        super().__init__()

        def param(*shape, scale):
            return torch.nn.Parameter((torch.randn(*shape) * scale).to(dtype))

        self.gpt_oss = gpt_oss
        self.w_up = param(experts, 2 * inter, hidden, scale=hidden**-0.5)  # [E, 2I, H]
        self.w_down = param(experts, hidden, inter, scale=inter**-0.5)  # [E, H, I]
        self.b_up = param(experts, 2 * inter, scale=0.5) if gpt_oss else None
        self.b_down = param(experts, hidden, scale=0.5) if gpt_oss else None

    def forward(self, x, ids, weights):
        if self.gpt_oss:  # interleaved gate/up rows, clamped gate, both biases
            return ops.torch_moe(x, ids, weights, self.w_up, self.w_down, self.b_up, self.b_down,
                                 "swiglu_oai", True, True, 7.0, 1.702)
        return ops.torch_moe(x, ids, weights, self.w_up, self.w_down)


def _rank_graph(module, inputs, rank: int, world: int, mode: str):
    """This rank's graph after ``detect_sharding``/``shard_moe``/``fuse_moe``, its all-reduce dropped (the test
    sums the ranks' partial outputs itself)."""
    gm = torch.export.export(module, inputs).module()
    sharding = {"enabled": True}  # the defaults enable it only for tensor_parallel_size > 1
    overrides = {**TRITON, "detect_sharding": {**sharding, "moe": mode, "lm_head": False}, "shard_moe": sharding}
    transforms = make_transforms(["detect_sharding", "shard_moe", "fuse_moe"], overrides)
    gm = run_transforms(gm, transforms, SharedContext(device=DEVICE, rank=rank, world_size=world))
    reduces = [n for n in gm.graph.nodes if n.target == ops.all_reduce.default]
    assert len(reduces) == 1
    reduces[0].replace_all_uses_with(reduces[0].args[0])
    gm.graph.erase_node(reduces[0])
    gm.recompile()
    return gm


@pytest.mark.parametrize(
    "mode,gpt_oss,dtype",
    [("expert", False, torch.bfloat16), ("expert", True, torch.float32), ("tensor", True, torch.bfloat16)],
)
def test_fuse_moe_after_shard_moe(mode, gpt_oss, dtype):
    """Each rank runs ``triton_moe`` on its local experts (shifted ids: the others are sentinels) or on its slice
    of every expert's intermediate size; the ranks' outputs add up to the whole layer."""
    world, experts, hidden, inter, tokens, top_k = 2, 8, 48, 32, 13, 3
    module = Experts(experts, hidden, inter, dtype, gpt_oss).to(DEVICE)
    x = torch.randn(tokens, hidden, device=DEVICE).to(dtype)
    weights, ids = torch.randn(tokens, experts, device=DEVICE).softmax(-1).topk(top_k, -1)
    inputs = (x, ids, weights)
    expected = module(*inputs).float()
    total = torch.zeros_like(expected)
    for rank in range(world):
        gm = _rank_graph(module, inputs, rank, world, mode)
        assert count_op(gm, ops.triton_moe.default) == 1 and count_op(gm, ops.torch_moe.default) == 0
        w_up = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target.endswith("w_up"))
        local = tuple(getattr(gm, w_up.target).shape)
        assert local == ((experts // world, 2 * inter, hidden) if mode == "expert" else (experts, inter, hidden))
        total += gm(*inputs).float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    scale = expected.abs().max().item()
    torch.testing.assert_close(total, expected, atol=tol * scale, rtol=tol)
