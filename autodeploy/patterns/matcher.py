"""Search/replace pattern matching on exported graphs, on top of Inductor's pattern matcher.

This is the only module in autodeploy that touches private torch internals (``torch._inductor``).

A ``Pattern`` is a pair of plain functions plus example inputs (PyTorch Inductor's ``fuse_attention.py`` style).
The search function is traced with ``trace_function`` — the same ``torch.export`` + no-op clean-up the models
go through — once per floating dtype (float32, bfloat16, float16), so the casts a model inserts in low
precision are matched too. Literals in the traced pattern match exactly, except:

- shape lists and devices, which match anything (sizes differ between models); note that only devices do
  unless ``Pattern.any_size`` is set: ``torch.fx`` hands lists to the converter as ``immutable_list``, which the
  ``list`` entry of ``ignore_types`` does not catch. With ``any_size`` the size argument of shape ops
  (``view``/``reshape``/``expand``/``new_*``/``full``, ...) matches any size, other lists (``permute`` dims,
  ``cat`` inputs) still match exactly;
- scalars named in ``scalar_params`` (``{"eps": 1e-6}``): the example value becomes a named parameter, bound
  to whatever the model has there (and must agree where it appears more than once). Pick example values that
  occur nowhere else in the pattern;
- keyword arguments the traced pattern leaves out, which are not compared at all (Inductor's rule): ``gelu(x)``
  also matches ``gelu(x, approximate="tanh")``. Register the more specific pattern first (patterns with the
  same output op are tried in order) or look at the node in ``extra_check``.

On a match, ``extra_check(kwargs)`` (graph nodes and bound scalars by parameter name) can reject it; then
``replace_fn(**kwargs)`` is traced on the matched nodes' fake values and spliced in. Besides a bool, the check may
return ``Reject(reason)`` (refused; the reason is kept in ``PatternSet.rejections`` against the match's output
node) or ``Accept(**values)`` (accepted; the values become extra keyword arguments of ``replace_fn``: scalars are
baked into the replacement, tensors are added to the graph module as constants and passed as graph inputs, graph
nodes are passed as inputs, e.g. to read a tensor from before an op the pattern starts after).

Inductor refuses matches that contain an in-place op; ``PatternSet.match_across_mutations`` lifts that for patterns
whose in-place ops only mutate temporaries the pattern itself creates.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch._inductor.pattern_matcher as inductor_pattern_matcher
from torch._dispatch.python import enable_python_dispatcher
from torch._inductor.pattern_matcher import (
    Ignored,
    Match,
    PatternMatcherPass,
    fwd_only,
    fx_to_pattern,
    register_graph_pattern,
)
from torch.fx import GraphModule, Node

from ..export.trace_function import trace_function

logger = logging.getLogger("autodeploy.patterns")

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Reject:
    """What an ``extra_check`` returns to refuse a match and say why (falsy)."""

    reason: str

    def __bool__(self) -> bool:
        return False


class Accept:
    """What an ``extra_check`` returns to accept a match and hand extra keyword arguments to ``replace_fn``."""

    def __init__(self, **values: Any):
        self.values: dict[str, Any] = values

    def __bool__(self) -> bool:
        return True


@dataclass
class Pattern:
    name: str
    search_fn: Callable[..., Any]
    replace_fn: Callable[..., Any]
    example_inputs: Sequence[Any]
    extra_check: Callable[[dict[str, Any]], bool | Reject | Accept] | None = None
    scalar_params: dict[str, float | int] = field(default_factory=dict)
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES
    #: the size argument of shape ops (``view``, ``reshape``, ``expand``, ...) matches any size
    any_size: bool = False

    @property
    def arg_names(self) -> list[str]:
        return list(inspect.signature(self.search_fn).parameters)[: len(self.example_inputs)]


def _with_dtype(inputs: Sequence[Any], dtype: torch.dtype) -> list[Any]:
    return [x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]


class PatternSet:
    """Patterns applied together in one pass over a graph. Tracing happens on first use."""

    def __init__(self, patterns: Sequence[Pattern]):
        self.patterns = list(patterns)
        self._pass: PatternMatcherPass | None = None
        self.matches_by_pattern: dict[str, int] = {}
        #: output node of each match an ``extra_check`` refused with ``Reject`` -> (pattern name, reason)
        self.rejections: dict[Node, tuple[str, str]] = {}
        self._accepted: dict[int, dict[str, Any]] = {}  # id(match) -> Accept values, from check to handler
        #: also match nodes whose values are on the meta device (a model exported before its weights are loaded);
        #: Inductor's pass skips those (and complex, sparse, some fp8 tensors) as it cannot lower them
        self.match_meta = False
        #: let a match contain in-place ops; Inductor's pass refuses matches that span a mutation. Only for patterns
        #: whose in-place ops mutate temporaries they create themselves (transformers' grouped-mm experts)
        self.match_across_mutations = False

    def _build(self) -> PatternMatcherPass:
        pm_pass = PatternMatcherPass()
        for pattern in self.patterns:
            seen: set[str] = set()
            for dtype in pattern.dtypes:
                inputs = _with_dtype(pattern.example_inputs, dtype)
                try:
                    search_gm = trace_function(pattern.search_fn, inputs)
                except Exception as e:  # a pattern that cannot trace in one dtype may in another
                    logger.debug("pattern %s does not trace in %s: %s", pattern.name, dtype, e)
                    continue
                if pattern.any_size:
                    _ignore_sizes(search_gm)
                tensor_names = [n for n, x in zip(pattern.arg_names, inputs) if isinstance(x, torch.Tensor)]
                expr = fx_to_pattern(
                    search_gm,
                    ignore_types=(list, torch.device),
                    argnames=tensor_names,
                    scalar_workaround=dict(pattern.scalar_params),
                )
                key = str(expr)
                if key in seen:
                    continue
                seen.add(key)
                register_graph_pattern(expr, extra_check=self._make_check(pattern), pass_dict=pm_pass)(
                    self._make_handler(pattern)
                )
        return pm_pass

    def _make_check(self, pattern: Pattern) -> Callable[[Match], bool]:
        def check(match: Match) -> bool:
            if pattern.extra_check is None:
                return True
            result = pattern.extra_check(dict(match.kwargs))
            if isinstance(result, Reject):
                self.rejections[match.output_node()] = (pattern.name, result.reason)
            elif isinstance(result, Accept):
                self._accepted[id(match)] = dict(result.values)
            return bool(result)

        return check

    def _make_handler(self, pattern: Pattern) -> Callable[..., None]:
        names = pattern.arg_names

        def handler(match: Match, *args: Any, **kwargs: Any) -> None:
            extras = self._accepted.pop(id(match), {})
            kwargs = {**kwargs, **_constants_as_nodes(match, extras)}
            names_here = [*names, *(n for n in extras if n not in names)]
            node_args = [n for n in names_here if isinstance(kwargs.get(n), Node)]
            constants = {n: kwargs[n] for n in kwargs if n not in node_args}

            def replacement(*tensors: Any) -> Any:
                return pattern.replace_fn(**constants, **dict(zip(node_args, tensors)))

            match.replace_by_example(replacement, [kwargs[n] for n in node_args], trace_fn=_trace_replacement)
            self.matches_by_pattern[pattern.name] = self.matches_by_pattern.get(pattern.name, 0) + 1

        return handler

    def apply(self, gm: GraphModule) -> int:
        """Replace every match in ``gm.graph`` (not recompiled); returns the number of replacements."""
        if self._pass is None:
            self._pass = self._build()
        self.matches_by_pattern = {}
        self.rejections = {}
        self._accepted = {}
        with contextlib.ExitStack() as stack:
            if self.match_meta:
                stack.enter_context(_lowerable_check_off())
            if self.match_across_mutations:
                stack.enter_context(_mutation_regions_off(gm.graph))
            count = self._pass.apply(gm.graph)
        return int(count)

    def live_rejections(self, gm: GraphModule) -> dict[str, str]:
        """``{node name: "pattern: reason"}`` of the refused matches whose output node is still in ``gm``."""
        live = set(gm.graph.nodes)
        return {n.name: f"{name}: {why}" for n, (name, why) in self.rejections.items() if n in live}


@contextlib.contextmanager
def _lowerable_check_off() -> Any:
    """Within the context, Inductor's pass does not skip nodes whose tensors it could not lower (meta, ...)."""
    original = inductor_pattern_matcher.fallback_node_due_to_unsupported_type
    inductor_pattern_matcher.fallback_node_due_to_unsupported_type = lambda node, allow_cpu_inputs=True: False
    try:
        yield
    finally:
        inductor_pattern_matcher.fallback_node_due_to_unsupported_type = original


