"""One decoder layer's linear layers per pi0 part (LLM prefix M=816, action expert M=51, SigLIP M=768):
bf16 cuBLAS (unfused and fused q/k/v, gate/up) vs W4A8 / W8A8 (activation kernel + fused GEMMs), CUDA graphs,
resident weight bytes. Writes layer_stack.{json,md} to --out (default $OUT).

    PYTHONPATH=src python3 bench/layer_stack.py [--parts llm,expert,vision] [--layers 2] [--out DIR]
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bench import bench_stack  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
p.add_argument("--parts", default="llm,expert,vision")
p.add_argument("--layers", type=int, default=2)
a = p.parse_args()
bench_stack(a.out, parts=tuple(a.parts.split(",")), nlayers=a.layers)
