"""The sharding plan and the graph edits that carry it out (shared by ``detect_sharding`` and ``shard_*``).

``detect_sharding`` records a ``ShardingPlan`` in ``gm.meta[PLAN_KEY]``: for this rank, which linears keep which
output features (column split) or input features (row split, followed by ``autodeploy::all_reduce``), which
``view``/``reshape`` literals become local head counts, how MoE expert weights are split, and the vocab split
of the embedding and LM head. Nodes are named, not held, so the plan survives graph copies. Every ``shard_*``
transform applies one family of entries with the helpers here.

Parameters are cut with ``shard_parameter``: a real parameter is sliced in place (the full tensor is freed);
a parameter still on the meta device gets the local shape and a load hook (``models/weights.py``,
``_autodeploy_weight_hooks``) that slices each checkpoint tensor as it streams in, so a rank only ever keeps
its own shard.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from ..distributed import collectives  # noqa: F401  (registers autodeploy::all_reduce / all_gather)
from ..errors import ModelLoadError, TransformError
from ..models.weights import WEIGHT_HOOKS_ATTR

aten = torch.ops.aten
ALL_REDUCE = torch.ops.autodeploy.all_reduce.default
ALL_GATHER = torch.ops.autodeploy.all_gather.default
PLAN_KEY = "autodeploy_sharding"
_DONE_KEY = "autodeploy_sharded_params"

Ranges = tuple[tuple[int, int], ...]  # kept [start, stop) intervals along one dim, concatenated in order


@dataclass
class LinearSplit:
    node: str
    ranges: Ranges  # output features (column split) or input features (row split)


@dataclass
class ViewRewrite:
    node: str
    sizes: dict[int, int]  # literal global size -> local size
    keep_last: int | None = None  # a literal in the last position equal to this is the head dim: left alone


@dataclass
class ParamSplit:
    target: str
    dim: int
    ranges: Ranges
    zero: bool = False  # keep the shape, zero the values (a bias that only one rank may add)


@dataclass
class AttentionShard:
    layer: str
    attention: str
    columns: list[LinearSplit]  # q, k, v
    row: LinearSplit  # o
    views: list[ViewRewrite]
    head_params: list[ParamSplit]  # per-query-head parameters of the attention op (sinks, ALiBi slopes)
    heads: dict[str, tuple[int, int]]  # "q"/"kv": (global, local)


@dataclass
class MLPShard:
    layer: str
    columns: list[LinearSplit]
    row: LinearSplit
    views: list[ViewRewrite]


@dataclass
class MoEShard:
    layer: str
    node: str
    mode: str  # "expert" | "tensor"
    params: list[ParamSplit]
    id_offset: int  # expert mode: this rank's first expert (subtracted from the routed ids)


@dataclass
class EmbeddingSplit:
    node: str
    start: int
    stop: int


@dataclass
class VocabShard:
    vocab_size: int
    embeddings: list[EmbeddingSplit]
    lm_head: LinearSplit | None


@dataclass
class ShardingPlan:
    rank: int
    world_size: int
    attention: list[AttentionShard] = field(default_factory=list)
    mlp: list[MLPShard] = field(default_factory=list)
    moe: list[MoEShard] = field(default_factory=list)
    vocab: VocabShard | None = None


def get_plan(gm: GraphModule) -> ShardingPlan | None:
    return gm.meta.get(PLAN_KEY)


def split_range(size: int, rank: int, world_size: int) -> tuple[int, int]:
    local = size // world_size
    return rank * local, (rank + 1) * local


def layer_of(node: Node) -> str:
    """The module path a node came from (``model.layers.3.self_attn``), for messages."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    return path.removeprefix("wrapped.") or node.name


def nodes_by_name(gm: GraphModule) -> dict[str, Node]:
    return {n.name: n for n in gm.graph.nodes}


# ---- parameters ---------------------------------------------------------------------------------------------
def _take(tensor: torch.Tensor, dim: int, ranges: Ranges, zero: bool, full: int, name: str) -> torch.Tensor:
    if tensor.shape[dim] != full:
        raise ModelLoadError(
            f"{name} has {tensor.shape[dim]} entries along dim {dim} in the checkpoint, the model expects {full}",
            where="sharding load hook",
            hint="the checkpoint does not match the model config",
        )
    if zero:
        return torch.zeros_like(tensor)
    parts = [tensor.narrow(dim, start, stop - start) for start, stop in ranges]
    out = torch.cat(parts, dim) if len(parts) > 1 else parts[0]
    return out.clone(memory_format=torch.contiguous_format)  # own storage: the full tensor can be freed


def _compose(first: Any, second: Any, tensor: torch.Tensor) -> torch.Tensor:
    return second(first(tensor))


