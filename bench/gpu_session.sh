#!/usr/bin/env bash
# One device-machine session: install what the GPU image lacks (wheels carried in .whl/), then run the named
# steps, each under its own time limit, logging to $OUT. Usage: bench/gpu_session.sh kernels e2e gpu-tests
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
clocks() { nvidia-smi --query-gpu=index,clocks.sm,clocks.max.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active --format=csv,noheader | tr '\n' ' '; echo; }
for step in "$@"; do
  echo "=== $step === $(clocks)"
  case "$step" in
    kernels)   timeout 240 python3 bench/kernels.py --quick 2>&1 | tee "$OUT/kernels.log" | tail -40 ;;
    kernels-full) timeout 400 python3 bench/kernels.py 2>&1 | tee "$OUT/kernels.log" | tail -60 ;;
    e2e)       timeout 420 python3 bench/e2e.py --profile-ttft --json "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log" | grep -v Warn | tail -40 ;;
    e2e-latency) timeout 240 python3 bench/e2e.py --skip-hf --only decode,ttft --profile-ttft --json "$OUT/e2e_latency.json" 2>&1 | tee "$OUT/e2e_latency.log" | grep -v Warn | tail -30 ;;
    ttft-trace) for only in ttft decode,ttft; do timeout 200 python3 bench/e2e.py --skip-hf --only $only --profile-ttft --trace-ttft --json "$OUT/ttft_${only/,/_}.json" 2>&1 | tee "$OUT/ttft_${only/,/_}.log" | grep -E 'optimize|ttft_1024_p50|ttft kernels|batch1_decode' | cut -c1-3000; done ;;
    decode-trace) AUTODEPLOY_PDL=0 timeout 200 python3 bench/e2e.py --skip-hf --only decode --trace-decode --json "$OUT/decode_trace.json" 2>&1 | tee "$OUT/decode_trace.log" | grep -E 'optimize|decode kernels|batch1' | cut -c1-4000 ;;
    offline-profile) timeout 220 python3 bench/e2e.py --skip-hf --only offline --profile-steps --trace-from 60 --json "$OUT/offline_profile.json" > "$OUT/offline_profile.log" 2>&1; grep -E 'optimize|steps=|offline_1|offline_itl|num_alloc|num_device' "$OUT/offline_profile.log"; grep -A36 'first offline step' "$OUT/offline_profile.log" | cut -c1-170; grep -A28 'Self CUDA' "$OUT/offline_profile.log" | cut -c1-220 ;;
    offline-host) for q in null fp8; do timeout 200 python3 bench/e2e.py --skip-hf --only offline --set quantize=$q --set kv_cache.dtype=${KV_DTYPE:-fp8} --host-steps --json "$OUT/offline_host_$q.json" 2>&1 | tee "$OUT/offline_host_$q.log" | grep -E 'optimize|host step|"offline_1|offline_itl_p50|kv_cache_blocks|peak_memory'; done ;;
    decode-attn) timeout 200 python3 bench/decode_attention.py --out "$OUT/decode_attention.json" 2>&1 | tee "$OUT/decode_attention.log" | grep '^{' | cut -c1-420 ;;
    offline)   for kv in auto fp8; do timeout 200 python3 bench/e2e.py --skip-hf --only offline --set kv_cache.dtype=$kv --json "$OUT/offline_$kv.json" 2>&1 | tee "$OUT/offline_$kv.log" | grep -E 'optimize|"offline_|peak_memory|kv_cache_blocks'; done ;;
    e2e-nohf)  timeout 300 python3 bench/e2e.py --skip-hf --json "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log" | grep -v Warn | tail -40 ;;
    flashinfer) bash bench/flashinfer_setup.sh 2>&1 | tail -5 ;;
    e2e-flashinfer) timeout 420 python3 bench/e2e.py --skip-hf --attn-backend flashinfer --json "$OUT/e2e_flashinfer.json" 2>&1 | tee "$OUT/e2e_flashinfer.log" | grep -v Warn | tail -40 ;;
    flashinfer-tests) timeout 540 python3 -m pytest -q -m gpu tests/test_flashinfer_backend.py 2>&1 | tail -15 ;;
    gpu-tests) timeout 540 python3 -m pytest -q -m gpu tests/ 2>&1 | tail -15 ;;  # FlashInfer JIT: ~60 s a variant
    pdl)       timeout 200 python3 bench/pdl.py --out "$OUT/pdl.json" 2>&1 | tee "$OUT/pdl.log" | grep '^{' ;;
    kernel-tests) timeout 300 python3 -m pytest -q -x tests/test_pdl.py tests/test_triton_kernels.py -k "rope or decode or pdl" 2>&1 | tail -15 ;;
    kernel-gpu-tests) timeout 330 python3 -m pytest -q -m gpu tests/test_gemv.py tests/test_moe_kernels.py tests/test_triton_kernels.py 2>&1 | tail -15 ;;
    pdl-tests) timeout 300 python3 -m pytest -q -m gpu tests/test_pdl.py tests/test_gemv.py tests/test_triton_kernels.py tests/test_attention_ops.py tests/test_moe_router.py tests/test_moe_kernels.py 2>&1 | tail -15 ;;
    e2e-pdl)   for pdl in 0 1; do AUTODEPLOY_PDL=$pdl timeout 160 python3 bench/e2e.py --skip-hf --only decode,ttft --profile-ttft --json "$OUT/e2e_pdl$pdl.json" 2>&1 | tee "$OUT/e2e_pdl$pdl.log" | grep -E 'optimize|batch1|ttft_1024|tokens_match'; done ;;
    gemv)      timeout 280 python3 bench/gemv.py --out "$OUT/gemv.json" 2>&1 | tee "$OUT/gemv.log" | grep '^{' | tail -60 ;;
    gemv-tp2)  timeout 240 python3 bench/gemv.py --fmts dense --tokens 1 --variants cuda --shapes llama-tp2 --out "$OUT/gemv_tp2.json" 2>&1 | tee "$OUT/gemv_tp2.log" | grep '^{' | cut -c1-600 ;;
    gemv-moe)  timeout 300 python3 bench/gemv.py --fmts dense --tokens 1 --shapes qwen3-moe --out "$OUT/gemv_moe.json" 2>&1 | tee "$OUT/gemv_moe.log" | grep '^{' | cut -c1-600 ;;
    gemv-tc)   timeout 330 python3 bench/gemv.py --fmts fp8,dense --tokens 1 --variants tc --out "$OUT/gemv_tc.json" 2>&1 | tee "$OUT/gemv_tc.log" | grep '^{' | cut -c1-700 ;;
    quant-fp8) timeout 150 python3 bench/quant.py --only fp8 --out "$OUT/quant_fp8.json" 2>&1 | tee "$OUT/quant_fp8.log" | grep '^{' | tail -10 ;;
    gemv-int4) timeout 300 python3 bench/gemv.py --fmts int4 --tokens ${GEMV_TOKENS:-1,2} --variants tc ${GEMV_GLU:+--glu} --out "$OUT/gemv_int4.json" 2>&1 | tee "$OUT/gemv_int4.log" | grep '^{' | grep -v '"phase": "prefill"' | cut -c1-700 ;;
    gemv-ncu)  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1); echo "ncu: ${NCU:-none}"
               for spec in "int4 o 64,128,4,4,4,true" "int4 gate_up 64,128,1,4,4,true"; do set -- $spec
                 timeout 120 "$NCU" -k regex:_gemv_kernel -s 3 -c 1 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section SourceCounters python3 bench/gemv_profile.py --fmt $1 --shape $2 --cfg $3 > "$OUT/ncu_$1_$2.txt" 2>&1; grep -E "Duration|DRAM Throughput|Achieved Occupancy|Warp Cycles Per Issued|Eligible Warps|Registers Per|Est. Speedup|stalled|ERR" "$OUT/ncu_$1_$2.txt" | head -30; sed -n '/Section: Source Counters/,$p' "$OUT/ncu_$1_$2.txt" | head -60 | cut -c1-200; done ;;
    gemv-fp8-tc) timeout 330 python3 bench/gemv.py --fmts fp8 --tokens 1 --variants tc --out "$OUT/gemv_fp8_tc.json" 2>&1 | tee "$OUT/gemv_fp8_tc.log" | grep '^{' | cut -c1-700 ;;
    gemv-fp8)  timeout 200 python3 bench/gemv.py --fmts fp8,int8 --tokens 1 --out "$OUT/gemv_fp8.json" 2>&1 | tee "$OUT/gemv_fp8.log" | grep '^{' | cut -c1-400 ;;  # int8 = fp8 minus the activation quantization
    gemv-wide) timeout 300 python3 bench/gemv.py --fmts ${GEMV_FMTS:-fp8} --tokens ${GEMV_TOKENS:-1} --variants ${GEMV_VARIANTS:-wide} --out "$OUT/gemv_wide.json" 2>&1 | tee "$OUT/gemv_wide.log" | grep '^{' | cut -c1-700 ;;
    quant-int4) timeout 200 python3 bench/quant.py --only int4 --out "$OUT/quant_int4.json" 2>&1 | tee "$OUT/quant_int4.log" | grep '^{' | tail -10 ;;
    quant-lm-head) for spec in int4: int4:transforms.quantize_int4_linear.quantize_lm_head=true fp8: fp8:transforms.quantize_fp8_linear.quantize_lm_head=true; do only=${spec%%:*}; set=${spec#*:}; timeout 150 python3 bench/quant.py --only $only --num-requests 0 ${set:+--set $set} --out "$OUT/quant_${only}_${#set}.json" 2>&1 | tee "$OUT/quant_${only}_${#set}.log" | grep -E '_build|_decode' | cut -c1-400; done ;;
    quant-engines) timeout 230 python3 bench/quant.py --only fp8,int4 --out "$OUT/quant.json" 2>&1 | tee "$OUT/quant.log" | grep '^{' | tail -30 ;;
    quant)     timeout 300 python3 bench/quant.py --out "$OUT/quant.json" 2>&1 | tee "$OUT/quant.log" | grep '^{' | tail -30 ;;
    moe)       timeout 420 python3 bench/moe.py --out "$OUT/moe.json" 2>&1 | tee "$OUT/moe.log" | grep '^{' | tail -20 ;;
    moe-decode) timeout 300 python3 bench/moe.py --skip-e2e --tokens 1 --sweep --out "$OUT/moe_decode.json" 2>&1 | tee "$OUT/moe_decode.log" | grep '^{' | cut -c1-260 ;;
    moe-prefill) for fp8 in "" --fp8; do timeout 280 python3 bench/moe.py --skip-e2e --prefill-sweep $fp8 --out "$OUT/moe_prefill${fp8:+_fp8}.json" 2>&1 | tee "$OUT/moe_prefill${fp8:+_fp8}.log" | grep '^{' | cut -c1-330; done ;;
    moe-trace) AUTODEPLOY_PDL=0 timeout 240 python3 bench/moe.py --skip-kernels --skip-reference --num-requests 16 --trace-decode --out "$OUT/moe_trace.json" 2>&1 | tee "$OUT/moe_trace.log" | grep '^{' | cut -c1-4000 ;;
    moe-tiles) timeout 300 python3 bench/moe.py --skip-kernels --skip-reference --num-requests 16 --decode-tiles --gemv-variants --out "$OUT/moe_tiles.json" 2>&1 | tee "$OUT/moe_tiles.log" | grep '^{' | cut -c1-400 ;;
    moe-decode-ab) for fuse in true false; do timeout 200 python3 bench/moe.py --skip-kernels --skip-reference --num-requests 16 --set transforms.fuse_add_rmsnorm_linear.enabled=$fuse --out "$OUT/moe_norm_$fuse.json" 2>&1 | tee "$OUT/moe_norm_$fuse.log" | grep -E '"phase": "(build|decode)"' | cut -c1-300; done ;;
    moe-e2e)   timeout 240 python3 bench/moe.py --skip-kernels --skip-reference --out "$OUT/moe_e2e.json" 2>&1 | tee "$OUT/moe_e2e.log" | grep '^{' | tail -20 ;;
    compile-backend) timeout 290 python3 bench/compile_backend.py --out "$OUT/compile_backend.json" 2>&1 | tee "$OUT/compile_backend.log" | grep '^{' ;;
    compile-profile) timeout 240 python3 bench/compile_backend.py --configs inductor,autodeploy --batches 16 --profile --out "$OUT/compile_profile.json" 2>&1 | tee "$OUT/compile_profile.log" | grep '^{' ;;
    compile-recompile) TORCH_LOGS=perf_hints timeout 240 python3 bench/compile_backend.py --configs autodeploy --batches 1,16 --profile --out "$OUT/compile_recompile.json" 2>&1 | tee "$OUT/compile_recompile.log" | grep -E '^\{|cudagraph' | cut -c1-1500 ;;
    tp-tests)  NCCL_NVLS_ENABLE=0 timeout 240 python3 -m pytest -q -m gpu tests/test_symm_all_reduce.py 2>&1 | tail -15 ;;
    tp-fp32)   NCCL_NVLS_ENABLE=0 timeout 200 python3 bench/tp.py --dtype float32 --layers 8 --decode-tokens 16 --child-timeout 90 --all-reduce auto --out "$OUT/tp_fp32.json" 2>&1 | tee "$OUT/tp_fp32.log" | grep '^{' | cut -c1-600 ;;
    tp-fp32-full) NCCL_NVLS_ENABLE=0 timeout 330 python3 bench/tp.py --dtype float32 --decode-tokens 16 --child-timeout 200 --all-reduce auto --out "$OUT/tp_fp32_full.json" 2>&1 | tee "$OUT/tp_fp32_full.log" | grep '^{' | grep -v -e '"measure": "greedy"' -e '"measure": "measured"' | cut -c1-600 ;;
    tp)        NCCL_NVLS_ENABLE=0 timeout 580 python3 bench/tp.py --initializer-range 0.2 --all-reduce auto,auto-unfused --trace-decode --out "$OUT/tp.json" 2>&1 | tee "$OUT/tp.log" | grep '^{' ;;
    *) echo "unknown step $step" ;;
  esac
  # a step stopped by its time limit leaves its JIT builds running; they would slow every later measurement
  pkill -9 -f '(ninja|nvcc|cicc|ptxas)' 2>/dev/null || true
done
echo "=== end === $(clocks)"
