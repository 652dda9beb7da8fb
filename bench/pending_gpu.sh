#!/usr/bin/env bash
# What the sixth session built without device time to measure it, as two bounded device calls (each < 10 minutes):
#   bash bench/pending_gpu.sh 1      (repository root; results and logs under $OUT; DUQUANT_COMMIT=<sha> to stamp)
#   bash bench/pending_gpu.sh 2
# 1: GPU tests of the w4a8-fp8 format (int4 x FP8 GEMM, FP8 split codes + code sums, fake vs gpu report) and of the
#    persistent TMA GEMM (explicit only until these pass); the bare mainloop probe (persistent rows, packed-int4 x int8
#    / x FP8 rows); the GEMM sweep with the w4a8-fp8 and persistent rows; one LLM decoder layer per format.
# 2: pi0 end to end, batch 1 and 16: w4a8-fp8 beside w4a8, w8a8-fp8 and bf16, and both FP8 formats on the expert too.
set -u
export PYTHONPATH=src TRITON_CACHE_AUTOTUNING=1 DUQUANT_COMMIT="${DUQUANT_COMMIT:-unknown}"
OUT="${OUT:-bench_out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
case "${1:-1}" in
1)
    DUQUANT_GEMM_QUICK=1 timeout 220 python3 -m pytest -q -rf tests/test_int4_fp8.py \
        "tests/test_report.py::test_fake_and_gpu_backends_give_the_same_report_figures" \
        "tests/test_kernels.py::test_gpu_gemm_matches_reference" -k "fp8 or fake_and_gpu or persistent" \
        > "$OUT/tests.log" 2>&1
    tail -3 "$OUT/tests.log"
    timeout 60 python3 bench/mainloop_probe.py --out "$OUT" > "$OUT/probe.log" 2>&1
    grep "w4 x" "$OUT/mainloop_probe.md"
    timeout 140 python3 bench/gemm_sweep.py --out "$OUT" > "$OUT/gemm.log" 2>&1
    grep "autotuned\|cuBLAS\|_scaled_mm" "$OUT/gemm_sweep.md"
    timeout 120 python3 bench/layer_formats.py --out "$OUT" > "$OUT/layer.log" 2>&1
    tail -8 "$OUT/layer.log"
    ;;
2)
    timeout 560 python3 bench/e2e.py --models pi0 --batches 1,16 --out "$OUT" --variants \
        "bf16 fast,w4a8 llm fast shuffle,w4a8-fp8 llm fast shuffle,w8a8-fp8 llm fast shuffle,w8a8-fp8 llm+expert fast shuffle,w4a8-fp8 llm+expert fast shuffle" \
        > "$OUT/e2e.log" 2>&1
    tail -16 "$OUT/e2e.log"
    ;;
esac
