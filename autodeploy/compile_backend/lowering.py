"""Dynamo's captured graph -> the aten graph our transforms are written for, and the hand-off to Inductor.

The one module of ``compile_backend`` that touches private torch internals (``torch._guards``, ``torch._dynamo``,
``torch._inductor``): a Dynamo backend has no public API beyond its signature.

``lower_to_aten(gm, example_inputs)`` re-traces Dynamo's torch-level graph with ``make_fx(pre_dispatch=True)``,
the tracer ``torch.export`` uses for its (pre-dispatch) training IR: ``aten.linear`` and
``aten.scaled_dot_product_attention`` survive, nothing is functionalised (the in-place KV-cache writes of
Hugging Face's caches stay ``index_copy_``/``copy_`` on their inputs) and every node gets ``meta["val"]``. It
traces with the fake tensors of Dynamo's own ``TracingContext`` — the same ``ShapeEnv`` and symbols — so any
guard the lowering or a transform adds lands in Dynamo's guards, with no re-specialisation and no second export.
Then:

- weights (parameters and module buffers the graph does not mutate) become ``get_attr`` attributes under their
  module path (``model.layers.0.self_attn.q_proj.weight``), as in an exported model, so transforms can read and
  fuse them; their arguments are dropped at run time (``LoweredGraph.weight_positions``);
- placeholders take their Python names (``input_ids``, ``position_ids``, ``past_key_values_layers_0_keys``);
- a size Dynamo passes as its own ``SymInt`` argument is read from a tensor input instead
  (``sym_size(input_ids, 1)``), as in an exported graph, so a mask computed from shapes depends on
  ``input_ids`` alone and ``match_attention`` can probe it;
- a Python float Dynamo passes as a 0-d tensor (``dynamic=True`` does, for an ``eps``) becomes its value,
  guarded, so patterns bind it as the literal they expect.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx.traceback as fx_traceback
from torch.fx import GraphModule, Interpreter, Node, map_arg
from torch.fx.experimental.symbolic_shapes import guard_scalar
from torch.fx.experimental.proxy_tensor import make_fx

aten = torch.ops.aten


@dataclass
class LoweredGraph:
    gm: GraphModule
    #: positions (in Dynamo's argument list) of the weights now read by ``get_attr``, and those tensors
    weight_positions: list[int] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)
    #: positions of the arguments the lowered graph still takes, in its placeholder order
    input_positions: list[int] = field(default_factory=list)
    time_s: float = 0.0


# ----------------------------------------------------------------------------------------------- inputs


def _tracing_fake_mode() -> Any:
    context = torch._guards.TracingContext.try_get()
    return context.fake_mode if context is not None else None


def _fake_inputs(gm: GraphModule, example_inputs: Sequence[Any]) -> list[Any]:
    """Dynamo's inputs as fake tensors of the tracing context (its symbols), as AOTAutograd makes them."""
    context = torch._guards.TracingContext.try_get()
    fake_mode = _tracing_fake_mode()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes: list[Any] = []
    for node, value in zip(placeholders, example_inputs):
        example = node.meta.get("example_value")
        if isinstance(value, torch.Tensor):
            symbolic = context.tensor_to_context.get(value) if context is not None else None
            source = symbolic.tensor_source if symbolic is not None else None
            fake = fake_mode.from_tensor(value, symbolic_context=symbolic, source=source)
            memo = getattr(example, "item_memo", None)  # a float Dynamo passes as a 0-d tensor: its SymFloat
            if memo is not None and fake.item_memo is None:
                fake.item_memo = memo
            fakes.append(fake)
        elif isinstance(example, torch.SymInt) and example.node.shape_env is fake_mode.shape_env:
            fakes.append(example)
        else:
            fakes.append(value)
    return fakes


