"""pi0 / pi0.5 `sample_actions` end to end on CUDA: bf16 vs DuQuant W4A8 (gpu backend), both captured in CUDA
graphs; peak memory and resident weight bytes. Writes e2e.{json,md} to --out (default $OUT).

    PYTHONPATH=src python3 bench/e2e.py [--models pi0,pi05] [--batches 1,16] [--out DIR]
"""

import argparse
import os

from duquant.kernels.bench import bench_e2e

p = argparse.ArgumentParser()
p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
p.add_argument("--models", default="pi0")
p.add_argument("--batches", default="1")
p.add_argument("--iters", type=int, default=10)
p.add_argument("--skip-all", action="store_true", help="only bf16 and W4A8 llm+vision (expert bf16)")
a = p.parse_args()
bench_e2e(a.out, models=tuple(a.models.split(",")), batches=tuple(int(b) for b in a.batches.split(",")),
          iters=a.iters, skip_all=a.skip_all)
