"""Batched sampling on the device: one call turns the logits ``[N, V]`` of N requests into N token ids.

Every row has its own ``SamplingParams``. Per step the engine builds a ``SamplingBatch`` (the per-row values
as device tensors, plus count/mask tensors only where a penalty needs them) and calls
``Sampler(logits, batch)``.

What happens to a row, in this order:

1. ``min_tokens``: while the row has fewer than ``min_tokens`` outputs, its stop token ids (and its EOS ids
   unless ``ignore_eos``) get ``-inf``, so a row cannot end early.
2. Penalties, on float32 logits. Repetition (HF / vLLM / CTRL): a token seen in the prompt *or* the output
   has a positive logit divided by ``repetition_penalty`` and a negative one multiplied by it. Then
   frequency (``logit -= frequency_penalty * count``) and presence (``logit -= presence_penalty``), both
   counted over the *output* tokens only (OpenAI semantics).
3. Greedy rows (``temperature < GREEDY_TEMPERATURE``) take the argmax of the penalised logits and stop here.
4. Temperature: ``logits / temperature``, then ``probs = softmax``.
5. Filtering, each filter seeing the survivors of the previous one: ``min_p`` (drop tokens with
   ``p < min_p * max p``; this ratio is unchanged by renormalising), ``top_k`` (keep the k most probable),
   ``top_p`` (keep the smallest most-probable set whose mass, renormalised over the top-k survivors, reaches
   ``top_p``; the most probable token always survives).
6. Sampling by an exponential race: ``argmax(p_i / E_i)`` with ``E_i = -log(U_i) ~ Exp(1)``, which draws
   ``i`` with probability ``p_i / sum(p)`` (no renormalisation or ``multinomial`` needed, no host sync).
   ``U`` is drawn for the full vocabulary from the row's own ``torch.Generator`` when the request has a seed
   (one draw of ``V`` uniforms per generated token), so a seeded request gives the same tokens whatever
   else is in the batch and in whichever order; unseeded rows share the sampler's generator.

Logprobs are the model's own: ``log_softmax`` of the raw logits in float32, *before* penalties, min_tokens
masking and temperature (vLLM's default "raw_logprobs"). ``SamplerOutput.logprobs`` holds the sampled token's
logprob for every row; ``top_ids``/``top_logprobs`` the ``K`` highest for ``K = max(logprobs)`` over the rows
that asked (a row that asked for ``k < K`` reads its first ``k`` columns).

Work nobody needs is skipped: no count/mask tensors without penalties; only the random rows with top-k or
top-p are sorted (a ``topk`` of the largest k replaces the full sort when all of them have a top-k); no
softmax or random numbers when every row is greedy; no log-softmax when no row asked for logprobs. These
decisions are taken from the host-side parameters while building the batch, so ``__call__`` never reads a
device value back (no host sync); the caller copies the results to the host once.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np
import torch

from ..errors import RequestError
from .sampling_params import GREEDY_TEMPERATURE, SamplingParams


class SamplingRow(NamedTuple):
    """What the sampler needs of one request this step (a plain tuple works too)."""

    params: SamplingParams
    prompt_token_ids: Sequence[int] | np.ndarray
    output_token_ids: Sequence[int] | np.ndarray
    #: the request's own generator on the logits' device when it has a seed; None shares the sampler's
    generator: torch.Generator | None = None
    #: the model's EOS ids, banned (with ``stop_token_ids``) while fewer than ``min_tokens`` were generated
    eos_token_ids: Collection[int] = ()


class RequestLike(Protocol):
    """The parts of ``executor.request.Request`` that ``Sampler.batch_for`` reads."""

    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: frozenset[int]


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor | None = None  # [N] float32, raw logprob of each sampled token
    top_ids: torch.Tensor | None = None  # [N, K] int64, most probable first
    top_logprobs: torch.Tensor | None = None  # [N, K] float32

    @property
    def top(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(top_ids, top_logprobs)`` or None."""
        if self.top_ids is None or self.top_logprobs is None:
            return None
        return self.top_ids, self.top_logprobs


# the per-row parameters read from SamplingParams: the first 7 are the packed float parameters (one host-to-device
# copy), min_tokens stays on the host
_PARAM_FIELDS = (
    "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
    "min_tokens",
)
_TEMP, _TOP_K, _TOP_P, _MIN_P, _REP, _PRES, _FREQ, _MIN_TOKENS = range(len(_PARAM_FIELDS))
_param_values = operator.attrgetter(*_PARAM_FIELDS)