_PATH_PART = re.compile(r"\.?_(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


def _source_name(node: Node) -> str | None:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    return source.name if source is not None else None


_ROOT = re.compile(r"^[LG]\['[^']+'\]")


def _module_path(source: str | None) -> str | None:
    """``L['self']._modules['model']._parameters['weight']`` -> ``model.weight`` (``None`` if not a module's)."""
    root = _ROOT.match(source or "")
    if root is None:
        return None
    rest = source[root.end() :]
    parts = []
    pos = 0
    for match in _PATH_PART.finditer(rest):
        if match.start() != pos:
            return None
        parts.append(next(g for g in match.groups() if g is not None))
        pos = match.end()
    return ".".join(parts) if parts and pos == len(rest) else None


def _input_name(node: Node) -> str:
    """A placeholder's Python name: ``L['kwargs']['input_ids']`` -> ``input_ids``."""
    source = _source_name(node) or node.name
    path = _module_path(source)
    if path is not None:
        return re.sub(r"\W", "_", path)
    keys = re.findall(r"\['([^']+)'\]|\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]", source)
    parts = [next(g for g in k if g) for k in keys]
    while parts and parts[0] in ("kwargs", "args"):
        parts = parts[1:]
    name = re.sub(r"\W", "_", "_".join(parts) if parts else node.name)
    return name if name[:1].isalpha() or name[:1] == "_" else f"arg{name}"


def _is_weight(node: Node, value: Any) -> bool:
    if not isinstance(value, torch.Tensor):
        return False
    source = _source_name(node) or ""
    if not (isinstance(value, torch.nn.Parameter) or "._buffers[" in source):
        return False
    return _module_path(source) is not None


def _mutated(node: Node) -> bool:
    for user in node.users:
        schema = getattr(user.target, "_schema", None)
        if schema is None or not schema.is_mutable:
            continue
        for argument, value in zip(schema.arguments, user.args):
            if value is node and argument.alias_info is not None and argument.alias_info.is_write:
                return True
    return False


# ----------------------------------------------------------------------------------------------- graph surgery


def _set_attr(gm: GraphModule, path: str, tensor: torch.Tensor) -> None:
    owner: torch.nn.Module = gm
    *parents, leaf = path.split(".")
    for part in parents:
        child = getattr(owner, part, None)
        if not isinstance(child, torch.nn.Module):
            child = torch.nn.Module()
            owner.add_module(part, child)
        owner = child
    if isinstance(tensor, torch.nn.Parameter):
        owner.register_parameter(leaf, tensor)
    else:
        owner.register_buffer(leaf, tensor, persistent=False)


def _freeze_weights(
    traced: GraphModule, dynamo_placeholders: list[Node], example_inputs: Sequence[Any]
) -> tuple[list[int], list[torch.Tensor]]:
    graph = traced.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    first = next(n for n in graph.nodes if n.op != "placeholder")
    positions, weights = [], []
    seen: set[str] = set()
    for i, (node, dynamo_node, value) in enumerate(zip(placeholders, dynamo_placeholders, example_inputs)):
        if not _is_weight(dynamo_node, value) or _mutated(node):
            continue
        path = _module_path(_source_name(dynamo_node))
        if path in seen:
            continue
        seen.add(path)
        _set_attr(traced, path, value)
        with graph.inserting_before(first):
            attr = graph.get_attr(path)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
        positions.append(i)
        weights.append(value)
    return positions, weights


def _sizes_from_tensors(gm: GraphModule) -> int:
    """Replace uses of a ``SymInt`` placeholder by ``sym_size`` of a tensor input that has it as a dimension."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    dims: dict[Any, tuple[Node, int]] = {}
    for node in sorted(placeholders, key=lambda n: n.name != "input_ids"):  # prefer the token ids
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            for d, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt):
                    dims.setdefault(size.node.expr, (node, d))
    first = next(n for n in graph.nodes if n.op != "placeholder")
    replaced = 0
    for node in placeholders:
        val = node.meta.get("val")
        if not isinstance(val, torch.SymInt) or not node.users or val.node.expr not in dims:
            continue
        tensor, d = dims[val.node.expr]
        with graph.inserting_before(first):
            size = graph.call_function(aten.sym_size.int, (tensor, d))
        size.meta["val"] = val
        node.replace_all_uses_with(size)
        replaced += 1
    return replaced


def _specialize_scalars(gm: GraphModule) -> int:
    """A Python float (or int) Dynamo passes as a 0-d tensor read by ``item()`` becomes its value in the graph.

    Dynamo does that with ``dynamic=True`` for attributes such as an RMSNorm's ``eps``; patterns bind such
    scalars as literals. ``guard_scalar`` adds the guard ``value == this`` to Dynamo's guards (a recompile if it
    changes), as Dynamo itself does when it specialises a scalar.
    """
    specialized = 0
    for node in [n for n in gm.graph.nodes if n.op == "placeholder"]:
        memo = getattr(node.meta.get("val"), "item_memo", None)
        if memo is None:
            continue
        for item in [u for u in node.users if u.target in (aten.item.default, aten._local_scalar_dense.default)]:
            value = guard_scalar(memo)
            for user in list(item.users):
                user.args = map_arg(user.args, lambda n: value if n is item else n)
                user.kwargs = map_arg(user.kwargs, lambda n: value if n is item else n)
            gm.graph.erase_node(item)
            specialized += 1
    return specialized


def lower_to_aten(gm: GraphModule, example_inputs: Sequence[Any]) -> LoweredGraph:
    """Trace Dynamo's graph to pre-dispatch aten (see the module docstring); ``gm`` is not changed."""
    start = time.perf_counter()
    fake_mode = _tracing_fake_mode()
    fakes = _fake_inputs(gm, example_inputs)

    def run(*args: Any) -> Any:
        with fx_traceback.preserve_node_meta():
            return Interpreter(gm).run(*args)

    with fake_mode:
        traced = make_fx(run, pre_dispatch=True, record_module_stack=True)(*fakes)
    dynamo_placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, dynamo_node, fake in zip(
        [n for n in traced.graph.nodes if n.op == "placeholder"], dynamo_placeholders, fakes
    ):
        node._rename(_input_name(dynamo_node))  # unique within the graph's namespace
        node.target = node.name
        node.meta["val"] = fake  # make_fx records a copy without ``item_memo`` (the SymFloat of a 0-d input)
    positions, weights = _freeze_weights(traced, dynamo_placeholders, example_inputs)
    frozen = set(positions)
    _sizes_from_tensors(traced)
    _specialize_scalars(traced)
    traced.graph.eliminate_dead_code()
    traced.recompile()
    inputs = [i for i in range(len(dynamo_placeholders)) if i not in frozen]
    return LoweredGraph(traced, positions, weights, inputs, time.perf_counter() - start)


