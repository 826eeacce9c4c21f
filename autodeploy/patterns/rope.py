"""Rotary position embeddings as the models write them, as search/replace pairs -> ``autodeploy::torch_rope``.

Every search function takes one tensor ``q`` (a query or a key, 4-D, rotated over its last dim) and the ``cos``/
``sin`` it is multiplied by, already broadcast over the heads (``[B, 1, S, R]`` when ``q`` is ``[B, N, S, D]``,
``[B, S, 1, R]`` when ``q`` is ``[B, S, N, D]``), and computes ``q * cos + rotate(q) * sin``. Query and key are
matched separately: each becomes its own ``torch_rope``. Forms (``RopeForm``):

- rotation: NeoX half-split ``cat(-x[..., h:], x[..., :h])`` (group ``rope_neox``), the same written on the
  ``chunk(2)`` halves with half-width ``cos``/``sin``, ``cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)``
  (``neox_chunk``: gpt-oss; also ``rope_neox``), the same on the even/odd channels ``x1, x2 = x[..., ::2],
  x[..., 1::2]`` (``pairs_split``: DeepSeek's interleaved pairs written out half-split; also ``rope_neox``, on the
  de-interleaved ``cat(x[..., ::2], x[..., 1::2])``), or GPT-J interleaved ``stack(-x[..., 1::2], x[..., ::2])
  .flatten(-2)`` (group ``rope_interleaved``);
- extent: all ``D`` channels (``full``); the first ``R`` rotated and the rest joined back with ``cat``
  (``partial``: phi, stablelm, gpt_neox, gptj); and ``cat`` with an empty pass-through when ``R == D``, where the
  export drops the ``[..., :R]`` slice (``partial_full``: phi3);
- precision: as given (``same``), ``q.float()`` rotated and cast back (``upcast``: cohere), or rotated first and
  then cast to float32 (``rotate_upcast``: ernie 4.5).

The check works out the layout from where ``cos`` has its singleton head axis, refuses ``cos``/``sin`` that are
not per batch and sequence position, and hands the replacement the ``[B, S, R]`` tensors: the input of the model's
``unsqueeze`` when there is one, else ``cos`` squeezed (for ``neox_chunk`` then concatenated with itself). For
``[B, N, S, D]`` inputs the replacement is ``torch_rope(q.transpose(1, 2), cos, sin).transpose(1, 2)``, so the
model's transposes cancel against ours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import custom_ops  # noqa: F401  (registers autodeploy::torch_rope)
from .matcher import Accept, Reject
from .registry import register_pattern

aten = torch.ops.aten

NEOX_GROUP = "rope_neox"
INTERLEAVED_GROUP = "rope_interleaved"
ROPE_GROUPS = (NEOX_GROUP, INTERLEAVED_GROUP)

Rotation = Literal["neox", "neox_chunk", "pairs_split", "interleaved"]
Extent = Literal["full", "partial", "partial_full"]
Precision = Literal["same", "upcast", "rotate_upcast"]

# distinctive example sizes: they become named scalars, bound to the model's
_HALF, _ROT, _PASS = 11, 22, 16
_B, _N, _S = 2, 3, 5


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, Node) else None


def _same(a: Any, b: Any) -> bool:
    return bool(statically_known_true(a == b))


def rotate_neox(x: torch.Tensor, half: int) -> torch.Tensor:
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _head_axis(q: torch.Tensor, cos: torch.Tensor) -> int | None:
    """1 for ``q [B, N, S, D]`` with ``cos [B, 1, S, R]``, 2 for ``q [B, S, N, D]`` with ``cos [B, S, 1, R]``."""
    if not _same(cos.shape[0], q.shape[0]):
        return None
    if _same(cos.shape[1], 1) and _same(cos.shape[2], q.shape[2]) and not _same(q.shape[2], 1):
        return 1
    if _same(cos.shape[2], 1) and _same(cos.shape[1], q.shape[1]) and not _same(q.shape[1], 1):
        return 2
    return None


def _head_axis_of_unsqueeze(q: torch.Tensor, cos: torch.Tensor, nodes: tuple[Any, ...]) -> int | None:
    """The axis both ``cos`` and ``sin`` were unsqueezed at, when their shapes alone leave it open (``S == 1``,
    a decode step with Hugging Face's KV cache: both middle dims of ``cos`` are 1)."""
    if not _same(cos.shape[0], q.shape[0]):
        return None
    for axis in (1, 2):
        other = 3 - axis
        fits = _same(cos.shape[axis], 1) and _same(cos.shape[other], q.shape[other])
        if fits and all(_unsqueezed_source(node, axis) is not None for node in nodes):
            return axis
    return None


def _unsqueezed_source(node: Any, axis: int) -> Node | None:
    """``x`` if ``node`` is ``x.unsqueeze(axis)`` of a 3-D ``x``."""
    if not (isinstance(node, Node) and node.op == "call_function" and node.target == aten.unsqueeze.default):
        return None
    source = node.args[0]
    val = _val(source)
    if not isinstance(val, torch.Tensor) or val.dim() != 3 or node.args[1] % 4 != axis:
        return None
    return source


@dataclass(frozen=True)
class RopeForm:
    """One way of writing ``q * cos + rotate(q) * sin``."""

    rotation: Rotation
    extent: Extent
    precision: Precision

    @property
    def group(self) -> str:
        return INTERLEAVED_GROUP if self.rotation == "interleaved" else NEOX_GROUP

    @property
    def scalars(self) -> dict[str, int]:
        scalars = {"rot": _ROT} if self.extent != "full" else {}
        return scalars | ({"half": _HALF} if self.rotation == "neox" else {})

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        # without casts the pattern is the same in every dtype; with them, float32 would drop the casts
        return (torch.float32,) if self.precision == "same" else (torch.bfloat16, torch.float16)

    def _rotate(self, x: torch.Tensor, half: int) -> torch.Tensor:
        return rotate_neox(x, half) if self.rotation == "neox" else rotate_interleaved(x)

    @property
    def half_width(self) -> bool:
        """``cos``/``sin`` hold one angle per channel pair (half the rotated width)."""
        return self.rotation in ("neox_chunk", "pairs_split")

    def _core(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
        if self.half_width:
            x1, x2 = torch.chunk(x, 2, dim=-1) if self.rotation == "neox_chunk" else (x[..., 0::2], x[..., 1::2])
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        if self.precision == "rotate_upcast":
            return x.float() * cos + self._rotate(x, half).float() * sin
        return x * cos + self._rotate(x, half) * sin

    def search(
        self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: int, half: int
    ) -> torch.Tensor:
        x = q.float() if self.precision == "upcast" else q
        if self.extent == "full":
            out = self._core(x, cos, sin, half)
        else:
            out = torch.cat((self._core(x[..., :rot], cos, sin, half), x[..., rot:]), dim=-1)
        return out.to(q.dtype) if self.precision != "same" else out

    def replace(
        self,
        q: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        head_axis: int,
        squeeze: bool,
        out_dtype: torch.dtype,
        **_: Any,
    ) -> torch.Tensor:
        if squeeze:
            cos, sin = cos.squeeze(head_axis), sin.squeeze(head_axis)  # [B, S, R]
        if self.half_width:
            cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
        if self.rotation == "pairs_split":  # the model's output is half-split: rotate the de-interleaved channels
            q = torch.cat((q[..., 0::2], q[..., 1::2]), dim=-1)
        if self.precision != "same":
            cos, sin = cos.float(), sin.float()
        x = q if q.dtype == out_dtype else q.to(out_dtype)
        interleaved = self.rotation == "interleaved"
        if head_axis == 1:  # [B, N, S, D]
            return torch.ops.autodeploy.torch_rope(x.transpose(1, 2), cos, sin, interleaved).transpose(1, 2)
        return torch.ops.autodeploy.torch_rope(x, cos, sin, interleaved)

    def check(self, dtype: torch.dtype) -> Callable[[dict[str, Any]], Accept | Reject]:
        """The check of this form traced in ``dtype``."""

        def check(kw: dict[str, Any]) -> Accept | Reject:
            q, cos, sin = _val(kw["q"]), _val(kw["cos"]), _val(kw["sin"])
            if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, cos, sin)):
                return Reject("q, cos and sin are not all 4-D")
            if not all(_same(a, b) for a, b in zip(cos.shape, sin.shape)):
                return Reject("cos and sin shapes differ")
            if self.precision != "same" and q.dtype != dtype:
                return Reject(f"the rotation is cast to {dtype}, not back to q's {q.dtype}")
            problem = self._check_sizes(q, cos, kw)
            if problem is not None:
                return Reject(problem)
            axis = _head_axis(q, cos)
            if axis is None:
                axis = _head_axis_of_unsqueeze(q, cos, (kw["cos"], kw["sin"]))
            if axis is None:
                return Reject("cos/sin are not [B, S, R] broadcast over the heads of q")
            out_dtype = q.dtype if self.precision != "same" else torch.promote_types(q.dtype, cos.dtype)
            sources = [_unsqueezed_source(kw[name], axis) for name in ("cos", "sin")]
            if None in sources:
                return Accept(head_axis=axis, squeeze=True, out_dtype=out_dtype)
            return Accept(cos=sources[0], sin=sources[1], head_axis=axis, squeeze=False, out_dtype=out_dtype)

        return check

    def _check_sizes(self, q: torch.Tensor, cos: torch.Tensor, kw: dict[str, Any]) -> str | None:
        d, r = q.shape[-1], cos.shape[-1] * (2 if self.half_width else 1)
        rot = kw.get("rot", d)
        if self.rotation == "neox" and not _same(2 * kw["half"], rot):
            return f"rotate_half splits at {kw['half']}, not half of the {rot} rotated channels"
        if not _same(r, rot):
            return f"cos/sin have {r} channels, {rot} are rotated"
        if self.extent == "partial_full" and not _same(rot, d):
            return f"{rot} of {d} channels rotated, but nothing is sliced off"
        if self.extent == "partial" and not statically_known_true(rot < d):
            return f"{rot} of {d} channels rotated"
        return None

    def register(self) -> None:
        d = {"full": 2 * _HALF, "partial": _ROT + _PASS, "partial_full": _ROT}[self.extent]
        r = 2 * _HALF if self.extent == "full" else _ROT
        r = r // 2 if self.half_width else r
        inputs = [
            torch.randn(_B, _N, _S, d),
            torch.randn(_B, 1, _S, r),
            torch.randn(_B, 1, _S, r),
            _ROT,
            _HALF,
        ]
        for dtype in self.dtypes:
            pattern = register_pattern(
                self.group, self.search, self.replace, inputs, self.check(dtype), self.scalars, builtin=True
            )
            pattern.dtypes = (dtype,)


