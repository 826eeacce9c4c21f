"""RMSNorm as the models write it, as search/replace pairs -> ``autodeploy::torch_rmsnorm``.

Every search function normalises ``x`` over its last dim, ``x * rsqrt(mean(x^2, -1) + eps)`` in float32, and
scales by ``weight``; ``eps`` is bound to the model's value. Forms (``NormForm``):

- group ``rmsnorm``: ``weight * xhat.to(dtype)`` (Llama, Qwen3 and its per-head q/k norms), ``xhat.to(dtype) *
  weight``, and the cast after the scale, ``(weight * xhat).to(dtype)`` (OLMo 2), either side;
- group ``rmsnorm_gemma``: ``(xhat * (1 + weight.float())).type_as(x)`` or ``.to(dtype)`` (Gemma), emitted with
  ``weight_offset=1``.

Each form is traced in float32 (no casts: also matches low-precision models that normalise without upcasting)
and in bfloat16/float16 (the casts models insert); a cast pattern only matches an ``x`` of its dtype. The output
dtype is the model's: a float32 weight times a bfloat16 ``xhat`` gives float32, passed as ``out_dtype``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import custom_ops  # noqa: F401  (registers autodeploy::torch_rmsnorm)
from .matcher import FLOAT_DTYPES, Accept, Reject
from .registry import register_pattern

RMSNORM_GROUP = "rmsnorm"
GEMMA_GROUP = "rmsnorm_gemma"
#: tried in this order: in float32 Gemma's ``xhat * (w + 1)`` is also ``xhat * w2`` with ``w2 = w + 1``
RMSNORM_GROUPS = (GEMMA_GROUP, RMSNORM_GROUP)

_EPS = 4.25e-6  # distinctive: bound to the model's eps
_ROWS, _HIDDEN = 6, 24

Scale = Literal[
    "weight_cast_left",
    "weight_cast_right",
    "cast_weight_left",
    "cast_weight_right",
    "offset_type_as",
    "offset_to",
]
SCALES: tuple[Scale, ...] = get_args(Scale)


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, Node) else None


def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(torch.float32)
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


@dataclass(frozen=True)
class NormForm:
    """Where the weight and the cast back to ``x.dtype`` sit around the float32 ``xhat``."""

    scale: Scale

    @property
    def offset(self) -> float:
        return 1.0 if self.scale.startswith("offset") else 0.0

    @property
    def group(self) -> str:
        return GEMMA_GROUP if self.offset else RMSNORM_GROUP

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        # in float32 the casts vanish and forms that differ only in where they cast coincide
        if self.scale in ("cast_weight_left", "cast_weight_right", "offset_to"):
            return (torch.bfloat16, torch.float16)
        return FLOAT_DTYPES

    def search(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xhat = _normalize(x, eps)
        if self.scale == "weight_cast_left":
            return weight * xhat.to(x.dtype)
        if self.scale == "weight_cast_right":
            return xhat.to(x.dtype) * weight
        if self.scale == "cast_weight_left":
            return (weight * xhat).to(x.dtype)
        if self.scale == "cast_weight_right":
            return (xhat * weight).to(x.dtype)
        out = xhat * (1.0 + weight.float())
        return out.type_as(x) if self.scale == "offset_type_as" else out.to(x.dtype)

    def replace(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None, **_: Any
    ) -> torch.Tensor:
        return torch.ops.autodeploy.torch_rmsnorm(x, weight, eps, self.offset, out_dtype)

    def _out_dtype(self, x: torch.Tensor, weight: torch.Tensor, traced: torch.dtype) -> torch.dtype:
        """The dtype the model's form returns for these inputs (``traced``: the dtype the pattern was traced in)."""
        if traced == torch.float32 or self.scale.startswith("weight_cast"):  # no cast after the scale
            return torch.promote_types(x.dtype, weight.dtype)
        return traced

    def check(self, traced: torch.dtype) -> Callable[[dict[str, Any]], Accept | Reject]:
        """The check of this form traced in ``traced``."""

        def check(kw: dict[str, Any]) -> Accept | Reject:
            x, weight = _val(kw["x"]), _val(kw["weight"])
            if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)) or x.dim() == 0:
                return Reject("x or weight is not a tensor")
            if weight.dim() != 1 or not statically_known_true(weight.shape[0] == x.shape[-1]):
                return Reject(
                    f"weight {tuple(weight.shape)} is not one value per channel of x {tuple(x.shape)}"
                )
            if traced != torch.float32 and x.dtype != traced:
                return Reject(f"x is {x.dtype} but the form casts back to {traced}")
            out_dtype = self._out_dtype(x, weight, traced)
            return Accept(out_dtype=None if out_dtype == x.dtype else out_dtype)

        return check

    def register(self) -> None:
        inputs = [torch.randn(_ROWS, _HIDDEN), torch.randn(_HIDDEN), _EPS]
        for dtype in self.dtypes:
            pattern = register_pattern(
                self.group, self.search, self.replace, inputs, self.check(dtype), {"eps": _EPS}, builtin=True
            )
            pattern.dtypes = (dtype,)


NORM_FORMS = [NormForm(scale) for scale in SCALES]
for _form in NORM_FORMS:
    _form.register()
