"""``shard_vocab``: carry out the vocabulary part of the sharding plan (``detect_sharding``).

LM head: keeps this rank's ``V / N`` vocabulary rows (column split) and its logits are
``autodeploy::all_gather``-ed along the last dim, so every rank returns the full ``[..., V]`` logits.
Embedding (when planned, always for an LM head tied to it): keeps the same rows; a token outside this rank's
range looks up row 0 and is zeroed, and the partial embeddings are ``autodeploy::all_reduce``-d.
Emits nothing when there is no plan (a world of one).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from .base import SharedContext, Transform, TransformInfo, TransformRegistry
from .sharding import (
    ALL_GATHER,
    ALL_REDUCE,
    ParamSplit,
    get_plan,
    insert_after,
    nodes_by_name,
    shard_parameter,
    split_column,
)

aten = torch.ops.aten


def _vocab_parallel_embedding(gm: GraphModule, emb, start: int, stop: int) -> None:
    graph = gm.graph
    weight, ids = emb.args[0], emb.args[1]
    shard_parameter(gm, ParamSplit(weight.target, 0, ((start, stop),)))
    with graph.inserting_before(emb):
        local = graph.call_function(aten.sub.Tensor, (ids, start))
        inside = graph.call_function(
            aten.logical_and.default,
            (graph.call_function(aten.ge.Scalar, (local, 0)), graph.call_function(aten.lt.Scalar, (local, stop - start))),
        )
        safe = graph.call_function(aten.where.ScalarOther, (inside, local, 0))
    emb.replace_input_with(ids, safe)
    with graph.inserting_before(emb.next):  # in creation order, right after the lookup
        mask = graph.call_function(aten.unsqueeze.default, (inside, -1))
        masked = graph.call_function(aten.mul.Tensor, (emb, mask))
        reduced = graph.call_function(ALL_REDUCE, (masked,))
    emb.replace_all_uses_with(reduced, delete_user_cb=lambda user: user is not masked)

@TransformRegistry.register("shard_vocab")
class ShardVocab(Transform):
    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        plan = get_plan(gm)
        if plan is None or plan.vocab is None:
            return TransformInfo(num_matches=0)
        vocab = plan.vocab
        nodes = nodes_by_name(gm)
        for split in vocab.embeddings:
            _vocab_parallel_embedding(gm, nodes[split.node], split.start, split.stop)
        if vocab.lm_head is not None:
            head = nodes[vocab.lm_head.node]
            split_column(gm, head, vocab.lm_head.ranges)
            insert_after(gm, head, ALL_GATHER, (-1, plan.world_size))
        return TransformInfo(
            num_matches=len(vocab.embeddings) + (vocab.lm_head is not None),
            details={"vocab_size": vocab.vocab_size, "lm_head": vocab.lm_head is not None,
                     "embeddings": len(vocab.embeddings)},
        )
