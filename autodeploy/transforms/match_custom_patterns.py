"""``match_custom_patterns``: apply the pattern groups users registered with ``autodeploy.register_pattern``.

Matches whatever the user's search functions trace to (``patterns/matcher.py`` explains how a pattern matches:
literals exactly except shape lists, devices and the named ``scalar_params``), in every group registered without
``builtin=True`` (``patterns.user_pattern_groups()``), or only those named in ``groups``. Emits what the user's
replacement functions return. Patterns registered after a run are picked up by the next one.

Limits: groups are applied together in one pass, so where two user patterns overlap the one registered first
wins; an ``extra_check`` sees graph nodes (meta-device values on graphs exported before their weights load).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch.fx import GraphModule

from ..patterns import PatternSet, pattern_group, user_pattern_groups
from .base import SharedContext, Transform, TransformConfig, TransformInfo, TransformRegistry


class MatchCustomPatternsConfig(TransformConfig):
    #: names of the user pattern groups to apply (``None``: every group users registered)
    groups: list[str] | None = None


@TransformRegistry.register("match_custom_patterns")
class MatchCustomPatterns(Transform):
    config_class = MatchCustomPatternsConfig
    config: MatchCustomPatternsConfig
    _patterns: ClassVar[dict[tuple[int, ...], PatternSet]] = {}  # by the patterns it holds: traced once each

    @classmethod
    def pattern_set(cls, groups: list[str]) -> PatternSet:
        patterns = [p for name in groups for p in pattern_group(name)]  # ConfigError for an unknown name
        key = tuple(id(p) for p in patterns)
        if key not in cls._patterns:
            cls._patterns[key] = PatternSet(patterns)
            cls._patterns[key].match_meta = True
        return cls._patterns[key]

    def _apply(self, gm: GraphModule, ctx: SharedContext) -> TransformInfo:
        groups = self.config.groups if self.config.groups is not None else user_pattern_groups()
        details: dict[str, Any] = {"groups": list(groups)}
        if not groups:
            return TransformInfo(num_matches=0, details=details)
        patterns = self.pattern_set(list(groups))
        num_matches = patterns.apply(gm)
        details["matches_by_pattern"] = dict(patterns.matches_by_pattern)
        rejected = patterns.live_rejections(gm)
        if rejected:
            details["rejected"] = rejected
        return TransformInfo(num_matches=num_matches, details=details)
