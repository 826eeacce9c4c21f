"""``fuse_glu_linear``: a gate/up linear and the gated activation that alone reads it become one op.

Matches: ``triton_glu_packed(linear(x, ...), activation)`` where ``linear`` is ``triton_linear`` (``dense``),
``triton_quant_fp8_linear`` (``fp8``) or ``triton_quant_int4_linear`` (``int4``), of a format listed in
``formats``, and the GLU is its only user (so this runs after ``gemv_linears``). Emits ``triton_linear_glu``
(``custom_ops/triton/linear_glu.py``) with the linear's weights: at decode sizes the GEMV computes the activation
in its epilogue, one launch fewer per MLP. The torch backend has no such nodes, so the graph is left alone there.

``formats`` lists the weight formats fused, by default all three. On an H100, Llama-3.1-8B shape, batch-1 decode,
fused against the GEMV and the activation's own launch, same machine and call (docs/PERFORMANCE.md): bf16 saves
1.3-1.4 us a layer (``bench/pdl.py``, runs 14 and 17); int4 on the tensor-core GEMV 337.8 -> 341.7 tok/s and fp8
257.5 -> 258.8 tok/s (``bench/quant.py``, run 36; the CUDA-core int4 GEMV of run 14 lost 18.6 us a layer fused).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.fx import GraphModule, Node

from .base import SharedContext, Transform, TransformConfig, TransformInfo, TransformRegistry
from .graph import find_nodes

ops = torch.ops.autodeploy


def _linear_formats() -> dict:
    """linear op -> (weight_format, the names of its arguments after ``x``, their defaults)."""
    return {
        ops.triton_linear.default: ("dense", ("weight", "bias"), {"bias": None}),
        ops.triton_quant_fp8_linear.default: ("fp8", ("weight", "weight_scale", "bias"), {"bias": None}),
        ops.triton_quant_int4_linear.default: (
            "int4", ("qweight", "scales", "zeros", "bias", "group_size"),
            {"zeros": None, "bias": None, "group_size": 128},
        ),
    }


def _arguments(node: Node, names: tuple[str, ...], defaults: dict) -> dict:
    values = dict(zip(names, node.args[1:]))
    for name in names:
        if name not in values:
            values[name] = node.kwargs.get(name, defaults.get(name))
    return values


class FuseGLULinearConfig(TransformConfig):
    formats: list[Literal["dense", "fp8", "int4"]] = ["dense", "fp8", "int4"]


@TransformRegistry.register("fuse_glu_linear")
class FuseGLULinear(Transform):
    config_class = FuseGLULinearConfig
    requires_shape_prop = False  # the fused node takes the GLU's place and its output

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        if not hasattr(ops, "triton_glu_packed"):  # the Triton ops were never imported: nothing to match
            return TransformInfo(num_matches=0)
        from ..custom_ops.triton import linear_glu  # noqa: F401  (registers autodeploy::triton_linear_glu)

        formats = _linear_formats()
        graph = gm.graph
        fused = 0
        for glu in find_nodes(gm, ops.triton_glu_packed.default):
            linear, activation = glu.args[0], glu.args[1]
            if not isinstance(linear, Node) or linear.target not in formats or len(linear.users) != 1:
                continue
            weight_format, names, defaults = formats[linear.target]
            if weight_format not in self.config.formats:
                continue
            a = _arguments(linear, names, defaults)
            if weight_format == "dense":
                weight, scales, zeros, group = a["weight"], None, None, 0
            elif weight_format == "fp8":
                weight, scales, zeros, group = a["weight"], a["weight_scale"], None, 0
            else:
                weight, scales, zeros, group = a["qweight"], a["scales"], a["zeros"], a["group_size"]
            with graph.inserting_before(glu):
                new = graph.call_function(
                    ops.triton_linear_glu.default,
                    (linear.args[0], weight, scales, zeros, a["bias"], weight_format, group, activation),
                )
            new.meta.update(glu.meta)
            glu.replace_all_uses_with(new)
            graph.erase_node(glu)
            graph.erase_node(linear)
            fused += 1
        return TransformInfo(num_matches=fused)