def _set_attr_tensor(gm: GraphModule, target: str, value: torch.Tensor) -> None:
    owner_name, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    if isinstance(getattr(owner, attr), torch.nn.Parameter):
        setattr(owner, attr, torch.nn.Parameter(value, requires_grad=False))
    else:
        owner.register_buffer(attr, value)


def shard_parameter(gm: GraphModule, split: ParamSplit) -> bool:
    """Cut parameter ``split.target`` to ``split.ranges`` along ``split.dim``. False if it was already cut so."""
    done: dict[str, tuple] = gm.meta.setdefault(_DONE_KEY, {})
    key = (split.dim, tuple(split.ranges), split.zero)
    if split.target in done:
        if done[split.target] != key:
            raise TransformError(
                f"parameter {split.target} would be split two different ways",
                where="sharding",
                hint="a weight shared between layers cannot be sharded; set tensor_parallel_size=1",
            )
        return False
    owner_name, _, attr = split.target.rpartition(".")
    param = getattr(gm.get_submodule(owner_name) if owner_name else gm, attr)
    full = param.shape[split.dim]
    take = functools.partial(_take, dim=split.dim, ranges=split.ranges, zero=split.zero, full=full, name=split.target)
    if param.is_meta:
        shape = list(param.shape)
        shape[split.dim] = full if split.zero else sum(b - a for a, b in split.ranges)
        local = torch.empty(shape, dtype=param.dtype, device="meta")
        hooks = gm.__dict__.setdefault(WEIGHT_HOOKS_ATTR, {})
        previous = hooks.get(split.target)
        hooks[split.target] = take if previous is None else functools.partial(_compose, previous, take)
    else:
        local = take(param.detach())
    _set_attr_tensor(gm, split.target, local)
    done[split.target] = key
    return True


def weight_target(node: Node, index: int) -> str | None:
    """The parameter name of ``node.args[index]`` when it is a ``get_attr``."""
    arg = node.args[index] if len(node.args) > index else None
    return arg.target if isinstance(arg, Node) and arg.op == "get_attr" else None


def linear_bias(node: Node) -> Node | None:
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


# ---- graph edits --------------------------------------------------------------------------------------------
def insert_after(gm: GraphModule, node: Node, op: Any, extra_args: tuple = ()) -> Node:
    """``new = op(node, *extra_args)`` right after ``node``; every other user of ``node`` reads ``new``."""
    with gm.graph.inserting_after(node):
        new = gm.graph.call_function(op, (node, *extra_args))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    return new


def split_column(gm: GraphModule, linear: Node, ranges: Ranges) -> None:
    """``linear`` keeps the output features ``ranges`` (weight rows, bias entries)."""
    weight = weight_target(linear, 1)
    shard_parameter(gm, ParamSplit(weight, 0, ranges))
    bias = linear_bias(linear)
    if bias is not None:
        shard_parameter(gm, ParamSplit(bias.target, 0, ranges))


def split_row(gm: GraphModule, linear: Node, ranges: Ranges) -> Node:
    """``linear`` reads the input features ``ranges``; its partial sums are all-reduced, then the bias added."""
    shard_parameter(gm, ParamSplit(weight_target(linear, 1), 1, ranges))
    bias = linear_bias(linear)
    if bias is not None:
        linear.args = tuple(linear.args[:2])
        linear.kwargs = {k: v for k, v in linear.kwargs.items() if k != "bias"}
    reduced = insert_after(gm, linear, ALL_REDUCE)
    if bias is not None:
        reduced = insert_after(gm, reduced, aten.add.Tensor, (bias,))
    return reduced


def rewrite_view(gm: GraphModule, rewrite: ViewRewrite) -> int:
    """Replace the literal sizes of a ``view``/``reshape`` by their local values. Returns how many changed."""
    node = nodes_by_name(gm)[rewrite.node]
    shape = list(node.args[1])
    changed = 0
    for i, size in enumerate(shape):
        if not isinstance(size, int) or size not in rewrite.sizes:
            continue
        if i == len(shape) - 1 and rewrite.keep_last is not None and size == rewrite.keep_last:
            continue
        shape[i] = rewrite.sizes[size]
        changed += 1
    if changed:
        node.args = (node.args[0], shape, *node.args[2:])
    return changed


def check_get_attr_users(gm: GraphModule, target: str, allowed: set[Node], layer: str) -> None:
    """Refuse to cut a parameter that something outside the sharded region also reads."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target == target:
            others = [u for u in node.users if u not in allowed]
            if others:
                raise TransformError(
                    f"{layer}: parameter {target} is also read by {[u.name for u in others]}, outside the region "
                    "being sharded",
                    where="detect_sharding",
                    hint="weights shared between layers cannot be sharded; set tensor_parallel_size=1",
                )
