"""The Dynamo backend: lower the captured graph, run the transforms, hand the result to Inductor or run it.

``autodeploy_backend(gm, example_inputs, options=None, mode=None)`` is what ``backend="autodeploy"`` resolves to;
``AutoDeployBackend(**options)`` is the same with fixed options and its own list of reports. Per graph:

1. ``lowering.lower_to_aten``: Dynamo's graph -> pre-dispatch aten (the IR of ``torch.export``), weights as
   ``get_attr``;
2. the transforms of ``options.select_transforms`` (canonicalise, quantize if asked, fuse), exactly the classes
   the engine's pipeline runs;
3. Inductor (``compile_fx``, reference ops decomposed so it fuses through them), Dynamo's ``cudagraphs`` backend
   (``inductor=False`` with ``mode="reduce-overhead"`` on CUDA) or the FX graph itself;
4. a ``GraphReport`` (``report.py``).

The returned function takes Dynamo's arguments, drops the frozen weights and calls the compiled graph. Weights are
captured at compile time (fused ones as concatenated copies), as with Inductor's freezing: an in-place update of a
parameter reaches unfused weights only. A call with other weight objects than those compiled with (Dynamo does
not guard on them) runs Dynamo's own graph instead, with a warning (``_runner``).
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.fx import GraphModule

from ..errors import ConfigError
from ..transforms.base import SharedContext, get_history
from ..transforms.pipeline import run_transforms
from .decompositions import reference_decompositions
from .lowering import (
    LoweredGraph,
    carry_dynamo_metadata,
    compile_id,
    cudagraphs_compile,
    inductor_compile,
    lower_to_aten,
    mode_config,
    transform_context,
)
from .options import CompileOptions, select_transforms
from .report import GraphReport, next_index, op_counts, record

logger = logging.getLogger("autodeploy.compile")


def _picker(positions: Sequence[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    if len(positions) == 1:
        (only,) = positions
        return lambda args: (args[only],)
    return operator.itemgetter(*positions) if positions else (lambda args: ())


def _runner(fn: Callable[..., Any], lowered: LoweredGraph, fallback: GraphModule, report: GraphReport):
    """What Dynamo calls: drop the frozen weights, call ``fn``; Dynamo's own graph for other weights.

    Dynamo does not guard on parameter identity, so one compiled graph can be called with the weights of another
    module of the same code (a graph break inside a repeated layer, a second model instance): those calls run
    ``fallback`` (Dynamo's graph, unoptimised) and are counted in ``report.fallback_calls``.
    """
    pick_inputs = _picker(lowered.input_positions)
    pick_weights = _picker(lowered.weight_positions)
    weights = tuple(lowered.weights)

    def run(*args: Any) -> Any:
        if weights and not all(map(operator.is_, pick_weights(args), weights)):
            if not report.fallback_calls:
                logger.warning(
                    "graph %d (compile id %s) is called with other weights than it was compiled with (a graph "
                    "break inside a repeated layer, or a second instance of the model); those calls run "
                    "unoptimised. Compile the model's whole forward without graph breaks, one model per process, "
                    "or update weights in place",
                    report.index,
                    report.compile_id,
                )
            report.fallback_calls += 1
            return fallback(*args)
        return fn(*pick_inputs(args))  # compile_fx and Dynamo backends return functions of unboxed arguments

    return run


def _device_and_dtype(lowered: LoweredGraph, example_inputs: Sequence[Any]) -> tuple[torch.device, torch.dtype]:
    tensors = [*lowered.weights, *(x for x in example_inputs if isinstance(x, torch.Tensor))]
    device = tensors[0].device if tensors else torch.device("cpu")
    floating = [t.dtype for t in tensors if t.is_floating_point()]
    return device, (floating[0] if floating else torch.float32)


def _describe_inputs(gm: GraphModule) -> list[str]:
    described = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        shape = list(val.shape) if isinstance(val, torch.Tensor) else val
        described.append(f"{node.name}: {shape}")
    return described


def compile_graph(
    gm: GraphModule, example_inputs: Sequence[Any], options: CompileOptions
) -> tuple[Callable[..., Any], GraphReport]:
    """Compile one Dynamo graph; returns the function Dynamo calls and the report."""
    transforms = select_transforms(options)  # config errors before any tracing
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        raise ConfigError(
            "torch.compile(backend='autodeploy') is for inference, but this graph was captured with autograd on "
            "and inputs that require grad (fused weights would not get gradients)",
            hint="call the model under torch.no_grad() or torch.inference_mode() (Hugging Face generate does), "
            "or model.requires_grad_(False)",
        )
    lowered = lower_to_aten(gm, example_inputs)
    graph = lowered.gm
    ops_before = op_counts(graph)
    device, dtype = _device_and_dtype(lowered, example_inputs)
    start = time.perf_counter()
    with transform_context():
        graph = run_transforms(graph, transforms, SharedContext(device=device, dtype=dtype))
    graph.recompile()
    transforms_s = time.perf_counter() - start
    inputs = [example_inputs[i] for i in lowered.input_positions]
    start = time.perf_counter()
    if options.inductor or options.cuda_graphs:
        carry_dynamo_metadata(graph, gm, lowered)
    if options.inductor:
        config = {**mode_config(options.mode), **options.inductor_config}
        fn, backend = inductor_compile(graph, inputs, config, reference_decompositions()), "inductor"
    elif options.cuda_graphs and device.type == "cuda":
        fn, backend = cudagraphs_compile(graph, inputs), "cudagraphs"
    else:
        fn, backend = graph, "eager"
    report = GraphReport(
        index=next_index(),
        compile_id=compile_id(),
        backend=backend,
        inputs=_describe_inputs(graph),
        num_weights=len(lowered.weights),
        transforms=list(get_history(graph).values()),
        ops_before=ops_before,
        ops_after=op_counts(graph),
        lowering_s=lowered.time_s,
        transforms_s=transforms_s,
        backend_compile_s=time.perf_counter() - start,
        code=graph.code,
    )
    record(report)
    logger.info("%s", report.summary())
    return _runner(fn, lowered, gm, report), report


def autodeploy_backend(
    gm: GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: dict[str, Any] | CompileOptions | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """The ``"autodeploy"`` Dynamo backend: ``torch.compile(m, backend="autodeploy", options={...})``."""
    compiled, _ = compile_graph(gm, example_inputs, CompileOptions.parse(options, mode))
    return compiled


class AutoDeployBackend:
    """The backend with fixed options and its own reports: ``torch.compile(m, backend=AutoDeployBackend(...))``."""

    def __init__(self, options: dict[str, Any] | None = None, **kwargs: Any):
        self.options = CompileOptions.parse({**(options or {}), **kwargs})
        self.reports: list[GraphReport] = []

    def __call__(self, gm: GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable[..., Any]:
        options = self.options
        if kwargs:
            merged = {**self.options.model_dump(), **(kwargs.get("options") or {})}
            options = CompileOptions.parse(merged, kwargs.get("mode"))
        compiled, report = compile_graph(gm, example_inputs, options)
        self.reports.append(report)
        return compiled

    def __repr__(self) -> str:
        return f"AutoDeployBackend({self.options.model_dump(exclude_defaults=True)})"
