"""Architecture coverage in CI: a representative subset of ``scripts/coverage.py`` (which runs every model type).

Each architecture: tiny random model, the whole pipeline, batched greedy generation equal to Hugging Face's
``generate`` (``autodeploy/coverage.py``). The subset spans the mechanisms: RoPE + RMSNorm + GLU (llama), sliding
and full layers with soft-caps and q/k norms (gemma3_text), partial rotary + parallel residual + LayerNorm (phi),
learned positions + Conv1D (gpt2), ALiBi by hand (bloom), multi-query parallel attention (falcon), shared-expert
MoE (qwen2_moe), latent attention + group-limited MoE (deepseek_v3), sinks + sliding windows + its MoE (gpt_oss),
eager ALiBi (mpt), chunked attention + complex RoPE + NoPE layers (llama4_text).
"""

from __future__ import annotations

import pytest

from autodeploy.coverage import FAIL, NOT_DECODER, PASS, UNSUPPORTED, CoverageResult, check_architecture
from autodeploy.coverage import render_markdown, run_coverage

CI_SUBSET = [
    "llama",
    "gemma3_text",
    "phi",
    "gpt2",
    "bloom",
    "falcon",
    "qwen2_moe",
    "deepseek_v3",
    "gpt_oss",
    "mpt",
    "llama4_text",
]


@pytest.mark.parametrize("model_type", CI_SUBSET)
def test_architecture_greedy_equals_hf(model_type):
    result = check_architecture(model_type, lengths=(3, 17, 41), max_new_tokens=12)
    assert result.status == PASS, f"{result.stage}: {result.reason}"
    assert result.ops.get("torch_attention", 0) >= 1


def test_out_of_scope_architectures_are_reported_not_run():
    hybrid = check_architecture("mamba")
    assert hybrid.status == UNSUPPORTED and hybrid.stage == "factory" and "missing" in hybrid.reason
    assert check_architecture("bart").status == NOT_DECODER


def test_subprocess_runner_reports_a_crash_and_keeps_going():
    results = run_coverage(["no_such_model_type", "bart"], timeout_s=120, jobs=2)
    assert [r.model_type for r in results] == ["no_such_model_type", "bart"]
    assert results[0].status == FAIL and "KeyError" in results[0].reason
    assert results[1].status == NOT_DECODER


def test_markdown_has_a_row_per_architecture():
    results = [
        CoverageResult("llama", PASS, "done", True, {"torch_attention": 2, "torch_rope": 4}, "3/3", 4.2),
        CoverageResult("mamba", UNSUPPORTED, "factory", reason="MambaForCausalLM keeps a recurrent state | x"),
        CoverageResult("bart", NOT_DECODER, "factory", reason="encoder-decoder"),
    ]
    text = render_markdown(results)
    assert "| `llama` | ✅ pass | yes | attention×2, rope×4 | 3/3 | 4 |" in text
    assert "recurrent state \\| x" in text  # table cells stay cells
    assert text.count("\n| `") == 3


def test_a_model_transformers_cannot_build_is_told_apart(monkeypatch):
    from transformers import AutoModelForCausalLM

    from autodeploy.coverage import _build_tiny
    from autodeploy.errors import ModelLoadError

    def broken_tiny(model_type):
        raise ValueError("tiny config refused")

    with pytest.raises(ValueError, match="tiny config refused"):  # the default builds: the tiny config's fault
        _build_tiny("llama", broken_tiny)

    def broken_from_config(config, **kwargs):
        raise KeyError("full_attention")

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", broken_from_config)
    with pytest.raises(ModelLoadError, match="even from its default config.*full_attention"):
        _build_tiny("llama", broken_tiny)
