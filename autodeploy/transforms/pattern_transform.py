"""``PatternTransform``: a matching transform that applies one set of traced patterns (the ``match_*`` family).

A subclass names its ``pattern_groups``; they are traced once per process (per subclass) on first use. The
default ``_apply`` applies them and reports ``matches_by_pattern``, the refused matches still in the graph
(``rejected``) and what the subclass's ``unmatched`` finds left over; ``after_matches`` cleans up when anything
matched and returns more details.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch.fx import GraphModule

from ..patterns import PatternSet, pattern_set
from .base import SharedContext, Transform, TransformInfo


class PatternTransform(Transform):
    preserves_node_values = True  # new nodes replace old ones; survivors compute what they did
    pattern_groups: ClassVar[tuple] = ()

    @classmethod
    def pattern_set(cls) -> PatternSet:
        patterns = cls.__dict__.get("_patterns")  # each subclass traces and keeps its own
        if patterns is None:
            patterns = pattern_set(*cls.pattern_groups)
            patterns.match_meta = True
            cls._patterns = patterns
        return patterns

    def after_matches(self, gm: GraphModule) -> dict[str, Any]:
        return {}

    def unmatched(self, gm: GraphModule) -> list[str]:
        """Nodes that look like what the patterns should have matched (a hint for ``autodeploy inspect``)."""
        return []

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        patterns = self.pattern_set()
        num_matches = patterns.apply(gm)
        details: dict[str, Any] = {"matches_by_pattern": dict(patterns.matches_by_pattern)}
        if num_matches:
            details.update(self.after_matches(gm))
        rejected = patterns.live_rejections(gm)
        if rejected:
            details["rejected"] = rejected
        unmatched = self.unmatched(gm)
        if unmatched:
            details["unmatched"] = unmatched
        return TransformInfo(num_matches=num_matches, details=details)
