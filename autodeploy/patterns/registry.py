"""Named pattern groups: the built-in ones (one module per family) and the user's.

``register_pattern(name, search_fn, replace_fn, example_inputs, extra_check=None, scalar_params=None)`` adds a
pattern to group ``name`` (a group can hold several variants). Built-in matching transforms ask for their
group by name; ``match_custom_patterns`` applies the groups registered by users.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ConfigError
from .matcher import Pattern, PatternSet

_GROUPS: dict[str, list[Pattern]] = {}
_USER_GROUPS: list[str] = []


def register_pattern(
    name: str,
    search_fn: Callable[..., Any],
    replace_fn: Callable[..., Any],
    example_inputs: Sequence[Any],
    extra_check: Callable[[dict[str, Any]], bool] | None = None,
    scalar_params: dict[str, float | int] | None = None,
    *,
    builtin: bool = False,
) -> Pattern:
    pattern = Pattern(name, search_fn, replace_fn, list(example_inputs), extra_check, dict(scalar_params or {}))
    _GROUPS.setdefault(name, []).append(pattern)
    if not builtin and name not in _USER_GROUPS:
        _USER_GROUPS.append(name)
    return pattern


def pattern_group(name: str) -> list[Pattern]:
    if name not in _GROUPS:
        raise ConfigError(f"no pattern group named {name!r}", hint=f"registered groups: {sorted(_GROUPS)}")
    return list(_GROUPS[name])


def user_pattern_groups() -> list[str]:
    return list(_USER_GROUPS)


def pattern_set(*names: str) -> PatternSet:
    return PatternSet([p for name in names for p in pattern_group(name)])
