"""One activation-transform launch per layout, for Nsight Compute (the act_transform.py timings say how long;
this says why): natural order, then the packed-int4 GEMM's split order, same input and plan.

    ncu --kernel-name regex:'_tile_act|_shuffle_act' --launch-skip 2 --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis python3 bench/act_ncu.py --shape 816x2048 [--permute shuffle --kernel fold]
"""

from __future__ import annotations

import argparse
import sys

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="816x2048")
    p.add_argument("--permute", default="zigzag")
    p.add_argument("--kernel", default="tile", help="tile or fold (the folded shuffle kernel: --permute shuffle)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("act_ncu: needs CUDA", file=sys.stderr)
        return 2
    from duquant.kernels.triton_act import build_act_plan
    from duquant.kernels.triton_act_shuffle import act_quant_shuffle
    from duquant.kernels.triton_act_tile import act_quant_tile
    from duquant.random_layers import random_activations, random_transform

    m, k = (int(v) for v in a.shape.split("x"))
    plan = build_act_plan(random_transform(k, "duquant", 128, seed=k, steps=4, permute=a.permute), k, "cuda")
    x = random_activations(m, k, seed=1, dtype=torch.bfloat16, device="cuda")
    fn = act_quant_shuffle if a.kernel == "fold" else act_quant_tile
    for layout in ("natural", "natural", "natural", "split"):  # two warm-up launches, then one profiled each
        fn(x, plan, clip=0.9, layout=layout)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
