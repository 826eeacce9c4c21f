"""What an attention mask or bias in an exported graph means, found by running the subgraph that computes it.

A mask in an exported causal LM is computed from shapes, positions and constants: transformers' mask functions
(``arange`` / ``le`` / ``sub(q_idx, window)`` / packed-sequence checks on ``position_ids``), a model's ``tril``
buffer, BLOOM's ALiBi tensor. Rather than recognise each way of writing them, ``classify_mask`` copies the nodes
the mask depends on into a small graph and runs it on CPU for a few probe lengths (``position_ids = arange`` from
two offsets; the mask may read the shape of ``input_ids``, not its values), then compares which keys each query
sees with causal attention, optionally limited to a sliding window and/or to the query's chunk (chunked local
attention; chunks counted from the first index or, as transformers >= 5.2x counts them, from each row's position
ids: the two agree in the engine, whose positions are indices). The probe lengths are 5 and 13, and ``c + 2``
for every integer literal ``c`` in the subgraph (a window or chunk size is such a literal), so a window ``W`` is
seen at a length beyond it. A probe length at which the subgraph fails to run is skipped: the model cannot run
there either.

Keyed on what the graph computes, never on a model's name. Results are cached in ``node.meta`` for one pass
(``forget_probes`` drops them). Only public torch APIs (``torch.fx``) are used here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.fx import Graph, GraphModule, Interpreter, Node

#: how a mask tensor is applied: SDPA's ``attn_mask`` (bool = keep, float = added), an added float mask, or the
#: bool argument of ``masked_fill`` (True = hidden)
MaskKind = Literal["sdpa", "additive", "fill"]

#: longest probe; a larger integer literal in a mask's subgraph cannot be probed and makes the mask unknown
MAX_PROBE_LEN = 8192
BASE_PROBE_LENS = (5, 13)
#: an added mask value at or below this hides the key (transformers uses the dtype's minimum, others -1e4 or -inf)
HIDDEN_BELOW = -1e4
#: batch row ``b`` of a probe has position ids ``b * POSITION_STEP + arange(S)``
POSITION_STEP = 3
_CACHE = "autodeploy_probe_cache"
_INPUTS = ("input_ids", "position_ids")
_SHAPE_ONLY = (torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int)


@dataclass(frozen=True)
class CausalMask:
    """The mask is causal; ``sliding_window`` and ``chunk_size`` (if set) as ``torch_attention`` defines them."""

    sliding_window: int | None = None
    chunk_size: int | None = None


class ProbeError(Exception):
    """The subgraph cannot be probed (it reads weights, other graph inputs, values not loaded, ...)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _CpuInterpreter(Interpreter):
    """Runs a subgraph on CPU whatever devices its literals and constants name.

    A one-element constant on the meta device (``torch.tensor(0.0)`` lifted by export from a model not loaded
    yet) reads as ``meta_fill``; the caller probes with two fills and keeps only what both agree on.
    """

    def __init__(self, gm: GraphModule, meta_fill: float):
        super().__init__(gm)
        self.meta_fill = meta_fill

    def fetch_attr(self, target: str) -> Any:
        value = super().fetch_attr(target)
        if isinstance(value, torch.nn.Parameter):
            raise ProbeError(f"it reads the weight {target!r}")
        if isinstance(value, torch.Tensor):
            if value.is_meta:
                if value.numel() != 1:
                    raise ProbeError(f"it reads {target!r}, which has no values yet (meta device)")
                return torch.full(value.shape, self.meta_fill, dtype=value.dtype)
            return value.cpu()
        return value

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        return super().call_function(target, _on_cpu(args), _on_cpu(kwargs))


def _on_cpu(value: Any) -> Any:
    if isinstance(value, torch.device):
        return torch.device("cpu")
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    return value


def _subgraph(target: Node) -> GraphModule:
    """A graph of the nodes ``target`` depends on, returning ``target``."""
    needed: set[Node] = set()
    stack = [target]
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    graph = Graph()
    env: dict[Node, Node] = {}
    for node in target.graph.nodes:
        if node in needed:
            if node.op == "placeholder" and node.target not in _INPUTS:
                raise ProbeError(f"it depends on the graph input {node.target!r}")
            if node.op == "placeholder" and node.target == "input_ids":
                if any(user in needed and user.target not in _SHAPE_ONLY for user in node.users):
                    raise ProbeError("it reads the token ids, not only their shape (a padding mask?)")
            if node.op == "call_module":
                raise ProbeError(f"it calls the submodule {node.target!r}")
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[target])
    return GraphModule(target.graph.owning_module, graph)


def _int_literals(gm: GraphModule) -> set[int]:
    found: set[int] = set()

    def visit(value: Any) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, int):
            found.add(abs(value))
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)

    for node in gm.graph.nodes:
        visit(node.args)
        visit(node.kwargs)
    return found


def _probe_lens(gm: GraphModule) -> list[int]:
    literals = {c for c in _int_literals(gm) if 2 <= c < 2**31 - 1}
    too_big = sorted(c for c in literals if c + 2 > MAX_PROBE_LEN)
    if too_big:
        raise ProbeError(f"it holds the constant {too_big[0]}, longer than the longest probe ({MAX_PROBE_LEN})")
    return sorted(set(BASE_PROBE_LENS) | {c + 2 for c in literals})


