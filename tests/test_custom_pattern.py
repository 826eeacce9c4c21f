"""examples/custom_pattern.py runs (in its own process: its pattern registers globally) and matches GPT-2's GELUs;
match_custom_patterns checks its config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autodeploy.errors import ConfigError
from autodeploy.export.trace_function import trace_function
from autodeploy.transforms import SharedContext, TransformRegistry, get_history

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_pattern.py"


def test_custom_pattern_example_matches_every_layer():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)], check=False, capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "match_custom_patterns: 2 matches {'example_gelu_tanh': 2}" in result.stdout, result.stdout
    assert result.stdout.count("= my_ops.gelu_tanh(") == 2
    assert "logits match the model's" in result.stdout


def test_group_names_and_keys_are_checked():
    from autodeploy.transforms import library  # noqa: F401  (registers the built-in transforms)

    transform = TransformRegistry.get("match_custom_patterns")
    with pytest.raises(ConfigError, match="Extra inputs are not permitted"):
        transform({"stage": "pattern_matcher", "group": ["a"]})  # a typo'd key

    def double(x):
        return x * 2

    gm = trace_function(double, [torch.randn(3)])
    with pytest.raises(ConfigError, match="no pattern group named 'no_such_group'"):
        transform({"stage": "pattern_matcher", "groups": ["no_such_group"]})(gm, SharedContext())
    transform({"stage": "pattern_matcher", "groups": []})(gm, SharedContext())
    info = get_history(gm)["match_custom_patterns"]
    assert info.num_matches == 0 and info.details == {"groups": []}
