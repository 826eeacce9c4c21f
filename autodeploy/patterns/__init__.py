"""Search/replace patterns (``matcher.py``) and the named groups of them (``registry.py``)."""

from .matcher import Pattern, PatternSet
from .registry import pattern_group, pattern_set, register_pattern, user_pattern_groups

__all__ = ["Pattern", "PatternSet", "pattern_group", "pattern_set", "register_pattern", "user_pattern_groups"]
