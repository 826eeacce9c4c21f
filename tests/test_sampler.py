"""The batched sampler against straightforward per-row references, on fresh random logits and odd vocab sizes.

Distributions are checked with a chi-square statistic over many draws from fixed seeds (deterministic, with a
tolerant bound). CUDA tests (marked ``gpu``) also check that sampling never syncs with the host.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from autodeploy.errors import RequestError
from autodeploy.executor.request import Request
from autodeploy.executor.sampler import Sampler, SamplingBatch, SamplingRow, apply_penalties
from autodeploy.executor.sampling_params import SamplingParams

VOCABS = [7, 83, 769]


def fresh_logits(
    n: int, v: int, seed: int, scale: float = 3.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * scale + 0.5).to(dtype)  # [N, V]


def row(params: SamplingParams, prompt=(1, 2), output=(), generator=None, eos=()) -> SamplingRow:
    return SamplingRow(params, list(prompt), list(output), generator, eos)


def seeded(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def sample(logits: torch.Tensor, rows: list[SamplingRow], sampler: Sampler | None = None):
    batch = SamplingBatch.build(rows, logits.device, logits.shape[-1])
    return (sampler or Sampler(seed=0))(logits, batch)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic; bins expecting fewer than 5 draws are merged into one."""
    total = float(counts.sum())
    expected = probs.double() * total
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    if exp[-1] == 0:
        assert obs[-1] == 0, "draws of tokens with probability 0"
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    return stat, len(exp) - 1