@dataclass
class SamplingBatch:
    """One step's per-row sampling state on the device. Tensors a step does not need are None."""

    num_rows: int
    vocab_size: int
    device: torch.device
    all_greedy: bool
    greedy: torch.Tensor | None = None  # [N] bool; only in a batch mixing greedy and random rows
    temperature: torch.Tensor | None = None  # [N, 1] float32 (1 for greedy rows); None when all are 1
    min_p: torch.Tensor | None = None  # [N, 1] float32; None when no random row has min-p
    #: the S random rows with top-k or top-p, the only rows that are sorted; None when S == N
    filter_rows: torch.Tensor | None = None  # [S] int64
    top_k: torch.Tensor | None = None  # [S, 1] int64 in [1, V]; None when none of them has top-k
    top_p: torch.Tensor | None = None  # [S, 1] float32; None when none of them has top-p
    #: when all S rows have a top-k: the largest, so a ``topk`` of this width replaces the sort
    max_top_k: int | None = None
    repetition_penalty: torch.Tensor | None = None  # [N, 1] float32
    presence_penalty: torch.Tensor | None = None  # [N, 1] float32
    frequency_penalty: torch.Tensor | None = None  # [N, 1] float32
    seen: torch.Tensor | None = None  # [N, V] bool: in prompt or output (rows with a repetition penalty)
    output_counts: torch.Tensor | None = None  # [N, V] float32 (rows with presence/frequency penalties)
    banned: torch.Tensor | None = None  # [B] int64 flat indices row * V + token set to -inf (min_tokens)
    #: random rows with their own generator: (row, generator)
    seeded_rows: list[tuple[int, torch.Generator]] = field(default_factory=list)
    unseeded_rows: torch.Tensor | None = None  # [U] int64 rows drawing from the shared generator
    num_unseeded: int = 0
    max_logprobs: int | None = None  # K of the top logprobs (0: only the sampled token's); None: no row asked

    @classmethod
    def build(
        cls,
        rows: Sequence[SamplingRow | tuple],
        device: torch.device | str,
        vocab_size: int,
    ) -> SamplingBatch:
        """Gather the rows' parameters into device tensors: two host-to-device copies (none when every row is
        greedy without penalties or banned tokens), no syncs.

        ``prompt_token_ids`` may also be an int64 numpy array (e.g. cached per request), which saves
        converting a long prompt every step.
        """
        rows = [r if type(r) is SamplingRow else SamplingRow(*r) for r in rows]
        if not rows:
            raise RequestError("a sampling batch needs at least one row")
        return cls.from_columns(*zip(*rows), device=device, vocab_size=vocab_size)

    @classmethod
    def from_columns(
        cls,
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int] | np.ndarray],
        output_token_ids: Sequence[Sequence[int] | np.ndarray],
        generators: Sequence[torch.Generator | None],
        eos_token_ids: Sequence[Collection[int]],
        *,
        device: torch.device | str,
        vocab_size: int,
    ) -> SamplingBatch:
        """``build`` for rows given as columns, one sequence per ``SamplingRow`` field (no row objects to make).

        The parameters of all rows are read at once into one array; prompt tokens, EOS ids and generators are
        read only for the rows that need them.
        """
        device = torch.device(device)
        n, v = len(params), vocab_size
        if n == 0:
            raise RequestError("a sampling batch needs at least one row")
        num_fields = len(_PARAM_FIELDS)
        values = np.fromiter(  # [N, 8]; a row's tuple is freed before the next is made
            itertools.chain.from_iterable(map(_param_values, params)), dtype=np.float64, count=n * num_fields
        ).reshape(n, num_fields)
        greedy = values[:, _TEMP] < GREEDY_TEMPERATURE
        seeded, unseeded = _random_rows_by_generator(generators, np.flatnonzero(~greedy), device)
        num_outputs = np.fromiter(map(len, output_token_ids), dtype=np.int64, count=n)
        rep_rows = np.flatnonzero(values[:, _REP] != 1.0).tolist()
        has_count_penalty = (values[:, _PRES] != 0.0) | (values[:, _FREQ] != 0.0)
        count_rows = np.flatnonzero(has_count_penalty & (num_outputs > 0)).tolist()
        below_min_tokens = np.flatnonzero(num_outputs < values[:, _MIN_TOKENS]).tolist()
        banned = _banned_indices(params, eos_token_ids, below_min_tokens, v)
        asked = [p.logprobs for p in params if p.logprobs is not None]
        max_logprobs = min(max(asked), v) if asked else None

        if greedy.all() and not rep_rows and not count_rows and not banned:  # argmax alone: nothing to upload
            return cls(n, v, device, all_greedy=True, max_logprobs=max_logprobs)
        host = values[:, :_MIN_TOKENS].copy()  # [N, 7]: the sampler's view of the parameters
        host[greedy, _TEMP] = 1.0
        top_k = host[:, _TOP_K]
        host[:, _TOP_K] = np.where(top_k <= 0, v, np.minimum(top_k, v))
        host = host.astype(np.float32)
        random_rows = ~greedy
        filtered = random_rows & ((host[:, _TOP_K] < v) | (host[:, _TOP_P] < 1.0))
        sub = host[filtered]  # [S, 7]
        floats = {"params": host, "top_p": sub[:, _TOP_P]}
        ints: dict[str, np.ndarray] = {"top_k": sub[:, _TOP_K].astype(np.int64)}
        if filtered.any() and not filtered.all():
            ints["filter_rows"] = np.flatnonzero(filtered)
        if unseeded and len(unseeded) < n:
            ints["unseeded_rows"] = np.asarray(unseeded, dtype=np.int64)
        if greedy.any() and not greedy.all():
            ints["greedy"] = greedy.astype(np.int64)
        if rep_rows:
            seen = [(i, prompt_token_ids[i]) for i in rep_rows] + [(i, output_token_ids[i]) for i in rep_rows]
            ints["seen"] = _flat_indices(seen, v)
        if count_rows:
            ints["counts"] = _flat_indices([(i, output_token_ids[i]) for i in count_rows], v)
        if banned:
            ints["banned"] = np.asarray(banned, dtype=np.int64)
        f = _upload(floats, np.float32, device)
        d = _upload(ints, np.int64, device)
        device_params = f["params"].view(n, 7)

        def col(c: int) -> torch.Tensor:  # [N, 1]
            return device_params[:, c : c + 1]

        batch = cls(n, v, device, all_greedy=bool(greedy.all()), max_logprobs=max_logprobs)
        batch.seeded_rows = seeded
        batch.num_unseeded = len(unseeded)
        batch.unseeded_rows = d.get("unseeded_rows")
        if "greedy" in d:
            batch.greedy = d["greedy"].bool()
        if (host[random_rows, _TEMP] != 1.0).any():
            batch.temperature = col(_TEMP)
        if (host[random_rows, _MIN_P] > 0.0).any():
            batch.min_p = col(_MIN_P)
        batch.filter_rows = d.get("filter_rows")
        if (sub[:, _TOP_K] < v).any():
            batch.top_k = d["top_k"][:, None]
            if (sub[:, _TOP_K] < v).all():
                batch.max_top_k = int(sub[:, _TOP_K].max())
        if (sub[:, _TOP_P] < 1.0).any():
            batch.top_p = f["top_p"][:, None]
        if rep_rows:
            batch.repetition_penalty = col(_REP)
            seen = torch.zeros(n * v, dtype=torch.bool, device=device)
            batch.seen = seen.index_fill_(0, d["seen"], True).view(n, v)
        if count_rows:
            if (host[count_rows, _PRES] != 0.0).any():
                batch.presence_penalty = col(_PRES)
            if (host[count_rows, _FREQ] != 0.0).any():
                batch.frequency_penalty = col(_FREQ)
            counts = torch.zeros(n * v, dtype=torch.float32, device=device)
            ones = torch.ones(d["counts"].shape, dtype=torch.float32, device=device)
            batch.output_counts = counts.index_add_(0, d["counts"], ones).view(n, v)
        batch.banned = d.get("banned")
        return batch


