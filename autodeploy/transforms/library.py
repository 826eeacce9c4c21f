"""Imports every built-in transform module so each registers itself by name."""

from . import cleanup_noop_ops  # noqa: F401
