"""``torch.compile(model, backend="autodeploy")`` against Hugging Face's eager forward and ``generate`` (float32, CPU).

For tiny Llama, Qwen3, Gemma 2 and Mixtral, with Hugging Face's own KV cache (static and dynamic): logits of a
forward without cache and of every generate step (prefill and decode) equal eager's, greedy tokens equal, the
canonical and fused ops are in the compiled graphs (read from the reports), attention under the cache stays
``scaled_dot_product_attention`` with the reason recorded, no graph breaks, and no recompile once warm.
Inductor (C++ on CPU, slow to compile) is covered by one test, through Hugging Face's own compile hook
(``compile_config``); ``quantize`` by one.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import autodeploy
from autodeploy.compile_backend import AutoDeployBackend, CompileOptions
from autodeploy.compile_backend.options import select_transforms
from autodeploy.errors import ConfigError
from autodeploy.models.tiny import tiny_model

ATOL = 1e-4
NEW_TOKENS = 6
# (Hugging Face cache, prompt lengths) per architecture. With three lengths the third must not recompile: the
# second made the prompt length (and the static cache's length) dynamic. gemma2's tiny sliding window (8) is
# shorter than its prompt; a prompt shorter than the window takes another Python path in HF (another graph).
CASES = {
    "llama": ("static", (7, 11, 9)),
    "qwen3": ("dynamic", (7, 11, 9)),
    "gemma2": ("static", (11,)),
    "mixtral": ("dynamic", (7,)),
}
# what the transforms must leave in every compiled graph of the architecture (prefill and decode alike)
EXPECTED_OPS = {
    "llama": ["torch_rope", "torch_fused_add_rmsnorm", "torch_glu_packed"],
    "qwen3": ["torch_rope", "torch_fused_add_rmsnorm", "torch_rmsnorm", "torch_glu_packed"],
    "gemma2": ["torch_rope", "torch_rmsnorm", "torch_glu_packed"],
    "mixtral": ["torch_rope", "torch_fused_add_rmsnorm", "torch_moe"],
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _prompt(batch: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=gen)


def _generate(model, ids: torch.Tensor, cache: str):
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.no_grad():
        return model.generate(
            ids,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            disable_compile=True,  # HF's own auto-compile (static cache on CUDA) stays out of it
            **kwargs,
        )


def _assert_same_generation(got, want) -> None:
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):  # step 0 = prefill, then decode steps
        torch.testing.assert_close(a, b, atol=ATOL, rtol=ATOL, msg=lambda m: f"step {step}: {m}")


def _no_graph_breaks() -> None:
    assert not counters["graph_break"], dict(counters["graph_break"])


def _count(report, op: str) -> int:
    return report.count(f"autodeploy.{op}")


@pytest.mark.parametrize("model_type", list(CASES))
def test_generate_and_logits_equal_eager(model_type):
    cache, lengths = CASES[model_type]
    model = tiny_model(model_type)
    vocab = model.config.vocab_size
    ids = _prompt(2, 7, vocab, seed=1)
    with torch.no_grad():
        want_logits = model(input_ids=ids, use_cache=False).logits
    want = [_generate(model, _prompt(2, n, vocab, seed=n), cache) for n in lengths]

    backend = AutoDeployBackend(inductor=False)
    model.forward = torch.compile(model.forward, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, want_logits, atol=ATOL, rtol=ATOL)
    compiled_before = []
    for n, expected in zip(lengths, want):
        compiled_before.append(len(backend.reports))
        _assert_same_generation(_generate(model, _prompt(2, n, vocab, seed=n), cache), expected)
    if len(lengths) > 2:  # warm after two prompt lengths (the second made them dynamic): no more compiles
        assert len(backend.reports) == compiled_before[2], [r.inputs for r in backend.reports]
    assert len(backend.reports) <= 6, [r.inputs for r in backend.reports]
    _no_graph_breaks()

    for report in backend.reports:
        assert report.fallback_calls == 0
        # without position_ids (the no-cache forward) HF's cos/sin broadcast over the batch: RoPE is not matched
        expected = EXPECTED_OPS[model_type] if report.index != backend.reports[0].index else EXPECTED_OPS[model_type][1:]
        for op in expected:
            assert _count(report, op) > 0, f"{op} missing from graph {report.index}:\n{report.summary()}"
        assert report.matches["fuse_parallel_linears"] > 0
        assert report.count("aten.linear") < report.ops_before["aten.linear.default"]  # q/k/v, gate/up fused
    decode = [r for r in backend.reports if any(i.startswith("input_ids: [2, 1]") for i in r.inputs)]
    assert decode, [r.inputs for r in backend.reports]
    for report in decode:  # q is one token, k/v the cache: attention is left as the model wrote it
        assert _count(report, "torch_attention") == 0
        assert report.count("aten.scaled_dot_product_attention") == model.config.num_hidden_layers
        rejected = next(t for t in report.transforms if t.name == "match_attention").details["rejected"]
        assert all("lengths differ" in why or "not known to be causal" in why for why in rejected.values())


def test_inductor_through_hf_compile_config(monkeypatch):
    """Hugging Face's own compile hook (prefill eager, decode compiled) with Inductor and CUDA-graph mode.

    The decode graph's static inputs (what CUDA graphs neither copy nor refuse to see written) must be the
    weights and the static KV cache Hugging Face marked with ``mark_static_address``, as with
    ``backend="inductor"``: the backend carries Dynamo's input metadata over to the graph it hands Inductor.
    """
    import torch._inductor.compile_fx as compile_fx
    from transformers import CompileConfig

    static_inputs = []
    get_static = compile_fx.get_static_input_idxs
    monkeypatch.setattr(
        compile_fx, "get_static_input_idxs", lambda n: static_inputs.append(list(get_static(n))) or static_inputs[-1]
    )
    model = tiny_model("llama")
    ids = _prompt(2, 7, model.config.vocab_size, seed=3)
    want = _generate(model, ids, "static")
    config = CompileConfig(backend="autodeploy", mode=None, fullgraph=True, options={"mode": "reduce-overhead"})
    config._compile_all_devices = True  # Hugging Face compiles only on accelerators unless told
    with torch.no_grad():
        got = model.generate(
            ids, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True,
            cache_implementation="static", compile_config=config,
        )
    _assert_same_generation(got, want)
    _no_graph_breaks()
    (report,) = autodeploy.compile_backend.reports()[-1:]
    assert report.backend == "inductor" and report.inputs[0].startswith("input_ids: [2, 1]")
    assert _count(report, "torch_rope") == 4 and _count(report, "torch_glu_packed") == 2
    (static,) = static_inputs  # positions in Inductor's arguments: the lifted weights, then the graph's inputs
    cache_inputs = [i for i, name in enumerate(report.inputs) if "past_key_values" in name]
    assert len(cache_inputs) == 3 * model.config.num_hidden_layers  # keys, values, cumulative length per layer
    num_weights = len(static) - len(cache_inputs)
    assert num_weights > 0
    assert static == [*range(num_weights), *(num_weights + i for i in cache_inputs)]


def test_quantize_option():
    """``quantize="int8_weight_only"``: linears become int8 ops computing the dequantized weights' product."""
    from autodeploy.custom_ops.quant_linear import quantize_int8_weight

    model = tiny_model("llama")
    ids = _prompt(2, 7, model.config.vocab_size, seed=5)
    reference = tiny_model("llama")
    with torch.no_grad():
        for module in reference.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                weight, scale = quantize_int8_weight(module.weight)
                module.weight.copy_(weight.float() * scale[:, None])
        want = reference(input_ids=ids, use_cache=False).logits
        options = {"inductor": False, "quantize": "int8_weight_only"}
        compiled = torch.compile(model, backend="autodeploy", options=options)
        got = compiled(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
    report = autodeploy.compile_backend.last_report()
    linears = 7 * model.config.num_hidden_layers  # q, k, v, o, gate, up, down; not the LM head
    assert report.matches["quantize_int8_linear"] == linears
    assert 0 < _count(report, "torch_quant_int8_linear") <= linears  # fusion stages may merge q/k/v, gate/up
    assert report.count("aten.linear") == 1


def test_dynamic_forward_matches_causal_attention():
    """Without a cache, q and k/v have one length and the mask is provably causal: canonical attention."""
    model = tiny_model("llama")
    backend = AutoDeployBackend(inductor=False)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad():
        for seq in (5, 9):
            ids = _prompt(3, seq, model.config.vocab_size, seed=seq)
            want = model(input_ids=ids, use_cache=False).logits
            torch.testing.assert_close(compiled(input_ids=ids, use_cache=False).logits, want, atol=ATOL, rtol=ATOL)
    assert len(backend.reports) == 1
    (report,) = backend.reports
    assert _count(report, "torch_attention") == 2
    assert report.count("aten.scaled_dot_product_attention") == 0
    assert _count(report, "torch_rmsnorm") + _count(report, "torch_fused_add_rmsnorm") == 5
    _no_graph_breaks()


def test_plain_module_and_transform_options():
    class GatedMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down = (torch.nn.Linear(16, 32), torch.nn.Linear(16, 32), torch.nn.Linear(32, 16))

        def forward(self, x):
            return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))

    model = GatedMLP().eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        got = torch.compile(model, backend="autodeploy", options={"inductor": False})(x)
        torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)
    report = autodeploy.compile_backend.last_report()
    assert _count(report, "torch_glu_packed") == 1 and report.num_weights == 6
    assert "weights" in str(report)

    torch._dynamo.reset()
    options = {"inductor": False, "transforms": {"fuse_parallel_linears": {"enabled": False}}}
    with torch.no_grad():
        torch.compile(model, backend="autodeploy", options=options)(x)
    report = autodeploy.compile_backend.last_report()
    assert _count(report, "torch_glu") == 1 and report.count("aten.linear") == 3


