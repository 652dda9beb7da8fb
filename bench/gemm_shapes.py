"""Every pi0 GEMM shape: bf16 cuBLAS vs our int8 x int8 and int8 x packed-int4 GEMMs (both orientations), torch
FP8 `_scaled_mm` and `_int_mm`. Writes gemm_shapes.{json,md} to --out (default $OUT).

    PYTHONPATH=src python3 bench/gemm_shapes.py [--only llm] [--out DIR]
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bench import PI0_GEMMS, bench_gemm  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
p.add_argument("--only", help="substring of the shape names to run (llm, exp, vis, fused)")
p.add_argument("--formats", default="w8a8,w4a8")
a = p.parse_args()
shapes = [s for s in PI0_GEMMS if a.only is None or a.only in s[0]]
bench_gemm(a.out, shapes, formats=tuple(a.formats.split(",")))
