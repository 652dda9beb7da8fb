# ruff: noqa: B023  (timed lambdas run before the loop moves on)
"""Launch configurations of the integer GEMMs (``kernels/triton_gemm.py``; nt, swap and the TMA variants swap-tma
and swap-tma-persistent, autotuned) on the LLM's large shapes, beside bf16 cuBLAS and torch's FP8 ``_scaled_mm``:
where the W4A8 product loses to bf16 at M = 816, is it the tile shape, the pipeline depth, or the int4 unpack
(compare the int8 x int8 rows, which have no unpack)?

Every configuration is checked against the float reference before it is timed (L2 flushed before each call,
CUDA-graph replays, ``kernel_bench.timeit``); a configuration that does not compile or fit is listed as skipped.
The w4a8-fp8 rows: the same packed int4 weights read as e4m3 (``W_INT4_FP8``) times FP8 activations, autotuned.

    PYTHONPATH=src python3 bench/gemm_sweep.py [--out DIR] [--shapes 816x2048x32768,816x16384x2048]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_bench  # noqa: E402

# (weight rows per tile = the MMA's M side for swap, tokens per tile, BK, warps, stages)
SWAP_GRID = [(128, 128, 128, 4, 4), (128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (128, 256, 64, 8, 4),
             (256, 128, 128, 8, 3), (256, 128, 64, 8, 4), (128, 128, 256, 8, 3), (128, 256, 128, 8, 4),
             (64, 256, 128, 4, 4), (128, 128, 64, 4, 5), (128, 64, 128, 4, 4), (256, 64, 128, 8, 3)]
# nt: (tokens per tile, weight rows per tile, BK, warps, stages)
NT_GRID = [(128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (128, 256, 128, 8, 3), (128, 256, 64, 4, 3),
           (128, 128, 64, 4, 4), (256, 128, 64, 8, 3), (64, 256, 128, 4, 4), (128, 256, 128, 8, 4)]
FORMATS = {"w4a8": (4, False), "w8a8-sym": (8, True)}


def sweep(m: int, k: int, n: int, failures: list[str]) -> list[dict]:
    import triton

    from duquant.kernels import reference
    from duquant.kernels import triton_gemm as tg

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    base = {"M": m, "K": k, "N": n}
    rows = [{**base, "kernel": "bf16 cuBLAS", "us": kernel_bench.timeit(lambda: torch.nn.functional.linear(x, wb))}]
    xf, wf = x.to(torch.float8_e4m3fn), wb.to(torch.float8_e4m3fn)
    sa, sb = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
    rows.append({**base, "kernel": "fp8 _scaled_mm", "us": kernel_bench.timeit(
        lambda: torch._scaled_mm(xf, wf.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                                 use_fast_accum=True))})
    for fmt, (wbits, sym) in FORMATS.items():
        w, deq = kernel_bench.random_gemm_weight(k, [n], wbits, w_symmetric=sym)
        codes, sx, zx = kernel_bench.random_act_codes(m, k)
        rs = reference.code_row_sums(codes)
        xin = reference.split_int4_order(codes) if w.act_layout == "split" else codes
        ref = ((codes.float() - zx[:, None]) * sx[:, None]) @ deq.T
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        grids = [("swap", c) for c in SWAP_GRID] + ([("nt", c) for c in NT_GRID] if wbits == 8 else [])
        tuned = [(f"autotuned {v}", (None,) * 5) for v in tg.VARIANTS]
        for variant, (b_first, b_second, bk, warps, stages) in tuned + grids:
            if variant.startswith("autotuned"):
                v = variant.split()[1]

                def launch():
                    tg._launch(v, xin, sx, zx, rs, w, [out])
                cfg = "autotuned"
            else:
                kern = tg._gemm_swap_kernel.fn if variant == "swap" else tg._gemm_nt_kernel.fn
                bm, bn = (b_second, b_first) if variant == "swap" else (b_first, b_second)

                def launch(kern=kern, bm=bm, bn=bn, bk=bk, warps=warps, stages=stages):
                    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
                    kern[grid](xin, w.data, m, n, k, w.KH, xin.stride(0), w.data.stride(0), 1, sx, zx, rs, w.scale,
                               w.zero, w.colsum, sx, out, out, out, n, n, out.stride(0), out.stride(0),
                               out.stride(0), tg._mb(m), 0, W_KIND=w.kind, ASYM_X=True, HAS_BIAS=False, NUM_OUT=1,
                               GROUPED=False, USE_ASM=tg._USE_ASM, BM=bm, BN=bn, BK=bk, GROUP_M=8,
                               num_warps=warps, num_stages=stages)
                cfg = f"BM={bm} BN={bn} BK={bk} w={warps} s={stages}"
            us = kernel_bench.check_then_time(f"{fmt} {variant} {cfg} {m}x{k}x{n}", launch, out, ref,
                                              lambda: kernel_bench.timeit(launch), failures)
            if us is None:
                continue
            rows.append({**base, "kernel": f"{fmt} {variant}", "config": cfg, "us": us})
            print(rows[-1], flush=True)
    rows += _int4_fp8_rows(m, k, n, base, failures)
    t_bf16 = rows[0]["us"]
    for r in rows:
        r["vs bf16"] = t_bf16 / r["us"]
    return rows


def _int4_fp8_rows(m: int, k: int, n: int, base: dict, failures: list[str]) -> list[dict]:
    """The w4a8-fp8 GEMM (packed int4 weights read as e4m3, FP8 activations in split order, float code sums),
    each variant autotuned."""
    from duquant.kernels import reference
    from duquant.kernels import triton_gemm as tg

    w, deq = kernel_bench.random_gemm_weight(k, [n], 4, w_symmetric=False)
    w.kind = tg.W_INT4_FP8
    g = torch.Generator(device="cuda").manual_seed(2)
    codes = (torch.randn(m, k, generator=g, device="cuda") * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    sx = torch.rand(m, generator=g, device="cuda") * 0.01 + 0.001
    xin = reference.split_int4_order(codes.view(torch.uint8)).view(torch.float8_e4m3fn)
    rs = codes.float().sum(1)
    ref = (codes.float() * sx[:, None]) @ deq.T
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    rows = []
    for v in tg.VARIANTS:
        if v in tg.TMA_VARIANTS and tg.tma_cannot_run(xin, w):
            continue
        def launch(v=v):
            tg._launch(v, xin, sx, None, rs, w, [out])
        us = kernel_bench.check_then_time(f"w4a8-fp8 {v} {m}x{k}x{n}", launch, out, ref,
                                          lambda: kernel_bench.timeit(launch), failures)
        if us is not None:
            rows.append({**base, "kernel": f"w4a8-fp8 autotuned {v}", "config": "autotuned", "us": us})
            print(rows[-1], flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--shapes", default="816x2048x32768,816x16384x2048", help="MxKxN, comma-separated")
    a = p.parse_args()
    code = kernel_bench.cannot_run("gemm_sweep")
    if code is not None:
        return code
    rows, failures = [], []
    for s in a.shapes.split(","):
        m, k, n = (int(v) for v in s.split("x"))
        got = sweep(m, k, n, failures)
        keep = [r for r in got if "config" not in r or r["config"] == "autotuned"]
        for fmt in FORMATS:  # the 4 fastest explicit configurations per format
            keep += sorted((r for r in got if r["kernel"].startswith(fmt) and r.get("config", "autotuned")
                            != "autotuned"), key=lambda r: r["us"])[:4]
        rows += keep
    md = (f"Integer GEMM launch configurations, {kernel_bench.env_info()['gpu']}, commit "
          f"{kernel_bench.env_info()['commit']}; µs with the L2 flushed, CUDA-graph replays\n\n"
          + kernel_bench.table(rows, ["M", "K", "N", "kernel", "config", "us", "vs bf16"]))
    return kernel_bench.finish(a.out, "gemm_sweep", {"env": kernel_bench.env_info(), "rows": rows}, md, failures)


if __name__ == "__main__":
    sys.exit(main())
