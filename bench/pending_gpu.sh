#!/usr/bin/env bash
# What the fifth session built without device time to measure it, as one bounded device call (about 8 minutes):
#   bash bench/pending_gpu.sh        (repository root; results and logs under $OUT; DUQUANT_COMMIT=<sha> to stamp)
# 1. GPU tests of the opt-in GeGLU prologue and TMA GEMM variant; 2. the TMA variant beside nt / swap on the LLM's
# large shapes; 3. pi0 end to end with and without the GeGLU fusion, batch 1 and 16, each beside its bf16 base.
set -u
export PYTHONPATH=src TRITON_CACHE_AUTOTUNING=1 DUQUANT_COMMIT="${DUQUANT_COMMIT:-unknown}"
OUT="${OUT:-bench_out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
DUQUANT_GEMM_QUICK=1 timeout 200 python3 -m pytest -q tests/test_geglu_fusion.py \
    "tests/test_kernels.py::test_gpu_gemm_matches_reference" -k "fused or swap-tma" > "$OUT/pending_tests.log" 2>&1
tail -2 "$OUT/pending_tests.log"
timeout 150 python3 bench/gemm_sweep.py --shapes 816x2048x32768,816x16384x2048 --out "$OUT" > "$OUT/gemm.log" 2>&1
grep "autotuned\|cuBLAS\|_scaled_mm" "$OUT/gemm_sweep.md"
timeout 280 python3 bench/e2e.py --models pi0 --batches 1,16 --out "$OUT" --variants \
    "bf16 fast,w8a8-fp8 llm fast shuffle,w8a8-fp8 llm fast shuffle geglu,w4a8 llm fast shuffle,w4a8 llm fast shuffle geglu" \
    > "$OUT/e2e.log" 2>&1
tail -12 "$OUT/e2e.log"