ROPE_FORMS = [
    RopeForm(rotation, extent, precision)
    for rotation in ("neox", "interleaved")
    for extent in ("full", "partial", "partial_full")
    for precision in ("same", "upcast", "rotate_upcast")
] + [RopeForm(rotation, "full", precision) for rotation in ("neox_chunk", "pairs_split") for precision in ("same", "upcast")]
for _form in ROPE_FORMS:
    _form.register()


# ----------------------------------------------------------------------------------------------- complex form


def _complex_search(q: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Llama 4: channel pairs as complex numbers times ``freqs = polar(1, angle)`` ``[B, S, 1, R / 2]``."""
    pairs = torch.view_as_complex(q.float().reshape(*q.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs).flatten(3).type_as(q)


def _complex_replace(q: torch.Tensor, freqs: torch.Tensor, **_: Any) -> torch.Tensor:
    parts = torch.view_as_real(freqs.squeeze(2))  # [B, S, R / 2, 2]
    cos = parts[..., 0].repeat_interleave(2, dim=-1)  # [B, S, R]
    sin = parts[..., 1].repeat_interleave(2, dim=-1)
    return torch.ops.autodeploy.torch_rope(q, cos, sin, True)


def _complex_check(dtype: torch.dtype) -> Callable[[dict[str, Any]], Accept | Reject]:
    def check(kw: dict[str, Any]) -> Accept | Reject:
        q, freqs = _val(kw["q"]), _val(kw["freqs"])
        if not (isinstance(q, torch.Tensor) and isinstance(freqs, torch.Tensor) and q.dim() == 4 and freqs.dim() == 4):
            return Reject("q and freqs are not both 4-D")
        if q.dtype != dtype or not freqs.is_complex():
            return Reject(f"q is {q.dtype} (pattern traced for {dtype}) or freqs is not complex")
        if not (_same(freqs.shape[0], q.shape[0]) and _same(freqs.shape[1], q.shape[1]) and _same(freqs.shape[2], 1)):
            return Reject("freqs are not [B, S, 1, R / 2] broadcast over the heads of q [B, S, N, D]")
        if not _same(2 * freqs.shape[3], q.shape[3]):
            return Reject("the complex rotation does not cover every channel")
        return Accept()

    return check


def _register_complex() -> None:
    inputs = [torch.randn(_B, _S, _N, 2 * _HALF), torch.randn(_B, _S, 1, _HALF, dtype=torch.complex64)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        pattern = register_pattern(
            INTERLEAVED_GROUP, _complex_search, _complex_replace, inputs, _complex_check(dtype), builtin=True
        )
        pattern.dtypes = (dtype,)
        pattern.any_size = True


_register_complex()
