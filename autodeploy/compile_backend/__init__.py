"""``torch.compile(model, backend="autodeploy")``: autodeploy's transforms as a Dynamo backend (no executor).

For people who keep their own loop (Hugging Face ``generate``, evaluation, research code)::

    import autodeploy, torch
    model.forward = torch.compile(model.forward, backend="autodeploy")       # options={"inductor": False, ...}
    model.generate(ids, max_new_tokens=64, cache_implementation="static")    # HF's own KV cache
    print(autodeploy.compile_backend.last_report())                          # what each transform matched

or through Hugging Face's own hook, which compiles the decode step only (prefill stays eager)::

    config = transformers.CompileConfig(backend="autodeploy", mode=None, options={"mode": "reduce-overhead"})
    model.generate(ids, max_new_tokens=64, cache_implementation="static", compile_config=config)

Options (``options={...}``, validated by ``CompileOptions``): ``inductor`` (default True; False runs the
transformed FX graph as is), ``mode`` (as ``torch.compile``'s, which takes ``mode`` or ``options`` but not both;
``reduce-overhead`` adds CUDA graphs: Inductor's, which keep Hugging Face's static KV cache and the weights as
static inputs; without Inductor, Dynamo's ``cudagraphs`` backend, which skips graphs that write an input),
``quantize`` (``fp8``, ``int8_weight_only``, ``int4_weight_only``), ``transforms`` (merged over
``configs/default.yaml``'s section; see ``options.py`` for which stages run) and ``inductor_config``.

Design (``backend.py`` runs it): Dynamo's graph is re-traced to pre-dispatch aten with Dynamo's own fake tensors
(``lowering.py``), so the patterns see the IR they are written for and guards stay Dynamo's; weights become
``get_attr``. Attention under Hugging Face's KV cache keeps its ``scaled_dot_product_attention``: q (length S)
and k/v (past + S, or the static cache's full length) differ in length and the mask reads the cache position,
so ``match_attention`` proves nothing and leaves it — only a provably causal self-attention of equal lengths
(a forward without cache, a prefill with an empty cache) becomes ``torch_attention``, and only in a graph with a
dynamic sequence length (the mask is probed at other lengths; a static one stays SDPA with its mask). Every such decision is in
the ``GraphReport`` of the graph (``last_report()``, ``reports()``, ``AutoDeployBackend().reports``).

Importing this package is light (no torch); the backend loads on first use. ``registration.py`` explains how
the name ``"autodeploy"`` reaches Dynamo.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .registration import BACKEND_NAME, autodeploy_backend, install

if TYPE_CHECKING:
    from .backend import AutoDeployBackend, compile_graph
    from .options import CompileOptions
    from .report import GraphReport, clear_reports, last_report, reports

_LAZY = {
    "AutoDeployBackend": "backend",
    "compile_graph": "backend",
    "CompileOptions": "options",
    "GraphReport": "report",
    "clear_reports": "report",
    "last_report": "report",
    "reports": "report",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKEND_NAME",
    "AutoDeployBackend",
    "CompileOptions",
    "GraphReport",
    "autodeploy_backend",
    "clear_reports",
    "compile_graph",
    "install",
    "last_report",
    "reports",
]
