"""``fuse_fp8_act_quant``: an fp8 linear's per-token input quantization moves into the kernel that makes its input.

Matches a producer — ``triton_rmsnorm`` (without ``out_dtype``), ``triton_fused_add_rmsnorm`` (its normalised
output) or a ``triton_linear_glu`` of fp8 weights (``fuse_glu_linear`` ran before) — whose 16-bit output is read
only by fp8 linears (``triton_quant_fp8_linear``, fp8 ``triton_linear_glu``), directly or through views, each with
16-aligned weight rows. Emits the producer's fp8 twin and the readers' forms that take its codes
(``custom_ops/triton/fp8_activations.py``): above one token on the GPU the norm (q/k/v, gate/up) and the gated
activation (down) write fp8 codes and per-token scales in place of their 16-bit output, and ``torch._scaled_mm``
multiplies them — one launch and two passes over the activation fewer per linear. At one token, and on CPU, the
graph computes what it did before; there the norms also write the per-token scale, which the fp8 decode GEMVs of
q/k/v and gate/up read instead of each program computing it from the whole row. Not matched: the attention output
(``o_proj`` keeps its quantization launch), norms fused with an all-reduce (tensor parallel), readers of other
formats. The torch backend has no such nodes.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from .base import SharedContext, Transform, TransformConfig, TransformInfo, TransformRegistry
from .graph import find_nodes, get_attr_value, is_op, node_val

ops = torch.ops.autodeploy
aten = torch.ops.aten
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _rows_aligned(gm: GraphModule, weight: object) -> bool:
    return isinstance(weight, Node) and weight.op == "get_attr" and get_attr_value(gm, weight).shape[0] % 16 == 0


def _is_reader(gm: GraphModule, node: Node, x: Node) -> bool:
    """An fp8 linear that reads ``x`` as its 16-bit input (and does not yet take codes)."""
    if not node.args or node.args[0] is not x:
        return False
    if node.target == ops.triton_quant_fp8_linear.default:
        return _rows_aligned(gm, node.args[1])
    if node.target == ops.triton_linear_glu.default:
        return node.args[5] == "fp8" and _rows_aligned(gm, node.args[1])
    if node.target == ops.triton_linear_glu_fp8.default:
        return node.args[1] is None and _rows_aligned(gm, node.args[3])
    return False


def _readers(gm: GraphModule, y: Node) -> list[Node] | None:
    """The fp8 linears reading ``y`` directly or through views, or None when anything else reads it."""
    found = []
    for user in y.users:
        if is_op(user, VIEWS) and user.args[0] is y:
            inner = _readers(gm, user)
            if inner is None:
                return None
            found += inner
        elif _is_reader(gm, user, y):
            found.append(user)
        else:
            return None
    return found


def _getitem(graph, node: Node, index: int, val: object) -> Node:
    item = graph.call_function(operator.getitem, (node, index))
    if val is not None:
        item.meta["val"] = val
    return item


def _fp8_vals(y_val: object, rows: bool = True) -> tuple[object, object]:
    """Fake values of the codes ``[R, K]`` and scales ``[R, 1]`` of ``y`` (no rows: ``[0, K]``, ``[0, 1]``)."""
    if y_val is None:
        return None, None
    flat = y_val.reshape(-1, y_val.shape[-1])
    r = flat.shape[0] if rows else 0
    return flat.new_empty((r, flat.shape[1]), dtype=torch.float8_e4m3fn), flat.new_empty((r, 1), dtype=torch.float32)


def _argument(node: Node, index: int, name: str, default: object) -> object:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _read_codes(graph, reader: Node, codes: Node, scales: Node, scale_given: bool) -> None:
    """Make ``reader`` take the codes and scales beside its 16-bit input (``scale_given``: the scales also come
    with the 16-bit form, as a norm writes them)."""
    if reader.target == ops.triton_linear_glu_fp8.default:
        reader.args = (reader.args[0], codes, scales, *reader.args[3:8], scale_given)
        return
    with graph.inserting_before(reader):
        if reader.target == ops.triton_quant_fp8_linear.default:
            x, weight, weight_scale = reader.args[:3]
            new = graph.call_function(ops.triton_quant_fp8_linear_prequant.default,
                                      (x, codes, scales, weight, weight_scale, _argument(reader, 3, "bias", None),
                                       scale_given))
            new.meta.update(reader.meta)
            reader.replace_all_uses_with(new)
        else:  # triton_linear_glu(x, weight, scales, zeros, bias, "fp8", group_size, activation)
            x, weight, weight_scale, _, bias, _, _, activation = reader.args[:8]
            new = graph.call_function(ops.triton_linear_glu_fp8.default,
                                      (x, codes, scales, weight, weight_scale, bias, activation, False, scale_given))
            val = node_val(reader)
            new.meta["val"] = (val, *_fp8_vals(val, rows=False))
            reader.replace_all_uses_with(_getitem(graph, new, 0, val))
    graph.erase_node(reader)


def _fuse_norm(gm: GraphModule, norm: Node) -> bool:
    """A norm whose output only fp8 linears read writes their codes."""
    graph = gm.graph
    plain = norm.target == ops.triton_rmsnorm.default
    if plain:
        if _argument(norm, 4, "out_dtype", None) is not None:
            return False
        normed, summed = norm, None
    else:
        outs = {u.args[1]: u for u in norm.users if u.target is operator.getitem}
        if len(outs) != len(norm.users) or 0 not in outs:
            return False
        normed, summed = outs[0], outs.get(1)
    readers = _readers(gm, normed)
    if not readers:
        return False
    inputs = norm.args[:2] if plain else norm.args[:3]  # (x, weight) or (x, residual, weight)
    eps = norm.args[len(inputs)]
    offset = _argument(norm, len(inputs) + 1, "weight_offset", 0.0)
    y_val, sum_val = node_val(normed), node_val(summed) if summed is not None else None
    codes_val, scales_val = _fp8_vals(y_val)
    with graph.inserting_before(norm):
        if plain:
            new = graph.call_function(ops.triton_rmsnorm_fp8.default, (*inputs, eps, offset))
            new.meta["val"] = (y_val, codes_val, scales_val)
        else:
            new = graph.call_function(ops.triton_fused_add_rmsnorm_fp8.default, (*inputs, eps, offset))
            new.meta["val"] = (y_val, sum_val, codes_val, scales_val)
            new_summed = _getitem(graph, new, 1, sum_val)
            if summed is not None:
                summed.replace_all_uses_with(new_summed)
        first = 0 if plain else 1
        y = _getitem(graph, new, 0, y_val)
        codes, scales = _getitem(graph, new, first + 1, codes_val), _getitem(graph, new, first + 2, scales_val)
    normed.replace_all_uses_with(y)
    for reader in readers:
        _read_codes(graph, reader, codes, scales, scale_given=True)
    for node in dict.fromkeys(n for n in (summed, normed, norm) if n is not None):  # norm last
        if not node.users:
            graph.erase_node(node)
    return True


def _fuse_glu(gm: GraphModule, glu: Node) -> bool:
    """An fp8 gate/up linear whose activation only fp8 linears read writes their codes."""
    graph = gm.graph
    if glu.target == ops.triton_linear_glu.default:
        if glu.args[5] != "fp8":
            return False
        h = glu
    else:
        items = [u for u in glu.users if u.target is operator.getitem and u.args[1] == 0]
        if glu.args[7] or len(items) != len(glu.users) or len(items) != 1:
            return False
        h = items[0]
    readers = _readers(gm, h)
    if not readers:
        return False
    h_val = node_val(h)
    codes_val, scales_val = _fp8_vals(h_val)
    with graph.inserting_before(glu):
        if glu.target == ops.triton_linear_glu.default:
            x, weight, weight_scale, _, bias, _, _, activation = glu.args[:8]
            new = graph.call_function(ops.triton_linear_glu_fp8.default,
                                      (x, None, None, weight, weight_scale, bias, activation, True))
            y = _getitem(graph, new, 0, h_val)
        else:
            new, y = glu, h
            new.update_arg(7, True)
        new.meta["val"] = (h_val, codes_val, scales_val)
    with graph.inserting_after(y):
        scales = _getitem(graph, new, 2, scales_val)
    with graph.inserting_after(y):
        codes = _getitem(graph, new, 1, codes_val)
    if y is not h:
        h.replace_all_uses_with(y)
        graph.erase_node(h)
    for reader in readers:
        _read_codes(graph, reader, codes, scales, scale_given=False)
    return True


@TransformRegistry.register("fuse_fp8_act_quant")
class FuseFp8ActQuant(Transform):
    config_class = TransformConfig
    requires_shape_prop = False  # the new nodes carry the values of the nodes they replace

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        if not hasattr(ops, "triton_quant_fp8_linear") or not hasattr(ops, "triton_rmsnorm"):
            return TransformInfo(num_matches=0)
        from ..custom_ops.triton import fp8_activations  # noqa: F401  (registers the ops it emits)

        norms = sum(_fuse_norm(gm, n) for n in find_nodes(gm, (ops.triton_rmsnorm.default,
                                                                ops.triton_fused_add_rmsnorm.default)))
        glus = sum(_fuse_glu(gm, n) for n in find_nodes(gm, (ops.triton_linear_glu.default,
                                                             ops.triton_linear_glu_fp8.default)))
        return TransformInfo(num_matches=norms + glus, details={"norms": norms, "activations": glus})
