#!/usr/bin/env bash
# The sixth session's device call after swap-tma joined the GEMM's "auto" choice (about 8 minutes):
#   bash bench/pending_gpu.sh        (repository root; results and logs under $OUT; DUQUANT_COMMIT=<sha> to stamp)
# 1. GPU GEMM tests (every variant, quick autotune lists); 2. one LLM decoder layer per format (auto variant);
# 3. pi0 end to end, batch 1 and 16, each quantized variant beside its bf16 base.
set -u
export PYTHONPATH=src TRITON_CACHE_AUTOTUNING=1 DUQUANT_COMMIT="${DUQUANT_COMMIT:-unknown}"
OUT="${OUT:-bench_out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
DUQUANT_GEMM_QUICK=1 timeout 150 python3 -m pytest -q tests/test_kernels.py -k "gpu_gemm" > "$OUT/tests.log" 2>&1
tail -2 "$OUT/tests.log"
timeout 150 python3 bench/layer_formats.py --out "$OUT" > "$OUT/layer.log" 2>&1
tail -8 "$OUT/layer.log"
timeout 280 python3 bench/e2e.py --models pi0 --batches 1,16 --out "$OUT" --variants \
    "bf16 fast,w8a8-fp8 llm fast shuffle,w4a8 llm fast shuffle" > "$OUT/e2e.log" 2>&1
tail -8 "$OUT/e2e.log"
