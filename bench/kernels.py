"""Check and time the Triton kernels against their torch references on Llama-3.1-8B shapes (one H100).

    python bench/kernels.py            # checks, timings, small tile/split sweeps (~2 min with compilation)
    python bench/kernels.py --quick    # no sweeps
    python bench/kernels.py --smoke    # CPU, Triton interpreter, tiny shapes: exercises this script's code paths

Every case first checks the Triton output (poisoned with NaN beforehand) against the torch reference
(``rel = |out - ref| / |ref|``, bf16 passes under 1e-2), then times both with ``triton.testing.do_bench``
(median; Triton flushes L2 before every repetition, so memory-bound numbers are DRAM numbers). Memory-bound
kernels report GB/s (fewest bytes: every input read once, every output written once), prefill attention
TFLOP/s (causal FLOPs only). Decode attention is also timed inside a CUDA graph (``graph_us``: no launch gaps,
L2 not flushed) and, where it runs, against torch SDPA on contiguous (unpaged) KV as a yardstick.
The last lines are a short table; ``$OUT/kernels.json`` gets everything when ``OUT`` is set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = "--smoke" in sys.argv
if SMOKE:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

import autodeploy.custom_ops  # noqa: E402,F401  (torch references)
import autodeploy.custom_ops.triton  # noqa: E402,F401  (Triton ops)
from autodeploy.custom_ops.triton.attention_tiles import AttentionConfig, decode_splits, default_config  # noqa: E402
from autodeploy.custom_ops.triton.cached_attention import cached_attention_into  # noqa: E402
from copy_bandwidth import copy_bytes_per_s  # noqa: E402  (bench/, the script's folder)

ops = torch.ops.autodeploy
N_Q, N_KV, HEAD_DIM, HIDDEN, INTER = (4, 2, 16, 83, 83) if SMOKE else (32, 8, 128, 4096, 14336)  # Llama-3.1-8B
PAGE = 16
DEV = torch.device("cpu" if SMOKE else "cuda")
DTYPE = torch.bfloat16
REL_TOL = 1e-2


@dataclass
class Row:
    kernel: str
    case: str
    triton_us: float | None = None
    ref_us: float | None = None
    metric: float | None = None  # GB/s or TFLOP/s of the Triton kernel
    unit: str = ""
    rel_err: float | None = None
    max_err: float | None = None
    ok: bool = False
    extra: dict = field(default_factory=dict)


def _median_us(fn: Callable[[], object], rep: int = 100) -> float:
    if SMOKE:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    return do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e3


def _graph_us(fn: Callable[[], object]) -> float | None:
    if SMOKE:
        fn()
        return None
    return do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3


def _errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    if torch.isnan(out).any():
        return math.inf, math.inf
    o, r = out.double(), ref.double()
    return ((o - r).norm() / r.norm().clamp_min(1e-30)).item(), (o - r).abs().max().item()


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second (the memory ceiling), in GB/s."""
    return copy_bytes_per_s(DEV, 1 << (10 if SMOKE else 29)) / 1e9


