"""``detect_sharding``: decide how this rank's share of the model looks, and refuse what cannot be split.

Runs first in the sharding stage (after pattern matching, before weights are loaded and linears fused), on a
world of ``ctx.world_size`` ranks; a world of one leaves the graph alone. It records a ``ShardingPlan``
(``transforms/sharding.py``) that the ``shard_*`` transforms carry out:

- **attention** (each ``torch_attention``): q/k/v linears split by heads (column), o_proj by its input (row, then
  ``all_reduce``); the ``view``/``reshape`` literals on those paths become local head counts; per-head
  parameters of the op (sinks, ALiBi slopes) are sliced. GQA: with ``num_kv_heads >= world_size`` the KV heads
  are split too; with fewer, each rank keeps the one KV head its query heads read (replicated KV heads).
  Between a projection and the op only views, transposes, casts, RoPE and per-head RMSNorm may appear.
- **mlp**: ``torch_glu(gate, up)`` / ``torch_glu_packed(gate_up)`` and ``linear -> unary activation -> linear``
  chains: the first linears column, the last row (then ``all_reduce``).
- **moe** (each ``torch_moe``): ``expert`` mode gives each rank ``E / N`` experts and shifts the routed ids so
  the others fall outside ``[0, E/N)`` (which ``torch_moe`` ignores); ``tensor`` mode splits every expert's
  intermediate size; ``auto`` prefers expert mode. Then ``all_reduce``.
- **vocab**: the LM head keeps ``V / N`` vocabulary rows and its logits are ``all_gather``-ed (``lm_head``);
  the embedding can be vocab-parallel too (``embedding``: masked lookup, then ``all_reduce``). A tied LM head
  and embedding are split together.

Linears may be quantized (the quantization stage runs first): they split like ``aten.linear``, with their scales
(``sharding.py``), and float8 experts keep their per-row scales with their rows. Everything else (routers,
norms, the embedding by default) is replicated. Shapes that do not divide (heads, intermediate sizes, experts,
vocabulary, int4 groups) raise a ``TransformError`` naming the layer and the setting to change.
Limits: packed QKV projections, attention whose projections pass through other ops (MLA) and norms over the
whole projection are refused rather than replicated.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.fx import GraphModule, Node

from ..errors import TransformError
from .base import SharedContext, Transform, TransformConfig, TransformInfo, TransformRegistry
from .gather_logits import find_lm_head
from .graph import find_nodes, is_op, node_val, op_arguments, parameter_view
from .sharding import (
    PLAN_KEY,
    AttentionShard,
    EmbeddingSplit,
    LinearSplit,
    MLPShard,
    MoEShard,
    ParamSplit,
    ShardingPlan,
    ViewRewrite,
    VocabShard,
    check_get_attr_users,
    is_linear,
    layer_of,
    linear_bias,
    linear_operands,
    row_split_unit,
    split_range,
    weight_target,
)

aten = torch.ops.aten
ad = torch.ops.autodeploy
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
PASS = (aten.transpose.int, aten.permute.default, aten.contiguous.default, aten.clone.default, aten.to.dtype,
        aten._to_copy.default, aten.to.dtype_layout, aten.alias.default)
ACTIVATIONS = (aten.gelu.default, aten.relu.default, aten.silu.default, aten.tanh.default, aten.sigmoid.default,
               aten.square.default, aten.pow.Tensor_Scalar)


class DetectShardingConfig(TransformConfig):
    attention: bool = True
    mlp: bool = True
    moe: Literal["auto", "expert", "tensor", "none"] = "auto"
    lm_head: bool = True  # vocab-parallel LM head (logits all-gathered)
    embedding: bool = False  # vocab-parallel embedding (masked lookup, all-reduced)


def _error(layer: str, what: str, hint: str) -> TransformError:
    return TransformError(f"{layer}: {what}", where="detect_sharding", hint=hint)


def _is_scalar_mul(node: Node) -> bool:
    return is_op(node, (aten.mul.Tensor, aten.div.Tensor)) and not isinstance(node.args[1], Node)


def _single_user(node: Node) -> Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


class _Detector:
    def __init__(self, gm: GraphModule, config: DetectShardingConfig, rank: int, world: int):
        self.gm, self.config, self.rank, self.world = gm, config, rank, world
        self.claimed: set[Node] = set()
        self.plan = ShardingPlan(rank, world)

    # ---- attention ----------------------------------------------------------------------------------------
    def _to_projection(self, start: Node, layer: str, what: str, head_dim: int) -> tuple[Node, list[Node]]:
        """Walk from an attention input back to its linear; returns it and the nodes in between."""
        hint = "set transforms.detect_sharding.attention=false to replicate attention, or tensor_parallel_size=1"
        path, node = [], start
        while not is_linear(node):
            if not isinstance(node, Node) or node.op != "call_function":
                raise _error(layer, f"the attention's {what} does not come from a linear projection", hint)
            if is_op(node, ad.torch_rmsnorm) and node_val(node.args[0]).shape[-1] != head_dim:
                raise _error(layer, f"the {what} projection is normalised over all heads at once", hint)
            if not (is_op(node, (*VIEWS, *PASS, ad.torch_rope, ad.torch_rmsnorm)) or _is_scalar_mul(node)):
                raise _error(layer, f"the attention's {what} passes through {node.target}, which cannot be split by "
                             "heads (packed QKV and latent attention are not supported)", hint)
            if len(node.users) != 1:
                raise _error(layer, f"the {what} path node {node.name} is read outside the attention", hint)
            path.append(node)
            node = node.args[0]
        if len(node.users) != 1:
            raise _error(layer, f"the {what} projection {node.name} is read outside the attention", hint)
        return node, path

    def _to_output_projection(self, attn: Node, layer: str) -> tuple[Node, list[Node]]:
        hint = "set transforms.detect_sharding.attention=false to replicate attention, or tensor_parallel_size=1"
        path, node = [], attn
        while True:
            user = _single_user(node)
            if user is None:
                raise _error(layer, f"the attention output ({node.name}) has {len(node.users)} readers", hint)
            if is_linear(user) and user.args[0] is node:
                return user, path
            if not is_op(user, (*VIEWS, *PASS)):
                raise _error(layer, f"the attention output passes through {user.target} before its projection", hint)
            path.append(user)
            node = user

    def _kv_heads(self, layer: str, n_q: int, n_kv: int) -> tuple[int, int]:
        """(first KV head, local KV heads) of this rank."""
        world, q_local = self.world, n_q // self.world
        if n_kv % world == 0:
            local = n_kv // world
            return self.rank * local, local
        if world % n_kv == 0:
            return (self.rank * q_local) // (n_q // n_kv), 1
        raise _error(
            layer,
            f"{n_kv} KV heads cannot be split or replicated over {world} ranks (neither divides the other)",
            "use a tensor_parallel_size that divides num_key_value_heads or is a multiple of it",
        )

    def attention(self) -> None:
        for attn in find_nodes(self.gm, ad.torch_attention):
            layer = layer_of(attn)
            q, k, v = (node_val(a) for a in attn.args[:3])
            n_q, n_kv, d, dv = q.shape[2], k.shape[2], q.shape[3], v.shape[3]
            if n_q % self.world:
                raise _error(
                    layer,
                    f"{n_q} query heads do not divide over tensor_parallel_size={self.world}",
                    f"use a tensor_parallel_size that divides {n_q}",
                )
            q_local = n_q // self.world
            kv_first, kv_local = self._kv_heads(layer, n_q, n_kv)
            q_first = self.rank * q_local
            (q_lin, q_path), (k_lin, k_path), (v_lin, v_path) = (
                self._to_projection(attn.args[i], layer, what, d if i < 2 else dv)
                for i, what in enumerate(("query", "key", "value"))
            )
            o_lin, o_path = self._to_output_projection(attn, layer)
            if len({q_lin, k_lin, v_lin}) != 3:
                raise _error(layer, "query, key and value share one projection (packed QKV)",
                             "set transforms.detect_sharding.attention=false or tensor_parallel_size=1")
            columns = [
                LinearSplit(q_lin.name, ((q_first * d, (q_first + q_local) * d),)),
                LinearSplit(k_lin.name, ((kv_first * d, (kv_first + kv_local) * d),)),
                LinearSplit(v_lin.name, ((kv_first * dv, (kv_first + kv_local) * dv),)),
            ]
            for lin, n, hd in ((q_lin, n_q, d), (k_lin, n_kv, d), (v_lin, n_kv, dv)):
                if node_val(lin).shape[-1] != n * hd:
                    raise _error(layer, f"projection {lin.name} has {node_val(lin).shape[-1]} outputs, not "
                                 f"{n} heads x {hd}", "set transforms.detect_sharding.attention=false")
            row = LinearSplit(o_lin.name, ((q_first * dv, (q_first + q_local) * dv),))
            self._check_row_split(o_lin, row.ranges, layer)
            views = [ViewRewrite(n.name, {n_q: q_local, n_q * d: q_local * d}, d) for n in q_path if is_op(n, VIEWS)]
            views += [ViewRewrite(n.name, {n_kv: kv_local, n_kv * d: kv_local * d}, d)
                      for n in k_path if is_op(n, VIEWS)]
            views += [ViewRewrite(n.name, {n_kv: kv_local, n_kv * dv: kv_local * dv}, dv)
                      for n in v_path if is_op(n, VIEWS)]
            views += [ViewRewrite(n.name, {n_q: q_local, n_q * dv: q_local * dv}, dv)
                      for n in o_path if is_op(n, VIEWS)]
            head_params = self._head_params(attn, layer, n_q, q_first, q_local)
            for lin in (q_lin, k_lin, v_lin, o_lin):
                self._check_weights(lin, layer)
            self.claimed.update((q_lin, k_lin, v_lin, o_lin))
            self.plan.attention.append(
                AttentionShard(layer, attn.name, columns, row, views, head_params,
                               {"q": (n_q, q_local), "kv": (n_kv, kv_local)})
            )

    def _head_params(self, attn: Node, layer: str, n_q: int, first: int, local: int) -> list[ParamSplit]:
        out = []
        schema = attn.target._schema
        for i, arg in enumerate(schema.arguments):
            value = attn.args[i] if i < len(attn.args) else attn.kwargs.get(arg.name)
            if arg.name not in ("sinks", "alibi_slopes", "mask") or value is None:
                continue
            if arg.name == "mask":
                if node_val(value).shape[1] != 1:
                    raise _error(layer, "the attention mask has one plane per head",
                                 "set transforms.detect_sharding.attention=false")
                continue
            if not (isinstance(value, Node) and value.op == "get_attr" and node_val(value).shape == (n_q,)):
                raise _error(layer, f"the attention's {arg.name} are computed in the graph, not a [{n_q}] parameter",
                             "set transforms.detect_sharding.attention=false")
            check_get_attr_users(self.gm, value.target, {attn}, layer)
            out.append(ParamSplit(value.target, 0, ((first, first + local),)))
        return out

    def _check_weights(self, lin: Node, layer: str) -> None:
        for name, operand in linear_operands(lin).items():
            if operand.op != "get_attr":
                raise _error(layer, f"the {name} of {lin.name} is computed in the graph", "tensor_parallel_size=1")
            check_get_attr_users(self.gm, operand.target, {lin}, layer)

    def _check_row_split(self, lin: Node, ranges, layer: str) -> None:
        unit = row_split_unit(lin)
        if any(a % unit or b % unit for a, b in ranges):
            module = weight_target(lin, 1).rpartition(".")[0]
            raise _error(layer, f"{module} would be split inside its int4 groups (its input features on each rank "
                         f"must be a multiple of {unit})", "use a smaller tensor_parallel_size, or quantize with "
                         "another group_size")

    # ---- MLP ----------------------------------------------------------------------------------------------
    def _down_projection(self, node: Node, layer: str) -> Node:
        start = node
        while True:
            user = _single_user(node)
            if user is not None and is_linear(user) and user.args[0] is node:
                return user
            if user is None or not is_op(user, PASS):
                raise _error(layer, f"the gated activation {start.name} does not feed exactly one linear",
                             "set transforms.detect_sharding.mlp=false to replicate MLPs")
            node = user

    def _mlp_shard(self, layer: str, columns: list[tuple[Node, int, bool]], down: Node, size: int) -> None:
        """``columns``: (linear, its output features, packed gate+up)."""
        if size % self.world:
            raise _error(layer, f"intermediate size {size} does not divide over tensor_parallel_size={self.world}",
                         "set transforms.detect_sharding.mlp=false, or a tensor_parallel_size that divides it")
        start, stop = split_range(size, self.rank, self.world)
        splits = []
        for lin, _, packed in columns:
            ranges = ((start, stop), (size + start, size + stop)) if packed else ((start, stop),)
            splits.append(LinearSplit(lin.name, ranges))
            self._check_weights(lin, layer)
        self._check_weights(down, layer)
        self._check_row_split(down, ((start, stop),), layer)
        self.claimed.update([lin for lin, _, _ in columns] + [down])
        self.plan.mlp.append(MLPShard(layer, splits, LinearSplit(down.name, ((start, stop),)), []))

    def mlp(self) -> None:
        for glu in find_nodes(self.gm, (ad.torch_glu, ad.torch_glu_packed)):
            layer = layer_of(glu)
            inputs = glu.args[:2] if is_op(glu, ad.torch_glu) else glu.args[:1]
            if not all(is_linear(a) and len(a.users) == 1 and a not in self.claimed for a in inputs):
                raise _error(layer, f"the inputs of {glu.name} are not linears that only it reads",
                             "set transforms.detect_sharding.mlp=false to replicate MLPs")
            packed = is_op(glu, ad.torch_glu_packed)
            size = node_val(inputs[0]).shape[-1] // (2 if packed else 1)
            self._mlp_shard(layer, [(a, size, packed) for a in inputs], self._down_projection(glu, layer), size)
        for first in [n for n in self.gm.graph.nodes if is_linear(n)]:
            if first in self.claimed:
                continue
            node, acts = first, 0
            while (user := _single_user(node)) is not None and is_op(user, (*ACTIVATIONS, *PASS)):
                acts += is_op(user, ACTIVATIONS)
                node = user
            size = node_val(first).shape[-1]
            if acts and user is not None and is_linear(user) and user.args[0] is node and user not in self.claimed \
                    and size % self.world == 0:  # an unrecognised odd-sized chain stays replicated
                self._mlp_shard(layer_of(first), [(first, size, False)], user, size)

    # ---- MoE ----------------------------------------------------------------------------------------------
    def _param_dim(self, node: Node, dim: int, layer: str) -> tuple[str, int]:
        """The parameter behind an op argument and which of its dims is the argument's ``dim``."""
        view = parameter_view(self.gm, node)
        if view is None:
            raise _error(layer, f"expert weights come from {getattr(node, 'target', node)}, not a parameter",
                         "set transforms.detect_sharding.moe=none to replicate the experts")
        return view[0], view[1][dim]

    def moe(self) -> None:
        for moe in find_nodes(self.gm, ad.torch_moe):
            layer = layer_of(moe)
            args = op_arguments(moe)
            w_up, w_down = node_val(args["w_up"]), node_val(args["w_down"])
            n_exp, inter = w_up.shape[0], w_down.shape[2]
            mode = self.config.moe
            if mode == "auto":
                mode = "expert" if n_exp % self.world == 0 else "tensor"
            size = n_exp if mode == "expert" else inter
            if size % self.world:
                what = "experts" if mode == "expert" else "expert intermediate size"
                raise _error(layer, f"{size} {what} do not divide over tensor_parallel_size={self.world}",
                             "set transforms.detect_sharding.moe to another mode or none")
            start, stop = split_range(size, self.rank, self.world)
            params: list[ParamSplit] = []

            def cut(name: str, op_dim: int, ranges, zero: bool = False) -> None:
                if args.get(name) is None:
                    return
                target, dim = self._param_dim(args[name], op_dim, layer)
                check_get_attr_users(self.gm, target, {moe} | set(_view_chain(args[name])), layer)
                params.append(ParamSplit(target, dim, ranges, zero))

            if mode == "expert":
                for name in ("w_up", "w_down", "b_up", "b_down", "w_up_scale", "w_down_scale"):
                    cut(name, 0, ((start, stop),))
            else:
                gated, interleaved = bool(args["gated"]), bool(args["interleaved"])
                up = (((2 * start, 2 * stop),) if interleaved else ((start, stop), (inter + start, inter + stop))) \
                    if gated else ((start, stop),)
                cut("w_up", 1, up)
                cut("b_up", 1, up)
                cut("w_up_scale", 1, up)  # float8 experts: one scale per row of w_up; w_down's rows stay whole
                cut("w_down", 2, ((start, stop),))
                if self.rank != 0:
                    cut("b_down", 1, ((0, w_down.shape[1]),), zero=True)
            self.plan.moe.append(MoEShard(layer, moe.name, mode, params, start if mode == "expert" else 0))

    # ---- vocabulary ---------------------------------------------------------------------------------------
    def vocab(self) -> None:
        head = find_lm_head(self.gm) if self.config.lm_head else None
        embeddings = [n for n in find_nodes(self.gm, aten.embedding.default)
                      if isinstance(n.args[0], Node) and n.args[0].op == "get_attr"]
        head_weight = weight_target(head, 1) if head is not None else None
        tied = {n for n in embeddings if n.args[0].target == head_weight}
        chosen = [n for n in embeddings if self.config.embedding or n in tied]
        if not chosen and head is None:
            return
        vocab = node_val(head).shape[-1] if head is not None else node_val(chosen[0].args[0]).shape[0]
        if vocab % self.world:
            raise _error("lm_head", f"vocabulary size {vocab} does not divide over tensor_parallel_size={self.world}",
                         "set transforms.detect_sharding.lm_head=false (and embedding=false)")
        start, stop = split_range(vocab, self.rank, self.world)
        splits = []
        for emb in chosen:
            if node_val(emb.args[0]).shape[0] != vocab:
                continue
            check_get_attr_users(self.gm, emb.args[0].target, {emb} | ({head} if head is not None else set()),
                                 layer_of(emb))
            splits.append(EmbeddingSplit(emb.name, start, stop))
        head_split = None
        if head is not None:
            if linear_bias(head) is not None and not (isinstance(linear_bias(head), Node)
                                                      and linear_bias(head).op == "get_attr"):
                raise _error("lm_head", "the LM head's bias is computed in the graph",
                             "set transforms.detect_sharding.lm_head=false")
            head_split = LinearSplit(head.name, ((start, stop),))
            self.claimed.add(head)
        self.plan.vocab = VocabShard(vocab, splits, head_split)