def test_options_are_validated():
    with pytest.raises(ConfigError, match="inductr"):
        CompileOptions.parse({"inductr": False})
    with pytest.raises(ConfigError, match="cannot run in the torch.compile backend"):
        select_transforms(CompileOptions(transforms={"insert_cached_attention": {"stage": "cache_init"}}))
    with pytest.raises(ConfigError):
        select_transforms(CompileOptions(transforms={"match_rope": {"enabld": False}}))
    names = [t.name for t in select_transforms(CompileOptions())]
    assert "match_attention" in names and "fuse_parallel_linears" in names
    assert not {"load_weights", "insert_cached_attention", "gather_logits"} & set(names)
    backends = {t.name: t.config.backend for t in select_transforms(CompileOptions()) if hasattr(t.config, "backend")}
    assert set(backends.values()) == {"torch"}  # Inductor generates the kernels around the reference ops


def test_other_weights_run_dynamo_graph(caplog):
    """Dynamo reuses a compiled graph for another module of the same code; those calls must not use ours."""
    first, second = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = _prompt(1, 6, first.config.vocab_size, seed=4)
    backend = AutoDeployBackend(inductor=False)
    with torch.no_grad():
        want = [m(input_ids=ids, use_cache=False).logits for m in (first, second)]
        compiled = [torch.compile(m, backend=backend) for m in (first, second)]
        with caplog.at_level(logging.WARNING, logger="autodeploy.compile"):
            got = [c(input_ids=ids, use_cache=False).logits for c in compiled]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=ATOL)
    assert len(backend.reports) == 1 and backend.reports[0].fallback_calls == 1
    assert "other weights" in caplog.text


def test_inference_only():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(Exception, match="for inference"):
        torch.compile(model, backend="autodeploy", options={"inductor": False})(torch.randn(2, 4))


def test_backend_name_resolves_after_light_import():
    code = (
        "import sys, autodeploy\n"
        "assert 'torch' not in sys.modules\n"
        "import torch\n"
        "from torch._dynamo import list_backends\n"
        "assert 'autodeploy' in list_backends(), list_backends()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_entry_point_declared():
    from importlib.metadata import EntryPoint

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    value = project["project"]["entry-points"]["torch_dynamo_backends"]["autodeploy"]
    backend = EntryPoint("autodeploy", value, "torch_dynamo_backends").load()
    assert backend is autodeploy.compile_backend.autodeploy_backend
