#!/usr/bin/env bash
# What the seventh session changed after its last device call, checked on the CPU only (sm_90 PTX / opcode counts
# unchanged, interpreter tests), as one bounded device call (< 3 minutes):
#   DUQUANT_COMMIT=<sha> bash bench/pending_gpu.sh      (repository root; log under $OUT)
# 88579ab: the nt / swap GEMM kernels share helpers (_tile_rows, _zero_acc, _add_weight_group);
# 6c89f46: one int8 quantization epilogue for the fused, split, tile, chunked and folded activation kernels.
# the review commit after them: the FP8 split store folded into _store_codes (FP8 flag), the TMA GEMM kernels on
# _zero_acc / _tile_rows.
# The GPU tests of those kernels, in parallel (pytest-xdist: each case is compile-bound, ~10-25 s on one core).
# The refactors change no launch, so no timing is pending.
set -u
export PYTHONPATH=src TRITON_CACHE_AUTOTUNING=1 DUQUANT_COMMIT="${DUQUANT_COMMIT:-unknown}"
OUT="${OUT:-bench_out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
# One representative case per refactored path (the whole matrix, 144 cases, outlasts a call even under xdist):
# the folded / fused / tile activation kernels (int8 epilogue, split order), the int4 x FP8 layer (FP8 split store)
# and every GEMM variant at 4 and 8 bits, per channel and grouped.
T=tests
ids=(
  "$T/test_kernels_tile.py::test_gpu_folded_shuffle_kernel_matches_reference[False-816-2048]"
  "$T/test_kernels_tile.py::test_gpu_folded_shuffle_kernel_matches_reference[True-816-2048]"
  "$T/test_kernels_tile.py::test_gpu_folded_shuffle_kernel_matches_reference[True-51-1024]"
  "$T/test_int4_fp8.py::test_gpu_w4a8_fp8_layer_matches_reference[816-2048-2048-duquant]"
  "$T/test_int4_fp8.py::test_gpu_w4a8_fp8_layer_matches_reference[816-2048-2048-rtn]"
  "$T/test_int4_fp8.py::test_gpu_w4a8_fp8_layer_matches_reference[51-1024-4096-rtn]"
  "$T/test_kernels.py::test_gpu_act_kernel_matches_reference[False-816-2048]"
  "$T/test_kernels.py::test_gpu_act_kernel_matches_reference[True-768-4304]"
  "$T/test_kernels_tile.py::test_gpu_tile_kernel_matches_reference[scratch-False-816-2048]"
  "$T/test_kernels_tile.py::test_gpu_tile_kernel_matches_reference[scratch-True-768-4304]"
  "$T/test_kernels_tile.py::test_gpu_tile_kernel_matches_reference[scratch-True-7-2048]"
)
for v in nt swap swap-tma swap-tma-persistent; do
  for c in 4-False-None 8-True-None 4-False-128; do
    ids+=("$T/test_kernels.py::test_gpu_gemm_matches_reference[816-2048-outs0-$v-$c]")
  done
done
DUQUANT_GEMM_QUICK=1 timeout "${PENDING_TIMEOUT:-400}" python3 -m pytest -n "${PENDING_WORKERS:-12}" -rA -o addopts="" \
    -p no:cacheprovider "${ids[@]}" > "$OUT/gpu_tests.log" 2>&1
echo "pytest rc=$? passed=$(grep -c '^PASSED' "$OUT/gpu_tests.log") failed=$(grep -c '^FAILED' "$OUT/gpu_tests.log")"
grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -5; tail -1 "$OUT/gpu_tests.log"
