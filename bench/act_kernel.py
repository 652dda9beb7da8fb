"""The fused DuQuant activation kernel on pi0's activation shapes, against device copy bandwidth (and a sweep of
launch configurations / precisions). Writes act_kernel.{json,md} to --out (default $OUT).

    PYTHONPATH=src python3 bench/act_kernel.py [--no-sweep] [--out DIR]
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bench import bench_act  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
p.add_argument("--no-sweep", action="store_true")
a = p.parse_args()
bench_act(a.out, sweep=not a.no_sweep)