def _random_rows_by_generator(
    generators: Sequence[torch.Generator | None], random_rows: np.ndarray, device: torch.device
) -> tuple[list[tuple[int, torch.Generator]], list[int]]:
    """The random rows with their own generator, as ``(row, generator)``, and those without one."""
    seeded: list[tuple[int, torch.Generator]] = []
    unseeded: list[int] = []
    for i in random_rows.tolist():
        generator = generators[i]
        if generator is None:
            unseeded.append(i)
        elif generator.device.type != device.type:
            raise RequestError(
                f"the generator of sampling row {i} is on {generator.device}, the logits on {device}",
                hint="create per-request generators with torch.Generator(device=<logits device>)",
            )
        else:
            seeded.append((i, generator))
    return seeded, unseeded


def _banned_indices(
    params: Sequence[SamplingParams], eos_token_ids: Sequence[Collection[int]], rows: list[int], vocab_size: int
) -> list[int]:
    """``row * V + token`` for the stop tokens (and EOS unless ``ignore_eos``) of ``rows`` (under min_tokens)."""
    banned: list[int] = []
    for i in rows:
        p = params[i]
        stops = set(p.stop_token_ids or ())
        if not p.ignore_eos:
            stops.update(eos_token_ids[i])
        banned.extend(i * vocab_size + t for t in stops if 0 <= t < vocab_size)
    return banned