def assert_distribution(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    counts = torch.bincount(tokens, minlength=probs.numel())
    assert bool((counts[probs == 0] == 0).all()), "sampled a token that should have been filtered out"
    stat, df = chi_square(counts, probs)
    assert stat < df + 6 * math.sqrt(2 * df) + 10, f"chi-square {stat:.1f} with {df} degrees of freedom"


def reference_filtered(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Per-row reference of temperature → min_p → top_k → top_p; returns the renormalised distribution."""
    probs = torch.softmax(logits.double() / p.temperature, dim=-1).tolist()
    v = len(probs)
    keep = [True] * v
    if p.min_p > 0:
        top = max(probs)
        keep = [k and q >= p.min_p * top for k, q in zip(keep, probs)]
    order = sorted(range(v), key=lambda i: -probs[i])
    if p.top_k > 0:
        for i in order[p.top_k :]:
            keep[i] = False
    if p.top_p < 1:
        total = sum(probs[i] for i in range(v) if keep[i])
        mass = 0.0
        for i in order:
            if not keep[i]:
                continue
            if mass >= p.top_p * total:
                keep[i] = False
            mass += probs[i]
    out = torch.tensor([q if k else 0.0 for q, k in zip(probs, keep)], dtype=torch.float64)
    return out / out.sum()


def reference_penalised(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]):
    """Per-row Python reference: repetition penalty on prompt+output, presence/frequency on output."""
    x = logits.float().tolist()
    for t in set(prompt) | set(output):
        if p.repetition_penalty != 1.0:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return torch.tensor(x)


# ---- greedy and its equivalents ----------------------------------------------------------------------------
@pytest.mark.parametrize("v", VOCABS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax(v: int, dtype: torch.dtype):
    logits = fresh_logits(6, v, seed=v, dtype=dtype)
    logits[0, 2] = logits[0, v - 1] = logits[0].max() + 1  # a tie: the first index wins
    out = sample(logits, [row(SamplingParams(temperature=0.0)) for _ in range(6)])
    assert out.token_ids[0] == 2
    assert out.token_ids.dtype == torch.int64 and out.token_ids.shape == (6,)
    assert torch.equal(out.token_ids, logits.float().argmax(-1))
    assert out.logprobs is None and out.top is None


@pytest.mark.parametrize("v", VOCABS)
def test_top_k_one_and_tiny_top_p_are_greedy(v: int):
    logits = fresh_logits(8, v, seed=100 + v, scale=1.0)
    argmax = logits.argmax(-1)
    for params in (SamplingParams(temperature=1.7, top_k=1), SamplingParams(temperature=1.7, top_p=1e-6)):
        for step in range(3):
            out = sample(logits, [row(params) for _ in range(8)], Sampler(seed=step))
            assert torch.equal(out.token_ids, argmax), params


# ---- distributions -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("v", [7, 83])
@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.8])
def test_temperature_matches_softmax(v: int, temperature: float):
    draws = 30000
    logits = fresh_logits(1, v, seed=v, scale=1.5)
    params = SamplingParams(temperature=temperature)
    out = sample(logits.expand(draws, v), [row(params)] * draws, Sampler(seed=1))
    assert_distribution(out.token_ids, torch.softmax(logits[0].double() / temperature, -1))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.9, min_p=0.1),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=1.1, top_p=0.7),
        SamplingParams(temperature=1.2, min_p=0.02, top_k=20, top_p=0.8),
    ],
    ids=["min_p", "top_k", "top_p", "all"],
)
@pytest.mark.parametrize("with_other_rows", [False, True], ids=["alone", "sorted"])
def test_filters_match_reference_distribution(params: SamplingParams, with_other_rows: bool):
    """Alone, a top-k batch filters through ``topk``; a top-p row without top-k forces the full sort (and a
    greedy row makes the filtered rows a subset of the batch)."""
    draws, v = 30000, 83
    logits = fresh_logits(1, v, seed=7, scale=1.5)
    rows = [row(params)] * draws
    if with_other_rows:
        rows += [row(SamplingParams(temperature=0.0)), row(SamplingParams(temperature=1.0, top_p=0.99))]
    batch = SamplingBatch.build(rows, "cpu", v)
    assert (batch.max_top_k is not None) == (params.top_k > 0 and not with_other_rows)
    assert (batch.filter_rows is not None) == with_other_rows
    out = Sampler(seed=2)(logits.expand(len(rows), v), batch)
    expected = reference_filtered(logits[0], params)
    assert 1 < int((expected > 0).sum()) < v  # the filter does something and leaves a choice
    assert_distribution(out.token_ids[:draws], expected)


def test_min_p_keeps_only_tokens_near_the_top():
    v = 769
    logits = fresh_logits(64, v, seed=3, scale=2.0)
    params = SamplingParams(temperature=0.8, min_p=0.3)
    for step in range(4):
        out = sample(logits, [row(params)] * 64, Sampler(seed=step))
        probs = torch.softmax(logits / 0.8, -1)
        picked = probs.gather(1, out.token_ids[:, None]).squeeze(1)
        assert bool((picked >= 0.3 * probs.amax(-1) * (1 - 1e-5)).all())


def test_seeded_row_draws_follow_the_distribution():
    """One seeded request, stepped token by token through its own generator."""
    v, draws = 7, 3000
    logits = fresh_logits(1, v, seed=11, scale=1.0)
    params = SamplingParams(temperature=0.8, seed=5)
    generator = seeded(5)
    sampler = Sampler(seed=0)
    batch = SamplingBatch.build([row(params, generator=generator)], "cpu", v)
    tokens = torch.cat([sampler(logits, batch).token_ids for _ in range(draws)])
    assert_distribution(tokens, torch.softmax(logits[0].double() / 0.8, -1))


# ---- seeds -------------------------------------------------------------------------------------------------
def _run_requests(
    order: list[str], specs: dict[str, SamplingParams], steps: int, v: int
) -> dict[str, list[int]]:
    """Decode ``steps`` tokens of the named requests batched in ``order``; logits depend on (name, step)."""
    generators = {name: seeded(p.seed) if p.seed is not None else None for name, p in specs.items()}
    outputs: dict[str, list[int]] = {name: [] for name in order}
    sampler = Sampler()  # unseeded rows: a random seed
    for step in range(steps):
        logits = torch.cat(
            [fresh_logits(1, v, seed=zlib.crc32(f"{name}/{step}".encode()), scale=1.0) for name in order]
        )
        rows = [row(specs[name], (3, 4, 5), outputs[name], generators[name]) for name in order]
        tokens = sample(logits, rows, sampler).token_ids.tolist()
        for name, t in zip(order, tokens):
            outputs[name].append(t)
    return outputs


@pytest.mark.parametrize("v", [83, 769])
def test_seeded_requests_reproduce_across_batch_orders_and_compositions(v: int):
    specs = {
        "a": SamplingParams(temperature=1.0, seed=1234),
        "b": SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=99, repetition_penalty=1.2),
        "c": SamplingParams(temperature=1.0),  # unseeded
        "d": SamplingParams(temperature=0.0, frequency_penalty=0.5),
        "e": SamplingParams(temperature=1.5, min_p=0.05, seed=1234),  # same seed as "a", other params
    }
    steps = 12
    reference = _run_requests(["a", "b", "c", "d", "e"], specs, steps, v)
    for order in (["e", "d", "c", "b", "a"], ["c", "a"], ["b"], ["d", "b", "c", "c2", "a"], ["a", "e"]):
        specs["c2"] = SamplingParams(temperature=1.0)
        got = _run_requests(order, specs, steps, v)
        for name in set(order) & {"a", "b", "d", "e"}:
            assert got[name] == reference[name], (name, order)
    # the seed matters: a different seed gives different tokens
    specs["a"] = SamplingParams(temperature=1.0, seed=4321)
    assert _run_requests(["a"], specs, steps, v)["a"] != reference["a"]


def test_unseeded_rows_differ_between_samplers():
    logits = fresh_logits(16, 769, seed=5, scale=0.5)
    rows = [row(SamplingParams(temperature=1.0))] * 16
    first = sample(logits, rows, Sampler()).token_ids
    second = sample(logits, rows, Sampler()).token_ids
    assert not torch.equal(first, second)


# ---- penalties ---------------------------------------------------------------------------------------------
PENALTY_CASES = [
    (SamplingParams(repetition_penalty=1.3), [1, 2, 3, 2], [4, 4, 5]),
    (SamplingParams(repetition_penalty=0.8), [6], [6, 0]),
    (SamplingParams(presence_penalty=0.7), [1, 2], [3, 3, 3, 2]),
    (SamplingParams(frequency_penalty=-0.4), [1], [3, 3, 3, 2]),
    (
        SamplingParams(repetition_penalty=1.5, presence_penalty=0.3, frequency_penalty=0.6),
        [0, 1, 5],
        [5, 2, 2, 6],
    ),
    (SamplingParams(), [1, 2], [3]),  # no penalty
    (SamplingParams(frequency_penalty=0.5), [1, 2], []),  # nothing generated yet
]


@pytest.mark.parametrize("v", VOCABS)
def test_penalties_match_reference(v: int):
    n = len(PENALTY_CASES)
    logits = fresh_logits(n, v, seed=v + 1)
    rows = [row(p, prompt, output) for p, prompt, output in PENALTY_CASES]
    batch = SamplingBatch.build(rows, "cpu", v)
    got = apply_penalties(logits.clone(), batch)
    expected = torch.stack([reference_penalised(logits[i], *PENALTY_CASES[i]) for i in range(n)])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(got[0], logits[0])
    # greedy rows take the argmax of the penalised logits
    greedy_rows = [
        row(SamplingParams(temperature=0.0, **_penalties(p)), prompt, out) for p, prompt, out in PENALTY_CASES
    ]
    assert torch.equal(sample(logits, greedy_rows).token_ids, expected.argmax(-1))


def _penalties(p: SamplingParams) -> dict[str, float]:
    return {
        "repetition_penalty": p.repetition_penalty,
        "presence_penalty": p.presence_penalty,
        "frequency_penalty": p.frequency_penalty,
    }


@pytest.mark.parametrize(
    "penalty", [{"repetition_penalty": 1.8}, {"repetition_penalty": 0.7}], ids=["above_1", "below_1"]
)
def test_greedy_with_repetition_penalty_matches_hf_generate(penalty: dict[str, float]):
    """The reference for the repetition penalty is HF's own ``generate`` (greedy) on a tiny random model."""
    from autodeploy.models.tiny import tiny_model

    model = tiny_model("llama", seed=3)
    prompt = torch.randint(3, 512, (1, 150), generator=torch.Generator().manual_seed(4))  # sees ~25% of V
    eos = model.config.eos_token_id
    with torch.no_grad():
        hf = model.generate(
            prompt, do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0, **penalty
        )
        plain = model.generate(prompt, do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
        assert not torch.equal(hf, plain)  # the penalty changes this model's greedy tokens
        params = SamplingParams(temperature=0.0, min_tokens=12, **penalty)
        ids: list[int] = []
        for _ in range(12):
            logits = model(torch.tensor([prompt[0].tolist() + ids])).logits[:, -1]  # [1, V]
            ids.append(int(sample(logits, [row(params, prompt[0].tolist(), ids, eos={eos})]).token_ids))
    assert ids == hf[0, 150:].tolist()


def test_repetition_penalty_steers_greedy_away_from_seen_tokens():
    v = 83
    logits = fresh_logits(1, v, seed=2, scale=1.0)
    top = int(logits.argmax())
    p = SamplingParams(temperature=0.0, repetition_penalty=100.0)
    assert int(sample(logits, [row(p, prompt=[top])]).token_ids) != top
    assert int(sample(logits, [row(p, prompt=[(top + 1) % v])]).token_ids) == top


def test_no_penalties_builds_no_count_tensors():
    rows = [
        row(SamplingParams(temperature=0.5), output=[1, 2]),
        row(SamplingParams(temperature=0.0), output=[3]),
    ]
    batch = SamplingBatch.build(rows, "cpu", 83)
    assert batch.seen is None and batch.output_counts is None and batch.banned is None
    assert batch.top_k is None and batch.top_p is None and batch.min_p is None
    assert batch.max_logprobs is None
    assert SamplingBatch.build(rows[1:], "cpu", 83).all_greedy


def test_min_tokens_bans_stop_tokens_until_reached():
    v = 83
    logits = fresh_logits(1, v, seed=8)
    eos = int(logits.argmax())
    second = int(logits[0].topk(2).indices[1])
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[second])
    assert int(sample(logits, [row(p, output=[9], eos={eos})]).token_ids) not in (eos, second)
    assert int(sample(logits, [row(p, output=[9, 9], eos={eos})]).token_ids) == eos
    ignore = SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True)
    assert int(sample(logits, [row(ignore, output=[9], eos={eos})]).token_ids) == eos


# ---- logprobs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("v", VOCABS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_are_raw_log_softmax(v: int, dtype: torch.dtype):
    logits = fresh_logits(4, v, seed=v + 2, dtype=dtype)
    rows = [
        row(SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.4), prompt=[0, 1, 2]),
        row(SamplingParams(temperature=0.5, logprobs=0, frequency_penalty=1.0), output=[1, 1]),
        row(SamplingParams(temperature=1.3, top_k=4, logprobs=5, seed=3), generator=seeded(3)),
        row(SamplingParams(temperature=1.0)),  # asked for none
    ]
    out = sample(logits, rows)
    reference = torch.log_softmax(logits.float(), dim=-1)
    k = min(5, v)
    assert out.top_ids is not None and out.top_logprobs is not None and out.logprobs is not None
    assert out.top_ids.shape == (4, k) and out.top_logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs, reference.gather(1, out.token_ids[:, None]).squeeze(1))
    torch.testing.assert_close(out.top_logprobs, reference.topk(k, -1).values)
    assert torch.equal(out.top_ids, reference.topk(k, -1).indices)


