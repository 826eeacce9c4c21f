"""Programmatic dependent launch: when it is on, and that a PDL-launched decode chain computes what the plain
launch computes, in eager mode and inside a CUDA graph (GPU)."""

from __future__ import annotations

import pytest
import torch

import autodeploy.custom_ops  # noqa: F401
from autodeploy.custom_ops.triton import _common
from autodeploy.custom_ops.triton.gemv import W_DENSE, W_FP8, W_INT4, gemv

ops = torch.ops.autodeploy


def test_pdl_off_on_cpu_and_in_the_interpreter(monkeypatch):
    monkeypatch.setenv(_common.PDL_ENV, "1")
    assert _common.pdl_flags(torch.device("cpu"), 1) == {"USE_PDL": False}


def test_pdl_flags_on_hopper_unless_disabled(monkeypatch):
    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(_common, "_pdl_capable", lambda index: True)
    monkeypatch.delenv(_common.PDL_ENV, raising=False)
    cuda = torch.device("cuda", 0)
    assert _common.pdl_flags(cuda, 1) == {"USE_PDL": True, "launch_pdl": True}
    assert _common.pdl_flags(cuda, _common.PDL_MAX_ROWS) == {"USE_PDL": True, "launch_pdl": True}
    assert _common.pdl_flags(cuda, _common.PDL_MAX_ROWS + 1) == {"USE_PDL": False}  # prefill-sized
    monkeypatch.setenv(_common.PDL_ENV, "0")
    assert _common.pdl_flags(cuda, 1) == {"USE_PDL": False}
    monkeypatch.setenv(_common.PDL_ENV, "1")
    monkeypatch.setattr(_common, "_pdl_capable", lambda index: False)  # before Hopper
    assert _common.pdl_flags(cuda, 1) == {"USE_PDL": False}


def _chain(fmt: int, layers: list, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """norm -> GEMV -> GLU -> GEMV, repeated: every kernel reads the one before it."""
    for w_up, w_down, norm in layers:
        h, residual = ops.triton_fused_add_rmsnorm(x, residual, norm, 1e-5)
        x = gemv(ops.triton_glu_packed(gemv(h, fmt, *w_up), "silu"), fmt, *w_down)
    return x + residual


def _weights(fmt: int, n: int, k: int) -> tuple:
    from autodeploy.custom_ops.quant_linear import quantize_fp8_weight, quantize_int4_weight

    w = (torch.randn(n, k, device="cuda") * k**-0.5).to(torch.bfloat16)
    if fmt == W_FP8:
        return quantize_fp8_weight(w)
    if fmt == W_INT4:
        q, s, z = quantize_int4_weight(w, 128)
        return q, s, z, None, 128
    return (w,)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", [W_DENSE, W_FP8, W_INT4])
def test_pdl_chain_equals_plain_launch(fmt, monkeypatch):
    if not _common._pdl_capable(torch.cuda.current_device()):
        pytest.skip("programmatic dependent launch needs Hopper or newer")
    hidden, inter = 1024, 2048
    layers = [(_weights(fmt, 2 * inter, hidden), _weights(fmt, hidden, inter),
               1 + 0.1 * torch.randn(hidden, device="cuda", dtype=torch.bfloat16)) for _ in range(6)]
    x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn_like(x)
    outs = {}
    for setting in ("0", "1"):
        monkeypatch.setenv(_common.PDL_ENV, setting)
        eager = _chain(fmt, layers, x, residual)
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            _chain(fmt, layers, x, residual)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graphed = _chain(fmt, layers, x, residual)
        outs[setting] = (eager, graph, graphed)
    plain_eager, plain_graph, plain_out = outs["0"]
    pdl_eager, pdl_graph, pdl_out = outs["1"]
    assert torch.equal(plain_eager, pdl_eager)
    for _ in range(5):  # fresh inputs through both graphs
        x.copy_(torch.randn_like(x))
        residual.copy_(torch.randn_like(residual))
        plain_graph.replay()
        pdl_graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(pdl_out).all()
        assert torch.equal(plain_out, pdl_out)