def _view_chain(node: Node) -> list[Node]:
    chain = []
    while isinstance(node, Node) and node.op != "get_attr":
        chain.append(node)
        node = node.args[0]
    return chain


@TransformRegistry.register("detect_sharding")
class DetectSharding(Transform):
    config_class = DetectShardingConfig
    requires_shape_prop = False

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        if ctx.world_size <= 1:
            return TransformInfo(num_matches=0, details={"world_size": ctx.world_size})
        detector = _Detector(gm, self.config, ctx.rank, ctx.world_size)
        if self.config.attention:
            detector.attention()
        if self.config.moe != "none":
            detector.moe()
        if self.config.lm_head or self.config.embedding:
            detector.vocab()
        if self.config.mlp:
            detector.mlp()
        plan = detector.plan
        gm.meta[PLAN_KEY] = plan
        replicated = [n.name for n in gm.graph.nodes if is_linear(n) and n not in detector.claimed]
        details = {
            "world_size": ctx.world_size,
            "rank": ctx.rank,
            "attention": len(plan.attention),
            "mlp": len(plan.mlp),
            "moe": [m.mode for m in plan.moe][:1] + [len(plan.moe)],
            "vocab": None if plan.vocab is None else {"lm_head": plan.vocab.lm_head is not None,
                                                       "embeddings": len(plan.vocab.embeddings)},
            "replicated_linears": replicated[:8],
        }
        num = len(plan.attention) + len(plan.mlp) + len(plan.moe) + (plan.vocab is not None)
        return TransformInfo(num_matches=num, details=details)