def _flat_indices(rows: list[tuple[int, Sequence[int] | np.ndarray]], vocab_size: int) -> np.ndarray:
    """``row * V + token`` for every in-vocabulary token of the given rows."""
    parts = [np.zeros(0, dtype=np.int64)]
    for row, tokens in rows:
        t = np.asarray(tokens, dtype=np.int64)
        t = t[(t >= 0) & (t < vocab_size)]
        parts.append(t + row * vocab_size)
    return np.concatenate(parts)


def _upload(arrays: dict[str, np.ndarray], dtype: type, device: torch.device) -> dict[str, torch.Tensor]:
    """One host-to-device copy of the concatenated arrays; returns a flat device view of each."""
    flat = [np.ascontiguousarray(a, dtype=dtype).reshape(-1) for a in arrays.values()]
    if sum(a.size for a in flat) == 0:
        return {}
    host = torch.from_numpy(np.concatenate(flat))
    if device.type == "cuda":
        host = host.pin_memory()
    buffer = host.to(device, non_blocking=True) if device.type != "cpu" else host
    views, offset = {}, 0
    for name, a in zip(arrays, flat):
        views[name] = buffer[offset : offset + a.size]
        offset += a.size
    return views


class Sampler:
    """Samples one token per row; holds only the generator shared by unseeded rows (one per device).

    ``seed`` makes the unseeded rows reproducible for a fixed batch (tests); by default it is random.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._shared: dict[torch.device, torch.Generator] = {}
        #: the distinct prompt tokens of requests with a repetition penalty, converted once per request
        self._prompt_sets: weakref.WeakKeyDictionary[object, np.ndarray] = weakref.WeakKeyDictionary()

    def batch_for(
        self,
        requests: Sequence[RequestLike],
        generators: Sequence[torch.Generator | None],
        device: torch.device | str,
        vocab_size: int,
    ) -> SamplingBatch:
        """The batch for the engine's scheduled requests (one generator or None per request)."""
        if len(generators) != len(requests):
            raise ValueError(f"{len(generators)} generators for {len(requests)} requests")
        params = [r.sampling_params for r in requests]
        prompts = [  # only read for rows with a repetition penalty
            r.prompt_token_ids if p.repetition_penalty == 1.0 else self._prompt_tokens(r)
            for r, p in zip(requests, params)
        ]
        outputs = [r.output_token_ids for r in requests]
        eos_ids = [r.eos_token_ids for r in requests]
        return SamplingBatch.from_columns(
            params, prompts, outputs, generators, eos_ids, device=device, vocab_size=vocab_size
        )

    def _prompt_tokens(self, request: RequestLike) -> Sequence[int] | np.ndarray:
        """The distinct prompt tokens of a request with a repetition penalty, converted once per request."""
        try:
            tokens = self._prompt_sets.get(request)
            if tokens is None:
                tokens = self._prompt_sets[request] = np.unique(
                    np.asarray(request.prompt_token_ids, np.int64)
                )
            return tokens
        except TypeError:  # not weak-referenceable or not hashable: convert every step
            return request.prompt_token_ids

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """``logits [N, V]`` (any float dtype, not modified) → one token per row, plus logprobs if asked."""
        if logits.dim() != 2 or tuple(logits.shape) != (batch.num_rows, batch.vocab_size):
            raise RequestError(
                f"logits of shape {tuple(logits.shape)} do not match the sampling batch "
                f"[{batch.num_rows}, {batch.vocab_size}]",
                hint="slice the logits to the vocabulary size and pass one row per request that samples",
            )
        plain_greedy = batch.all_greedy and batch.banned is None and batch.max_logprobs is None
        if plain_greedy and batch.repetition_penalty is None and batch.output_counts is None:
            return SamplerOutput(logits.argmax(dim=-1))  # float32 would change no comparison: no copy of [N, V]
        x = logits.to(torch.float32, copy=True)  # [N, V]
        if batch.banned is not None:
            x.view(-1).index_fill_(0, batch.banned, float("-inf"))
        x = apply_penalties(x, batch)
        if batch.all_greedy:
            token_ids = x.argmax(dim=-1)  # [N]
        else:
            greedy_ids = x.argmax(dim=-1) if batch.greedy is not None else None  # [N]
            if batch.temperature is not None:
                x.div_(batch.temperature)
            probs = _filter(torch.softmax(x, dim=-1), batch)  # [N, V], filtered tokens are 0
            del x
            token_ids = probs.div_(self._race_noise(batch)).argmax(dim=-1)  # [N]
            if greedy_ids is not None:
                token_ids = torch.where(batch.greedy, greedy_ids, token_ids)
        out = SamplerOutput(token_ids)
        if batch.max_logprobs is not None:
            logprobs = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
            out.logprobs = logprobs.gather(1, token_ids[:, None]).squeeze(1)
            if batch.max_logprobs > 0:
                out.top_logprobs, out.top_ids = logprobs.topk(batch.max_logprobs, dim=-1)
        return out

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        generator = self._shared.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            if self._seed is None:
                generator.seed()
            else:
                generator.manual_seed(self._seed)
            self._shared[device] = generator
        return generator

    def _race_noise(self, batch: SamplingBatch) -> torch.Tensor:
        """``E ~ Exp(1)`` per row and token (``-log U``, ``U`` in [0, 1): never 0, so ``p / E`` is finite)."""
        n, v, device = batch.num_rows, batch.vocab_size, batch.device
        if batch.num_unseeded == n:
            u = torch.empty(n, v, device=device).uniform_(generator=self._shared_generator(device))  # [N, V]
        else:
            u = torch.full((n, v), 0.5, device=device)  # [N, V]; greedy rows keep 0.5 (their draw is unused)
            for row, generator in batch.seeded_rows:
                u[row].uniform_(generator=generator)
            if batch.num_unseeded:
                shared = torch.empty(batch.num_unseeded, v, device=device)  # [U, V]
                shared.uniform_(generator=self._shared_generator(device))
                u.index_copy_(0, batch.unseeded_rows, shared)
        return u.log_().neg_()


