"""Graph helpers shared by transforms: clean-up, shape propagation, node queries."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

OpTarget = Any  # an OpOverload, an OpOverloadPacket or a Python callable


def count_nodes(gm: GraphModule) -> int:
    return len(gm.graph.nodes)


def canonicalize_graph(gm: GraphModule) -> None:
    """Drop dead code and unused submodules, check the graph, regenerate ``forward``."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()


def is_op(node: Node, targets: OpTarget | Iterable[OpTarget]) -> bool:
    """True if ``node`` calls one of ``targets`` (an overload packet matches all of its overloads)."""
    if node.op != "call_function":
        return False
    if not isinstance(targets, (list, tuple, set, frozenset)):
        targets = (targets,)
    for target in targets:
        if node.target is target:
            return True
        if getattr(node.target, "overloadpacket", None) is target:
            return True
    return False


def find_nodes(gm: GraphModule, targets: OpTarget | Iterable[OpTarget]) -> list[Node]:
    return [n for n in gm.graph.nodes if is_op(n, targets)]


def op_arguments(node: Node) -> dict[str, Any]:
    """Every argument of an op call by name, defaults filled in."""
    return {a.name: (node.args[i] if i < len(node.args) else node.kwargs.get(a.name, a.default_value))
            for i, a in enumerate(node.target._schema.arguments)}


def parameter_view(gm: GraphModule, node: Any) -> tuple[str, list[int]] | None:
    """``(parameter name, dims)`` when ``node`` is a parameter seen through transposes / permutes: dim ``i`` of the
    node's value is dim ``dims[i]`` of the parameter. ``None`` for anything else."""
    dims: list[int] | None = None
    while isinstance(node, Node) and node.op != "get_attr":
        val = node_val(node)
        if val is None:
            return None
        dims = dims if dims is not None else list(range(val.dim()))
        if is_op(node, torch.ops.aten.transpose.int):
            a, b = (d % val.dim() for d in node.args[1:3])
            dims = [b if d == a else a if d == b else d for d in dims]
        elif is_op(node, torch.ops.aten.permute.default):
            order = [d % val.dim() for d in node.args[1]]
            dims = [order[d] for d in dims]
        else:
            return None
        node = node.args[0]
    if not isinstance(node, Node):
        return None
    return node.target, dims if dims is not None else list(range(get_attr_value(gm, node).dim()))


def is_quantized_linear(node: Node) -> bool:
    """True if ``node`` calls a quantized linear (``autodeploy::<backend>_quant_<format>_linear``, input first)."""
    target = node.target
    return (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
            and target.namespace == "autodeploy" and "_quant_" in target.__name__ and "_linear" in target.__name__)


def node_val(node: Any) -> Any:
    """The fake value recorded for a node (``None`` for non-nodes or nodes without one)."""
    return node.meta.get("val") if isinstance(node, Node) else None


def placeholders(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def get_attr_value(gm: GraphModule, node: Node) -> torch.Tensor:
    """The parameter or buffer a ``get_attr`` node refers to."""
    obj: Any = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def _fake_mode_of(gm: GraphModule):
    for node in placeholders(gm):
        val = node_val(node)
        if isinstance(val, torch.Tensor) and hasattr(val, "fake_mode"):
            return val.fake_mode
    return None


class _NewNodesFakeTensorProp(FakeTensorProp):
    """Fake-tensor propagation that keeps every value a node already has and computes only the others."""

    def run_node(self, n):
        if n.op not in ("placeholder", "output") and "val" in n.meta:
            return n.meta["val"]
        return super().run_node(n)


def _attribute_values_hold(gm: GraphModule) -> bool:
    """Every parameter's recorded value still has its tensor's device, dtype and shape (weights loaded onto a
    device, or sharded, since the last pass make every value downstream stale)."""
    for node in gm.graph.nodes:
        val = node.meta.get("val") if node.op == "get_attr" else None
        if not isinstance(val, torch.Tensor):
            continue
        real = get_attr_value(gm, node)
        if isinstance(real, torch.Tensor) and (real.device, real.dtype, tuple(real.shape)) != (
            val.device, val.dtype, tuple(val.shape)
        ):
            return False
    return True


def run_shape_prop(gm: GraphModule, new_nodes_only: bool = False) -> None:
    """Refresh ``meta["val"]`` on every node with fake tensors, keeping the graph's symbolic shapes.

    ``new_nodes_only``: compute values only for nodes that have none. Right after a rewrite that preserves what
    every surviving node computes (matching, fusion, cleanup), their values still hold, and this costs a fraction
    of a full pass; a rewrite that changes shapes (sharding) needs the full one, and so does a graph whose
    parameters moved, changed dtype or shape since the last pass (checked here)."""
    fake_mode = _fake_mode_of(gm)
    if fake_mode is None:
        return
    from ..patterns.matcher import symbolic_dispatch  # the one module allowed torch internals; imports Inductor

    inputs = [node_val(n) for n in placeholders(gm)]
    prop = _NewNodesFakeTensorProp if new_nodes_only and _attribute_values_hold(gm) else FakeTensorProp
    with fake_mode, symbolic_dispatch():
        prop(gm, mode=fake_mode).propagate_dont_convert_inputs(*inputs)


def set_graph_device(gm: GraphModule, device: torch.device) -> int:
    """Point every device literal in the graph (``arange(..., device=...)``, ``to(device)``) at ``device``.

    Graphs exported on the meta device (weights not loaded yet) carry ``device="meta"`` in such ops.
    Returns how many literals changed.
    """
    changed = 0

    def retarget(value: Any) -> Any:
        nonlocal changed
        if isinstance(value, torch.device) and value != device:
            changed += 1
            return device
        if isinstance(value, (list, tuple)):
            return type(value)(retarget(v) for v in value)
        return value

    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.args = retarget(node.args)
            node.kwargs = {k: retarget(v) for k, v in node.kwargs.items()}
    if changed:
        gm.recompile()
    return changed


def add_parameter(gm: GraphModule, prefix: str, tensor: torch.Tensor) -> str:
    """Register ``tensor`` on ``gm`` as a frozen parameter under the first free ``<prefix>_<i>``; returns the name."""
    i = 0
    while hasattr(gm, f"{prefix}_{i}"):
        i += 1
    name = f"{prefix}_{i}"
    gm.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
    return name


def drop_unused_attributes(gm: GraphModule) -> int:
    """Delete parameters and buffers no ``get_attr`` node refers to any more (frees replaced weights)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    dropped = 0
    named = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    for name, _ in named:
        if name in used:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        if hasattr(owner, attr):
            delattr(owner, attr)
            dropped += 1
    return dropped
