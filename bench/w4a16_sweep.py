"""The w4a16 GEMM's launch configurations on the action expert's shapes, against bf16 cuBLAS.

Each shape gets 18 distinct weights (one per expert layer) and one CUDA graph calls them in turn, so the weights
come from HBM as in the model rather than from L2. Every configuration is checked against the float reference
first. Rows: both kernels as the model runs them (autotuned), and the natural kernel's configurations; the table
lists the fastest 8 per shape plus the autotuned ones.

    PYTHONPATH=src python3 bench/w4a16_sweep.py [--out DIR] [--m 51,816]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_bench  # noqa: E402

SHAPES = [("qkv fused", 1024, 2560), ("o", 2048, 1024), ("gate+up fused", 1024, 8192), ("down", 4096, 1024)]
LAYERS = 18


def bm_split(m: int):
    """Split-K runs only where the whole M fits one 64-row tile (the scratch is sized for that)."""
    return 64 if m <= 64 else None


def sweep_shape(name: str, m: int, k: int, n: int, failures: list[str]) -> list[dict]:
    import triton

    from duquant.kernels import triton_w4a16 as w4
    from duquant.quantizers import quantize_weight

    g = torch.Generator("cuda").manual_seed(k + n)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    dense = [torch.randn(n, k, device="cuda", generator=g) / k ** 0.5 for _ in range(LAYERS)]
    weights = []
    for d in dense:
        qw = quantize_weight(d, 4, symmetric=False, clip=0.9)
        weights.append(w4.w4a16_weight(qw.packed(), qw.scale, qw.zero, bits=4, symmetric=False, group_size=None,
                                       shape=(n, k)))
    ref = x.double() @ quantize_weight(dense[0], 4, symmetric=False, clip=0.9).dequantize(torch.float64).T
    bf = [d.to(torch.bfloat16) for d in dense]
    y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)

    def run_bf16():
        for w in bf:
            torch.mm(x, w.T, out=y)

    t_bf16 = kernel_bench.time_graph(run_bf16, calls=1) / LAYERS
    ws, lock = w4._split_buffers(n, m, x.device)
    results = []

    def check_and_time(cfg, launch):
        """launch(w) checked on the first weight, then timed over all 18 (one graph)."""
        def run_all():
            for w in weights:
                launch(w)

        return kernel_bench.check_then_time(f"{name} {cfg}", lambda: launch(weights[0]), y, ref,
                                            lambda: kernel_bench.time_graph(run_all, calls=1) / LAYERS, failures)

    # what the model runs: each kernel autotuned (on one L2-hot weight), then timed over the 18 weights
    for impl in w4.IMPLS:
        us = check_and_time(f"autotuned {impl}", lambda w, impl=impl: w4.w4a16_gemm(x, w, out=y, impl=impl))
        if us is not None:
            results.append({"impl": impl + " (autotuned)", "us": round(us, 3)})
    for bn, bk, split, ilv in itertools.product((64, 128), (128, 256), (1, 2, 4, 8), (0, 1)):
        if (split > 1 and bm_split(m) is None) or (ilv and (bn, bk) != (64, 128)):
            continue
        bm = 64 if m <= 64 else 128
        if split > 1 and bm * triton.cdiv(m, bm) > 64:
            continue
        stages = 3 if bk == 256 else 4

        def launch(w, bn=bn, bm=bm, bk=bk, split=split, ilv=ilv, stages=stages):
            grid = (triton.cdiv(n, bn), triton.cdiv(m, bm), split)
            w4._w4a16_natural_kernel.fn[grid](x, x.stride(0), w.data, w.data.stride(0), w.scale, w.zero, w.scale, y,
                                              y.stride(0), ws, lock, m, n, k, w.data.shape[1], 1, w4._mb(m), GS=0,
                                              HAS_BIAS=False, USE_ASM=True, BN=bn, BM=bm, BK=bk, SPLIT_K=split,
                                              ILV=ilv, num_warps=4 if bn == 64 else 8, num_stages=stages)
        cfg = f"natural BN={bn} BM={bm} BK={bk} split={split} ilv={ilv}"
        us = check_and_time(cfg, launch)
        if us is not None:
            results.append({"impl": "natural", "BN": bn, "BM": bm, "KS": bk, "SPLIT_K": split, "ILV": ilv,
                             "stages": stages, "us": round(us, 3)})
    results.sort(key=lambda r: r["us"])
    rows = [{"shape": name, "M": m, "K": k, "N": n, "bf16 us": round(t_bf16, 3), **r,
             "vs bf16": round(t_bf16 / r["us"], 3)} for r in results[:8]]
    rows += [{"shape": name, "M": m, "K": k, "N": n, "bf16 us": round(t_bf16, 3), **r,
              "vs bf16": round(t_bf16 / r["us"], 3)} for r in results if "autotuned" in r["impl"]
             and r not in results[:8]]
    for r in rows:
        print(r, flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--m", default="51", help="token counts, comma-separated (51 = batch 1, 816 = batch 16)")
    a = p.parse_args()
    code = kernel_bench.cannot_run("w4a16_sweep")
    if code is not None:
        return code
    rows, failures = [], []
    for m in (int(v) for v in a.m.split(",")):
        for name, k, n in SHAPES:
            rows += sweep_shape(name, m, k, n, failures)
    md = (f"w4a16 kernels and launch configurations, M = {a.m}, 18 distinct weights per graph (HBM-streamed), "
          f"{kernel_bench.env_info()['gpu']}; best 8 per shape; us = w4a16 µs\n\n"
          + kernel_bench.table(rows, ["shape", "M", "K", "N", "bf16 us", "impl", "BN", "BM", "KS", "SPLIT_K", "ILV",
                                      "stages", "us", "vs bf16"]))
    return kernel_bench.finish(a.out, "w4a16_sweep", {"env": kernel_bench.env_info(), "rows": rows}, md, failures)


if __name__ == "__main__":
    sys.exit(main())
