"""Attention written without our attention interface, as search/replace pairs -> ``autodeploy::torch_attention``.

Every search function takes ``q [B, Nq, S, D]``, ``k``/``v [B, Nkv, S, D]`` (the layout Hugging Face uses) and
returns ``[B, Nq, S, Dv]``; every replacement transposes into our ``bsnd`` op and back, so the model's own
transposes around the attention cancel against ours (``cleanup_noop_ops``). Groups:

- ``attention_sdpa``: ``scaled_dot_product_attention`` with a mask or ``is_causal=True``, explicit or default
  scale, with or without ``enable_gqa``;
- ``attention_eager``: ``matmul(q, k^T)`` scaled by ``mul``/``div``/not at all, optional soft-cap
  (``div -> tanh -> mul``), the mask added or applied by ``masked_fill`` (or added before the scale: CodeGen),
  softmax (in float32 and cast back, plain, or in the input's dtype), ``matmul`` with ``v``;
- ``attention_sinks``: the eager form with a learned per-head logit joined to the softmax (gpt-oss);
- ``attention_alibi``: BLOOM's ``baddbmm(alibi, q, k^T)`` on ``[B * N, S, D]`` views, then the eager tail; and the
  eager form with an ALiBi bias added to the scaled scores before the mask (MPT), softmax also upcast with
  ``.float()`` and cast back.

Dropout is gone by then (``cleanup_noop_ops``). A mask must be shown to be causal (optionally with a sliding
window or chunks) by ``attention_masks.classify_mask`` or the match is refused with the reason; an ALiBi bias must be
``slope * key position``. ``repeat_kv`` (``unsqueeze -> expand -> reshape`` or ``repeat_interleave``) feeding
``k``/``v`` is folded afterwards by ``fold_repeat_kv``, which keeps the pattern count down and turns the matched
attention into grouped-query attention.

Routed attention (``export/route_attention.py``) reaches the graph as ``torch_attention`` already, carrying the
model's own mask as its trailing ``mask`` argument; ``fold_attention_masks`` classifies that mask the same way and
replaces it by ``sliding_window`` / ``chunk_size``.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import custom_ops  # noqa: F401  (registers autodeploy::torch_attention)
from .attention_masks import HIDDEN_BELOW, CausalMask, MaskKind, alibi_slopes, classify_mask
from .matcher import FLOAT_DTYPES, Accept, Reject
from .registry import register_pattern

aten = torch.ops.aten

SDPA_GROUP = "attention_sdpa"
EAGER_GROUP = "attention_eager"
SINKS_GROUP = "attention_sinks"
ALIBI_GROUP = "attention_alibi"
ATTENTION_GROUPS = (SDPA_GROUP, EAGER_GROUP, SINKS_GROUP, ALIBI_GROUP)

# distinctive example scalars, so they bind to whatever the model has there
_SCALE, _CAP, _FILL = 0.1234, 37.25, -5678.5
_B, _N, _NKV, _S, _D = 2, 4, 2, 8, 16


def _t(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def _named(fn: Callable[..., Any], names: list[str]) -> Callable[..., Any]:
    """``fn(*args)`` with a signature naming its parameters (the matcher names pattern inputs after them)."""

    def named(*args: Any) -> Any:
        return fn(*args)

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    named.__signature__ = inspect.Signature([inspect.Parameter(n, kind) for n in names])  # type: ignore[attr-defined]
    return named


def attention_bnsd(
    q: torch.Tensor,  # [B, Nq, S, D]
    k: torch.Tensor,  # [B, Nkv, S, D]
    v: torch.Tensor,  # [B, Nkv, S, Dv]
    scale: float | None,
    sliding_window: int | None = None,
    logit_cap: float | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:  # [B, Nq, S, Dv]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    extra = () if chunk_size is None else (chunk_size,)  # trailing optional arguments stay out when unset
    out = torch.ops.autodeploy.torch_attention(q, k, v, scale, sliding_window, logit_cap, sinks, alibi_slopes, *extra)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------------- checks


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, Node) else None


def _check_qkv(q: Node, k: Node, v: Node) -> str | None:
    """Why ``q``/``k``/``v`` are not ``[B, N, S, D]`` self-attention inputs our op can take (``None`` if they are)."""
    qv, kv, vv = _val(q), _val(k), _val(v)
    if not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in (qv, kv, vv)):
        return "q, k and v are not all 4-D [B, N, S, D]"
    nq, nkv = qv.shape[1], kv.shape[1]
    if not (isinstance(nq, int) and isinstance(nkv, int) and nkv > 0 and nq % nkv == 0 and vv.shape[1] == nkv):
        return f"head counts q={nq}, k={nkv}, v={vv.shape[1]} are not grouped-query attention"
    if not statically_known_true(qv.shape[-1] == kv.shape[-1]):
        return "q and k head sizes differ"
    if not all(statically_known_true(qv.shape[i] == x.shape[i]) for x in (kv, vv) for i in (0, 2)):
        return "q, k and v batch or sequence lengths differ (cross-attention or a KV cache)"
    return None


def _mask_check(kind: MaskKind) -> Callable[[dict[str, Any]], Any]:
    def check(kw: dict[str, Any]) -> Any:
        problem = _check_qkv(kw["q"], kw["k"], kw["v"])
        if problem is not None:
            return Reject(problem)
        if "fill" in kw and not kw["fill"] <= HIDDEN_BELOW:
            return Reject(f"masked_fill value {kw['fill']} does not hide a key")
        if "mask" not in kw:
            return Accept(sliding_window=None, chunk_size=None)
        result = classify_mask(kw["mask"], kind)
        if not isinstance(result, CausalMask):
            return Reject(result)
        local = {"sliding_window": result.sliding_window, "chunk_size": result.chunk_size}
        if "alibi" in kw:
            slopes = alibi_slopes(kw["alibi"], int(_val(kw["q"]).shape[1]))
            if isinstance(slopes, str):
                return Reject(slopes)
            device = _val(kw["q"]).device
            device = torch.device("cpu") if device.type == "meta" else device  # moved with the weights later
            return Accept(**local, alibi_slopes=slopes.to(device))
        return Accept(**local)

    return check


def _register(
    group: str,
    search: Callable[..., Any],
    replace: Callable[..., Any],
    inputs: list[Any],
    kind: MaskKind,
    scalars: dict[str, float],
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
) -> None:
    pattern = register_pattern(group, search, replace, inputs, _mask_check(kind), scalars, builtin=True)
    pattern.dtypes = dtypes
    pattern.any_size = True


# ----------------------------------------------------------------------------------------------- SDPA


def _register_sdpa() -> None:
    for masked, scaled, gqa in itertools.product((True, False), (True, False), (False, True)):
        names = ["q", "k", "v"] + (["mask"] if masked else []) + (["scale"] if scaled else [])

        def search(*args: Any, _names: list[str] = names, _gqa: bool = gqa) -> torch.Tensor:
            a = dict(zip(_names, args))
            extra = {"enable_gqa": True} if _gqa else {}
            if "scale" in a:
                extra["scale"] = a["scale"]
            if "mask" in a:
                return F.scaled_dot_product_attention(a["q"], a["k"], a["v"], attn_mask=a["mask"], **extra)
            return F.scaled_dot_product_attention(a["q"], a["k"], a["v"], is_causal=True, **extra)

        def replace(q, k, v, scale=None, sliding_window=None, chunk_size=None, **_: Any) -> torch.Tensor:
            return attention_bnsd(q, k, v, scale, sliding_window, chunk_size=chunk_size)

        nkv = _NKV if gqa else _N
        inputs: list[Any] = [_t(_B, _N, _S, _D), _t(_B, nkv, _S, _D), _t(_B, nkv, _S, _D)]
        inputs += [_t(_B, 1, _S, _S)] if masked else []
        inputs += [_SCALE] if scaled else []
        scalars = {"scale": _SCALE} if scaled else {}
        _register(SDPA_GROUP, _named(search, names), replace, inputs, "sdpa", scalars, (torch.float32,))


# ----------------------------------------------------------------------------------------------- eager

ScaleForm = Literal["mul", "div", "none"]
SoftmaxForm = Literal["float32", "plain", "same", "upcast"]


@dataclass(frozen=True)
class EagerForm:
    """One way of writing ``softmax(q k^T * scale [soft-capped] + mask) v``."""

    scale: ScaleForm
    softcap: bool
    mask: Literal["add", "fill"]
    softmax: SoftmaxForm
    sinks: bool = False
    subtract_max: bool = False
    alibi: bool = False  # an ALiBi bias added to the scaled scores, before the mask
    mask_first: bool = False  # the (additive) mask is added to the raw scores, the scale applied after

    @property
    def names(self) -> list[str]:
        names = ["q", "k", "v", "mask"] + (["sinks"] if self.sinks else []) + (["alibi"] if self.alibi else [])
        names += ["scale"] if self.scale != "none" else []
        names += ["cap"] if self.softcap else []
        return names + (["fill"] if self.mask == "fill" else [])

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        if self.softmax == "plain":
            return (torch.float32,)  # no dtype literal in the pattern
        if self.softmax in ("same", "upcast"):
            return (torch.bfloat16, torch.float16)  # in float32 it is the "float32" form
        return FLOAT_DTYPES

    def search(self, *args: Any) -> torch.Tensor:
        a = dict(zip(self.names, args))
        q, k, v = a["q"], a["k"], a["v"]
        scores = torch.matmul(q, k.transpose(2, 3))  # [B, N, S, S]
        if self.mask_first:
            scores = scores + a["mask"]
        if self.scale == "mul":
            scores = scores * a["scale"]
        elif self.scale == "div":
            scores = scores / a["scale"]
        if self.softcap:
            scores = torch.tanh(scores / a["cap"]) * a["cap"]
        if self.alibi:
            scores = scores + a["alibi"]
        if self.mask_first:
            pass
        elif self.mask == "add":
            scores = scores + a["mask"]
        else:
            scores = scores.masked_fill(a["mask"], a["fill"])
        if self.sinks:
            sinks = a["sinks"].reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
            scores = torch.cat([scores, sinks], dim=-1)
            if self.subtract_max:
                scores = scores - scores.max(dim=-1, keepdim=True).values
        if self.softmax == "float32":
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        elif self.softmax == "same":
            probs = F.softmax(scores, dim=-1, dtype=scores.dtype)
        elif self.softmax == "upcast":
            probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
        else:
            probs = F.softmax(scores, dim=-1)
        if self.sinks:
            probs = probs[..., :-1].to(v.dtype)
        return torch.matmul(probs, v)

    def replace(
        self, q, k, v, scale=None, cap=None, sinks=None, sliding_window=None, chunk_size=None, alibi_slopes=None,
        **_: Any,
    ) -> torch.Tensor:
        if self.scale == "none":
            scale = 1.0
        elif self.scale == "div":
            scale = 1.0 / scale
        cap = cap if self.softcap else None
        return attention_bnsd(q, k, v, scale, sliding_window, cap, sinks, alibi_slopes, chunk_size)

    def register(self, group: str) -> None:
        inputs: list[Any] = [_t(_B, _N, _S, _D), _t(_B, _N, _S, _D), _t(_B, _N, _S, _D)]
        inputs.append(_t(_B, 1, _S, _S) if self.mask == "add" else torch.rand(_B, 1, _S, _S) > 0.5)
        inputs += [_t(_N)] if self.sinks else []
        inputs += [_t(_N, 1, _S)] if self.alibi else []
        scalars = {"scale": _SCALE, "cap": _CAP, "fill": _FILL}
        scalars = {n: scalars[n] for n in self.names if n in scalars}
        inputs += list(scalars.values())
        kind: MaskKind = "additive" if self.mask == "add" else "fill"
        _register(group, _named(self.search, self.names), self.replace, inputs, kind, scalars, self.dtypes)


def _register_eager() -> None:
    softmaxes: tuple[SoftmaxForm, ...] = ("float32", "plain", "same")
    scales: tuple[ScaleForm, ...] = ("mul", "div", "none")
    for scale, softcap, mask, softmax in itertools.product(scales, (False, True), ("add", "fill"), softmaxes):
        EagerForm(scale, softcap, mask, softmax).register(EAGER_GROUP)
    for softmax, subtract_max in itertools.product(softmaxes, (True, False)):
        EagerForm("mul", False, "add", softmax, sinks=True, subtract_max=subtract_max).register(SINKS_GROUP)
    for mask, softmax in itertools.product(("add", "fill"), (*softmaxes, "upcast")):
        EagerForm("mul", False, mask, softmax, alibi=True).register(ALIBI_GROUP)
    for scale, softmax in itertools.product(("mul", "div"), softmaxes):
        EagerForm(scale, False, "add", softmax, mask_first=True).register(EAGER_GROUP)


# ----------------------------------------------------------------------------------------------- ALiBi


def _alibi_search(q, k, v, alibi, mask, scale):
    b, n, s, d = q.shape
    scores = alibi.baddbmm(  # [B * N, S, S]
        batch1=q.reshape(b * n, -1, d), batch2=k.reshape(b * n, -1, d).transpose(1, 2), beta=1.0, alpha=scale
    )
    weights = scores.view(b, n, s, -1) + mask
    probs = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.bmm(probs.view(b * n, s, -1), v.reshape(b * n, -1, d))  # [B * N, S, D]
    return out.view(b, n, s, d)


def _alibi_replace(q, k, v, scale, sliding_window=None, alibi_slopes=None, chunk_size=None, **_: Any) -> torch.Tensor:
    return attention_bnsd(q, k, v, scale, sliding_window, alibi_slopes=alibi_slopes, chunk_size=chunk_size)


def _register_alibi() -> None:
    qkv = [_t(_B, _N, _S, _D) for _ in range(3)]
    inputs = [*qkv, _t(_B * _N, 1, _S), _t(_B, 1, _S, _S), _SCALE]
    _register(ALIBI_GROUP, _alibi_search, _alibi_replace, inputs, "additive", {"scale": _SCALE})


_register_sdpa()
_register_eager()
_register_alibi()


# ----------------------------------------------------------------------------------------------- repeat_kv


def _repeated_kv(node: Any) -> tuple[Node, int] | None:
    """If ``node`` is ``repeat_kv(x, n_rep)`` of a ``[B, Nkv, S, D]`` tensor ``x``, then ``(x, n_rep)``."""
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    out = _val(node)
    if node.target == aten.repeat_interleave.self_int and node.args[2:3] == (1,):
        source, reps = node.args[0], node.args[1]
        return (source, reps) if isinstance(reps, int) and _val(source) is not None else None
    if node.target not in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        return None
    expand = node.args[0]
    if not (isinstance(expand, Node) and expand.target == aten.expand.default):
        return None
    unsqueeze = expand.args[0]
    if not (isinstance(unsqueeze, Node) and unsqueeze.target == aten.unsqueeze.default and unsqueeze.args[1] == 2):
        return None
    source = unsqueeze.args[0]
    src, big = _val(source), _val(expand)
    if src is None or big is None or out is None or src.dim() != 4 or big.dim() != 5 or out.dim() != 4:
        return None
    reps = big.shape[2]
    same = [(big.shape[i], src.shape[i]) for i in (0, 1)] + [(big.shape[i + 1], src.shape[i]) for i in (2, 3)]
    kept = [(out.shape[0], src.shape[0]), (out.shape[1], src.shape[1] * reps)]
    kept += [(out.shape[i], src.shape[i]) for i in (2, 3)]
    if not isinstance(reps, int) or not all(statically_known_true(a == b) for a, b in same + kept):
        return None
    return source, reps


def fold_repeat_kv(gm: GraphModule) -> int:
    """Give ``torch_attention`` the un-repeated K/V where both were ``repeat_kv``'ed alike; returns how many."""
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.autodeploy.torch_attention.default:
            continue
        sides = []
        for arg in node.args[1:3]:  # transpose(repeat_kv(x), 1, 2)
            ok = isinstance(arg, Node) and arg.target == aten.transpose.int and sorted(arg.args[1:3]) == [1, 2]
            sides.append(_repeated_kv(arg.args[0]) if ok else None)
        if None in sides or sides[0][1] != sides[1][1]:
            continue
        new_args = list(node.args)
        for i, (source, _) in zip((1, 2), sides):
            with gm.graph.inserting_before(node):
                transposed = gm.graph.call_function(aten.transpose.int, (source, 1, 2))
            transposed.meta["val"] = _val(source).transpose(1, 2)
            new_args[i] = transposed
        node.args = tuple(new_args)
        folded += 1
    return folded


