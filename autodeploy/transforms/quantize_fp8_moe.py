"""``quantize_fp8_moe``: the experts of every ``torch_moe`` get float8 weights with one scale per output row.

Matches: every ``autodeploy::torch_moe`` whose ``w_up`` and ``w_down`` are parameters (seen directly or through
transposes, as gpt-oss's ``[E, H, U]`` experts are) read by nothing else, when ``quantize: fp8`` is set, except
``exclude`` patterns (fnmatch on the experts' module, e.g. ``model.layers.0.mlp.experts``). Emits: the same op
with ``w_up`` / ``w_down`` float8_e4m3fn codes in the parameters' own layout and new float32 parameters
``<name>_scale`` of shape ``[E, U]`` / ``[E, H]`` (the op's ``w_up_scale`` / ``w_down_scale``); the activations
stay 16-bit (``custom_ops/moe.py``: ``(x @ codes^T) * scale``, rounded once). ``fuse_moe`` then runs them on
the Triton kernel, which converts the codes as it loads them, so decode reads half the expert bytes.

Weights still on the meta device get a load hook that quantizes each tensor as it streams in.
Tensor parallelism (``detect_sharding``, after this stage) splits the scales with their rows. Limits: a
checkpoint's own quantization (compressed-tensors / fbgemm fp8 experts) is not read here.
"""

from __future__ import annotations

import fnmatch

import torch
from torch.fx import GraphModule, Node

from ..custom_ops.quant_linear import FP8_DTYPE, quantize_fp8_weight
from .base import SharedContext, Transform, TransformConfig, TransformInfo, TransformRegistry
from .graph import find_nodes, op_arguments, parameter_view
from .quantization import QuantizeFlag, add_weight_hook, checkpoint_of, meta

TORCH_MOE = torch.ops.autodeploy.torch_moe.default
WEIGHTS = (("w_up", "w_up_scale"), ("w_down", "w_down_scale"))


class QuantizeFP8MoeConfig(TransformConfig):
    quantize: QuantizeFlag = None  # the top-level ``quantize`` flag (set by config.py)
    exclude: list[str] = []  # fnmatch patterns of expert modules left in full precision


def quantize_expert_weight(weight: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)``: ``weight`` seen as the op's ``[E, N, K]`` through ``dims``, one scale per ``(e, n)``;
    the codes keep ``weight``'s own layout."""
    codes, scale = quantize_fp8_weight(weight.permute(dims))
    inverse = sorted(range(len(dims)), key=dims.__getitem__)
    return codes.permute(inverse).contiguous(), scale


def _owner(gm: GraphModule, target: str) -> tuple[torch.nn.Module, str]:
    owner_name, _, attr = target.rpartition(".")
    return (gm.get_submodule(owner_name) if owner_name else gm), attr


def _quantizable(gm: GraphModule, target: str, arg: Node) -> bool:
    """A 16/32-bit float parameter read once, through ``arg``'s chain."""
    owner, attr = _owner(gm, target)
    return getattr(owner, attr).dtype in (torch.float32, torch.bfloat16, torch.float16) and _read_once(gm, target, arg)


def _read_once(gm: GraphModule, target: str, arg: Node) -> bool:
    """Parameter ``target`` is read once, through ``arg``'s chain (each link with a single user)."""
    getters = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target]
    node = arg
    while len(node.users) == 1:
        if node.op == "get_attr":
            return getters == [node]
        node = node.args[0]
    return False


@TransformRegistry.register("quantize_fp8_moe")
class QuantizeFP8Moe(Transform):
    config_class = QuantizeFP8MoeConfig

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        if self.config.quantize != "fp8" or checkpoint_of(ctx) is not None:
            return TransformInfo(skipped=True)
        done, kept = [], []
        for node in find_nodes(gm, TORCH_MOE):
            args = op_arguments(node)
            views = [parameter_view(gm, args[name]) for name, _ in WEIGHTS]
            module = views[0][0].rpartition(".")[0] if views[0] is not None else node.name
            if args["w_up_scale"] is not None or any(fnmatch.fnmatch(module, p) for p in self.config.exclude):
                continue
            if any(v is None or not _quantizable(gm, v[0], args[name]) for v, (name, _) in zip(views, WEIGHTS)):
                kept.append(node.name)
                continue
            scales = {}
            for (name, scale_name), (target, dims) in zip(WEIGHTS, views):
                scales[scale_name] = self._quantize_parameter(gm, target, dims, ctx)
            with gm.graph.inserting_before(node):
                node.kwargs = {**node.kwargs, **{k: gm.graph.get_attr(t) for k, t in scales.items()}}
            done.append(module)
        details = {"modules": done[:3], **({"kept": kept} if kept else {})}
        return TransformInfo(num_matches=len(done), details=details)

    def _quantize_parameter(self, gm: GraphModule, target: str, dims: list[int], ctx: SharedContext) -> str:
        """Swap parameter ``target`` for its codes, add ``<target>_scale``; returns the scale's name."""
        owner, attr = _owner(gm, target)
        scale_target = f"{target}_scale"
        weight = getattr(owner, attr)
        if weight.is_meta:
            codes = meta(tuple(weight.shape), FP8_DTYPE)
            scale = meta(tuple(weight.shape[d] for d in dims[:2]), torch.float32)
            device = ctx.device

            def quantize(t: torch.Tensor) -> dict[str, torch.Tensor]:
                c, s = quantize_expert_weight(t.to(device), dims)
                return {target: c, scale_target: s}

            add_weight_hook(gm, target, quantize)
        else:
            codes, scale = quantize_expert_weight(weight.detach(), dims)
        setattr(owner, attr, torch.nn.Parameter(codes, requires_grad=False))
        owner.register_parameter(f"{attr}_scale", torch.nn.Parameter(scale, requires_grad=False))
        return scale_target
