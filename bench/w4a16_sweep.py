"""The w4a16 GEMM's launch configurations on the action expert's shapes, against bf16 cuBLAS.

Each shape gets 18 distinct weights (one per expert layer) and one CUDA graph calls them in turn, so the weights
come from HBM as in the model rather than from L2. Every configuration is checked against the float reference
first; the table lists the fastest ones per shape and what the autotuner would pick.

    PYTHONPATH=src python3 bench/w4a16_sweep.py [--out DIR] [--m 51]
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
    for bn, bm, ks, split in itertools.product((64, 128), (16, 64), (128, 256), (1, 2, 4, 8)):
        if split > 1 and bm * triton.cdiv(m, bm) > 64:
            continue

        def launch(w, bn=bn, bm=bm, ks=ks, split=split):
            grid = (triton.cdiv(n, bn), triton.cdiv(m, bm), split)
            w4._w4a16_kernel.fn[grid](x, x.stride(0), w.data, w.data.stride(0), w.scale, w.zero, w.scale, y,
                                      y.stride(0), ws, lock, m, n, k, w.data.shape[1], 1, w4._mb(m), GS=0,
                                      HAS_BIAS=False, BN=bn, BM=bm, KS=ks, SPLIT_K=split, num_warps=4, num_stages=3)
        cfg = f"{name} BN={bn} BM={bm} KS={ks} split={split}"
        try:
            y.fill_(float("nan"))
            launch(weights[0])
            torch.cuda.synchronize()
            err = float(((y.double() - ref).norm() / ref.norm()).item())
            if not err < 1e-2:
                failures.append(f"{cfg}: rel err {err:.3g}")
                continue

            def run_all(launch=launch):
                for w in weights:
                    launch(w)

            us = kernel_bench.time_graph(run_all, calls=1) / LAYERS
        except Exception as err:  # noqa: BLE001  (out of resources: not a candidate)
            print(f"skip {cfg}: {str(err)[:100]}", flush=True)
            continue
        results.append({"BN": bn, "BM": bm, "KS": ks, "SPLIT_K": split, "warps": 4, "stages": 3, "us": round(us, 3)})
    results.sort(key=lambda r: r["us"])
    rows = [{"shape": name, "M": m, "K": k, "N": n, "bf16 us": round(t_bf16, 3), **r,
             "vs bf16": round(t_bf16 / r["us"], 3)} for r in results[:8]]
    for r in rows:
        print(r, flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--m", type=int, default=51)
    a = p.parse_args()
    code = kernel_bench.cannot_run("w4a16_sweep")
    if code is not None:
        return code
    rows, failures = [], []
    for name, k, n in SHAPES:
        rows += sweep_shape(name, a.m, k, n, failures)
    md = (f"w4a16 launch configurations, M = {a.m}, 18 distinct weights per graph (HBM-streamed), "
          f"{kernel_bench.env_info()['gpu']}; best 8 per shape; us = w4a16 µs\n\n"
          + kernel_bench.table(rows, ["shape", "K", "N", "bf16 us", "BN", "BM", "KS", "SPLIT_K", "warps", "stages",
                                      "us", "vs bf16"]))
    return kernel_bench.finish(a.out, "w4a16_sweep", {"env": kernel_bench.env_info(), "rows": rows}, md, failures)


if __name__ == "__main__":
    sys.exit(main())
