"""``autodeploy bench`` end to end on a tiny random-weight model (CPU): the report, and the engine's batch size."""

from __future__ import annotations

import json

from autodeploy.bench.cli import BENCH_MAX_BATCH, bench_batch_size
from autodeploy.cli import main
from autodeploy.models.tiny import tiny_config


def test_bench_batch_size_follows_the_workload():
    assert bench_batch_size(0, 1000) == 1000
    assert bench_batch_size(8, 1000) == 8
    assert bench_batch_size(0, 5000) == BENCH_MAX_BATCH


def test_bench_reports_every_request(tmp_path):
    tiny_config("llama").save_pretrained(tmp_path)
    out = tmp_path / "report.json"
    argv = ["bench", "--model", str(tmp_path / "config.json"), "--random-weights", "--max-seq-len", "64",
            "--isl", "12", "--osl", "5", "--num-requests", "6", "--warmup", "1", "--json", str(out)]
    assert main(argv) == 0
    (report,) = json.loads(out.read_text())["reports"]
    assert report["num_requests"] == 6 and report["output_tokens"] == 30
    assert report["extra"]["max_batch_size"] == 6  # every request in flight: none was set
    assert report["output_tok_per_s"] > 0 and report["ttft_p50_ms"] > 0

    assert main([*argv, "--max-batch-size", "2"]) == 0
    (report,) = json.loads(out.read_text())["reports"]
    assert report["extra"]["max_batch_size"] == 2 and report["output_tokens"] == 30