@contextlib.contextmanager
def transform_context() -> Iterator[None]:
    """Where the transforms run on a lowered graph.

    - Dynamo's fake mode accepts real tensors: the frozen weights that the transforms' shape propagation reads
      through ``get_attr`` (an exported graph's fake mode allows them too);
    - Dynamo's ``TracingContext`` is set aside: building a pattern set exports each search function with
      ``torch.export``, which under the compile's context runs several times slower (its guard production walks
      Dynamo's shape environment). The graph's symbols are untouched: shape propagation takes the fake mode of
      the graph's own values, so a guard a transform adds still lands in Dynamo's ``ShapeEnv``.
    """
    fake_mode = _tracing_fake_mode()
    if fake_mode is None:
        yield
        return
    previous = fake_mode.allow_non_fake_inputs
    fake_mode.allow_non_fake_inputs = True
    try:
        with torch._guards.tracing(None):
            yield
    finally:
        fake_mode.allow_non_fake_inputs = previous


# ----------------------------------------------------------------------------------------------- hand-off


def carry_dynamo_metadata(graph: GraphModule, dynamo_gm: GraphModule, lowered: LoweredGraph) -> None:
    """Give the transformed graph the per-input metadata AOTAutograd reads from a Dynamo graph.

    AOTAutograd (under Inductor and Dynamo's ``cudagraphs``) takes it from ``gm.meta["dynamo_compile_id"]``,
    ``gm._param_name_to_source`` and each placeholder's ``_dynamo_source`` / ``meta["tensor_dict"]``; without it
    no input is static for CUDA graphs (``mode="reduce-overhead"``): every weight would be copied on each replay
    and a graph that writes Hugging Face's static KV cache in place (tensors marked with ``mark_static_address``)
    would not be captured at all. Weights a transform created (fused, quantized) get an ``EphemeralSource``: no
    guard is ever made from it (they are not Dynamo inputs).
    """
    from torch._dynamo.source import EphemeralSource

    compile_id = dynamo_gm.meta.get("dynamo_compile_id")
    dynamo_placeholders = [n for n in dynamo_gm.graph.nodes if n.op == "placeholder"]
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    if compile_id is None or len(placeholders) != len(lowered.input_positions):
        return  # not from Dynamo, or a transform changed the inputs: AOTAutograd treats them as fresh inputs
    weight_sources = {}
    for i in lowered.weight_positions:
        source = getattr(dynamo_placeholders[i].meta.get("grapharg"), "source", None)
        weight_sources[_module_path(_source_name(dynamo_placeholders[i]))] = source
    names = [name for name, _ in graph.named_parameters(remove_duplicate=False)]
    names += [name for name, _ in graph.named_buffers(remove_duplicate=False)]
    graph._param_name_to_source = {  # type: ignore[assignment]
        name: weight_sources.get(name) or EphemeralSource(f"autodeploy weight {name}") for name in names
    }
    for node, position in zip(placeholders, lowered.input_positions):
        dynamo_node = dynamo_placeholders[position]
        node._dynamo_source = getattr(dynamo_node, "_dynamo_source", None) or getattr(
            dynamo_node.meta.get("grapharg"), "source", None
        )
        if "tensor_dict" in dynamo_node.meta:
            node.meta["tensor_dict"] = dynamo_node.meta["tensor_dict"]
    graph.meta["dynamo_compile_id"] = compile_id


def inductor_compile(
    gm: GraphModule,
    example_inputs: Sequence[Any],
    config_patches: dict[str, Any],
    decompositions: dict[Any, Callable[..., Any]],
) -> Callable[..., Any]:
    """``compile_fx`` with our reference-op decompositions added to Inductor's table."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    table = {**select_decomp_table(), **decompositions}
    return compile_fx(gm, list(example_inputs), config_patches=config_patches, decompositions=table)


def mode_config(mode: str | None) -> dict[str, Any]:
    """Inductor's config patches for ``torch.compile``'s ``mode``."""
    if mode is None or mode == "default":
        return {}
    return dict(torch._inductor.list_mode_options(mode))


def cudagraphs_compile(gm: GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """Dynamo's own ``cudagraphs`` backend (CUDA-graph trees over the graph run as is)."""
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend("cudagraphs")(gm, list(example_inputs))


def compile_id() -> str | None:
    context = torch._guards.CompileContext.try_get()
    compile_id = getattr(context, "compile_id", None)
    return str(compile_id) if compile_id is not None else None
