# ruff: noqa: B023  (timed closures run before the loop moves on)
"""One LLM decoder layer's linear layers (M = 816: q/k/v, o, gate/up, down) per quantized format as the model
runs them -- the gpu backend's activation kernel once per shared input, then the format's GEMM -- against bf16
cuBLAS, fused (q/k/v and gate/up concatenated) and unfused. The issue-12 target: >= 1.2x with W4 weights, >= 1.4x
with W8. CUDA graph over L layers with distinct weights; each group's outputs are checked against the format's
float32 reference first.

    PYTHONPATH=src python3 bench/layer_formats.py [--layers 2] [--m 816] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_bench  # noqa: E402

GROUPS = [(2048, [2048, 256, 256]), (2048, [2048]), (2048, [16384, 16384]), (16384, [2048])]  # gemma_2b layer
VARIANTS = [("w4a8", "zigzag"), ("w4a8", "shuffle"), ("w4a8-fp8", "shuffle"), ("w8a8-fp8", "shuffle")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--m", type=int, default=816)
    a = p.parse_args()
    code = kernel_bench.cannot_run("layer_formats")
    if code is not None:
        return code
    from duquant.layers import DuQuantLinear
    from duquant.random_layers import random_transform

    torch.manual_seed(0)
    xs = [torch.randn(a.m, k, device="cuda", dtype=torch.bfloat16) for k, _ in GROUPS]
    lins = [[[nn.Linear(k, n, bias=False).cuda().to(torch.bfloat16) for n in outs] for k, outs in GROUPS]
            for _ in range(a.layers)]
    fused = [[torch.cat([lin.weight for lin in grp]) for grp in layer] for layer in lins]

    def run_bf16():
        for layer in lins:
            for x, grp in zip(xs, layer):
                for lin in grp:
                    F.linear(x, lin.weight)

    def run_bf16_fused():
        for layer in fused:
            for x, w in zip(xs, layer):
                F.linear(x, w)

    rows = [{"variant": "bf16 cuBLAS", "us": kernel_bench.time_graph(run_bf16) / a.layers},
            {"variant": "bf16 cuBLAS, q/k/v and gate/up fused",
             "us": kernel_bench.time_graph(run_bf16_fused) / a.layers}]
    failures = []
    for fmt, permute in VARIANTS:
        searched = {k: random_transform(k, "duquant", 128, seed=k, steps=4, permute=permute) for k in {2048, 16384}}
        qlayers = []
        for layer in lins:
            ql = []
            for (k, _), grp in zip(GROUPS, layer):
                t = copy.deepcopy(searched[k]).to("cuda")  # one transform object per group: one activation pass
                w_clip = 0.9 if fmt.startswith("w4") else 1.0  # the fixed 4-bit clip
                ql.append([DuQuantLinear.from_linear(lin.float(), fmt, transform=t, w_clip=w_clip, act_clip=0.9,
                                                     method="duquant", backend="gpu") for lin in grp])
            qlayers.append(ql)
        for ql in qlayers:
            for grp in ql:
                grp[0].prepare_gpu_group(grp)  # members share one activation pass and one fused GEMM
        for x, grp in zip(xs, qlayers[0]):  # check (and prepare the groups) before timing
            for la in grp:
                ref = la.fmt.reference(la, x)
                err = float((la(x).float() - ref).norm() / ref.norm())
                if not err < 2e-2:
                    failures.append(f"{fmt} {permute} K={la.in_features} N={la.out_features}: rel err {err:.3g}")

        def run_q(qlayers=qlayers):
            for ql in qlayers:
                for x, grp in zip(xs, ql):
                    for la in grp:
                        la(x)

        rows.append({"variant": f"{fmt} {permute}", "us": kernel_bench.time_graph(run_q) / a.layers})
        print(rows[-1], flush=True)
        del qlayers
        torch.cuda.empty_cache()
    for r in rows:
        r["vs bf16"], r["vs bf16 fused"] = rows[0]["us"] / r["us"], rows[1]["us"] / r["us"]
    info = kernel_bench.env_info()
    md = (f"One LLM decoder layer's linear layers (M = {a.m}), µs per layer, CUDA graph over {a.layers} layers with "
          f"distinct weights, {info['gpu']}, commit {info['commit']}, {info['date']}\n\n"
          + kernel_bench.table(rows, ["variant", "us", "vs bf16", "vs bf16 fused"]))
    return kernel_bench.finish(a.out, "layer_formats", {"env": info, "rows": rows}, md, failures)


if __name__ == "__main__":
    sys.exit(main())