def test_logprobs_zero_gives_only_the_sampled_token():
    logits = fresh_logits(2, 83, seed=4)
    out = sample(logits, [row(SamplingParams(temperature=0.0, logprobs=0))] * 2)
    assert out.top is None and out.logprobs is not None
    torch.testing.assert_close(out.logprobs, torch.log_softmax(logits, -1).amax(-1))


# ---- mixed batches -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("v", VOCABS)
def test_mixed_batch_in_one_call(v: int):
    logits = fresh_logits(7, v, seed=v + 3)
    cases = [
        (SamplingParams(temperature=0.0), [1], []),
        (
            SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5),
            [0, 2, 4],
            [1, 1, 3],
        ),
        (SamplingParams(temperature=0.9, seed=42), [1], [2]),
        (SamplingParams(temperature=1.1), [1], []),
        (SamplingParams(temperature=0.7, top_k=3, presence_penalty=1.0), [1], [0, 5]),
        (SamplingParams(temperature=1.0, min_p=0.2, seed=7), [1], []),
        (SamplingParams(temperature=2.0, top_p=0.5, logprobs=2), [1], []),
    ]
    rows = [row(p, prompt, out, seeded(p.seed) if p.seed is not None else None) for p, prompt, out in cases]
    out = sample(logits, rows, Sampler(seed=9))
    tokens = out.token_ids.tolist()
    penalised = [reference_penalised(logits[i], p, prompt, o) for i, (p, prompt, o) in enumerate(cases)]
    assert tokens[0] == int(penalised[0].argmax()) and tokens[1] == int(penalised[1].argmax())
    for i in range(2, 7):
        allowed = reference_filtered(penalised[i], cases[i][0])
        assert allowed[tokens[i]] > 0, (i, cases[i][0])
    # a seeded row gives the same token alone as in the mixed batch
    for i in (2, 5):
        p, prompt, o = cases[i]
        alone = sample(logits[i : i + 1], [row(p, prompt, o, seeded(p.seed))], Sampler(seed=123))
        assert int(alone.token_ids) == tokens[i]


