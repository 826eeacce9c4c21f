"""Trace a plain function to the same aten IR as an exported model (used to build patterns)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.fx import GraphModule
from torch.fx.graph import CodeGen

from .cleanup import remove_noop_ops


class _FunctionModule(torch.nn.Module):
    def __init__(self, fn: Callable[..., Any], scalars: dict[int, Any], arity: int):
        super().__init__()
        self.fn = fn
        self.scalars = scalars
        self.arity = arity

    def forward(self, *tensors: torch.Tensor) -> Any:
        it = iter(tensors)
        args = [self.scalars[i] if i in self.scalars else next(it) for i in range(self.arity)]
        return self.fn(*args)


def trace_function(fn: Callable[..., Any], example_inputs: Sequence[Any]) -> GraphModule:
    """Export ``fn(*example_inputs)``; tensor arguments become placeholders named after ``fn``'s parameters.

    Non-tensor arguments are baked in as constants. The graph goes through ``remove_noop_ops`` like a model's.
    """
    names = list(inspect.signature(fn).parameters)[: len(example_inputs)]
    scalars = {i: a for i, a in enumerate(example_inputs) if not isinstance(a, torch.Tensor)}
    tensors = tuple(a for a in example_inputs if isinstance(a, torch.Tensor))
    module = _FunctionModule(fn, scalars, len(example_inputs))
    with torch.no_grad():
        program = torch.export.export(module, tensors, strict=False)
    gm = program.module()
    graph = gm.graph
    graph.set_codegen(CodeGen())
    tensor_names = [n for i, n in enumerate(names) if i not in scalars]
    for node, name in zip([n for n in graph.nodes if n.op == "placeholder"], tensor_names):
        node.name = name
        node.target = name
    remove_noop_ops(gm)
    (output,) = [n for n in graph.nodes if n.op == "output"]
    results = output.args[0]
    if isinstance(results, (tuple, list)) and len(results) == 1:
        output.args = (results[0],)
    gm.recompile()
    return gm