# ----------------------------------------------------------------------------------------------- routed masks

_MASK_ARG = 9  # torch_attention(q, k, v, scale, sliding_window, logit_cap, sinks, alibi_slopes, chunk_size, mask)
#: ``node.meta`` key: why the mask of a routed attention node could not be folded
MASK_REJECTED = "autodeploy_mask_rejected"


def _tighter(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def fold_attention_masks(gm: GraphModule) -> tuple[int, dict[str, str]]:
    """Fold the ``mask`` argument of ``torch_attention`` nodes into ``sliding_window`` / ``chunk_size``.

    Returns how many were folded and, for the masks that are not causal (optionally windowed or chunked), why.
    """
    folded, rejected = 0, {}
    for node in find_attention(gm):
        if len(node.args) <= _MASK_ARG or not isinstance(node.args[_MASK_ARG], Node):
            continue
        result = classify_mask(node.args[_MASK_ARG], "sdpa")
        if not isinstance(result, CausalMask):
            rejected[node.name] = node.meta[MASK_REJECTED] = result
            continue
        args = list(node.args[:_MASK_ARG])
        args[4] = _tighter(args[4], result.sliding_window)
        args[8] = _tighter(args[8], result.chunk_size)
        node.args = tuple(args if args[8] is not None else args[:8])
        folded += 1
    return folded, rejected


def find_attention(gm: GraphModule) -> list[Node]:
    target = torch.ops.autodeploy.torch_attention.default
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]