@contextlib.contextmanager
def _mutation_regions_off(graph: torch.fx.Graph) -> Any:
    """Within the context, every node is in one mutation region; cached region ids are dropped before and after."""

    def forget() -> None:
        for node in graph.nodes:
            node.meta.pop("mutation_region_id", None)

    original = inductor_pattern_matcher.get_mutation_region_id
    forget()
    inductor_pattern_matcher.get_mutation_region_id = lambda graph, node: 0
    try:
        yield
    finally:
        inductor_pattern_matcher.get_mutation_region_id = original
        forget()


def _trace_replacement(fn: Callable[..., Any], args: Sequence[Any]) -> GraphModule:
    return fwd_only(fn, args, run_functional_passes=False, get_decomp_fn=lambda: {})


_SIZE_ARGS = ("size", "shape")


def _ignore_sizes(gm: GraphModule) -> None:
    """Replace the size argument of every shape op in ``gm`` by a wildcard (the graph is only converted after)."""
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        args, kwargs = list(node.args), dict(node.kwargs)
        for i, argument in enumerate(schema.arguments):
            if argument.name not in _SIZE_ARGS or not isinstance(argument.type, torch.ListType):
                continue
            if i < len(args):
                args[i] = Ignored()
            elif argument.name in kwargs:
                kwargs[argument.name] = Ignored()
        node.args, node.kwargs = tuple(args), kwargs


def _constants_as_nodes(match: Match, values: Mapping[str, Any]) -> dict[str, Any]:
    """``Accept`` values with every tensor registered on the graph module as a constant and read by ``get_attr``."""
    out = dict(values)
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        return out
    graph = match.graph
    gm = graph.owning_module
    fake_mode = torch._guards.detect_fake_mode([n.meta.get("val") for n in match.nodes])
    first = next(n for n in graph.nodes if n.op != "placeholder")
    for key, tensor in tensors.items():
        attr = next((name for name, buf in gm.named_buffers() if buf is tensor), None)  # one per tensor object
        if attr is None:
            index = 0
            while hasattr(gm, f"_pattern_constant_{index}"):
                index += 1
            attr = f"_pattern_constant_{index}"
            gm.register_buffer(attr, tensor, persistent=False)
        node = next((n for n in graph.nodes if n.op == "get_attr" and n.target == attr), None)
        if node is None:
            with graph.inserting_before(first):
                node = graph.get_attr(attr)
            node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode is not None else tensor
        out[key] = node
    return out


def symbolic_dispatch() -> Any:
    """A context for fake-tensor propagation of graphs with dynamic shapes, as ``torch.export`` traces them.

    Some meta functions need the Python decompositions for symbolic sizes (``baddbmm`` broadcasting its ``self``).
    """
    return enable_python_dispatcher()