def _meta_fills(gm: GraphModule) -> tuple[float, ...]:
    """The values to probe one-element meta constants with: one probe if there are none, else two."""
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value: Any = gm
            for part in node.target.split("."):
                value = getattr(value, part)
            if isinstance(value, torch.Tensor) and value.is_meta:
                return (0.0, 0.731)
    return (0.0,)


def _probe_batch(seq: int) -> int:
    return 2 if seq <= 256 else 1


def _row_offsets(rows: int, seq: int) -> torch.Tensor:
    """The position id of the first query of each of ``rows`` mask rows (batch leading; one batch row: zeros)."""
    batch = _probe_batch(seq)
    if rows % batch:
        return torch.zeros(rows, dtype=torch.long)
    return POSITION_STEP * (torch.arange(rows) // (rows // batch))


def _run(gm: GraphModule, seq: int, meta_fill: float = 0.0) -> torch.Tensor:
    batch = _probe_batch(seq)
    inputs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        if node.target == "input_ids":
            inputs.append(torch.arange(batch * seq).reshape(batch, seq) % 2)
        else:
            inputs.append(torch.arange(seq).expand(batch, seq) + POSITION_STEP * torch.arange(batch)[:, None])
    with torch.no_grad():
        out = _CpuInterpreter(gm, meta_fill).run(*inputs)
    if not isinstance(out, torch.Tensor):
        raise ProbeError(f"it is a {type(out).__name__}, not a tensor")
    return out


def _visible(value: torch.Tensor, kind: MaskKind, seq: int) -> torch.Tensor:
    """``[R, S, S]`` bool: which key each query sees."""
    if value.dim() < 2 or tuple(value.shape[-2:]) != (seq, seq):
        raise ProbeError(f"its shape {tuple(value.shape)} does not end in [S, S] = [{seq}, {seq}]")
    value = value.reshape(-1, seq, seq)
    if kind == "fill" or (kind == "sdpa" and value.dtype == torch.bool):
        if value.dtype != torch.bool:
            raise ProbeError(f"it is {value.dtype}, expected a bool mask")
        return ~value if kind == "fill" else value
    if not value.is_floating_point():
        raise ProbeError(f"it is {value.dtype}, expected a float mask to add to the scores")
    if bool(value.isnan().any()) or bool((value == float("inf")).any()):
        raise ProbeError("it holds NaN or +inf")
    # a value shared by every visible key of a row does not change the softmax; hidden keys sit far below it
    top = value.amax(dim=-1, keepdim=True)
    visible, hidden = value == top, value <= top + HIDDEN_BELOW
    if not bool((visible | hidden).all()):
        raise ProbeError("it adds different values to the keys a query sees (a bias, not a mask)")
    return visible


def _expected(seq: int, window: int | None, chunk: int | None, offset: int = 0) -> torch.Tensor:
    """``[S, S]`` bool: what a query sees under causal attention with this window and chunk size, chunks aligned to
    positions ``offset + index``."""
    q = torch.arange(seq)[:, None]
    k = torch.arange(seq)[None, :]
    visible = k <= q
    if window is not None:
        visible = visible & (q - k < window)
    if chunk is not None:
        visible = visible & ((k + offset) // chunk == (q + offset) // chunk)
    return visible


def _explains(visible: torch.Tensor, offsets: torch.Tensor, window: int | None, chunk: int | None) -> bool:
    """Whether this window and chunk size give ``visible`` ``[R, S, S]``, the chunks aligned either to the index or
    to each row's position ids (``offsets [R]``; transformers >= 5.2x chunks by position). The two agree where
    positions are indices, as in the engine."""
    seq = visible.shape[-1]
    if bool((visible == _expected(seq, window, chunk)).all()):
        return True
    return chunk is not None and all(
        bool((row == _expected(seq, window, chunk, int(offset))).all()) for row, offset in zip(visible, offsets))


def _locality(visible: torch.Tensor, offsets: torch.Tensor) -> tuple[int | None, int | None]:
    """``(window, chunk)`` of a causal ``visible`` ``[R, S, S]`` (each ``None`` when it does not bind); else an error.
    ``offsets [R]``: the position id of each row's first query."""
    seq = visible.shape[-1]
    causal = _expected(seq, None, None)
    if bool((visible & ~causal).any()):
        raise ProbeError("it lets queries see later positions (not causal)")
    if bool((visible == causal).all()):
        return None, None
    # a chunk starts at the first query (after 0) that sees only itself, in the rows whose positions are the index
    first = visible[offsets == 0]
    starts = [q for q in range(1, seq) if bool((first[:, q, : q + 1].sum(-1) == 1).all())]
    for window in (None, int(visible.sum(-1).max())):
        for chunk in (None, *starts[:1]):
            if _explains(visible, offsets, window, chunk):
                return window, chunk
    raise ProbeError("it is not causal, nor causal with a sliding window or chunks (a padding or document mask?)")


def _classify(mask: Node, kind: MaskKind) -> CausalMask:
    gm = _subgraph(mask)
    results = {_classify_with(gm, kind, fill) for fill in _meta_fills(gm)}
    if len(results) != 1:
        raise ProbeError("it depends on the value of a constant not loaded yet (meta device)")
    return results.pop()


def _evaluate(gm: GraphModule, seq: int, meta_fill: float) -> torch.Tensor | None:
    """The subgraph's value at length ``seq``; ``None`` if it cannot run there (nor can the model)."""
    try:
        return _run(gm, seq, meta_fill)
    except Exception as e:
        cause = e if isinstance(e, ProbeError) else e.__cause__
        if isinstance(cause, ProbeError):
            raise cause from None
        if seq == BASE_PROBE_LENS[0]:
            first_line = (str(e).strip().splitlines() or [""])[0]
            raise ProbeError(f"it fails to evaluate: {type(e).__name__}: {first_line}") from None
        return None


def _classify_with(gm: GraphModule, kind: MaskKind, meta_fill: float) -> CausalMask:
    seen: dict[int, torch.Tensor] = {}
    found: dict[str, set[int]] = {"window": set(), "chunk": set()}
    for seq in _probe_lens(gm):
        value = _evaluate(gm, seq, meta_fill)
        if value is not None:
            seen[seq] = visible = _visible(value, kind, seq)
            window, chunk = _locality(visible, _row_offsets(visible.shape[0], seq))
            found["window"] |= {window} if window else set()
            found["chunk"] |= {chunk} if chunk else set()
    for name, sizes in found.items():
        if len(sizes) > 1:
            raise ProbeError(f"its {name} changes with the length ({sorted(sizes)})")
    window, chunk = min(found["window"], default=None), min(found["chunk"], default=None)
    for seq, visible in seen.items():  # one window and chunk size explain every probe
        if not _explains(visible, _row_offsets(visible.shape[0], seq), window, chunk):
            raise ProbeError("its window or chunks change with the length")
    return CausalMask(window, chunk)


def classify_mask(mask: Node, kind: MaskKind) -> CausalMask | str:
    """``CausalMask`` if ``mask`` (applied as ``kind``) is causal, else why not (a sentence)."""
    cache = mask.meta.setdefault(_CACHE, {})
    key = ("mask", kind)
    if key not in cache:
        try:
            cache[key] = _classify(mask, kind)
        except ProbeError as e:
            cache[key] = f"mask {mask.name!r} is not known to be causal: {e.reason}"
    return cache[key]


def _slopes_with(gm: GraphModule, num_heads: int, meta_fill: float) -> torch.Tensor:
    found: list[torch.Tensor] = []
    for seq in BASE_PROBE_LENS:
        value = _evaluate(gm, seq, meta_fill)
        if value is None:
            raise ProbeError(f"it fails to evaluate at length {seq}")
        value = value.float()
        rows = value.shape[-2] if value.dim() >= 3 else 1
        if value.dim() < 2 or value.shape[-1] != seq or value.numel() % (num_heads * rows * seq) != 0:
            raise ProbeError(f"its shape {tuple(value.shape)} is not [B * {num_heads}, 1 or S, S] with S = {seq}")
        per_head = value.reshape(-1, num_heads, rows, seq)  # [B, N, 1 or S, S]
        slopes = per_head[0, :, 0, 1] - per_head[0, :, 0, 0]  # [N]
        expected = per_head[..., :1] + slopes[None, :, None, None] * torch.arange(seq)
        atol = 1e-5 * (float(per_head.abs().max()) + 1.0)
        if not torch.allclose(per_head, expected, rtol=1e-5, atol=atol):
            raise ProbeError("it is not slope * key position (plus a constant per query)")
        found.append(slopes)
    if not all(torch.allclose(s, found[0], rtol=1e-5, atol=1e-7) for s in found):
        raise ProbeError("its slopes change with the length")
    return found[0]


def _slopes(bias: Node, num_heads: int) -> torch.Tensor:
    gm = _subgraph(bias)
    found = [_slopes_with(gm, num_heads, fill) for fill in _meta_fills(gm)]
    if not all(torch.equal(s, found[0]) for s in found):
        raise ProbeError("it depends on the value of a constant not loaded yet (meta device)")
    return found[0]


def alibi_slopes(bias: Node, num_heads: int) -> torch.Tensor | str:
    """The ``[num_heads]`` ALiBi slopes of ``bias`` (``slope[h] * key_pos``, per-query constants aside), or why not."""
    cache = bias.meta.setdefault(_CACHE, {})
    key = ("alibi", num_heads)
    if key not in cache:
        try:
            cache[key] = _slopes(bias, num_heads)
        except ProbeError as e:
            cache[key] = f"bias {bias.name!r} is not an ALiBi bias: {e.reason}"
    return cache[key]


def forget_probes(gm: GraphModule) -> None:
    """Drop the cached probe results from every node of ``gm``."""
    for node in gm.graph.nodes:
        node.meta.pop(_CACHE, None)
