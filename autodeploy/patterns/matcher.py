"""Search/replace pattern matching on exported graphs, on top of Inductor's pattern matcher.

This is the only module in autodeploy that touches private torch internals (``torch._inductor``).

A ``Pattern`` is a pair of plain functions plus example inputs (PyTorch Inductor's ``fuse_attention.py`` style).
The search function is traced with ``trace_function`` — the same ``torch.export`` + no-op clean-up the models
go through — once per floating dtype (float32, bfloat16, float16), so the casts a model inserts in low
precision are matched too. Literals in the traced pattern match exactly, except:

- shape lists and devices, which match anything (sizes differ between models);
- scalars named in ``scalar_params`` (``{"eps": 1e-6}``): the example value becomes a named parameter, bound
  to whatever the model has there (and must agree where it appears more than once). Pick example values that
  occur nowhere else in the pattern.

On a match, ``extra_check(kwargs)`` (graph nodes and bound scalars by parameter name) can reject it; then
``replace_fn(**kwargs)`` is traced on the matched nodes' fake values and spliced in.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._inductor.pattern_matcher import (
    Match,
    PatternMatcherPass,
    fwd_only,
    fx_to_pattern,
    register_graph_pattern,
)
from torch.fx import GraphModule, Node

from ..export.trace_function import trace_function

logger = logging.getLogger("autodeploy.patterns")

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Pattern:
    name: str
    search_fn: Callable[..., Any]
    replace_fn: Callable[..., Any]
    example_inputs: Sequence[Any]
    extra_check: Callable[[dict[str, Any]], bool] | None = None
    scalar_params: dict[str, float | int] = field(default_factory=dict)
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES

    @property
    def arg_names(self) -> list[str]:
        return list(inspect.signature(self.search_fn).parameters)[: len(self.example_inputs)]


def _with_dtype(inputs: Sequence[Any], dtype: torch.dtype) -> list[Any]:
    return [x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]


class PatternSet:
    """Patterns applied together in one pass over a graph. Tracing happens on first use."""

    def __init__(self, patterns: Sequence[Pattern]):
        self.patterns = list(patterns)
        self._pass: PatternMatcherPass | None = None
        self.matches_by_pattern: dict[str, int] = {}

    def _build(self) -> PatternMatcherPass:
        pm_pass = PatternMatcherPass()
        for pattern in self.patterns:
            seen: set[str] = set()
            for dtype in pattern.dtypes:
                inputs = _with_dtype(pattern.example_inputs, dtype)
                try:
                    search_gm = trace_function(pattern.search_fn, inputs)
                except Exception as e:  # a pattern that cannot trace in one dtype may in another
                    logger.debug("pattern %s does not trace in %s: %s", pattern.name, dtype, e)
                    continue
                tensor_names = [n for n, x in zip(pattern.arg_names, inputs) if isinstance(x, torch.Tensor)]
                expr = fx_to_pattern(
                    search_gm,
                    ignore_types=(list, torch.device),
                    argnames=tensor_names,
                    scalar_workaround=dict(pattern.scalar_params),
                )
                key = str(expr)
                if key in seen:
                    continue
                seen.add(key)
                register_graph_pattern(expr, extra_check=self._make_check(pattern), pass_dict=pm_pass)(
                    self._make_handler(pattern)
                )
        return pm_pass

    def _make_check(self, pattern: Pattern) -> Callable[[Match], bool]:
        def check(match: Match) -> bool:
            if pattern.extra_check is None:
                return True
            return bool(pattern.extra_check(dict(match.kwargs)))

        return check

    def _make_handler(self, pattern: Pattern) -> Callable[..., None]:
        names = pattern.arg_names

        def handler(match: Match, *args: Any, **kwargs: Any) -> None:
            node_args = [n for n in names if isinstance(kwargs.get(n), Node)]
            constants = {n: kwargs[n] for n in kwargs if n not in node_args}

            def replacement(*tensors: Any) -> Any:
                return pattern.replace_fn(**constants, **dict(zip(node_args, tensors)))

            match.replace_by_example(replacement, [kwargs[n] for n in node_args], trace_fn=_trace_replacement)
            self.matches_by_pattern[pattern.name] = self.matches_by_pattern.get(pattern.name, 0) + 1

        return handler

    def apply(self, gm: GraphModule) -> int:
        """Replace every match in ``gm.graph`` (not recompiled); returns the number of replacements."""
        if self._pass is None:
            self._pass = self._build()
        self.matches_by_pattern = {}
        count = self._pass.apply(gm.graph)
        return int(count)


def _trace_replacement(fn: Callable[..., Any], args: Sequence[Any]) -> GraphModule:
    return fwd_only(fn, args, run_functional_passes=False, get_decomp_fn=lambda: {})
