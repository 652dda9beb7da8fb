#!/usr/bin/env bash
# One bounded device call (about 6 minutes) that checks and re-measures a change of the folded activation kernel:
#   DUQUANT_COMMIT=<sha> bash bench/pending_gpu.sh      (repository root; logs and tables under $OUT)
# 1. the GPU tests of every path that launches it (pytest-xdist: each case is compile-bound, ~10-25 s on one core);
# 2. the activation transform's table (BENCHMARKS §4c) and the launch variants side by side (act_variants.py);
# 3. one decoder layer per format (§10), each GEMM autotuned in this run.
set -u
export PYTHONPATH=src TRITON_CACHE_AUTOTUNING=1 DUQUANT_COMMIT="${DUQUANT_COMMIT:-unknown}"
OUT="${OUT:-bench_out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
DUQUANT_GEMM_QUICK=1 timeout "${PENDING_TIMEOUT:-240}" python3 -m pytest -n "${PENDING_WORKERS:-14}" -rA -p no:cacheprovider \
    -o addopts="" -k "not gather" \
    "tests/test_kernels_tile.py::test_gpu_folded_shuffle_kernel_matches_reference" \
    "tests/test_int4_fp8.py::test_gpu_w4a8_fp8_layer_matches_reference" \
    "tests/test_geglu_fusion.py::test_gpu_fused_down_projection_matches_unfused" \
    "tests/test_formats.py::test_gpu_format_matches_its_reference" \
    "tests/test_kernels.py::test_gpu_backend_layers_match_fake" > "$OUT/gpu_tests.log" 2>&1
echo "pytest rc=$? passed=$(grep -c '^PASSED' "$OUT/gpu_tests.log") failed=$(grep -c '^FAILED' "$OUT/gpu_tests.log")"
grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -5; tail -1 "$OUT/gpu_tests.log"
timeout 120 python3 bench/act_transform.py --quick --no-compile --permute shuffle \
    --shapes 816x2048,816x16384,51x1024,51x2048,51x4096,13056x2048 --out "$OUT/act" 2>&1 | tail -3
timeout 90 python3 bench/act_variants.py --shapes 816x2048,816x16384,13056x16384 --layouts split \
    --variants default,before --out "$OUT/variants" 2>&1 | tail -4
timeout 170 python3 bench/layer_formats.py --layers 2 --out "$OUT/layer" 2>&1 | tail -9