# ---- paged attention ----------------------------------------------------------------------------------------------
def paged_batch(seqs: list[tuple[int, int]], num_prefill: int) -> dict[str, torch.Tensor]:
    """Random q/k/v and stale random KV pools; each sequence's pages scattered over the pool."""
    dev = DEV
    num_seqs = len(seqs)
    pages = max(-(-(c + n) // PAGE) for c, n in seqs)
    num_blocks = num_seqs * pages + 8
    page_table = torch.randperm(num_blocks, device=dev)[: num_seqs * pages].view(num_seqs, pages).int()
    lens = torch.tensor([n for _, n in seqs], dtype=torch.int32, device=dev)
    cached = torch.tensor([c for c, _ in seqs], dtype=torch.int32, device=dev)
    cu = torch.zeros(num_seqs + 1, dtype=torch.int32, device=dev)
    cu[1:] = torch.cumsum(lens, 0)
    seq_of_tok = torch.repeat_interleave(torch.arange(num_seqs, device=dev), lens.long())
    pos = cached.long()[seq_of_tok] + torch.arange(seq_of_tok.numel(), device=dev) - cu.long()[seq_of_tok]
    slots = page_table.long()[seq_of_tok, pos // PAGE] * PAGE + pos % PAGE
    t = int(cu[-1])
    kw = dict(dtype=DTYPE, device=dev)
    return dict(
        q=torch.randn(1, t, N_Q, HEAD_DIM, **kw),
        k=torch.randn(1, t, N_KV, HEAD_DIM, **kw),
        v=torch.randn(1, t, N_KV, HEAD_DIM, **kw),
        k_cache=torch.randn(num_blocks, PAGE, N_KV, HEAD_DIM, **kw),
        v_cache=torch.randn(num_blocks, PAGE, N_KV, HEAD_DIM, **kw),
        seq_lens=lens,
        cu_seqlens=cu,
        cache_lens=cached,
        page_table=page_table,
        slot_mapping=slots,
        batch_info=torch.tensor([num_prefill, int(cu[num_prefill]), num_seqs - num_prefill], dtype=torch.int32),
    )


def _clone(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in inputs.items()}


def attention_reference(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return ops.torch_cached_attention(**_clone(inputs))


def check_attention(
    inputs: dict[str, torch.Tensor], ref: torch.Tensor, config: AttentionConfig | None = None, splits: int | None = None
) -> tuple[float, float, bool]:
    ours = _clone(inputs)
    out = torch.full_like(ref, float("nan"))
    cached_attention_into(out, **ours, config=config, num_splits=splits)
    rel, mx = _errors(out, ref)
    ref_in = _clone(inputs)
    ops.torch_cached_attention(**ref_in)
    caches_ok = torch.equal(ours["k_cache"], ref_in["k_cache"]) and torch.equal(ours["v_cache"], ref_in["v_cache"])
    return rel, mx, rel < REL_TOL and caches_ok


def kv_bytes(seqs: list[tuple[int, int]]) -> int:
    """Fewest bytes of one decode/prefill step: every cached or new K/V row read once, q read, out written."""
    tokens = sum(n for _, n in seqs)
    ctx = sum(c + n for c, n in seqs)
    return 2 * (ctx * N_KV * 2 * HEAD_DIM + tokens * N_KV * 2 * HEAD_DIM + 2 * tokens * N_Q * HEAD_DIM)


def causal_flops(seqs: list[tuple[int, int]]) -> float:
    keys = sum(sum(c + i + 1 for i in range(n)) for c, n in seqs)  # (query, visible key) pairs
    return 4.0 * keys * N_Q * HEAD_DIM


def sdpa_us(seqs: list[tuple[int, int]]) -> float | None:
    """torch SDPA on contiguous K/V of the same sizes (all sequences alike): a yardstick, not a reference."""
    if len(set(seqs)) != 1:
        return None
    (c, n), b = seqs[0], len(seqs)
    q = torch.randn(b, N_Q, n, HEAD_DIM, dtype=DTYPE, device=DEV)
    k = torch.randn(b, N_KV, c + n, HEAD_DIM, dtype=DTYPE, device=DEV)
    v = torch.randn_like(k)
    try:
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=c == 0 and n > 1, enable_gqa=True)  # noqa: E731
        fn()
        return _median_us(fn)
    except Exception:  # noqa: BLE001  (old torch / no GQA kernel): report nothing
        return None


def bench_attention(
    name: str, seqs: list[tuple[int, int]], num_prefill: int, rows: list[Row], sweeps: list[dict], sweep: bool
) -> None:
    row = Row("cached_attention", name)
    rows.append(row)
    inputs = paged_batch(seqs, num_prefill)
    ref = attention_reference(inputs)
    row.rel_err, row.max_err, row.ok = check_attention(inputs, ref)
    op = ops.triton_cached_attention
    work = _clone(inputs)
    row.triton_us = _median_us(lambda: op(**work))
    row.ref_us = _median_us(lambda: ops.torch_cached_attention(**work), rep=40)
    if num_prefill:
        row.metric, row.unit = causal_flops(seqs) / (row.triton_us * 1e-6) / 1e12, "TFLOP/s"
    else:
        row.metric, row.unit = kv_bytes(seqs) / (row.triton_us * 1e-6) / 1e9, "GB/s"
        row.extra["splits"] = decode_splits(len(seqs), N_KV, inputs["page_table"].shape[1] * PAGE,
                                            default_config(HEAD_DIM, DTYPE, ref.device).decode_block_n, ref.device)
        eager_out = op(**_clone(work))
        graph_out = torch.empty_like(eager_out)
        row.extra["graph_us"] = _graph_us(lambda: graph_out.copy_(op(**work)))
        row.extra["graph_matches_eager"] = bool(torch.equal(graph_out, eager_out))
        row.ok = row.ok and row.extra["graph_matches_eager"]
    row.extra["sdpa_us"] = sdpa_us(seqs)
    if not sweep:
        return
    base = default_config(HEAD_DIM, DTYPE, ref.device)
    if num_prefill:
        variants = [
            (f"m{m}n{n}w{w}s{s}", replace(base, prefill_block_m=m, prefill_block_n=n, prefill_warps=w,
                                          prefill_stages=s), None)
            for m, n, w, s in [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 2)]
        ]
    else:
        variants = [(f"splits{s}", base, s) for s in (1, 4, 8, 16, 32, 64)]
        variants += [
            (f"n{n}w{w}s{s}", replace(base, decode_block_n=n, decode_warps=w, decode_stages=s), None)
            for n, w, s in [(32, 4, 3), (128, 4, 2), (64, 8, 3), (64, 4, 4)]
        ]
    for label, cfg, splits in variants:
        entry = dict(case=name, variant=label)
        try:
            entry["rel_err"], _, entry["ok"] = check_attention(inputs, ref, cfg, splits)
            out = torch.empty_like(ref)
            entry["us"] = _median_us(lambda: cached_attention_into(out, **work, config=cfg, num_splits=splits))
        except Exception as exc:  # noqa: BLE001  (a config that does not compile or fit: record, go on)
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        sweeps.append(entry)


# ---- elementwise / row kernels ----------------------------------------------------------------------------------
def bench_simple(
    rows: list[Row], kernel: str, case: str, nbytes: int, fast: Callable[[], object], ref: Callable[[], object]
) -> None:
    row = Row(kernel, case)
    rows.append(row)
    got, want = fast(), ref()
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    errs = [_errors(g, w) for g, w in zip(got, want)]
    row.rel_err = max(e[0] for e in errs)
    row.max_err = max(e[1] for e in errs)
    row.ok = row.rel_err < REL_TOL
    row.triton_us = _median_us(fast)
    row.ref_us = _median_us(ref)
    row.metric, row.unit = nbytes / (row.triton_us * 1e-6) / 1e9, "GB/s"


def bench_row_kernels(rows: list[Row], tokens: int) -> None:
    dev, b = DEV, 2  # bytes per bf16 element
    x = torch.randn(tokens, HIDDEN, dtype=DTYPE, device=dev)
    res = torch.randn_like(x)
    w = torch.rand(HIDDEN, dtype=DTYPE, device=dev) + 0.5
    n = x.numel()
    bench_simple(rows, "rmsnorm", f"T={tokens} H={HIDDEN}", 2 * n * b,
                 lambda: ops.triton_rmsnorm(x, w, 1e-5), lambda: ops.torch_rmsnorm(x, w, 1e-5))
    bench_simple(rows, "fused_add_rmsnorm", f"T={tokens} H={HIDDEN}", 4 * n * b,
                 lambda: ops.triton_fused_add_rmsnorm(x, res, w, 1e-5),
                 lambda: ops.torch_fused_add_rmsnorm(x, res, w, 1e-5))

    q = torch.randn(1, tokens, N_Q, HEAD_DIM, dtype=DTYPE, device=dev)
    inv = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, device=dev).float() / HEAD_DIM))
    ang = torch.arange(tokens, device=dev).float()[:, None] * inv
    ang = torch.cat([ang, ang], -1)[None]  # [1, T, D]
    cos, sin = ang.cos().to(DTYPE), ang.sin().to(DTYPE)
    bench_simple(rows, "rope", f"q T={tokens} {N_Q}x{HEAD_DIM}", 2 * q.numel() * b + 2 * cos.numel() * b,
                 lambda: ops.triton_rope(q, cos, sin, False), lambda: ops.torch_rope(q, cos, sin, False))

    gate_up = torch.randn(tokens, 2 * INTER, dtype=DTYPE, device=dev)
    bench_simple(rows, "glu_packed silu", f"T={tokens} I={INTER}", 3 * tokens * INTER * b,
                 lambda: ops.triton_glu_packed(gate_up, "silu"), lambda: ops.torch_glu_packed(gate_up, "silu"))