def test_batch_for_reads_requests():
    params = SamplingParams(temperature=0.0, repetition_penalty=3.0, min_tokens=5)
    request = Request("r", [1, 2, 3], params, eos_token_ids={0})
    request.output_token_ids = [4]
    sampler = Sampler()
    batch = sampler.batch_for([request], [None], "cpu", 7)
    assert batch.banned is not None and batch.banned.tolist() == [0]
    assert batch.seen is not None and batch.seen[0].tolist() == [False, True, True, True, True, False, False]


def test_errors_are_typed():
    batch = SamplingBatch.build([row(SamplingParams())], "cpu", 83)
    with pytest.raises(RequestError, match="do not match"):
        Sampler()(fresh_logits(2, 83, seed=0), batch)
    with pytest.raises(RequestError):
        SamplingBatch.build([], "cpu", 83)


# ---- CUDA --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu_and_never_syncs(dtype: torch.dtype):
    v, n = 769, 8
    logits = fresh_logits(n, v, seed=21, dtype=dtype)
    cases = [
        (SamplingParams(temperature=0.0, logprobs=2), [1], []),
        (SamplingParams(temperature=0.0, repetition_penalty=1.5, presence_penalty=0.5), [3, 4], [5, 5]),
        (SamplingParams(temperature=0.8, seed=1, top_k=10, logprobs=0), [1], [2]),
        (SamplingParams(temperature=1.0), [1], []),
        (SamplingParams(temperature=1.2, top_p=0.8, min_p=0.05, frequency_penalty=0.3), [1], [7, 7]),
        (SamplingParams(temperature=0.0, min_tokens=3), [1], []),
        (SamplingParams(temperature=0.5, seed=2), [1], []),
        (SamplingParams(temperature=0.0, top_k=1), [1], []),
    ]
    eos = {int(logits[5].float().argmax())}
    cpu_rows = [row(p, a, b, None, eos) for p, a, b in cases]
    cpu = sample(logits, cpu_rows)
    gpu_logits = logits.cuda()
    gpu_rows = [
        row(p, a, b, seeded(p.seed, "cuda") if p.seed is not None else None, eos) for p, a, b in cases
    ]
    batch = SamplingBatch.build(gpu_rows, gpu_logits.device, v)
    sampler = Sampler(seed=0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sampler(gpu_logits, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for i in (0, 1, 5, 7):  # greedy rows agree with the CPU
        assert int(out.token_ids[i]) == int(cpu.token_ids[i])
    assert int(out.token_ids[5]) not in eos
    torch.testing.assert_close(out.logprobs.cpu()[:2], cpu.logprobs[:2], rtol=1e-5, atol=1e-5)
    # a seeded row on CUDA reproduces alone
    alone = sample(gpu_logits[2:3], [row(cases[2][0], [1], [2], seeded(1, "cuda"), eos)])
    assert int(alone.token_ids) == int(out.token_ids[2])


@pytest.mark.gpu
def test_cuda_temperature_distribution():
    draws, v = 50000, 83
    logits = fresh_logits(1, v, seed=v, scale=1.5).cuda()
    out = sample(logits.expand(draws, v), [row(SamplingParams(temperature=0.7))] * draws, Sampler(seed=1))
    assert_distribution(out.token_ids.cpu(), torch.softmax(logits[0].cpu().double() / 0.7, -1))
