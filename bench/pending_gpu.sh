#!/usr/bin/env bash
# What the eighth session left unchecked on a GPU, as one bounded device call (about 4 minutes):
#   DUQUANT_COMMIT=<sha> bash bench/pending_gpu.sh      (repository root; results under $OUT)
# §10d measured the w4a8-fp8 decoder layer 19 us slower at e89780c (chunk fold) than §10c at 0e12740 (transpose
# fold), while w8a8-fp8, which runs the same FP8 activation path in natural order, got faster. Settle it: the layer
# bench with each fold in one call (the GEMMs autotune in each run), and the activation transform with each fold
# writing split-order int8 and FP8 codes. The chunk fold changed no launch apart from the fold itself (CHUNK is
# now a required constexpr; the host always passed it), so nothing else is pending.
set -u
export PYTHONPATH=src TRITON_CACHE_AUTOTUNING=1 DUQUANT_COMMIT="${DUQUANT_COMMIT:-unknown}"
OUT="${OUT:-bench_out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
for fold in chunk transpose; do
  DUQUANT_FOLD=$fold timeout 170 python3 bench/layer_formats.py --layers 2 --out "$OUT/layer_$fold" 2>&1 | tail -8
done
python3 - <<'PY'
import torch, triton
from duquant.kernels.triton_act import build_act_plan
from duquant.kernels.triton_act_shuffle import act_quant_shuffle
from duquant.random_layers import random_activations, random_transform
for m, k in ((816, 2048), (51, 1024), (13056, 2048)):
    plan = build_act_plan(random_transform(k, "duquant", 128, seed=k, steps=4, permute="shuffle"), k, "cuda")
    x = random_activations(m, k, seed=1, dtype=torch.bfloat16, device="cuda")
    for kw in (dict(layout="split"), dict(fp8=True), dict(fp8=True, layout="split", fp8_sum=True)):
        us = {f: triton.testing.do_bench_cudagraph(lambda f=f: act_quant_shuffle(x, plan, clip=0.9, fold=f, **kw)) * 1e3
              for f in ("chunk", "transpose")}
        print(m, k, kw, {f: round(v, 2) for f, v in us.items()})
PY