# ---- main -------------------------------------------------------------------------------------------------------
def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip the tile / split sweeps")
    parser.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes, no real timings")
    args = parser.parse_args()
    if not SMOKE and not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU (or --smoke)")
        return 1
    torch.manual_seed(0)
    t0 = time.time()
    if SMOKE:
        device, sms = "cpu (interpreter)", 0
    else:
        device, sms = torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).multi_processor_count
    report: dict = dict(device=device, sms=sms, torch=torch.__version__, triton=triton.__version__,
                        copy_GBps=copy_bandwidth())
    rows: list[Row] = []
    sweeps: list[dict] = []
    cases = [
        ("decode b1 ctx1024", [(1023, 1)], 0),
        ("decode b1 ctx4096", [(4095, 1)], 0),
        ("decode b64 ctx256", [(255, 1)] * 64, 0),
        ("prefill 1x1024", [(0, 1024)], 1),
        ("mixed 2x512+32dec", [(0, 512), (256, 256)] + [(1000 + 37 * i, 1) for i in range(32)], 2),
    ]
    if SMOKE:
        cases = [("decode b1 ctx40", [(39, 1)], 0), ("decode b3 ctx20", [(19, 1)] * 3, 0),
                 ("prefill 1x19", [(0, 19)], 1), ("mixed", [(0, 7), (5, 6), (30, 1), (9, 1)], 2)]
    for name, seqs, num_prefill in cases:
        try:
            sweep = not args.quick and not name.startswith("mixed")
            bench_attention(name, seqs, num_prefill, rows, sweeps, sweep)
        except Exception:  # noqa: BLE001
            rows.append(Row("cached_attention", name, extra=dict(error=traceback.format_exc(limit=3))))
            traceback.print_exc()
    for tokens in (7, 19) if SMOKE else (1024, 8192):
        try:
            bench_row_kernels(rows, tokens)
        except Exception:  # noqa: BLE001
            rows.append(Row("row kernels", f"T={tokens}", extra=dict(error=traceback.format_exc(limit=3))))
            traceback.print_exc()
    report["rows"] = [asdict(r) for r in rows]
    report["sweeps"] = sweeps
    report["wall_s"] = time.time() - t0

    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "kernels.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)

    print(f"\n{report['device']} ({report['sms']} SMs), torch {report['torch']}, triton {report['triton']}, "
          f"copy {report['copy_GBps']:.0f} GB/s, {report['wall_s']:.0f} s")
    if sweeps:
        print(f"\n{'sweep case':22s} {'variant':14s} {'us':>9s} {'rel_err':>9s}")
        for s in sweeps:
            print(f"{s['case']:22s} {s['variant']:14s} {_fmt(s.get('us'), '9.1f')} {_fmt(s.get('rel_err'), '9.1e')}"
                  f" {'' if s.get('ok', False) else 'FAIL ' + s.get('error', '')}")
    print(f"\n{'kernel':18s} {'case':24s} {'triton_us':>9s} {'metric':>14s} {'torch_us':>9s} {'speedup':>7s} "
          f"{'rel_err':>8s} {'ok':>3s}  extra")
    for r in rows:
        metric = f"{r.metric:8.1f} {r.unit}" if r.metric is not None else "-"
        speed = f"{r.ref_us / r.triton_us:6.1f}x" if r.ref_us and r.triton_us else "-"
        extra = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.extra.items() if k != "error"}
        if "error" in r.extra:
            extra["error"] = r.extra["error"].strip().splitlines()[-1][:80]
        print(f"{r.kernel:18s} {r.case:24s} {_fmt(r.triton_us, '9.1f')} {metric:>14s} {_fmt(r.ref_us, '9.1f')} "
              f"{speed:>7s} {_fmt(r.rel_err, '8.1e')} {'yes' if r.ok else 'NO':>3s}  {extra}")
    return 0 if all(r.ok for r in rows) and all(s.get("ok", False) for s in sweeps) else 2


if __name__ == "__main__":
    sys.exit(main())
