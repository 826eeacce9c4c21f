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


def run_shape_prop(gm: GraphModule) -> None:
    """Refresh ``meta["val"]`` on every node with fake tensors, keeping the graph's symbolic shapes."""
    fake_mode = _fake_mode_of(gm)
    if fake_mode is None:
        return
    from ..patterns.matcher import symbolic_dispatch  # the one module allowed torch internals; imports Inductor

    inputs = [node_val(n) for n in placeholders(gm)]
    with fake_mode, symbolic_dispatch():
        FakeTensorProp(gm, mode=fake_mode).propagate_dont_convert_inputs(*inputs)


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
