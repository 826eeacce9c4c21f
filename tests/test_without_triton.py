"""Triton is optional (``pip install autodeploy`` on a CPU machine has none): the whole pipeline must run without it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from autodeploy.models.tiny import tiny_config

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["triton"] = None  # importing triton now fails, as on a machine without it
    import autodeploy
    for quantize in (None, "int8_weight_only"):
        engine = autodeploy.optimize(sys.argv[1], random_weights=True, max_batch_size=2, max_seq_len=64,
                                     max_num_tokens=64, quantize=quantize)
        out = engine.generate([[1, 2, 3]], autodeploy.SamplingParams(temperature=0, max_tokens=4))
        assert len(out[0].outputs[0].token_ids) == 4
    print("ok")
    """
)


def test_pipeline_and_engine_run_without_triton(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(tiny_config("llama").to_json_string())
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(config)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