def apply_penalties(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition (prompt + output), then frequency and presence (output only) penalties on ``x [N, V]``."""
    if batch.repetition_penalty is not None and batch.seen is not None:
        r = batch.repetition_penalty  # [N, 1]
        x = torch.where(batch.seen, torch.where(x > 0, x / r, x * r), x)
    if batch.output_counts is not None:
        if batch.frequency_penalty is not None:
            x.sub_(batch.frequency_penalty * batch.output_counts)
        if batch.presence_penalty is not None:
            x.sub_(batch.presence_penalty * (batch.output_counts > 0))
    return x


def _filter(probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Zero the probabilities of tokens removed by min-p, then top-k, then top-p (``probs [N, V]``)."""
    if batch.min_p is not None:
        threshold = batch.min_p * probs.amax(dim=-1, keepdim=True)  # [N, 1]
        probs = probs.masked_fill_(probs < threshold, 0.0)
    if batch.top_k is None and batch.top_p is None:
        return probs
    rows = batch.filter_rows
    sub = probs if rows is None else probs.index_select(0, rows)  # [S, V]
    if batch.max_top_k is not None:  # the survivors are among the max_top_k most probable
        sorted_probs, order = sub.topk(batch.max_top_k, dim=-1)  # [S, K]
    else:
        sorted_probs, order = sub.sort(dim=-1, descending=True, stable=True)  # [S, V]
    if batch.top_k is not None:
        rank = torch.arange(sorted_probs.shape[-1], device=probs.device)  # [K]
        sorted_probs = sorted_probs.masked_fill_(rank >= batch.top_k, 0.0)
    if batch.top_p is not None:
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [S, K] exclusive cumulative mass
        total = sorted_probs.sum(dim=-1, keepdim=True)  # [S, 1]
        keep = (mass_before < batch.top_p * total) | (batch.top_p >= 1.0)  # [S, K]
        sorted_probs = sorted_probs.masked_fill_(~keep, 0.0)
    sub = torch.zeros_like(sub).scatter_(1, order, sorted_probs)  # [S, V]
    return sub if rows is None else probs.index_copy_(0, rows, sub)
