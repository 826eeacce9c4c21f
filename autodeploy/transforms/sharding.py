"""The sharding plan and the graph edits that carry it out (shared by ``detect_sharding`` and ``shard_*``).

``detect_sharding`` records a ``ShardingPlan`` in ``gm.meta[PLAN_KEY]``: for this rank, which linears keep which
output features (column split) or input features (row split, followed by ``autodeploy::all_reduce``), which
``view``/``reshape`` literals become local head counts, how MoE expert weights are split, and the vocab split
of the embedding and LM head. Nodes are named, not held, so the plan survives graph copies. Every ``shard_*``
transform applies one family of entries with the helpers here.

Parameters are cut with ``shard_parameter``: a real parameter is sliced in place (the full tensor is freed);
a parameter still on the meta device gets the local shape and a parameter hook (``models/weights.py``,
``_autodeploy_param_hooks``) that slices what fills it as the checkpoint streams in, after any quantization
hook, so a rank only ever keeps its own shard.

Linears are split by their operands' names, so the quantized linears (which quantization swapped in before
this stage) split like ``aten.linear``: ``weight`` / ``qweight`` [N, K] (int4: planar codes, repacked after the
cut), per-row ``weight_scale`` [N], int4 ``scales`` / ``zeros`` [G, N] and ``bias`` [N]. A column split keeps
rows of all of them; a row split keeps weight columns and, for int4, the whole groups those columns fall in.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from ..custom_ops.quant_linear import INT4_CHUNK, int4_group, pack_int4, unpack_int4
from ..distributed import collectives  # noqa: F401  (registers autodeploy::all_reduce / all_gather)
from ..errors import ModelLoadError, TransformError
from ..models.weights import PARAM_HOOKS_ATTR
from .graph import is_op, is_quantized_linear, op_arguments

aten = torch.ops.aten
LINEAR = aten.linear.default
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
    int4: bool = False  # a planar int4 ``qweight``: ``dim`` and ``ranges`` count codes, not int32 words


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
def _take(tensor: torch.Tensor, split: ParamSplit, full: int) -> torch.Tensor:
    values = unpack_int4(tensor) if split.int4 else tensor
    if values.shape[split.dim] != full:
        raise ModelLoadError(
            f"{split.target} has {values.shape[split.dim]} entries along dim {split.dim} in the checkpoint, the "
            f"model expects {full}",
            where="sharding load hook",
            hint="the checkpoint does not match the model config",
        )
    if split.zero:
        return torch.zeros_like(tensor)
    parts = [values.narrow(split.dim, start, stop - start) for start, stop in split.ranges]
    out = torch.cat(parts, split.dim) if len(parts) > 1 else parts[0]
    if split.int4:
        return pack_int4(out)
    return out.clone(memory_format=torch.contiguous_format)  # own storage: the full tensor can be freed


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
    full = param.shape[split.dim] * (8 if split.int4 and split.dim == 1 else 1)
    take = functools.partial(_take, split=split, full=full)
    if param.is_meta:
        gm.__dict__.setdefault(PARAM_HOOKS_ATTR, {})[split.target] = take
    _set_attr_tensor(gm, split.target, take(param.detach()))  # on the meta device: the local shape
    done[split.target] = key
    return True


def weight_target(node: Node, index: int) -> str | None:
    """The parameter name of ``node.args[index]`` when it is a ``get_attr``."""
    arg = node.args[index] if len(node.args) > index else None
    return arg.target if isinstance(arg, Node) and arg.op == "get_attr" else None


# ---- linears ------------------------------------------------------------------------------------------------
_WEIGHTS = ("weight", "qweight")  # [N, K]
_ROWS = ("weight_scale", "bias")  # [N]
_GROUPS = ("scales", "zeros")  # int4 [G, N]


def is_linear(node: Any) -> bool:
    """``aten.linear`` or a quantized linear whose weight is a parameter."""
    return (isinstance(node, Node) and (is_op(node, LINEAR) or is_quantized_linear(node))
            and weight_target(node, 1) is not None)


def linear_operands(node: Node) -> dict[str, Node]:
    """A linear's operands after its input, by argument name: weight, scales, zero points, bias."""
    return {name: arg for name, arg in list(op_arguments(node).items())[1:] if isinstance(arg, Node)}


def linear_bias(node: Node) -> Node | None:
    return linear_operands(node).get("bias")


def _int4_group(node: Node) -> int:
    return int4_group(op_arguments(node)["group_size"], node.args[0].meta["val"].shape[-1])


def row_split_unit(node: Node) -> int:
    """Input features a row split must cut on multiples of: whole int4 groups of whole 128-code chunks (1 for
    everything else, per-channel int4 included)."""
    if "qweight" not in linear_operands(node) or op_arguments(node)["group_size"] <= 0:
        return 1
    return max(_int4_group(node), INT4_CHUNK)


def _linear_splits(node: Node, ranges: Ranges, column: bool) -> list[ParamSplit]:
    splits = []
    for name, arg in linear_operands(node).items():
        if arg.op != "get_attr":
            continue  # a computed bias: detect_sharding refused it for column splits; row splits add it later
        int4 = name == "qweight"
        if name in _WEIGHTS:
            splits.append(ParamSplit(arg.target, 0 if column else 1, ranges, int4=int4))
        elif name in _ROWS and column:
            splits.append(ParamSplit(arg.target, 0, ranges))
        elif name in _GROUPS and column:
            splits.append(ParamSplit(arg.target, 1, ranges))
        elif name in _GROUPS:
            g = _int4_group(node)
            splits.append(ParamSplit(arg.target, 0, tuple((a // g, -(-b // g)) for a, b in ranges)))
        elif name not in _ROWS:
            raise TransformError(f"{node.name}: cannot split the linear operand {name!r} of {node.target}",
                                 where="sharding", hint="set tensor_parallel_size=1")
    return splits


# ---- graph edits --------------------------------------------------------------------------------------------
def insert_after(gm: GraphModule, node: Node, op: Any, extra_args: tuple = ()) -> Node:
    """``new = op(node, *extra_args)`` right after ``node``; every other user of ``node`` reads ``new``."""
    with gm.graph.inserting_after(node):
        new = gm.graph.call_function(op, (node, *extra_args))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    return new


def split_column(gm: GraphModule, linear: Node, ranges: Ranges) -> None:
    """``linear`` keeps the output features ``ranges`` (weight rows, their scales, bias entries)."""
    for split in _linear_splits(linear, ranges, column=True):
        shard_parameter(gm, split)


def split_row(gm: GraphModule, linear: Node, ranges: Ranges) -> Node:
    """``linear`` reads the input features ``ranges``; its partial sums are all-reduced, then the bias added."""
    for split in _linear_splits(linear, ranges, column=False):
        shard_parameter(gm, split)
    bias = linear_bias(linear)
    if bias is not None:
        linear.replace_input_with(bias, None)
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
