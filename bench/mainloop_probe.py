# ruff: noqa: B023  (timed lambdas run before the loop moves on)
"""Is the W4A8 GEMM's gap to cuBLAS FP8 in Triton's int8 mainloop, or in int8 itself? A bare Triton GEMM (TMA
descriptor loads, no scales, no unpack, bf16 out) in bf16 (Triton against cuBLAS on equal terms), int8 x int8 ->
int32, and FP8 e4m3 x e4m3 -> float32 (Triton's fast accumulation, and promoted to float32 every 64 of K), beside
cuBLAS bf16, cuBLAS FP8 (``_scaled_mm``) and cuBLAS int8 (``torch._int_mm``), on the LLM's large shapes. If
Triton's FP8 mainloop is much faster than its int8 one, 4-bit weights should be widened to FP8 (every int4 code is
exact in e4m3) with FP8 activations; if cuBLAS int8 is near cuBLAS FP8, the int8 gap is Triton's code generation.
The persistent rows (one program per multiprocessor, tile loop flattened with the K loop) ask whether overlapping
a tile's epilogue with the next tile's loads closes the rest of the gap to cuBLAS.

Every configuration is checked against the float reference first (``kernel_bench.check_then_time``).

    PYTHONPATH=src python3 bench/mainloop_probe.py [--out DIR] [--shapes 816x2048x32768,816x16384x2048]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_bench  # noqa: E402

# (BM tokens, BN weight rows, BK, warps, stages)
GRID = [(128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (128, 256, 64, 8, 4), (128, 128, 256, 8, 3),
        (64, 256, 128, 4, 4), (256, 128, 128, 8, 3)]


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def tile_coords(tile, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        """(pid_m, pid_n) of output tile `tile`, GROUP_M row tiles at a time (L2 reuse of the weight tiles)."""
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        group = GROUP_M * num_n
        first_m = (tile // group) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        return first_m + (tile % group) % size_m, (tile % group) // size_m

    @triton.jit
    def tile_product(a_desc, b_desc, pid_m, pid_n, K, INT: tl.constexpr, PROMOTE: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr):
        if INT:
            acc = tl.zeros((BM, BN), dtype=tl.int32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        for it in range(0, tl.cdiv(K, BK)):
            a = a_desc.load([pid_m * BM, it * BK])
            b = b_desc.load([pid_n * BN, it * BK])
            if INT:
                acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
            elif PROMOTE:  # precise: the wgmma partial sums go into the float32 accumulator every PROMOTE of K
                acc = tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=PROMOTE)
            else:  # Triton's sm_90 default: accumulate in the tensor core's reduced-precision adder
                acc = tl.dot(a, tl.trans(b), acc)
        return acc

    @triton.jit
    def store_tile(c_ptr, acc, pid_m, pid_n, M, N, stride_cm, BM: tl.constexpr, BN: tl.constexpr):
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(tl.float32).to(tl.bfloat16), mask)

    @triton.jit
    def probe_gemm(a_desc, b_desc, c_ptr, M, N, K, stride_cm, INT: tl.constexpr, PROMOTE: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BM, BN, GROUP_M)
        acc = tile_product(a_desc, b_desc, pid_m, pid_n, K, INT, PROMOTE, BM, BN, BK)
        store_tile(c_ptr, acc, pid_m, pid_n, M, N, stride_cm, BM, BN)

    @triton.jit
    def probe_gemm_persistent(a_desc, b_desc, c_ptr, M, N, K, stride_cm, INT: tl.constexpr, NUM_SMS: tl.constexpr,
                              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        """probe_gemm (fast accumulation) as a persistent kernel, tile loop flattened with the K loop."""
        for tile in tl.range(tl.program_id(0), tl.cdiv(M, BM) * tl.cdiv(N, BN), NUM_SMS, flatten=True):
            pid_m, pid_n = tile_coords(tile, M, N, BM, BN, GROUP_M)
            acc = tile_product(a_desc, b_desc, pid_m, pid_n, K, INT, 0, BM, BN, BK)
            store_tile(c_ptr, acc, pid_m, pid_n, M, N, stride_cm, BM, BN)

    return probe_gemm, probe_gemm_persistent


def _w4_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def probe_w4(x_desc, w_desc, c_ptr, M, N, KH, stride_cm, FP8: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        """Packed int4 weights (byte j = codes 2j | 2j+1 << 4) as the MMA's A operand (swap orientation, through
        registers), activations in split order (even channels, then odd ones). FP8: a nibble n in the low bits of
        a byte is the e4m3 number n * 2^-9 exactly (subnormals for n < 8, exponent field 1 above), so the unpack
        is the int8 path's mask / shift and a bitcast; the 2^9 goes into the epilogue."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        pid_m = pid % num_m
        pid_n = pid // num_m
        if FP8:
            acc = tl.zeros((BN, BM), dtype=tl.float32)
        else:
            acc = tl.zeros((BN, BM), dtype=tl.int32)
        BKH: tl.constexpr = BK // 2
        for it in range(0, tl.cdiv(KH, BKH)):
            p = w_desc.load([pid_n * BN, it * BKH])
            x_lo = x_desc.load([pid_m * BM, it * BKH])
            x_hi = x_desc.load([pid_m * BM, KH + it * BKH])
            lo = p & 0x0F
            hi = p >> 4
            if FP8:
                acc = tl.dot(lo.to(tl.float8e4nv, bitcast=True), tl.trans(x_lo), acc)
                acc = tl.dot(hi.to(tl.float8e4nv, bitcast=True), tl.trans(x_hi), acc)
            else:
                acc = tl.dot(lo.to(tl.int8, bitcast=True), tl.trans(x_lo), acc, out_dtype=tl.int32)
                acc = tl.dot(hi.to(tl.int8, bitcast=True), tl.trans(x_hi), acc, out_dtype=tl.int32)
        y = acc.to(tl.float32)
        if FP8:
            y = y * 512.0
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
        tl.store(c_ptr + offs_m[None, :] * stride_cm + offs_n[:, None], y.to(tl.bfloat16), mask)

    return probe_w4


# swap orientation: (BN weight rows, BM tokens, BK, warps, stages)
W4_GRID = [(128, 128, 128, 8, 3), (128, 128, 256, 8, 3), (128, 256, 128, 8, 3), (64, 256, 128, 4, 4),
           (128, 64, 256, 4, 4), (256, 128, 128, 8, 3)]


def probe_w4(m: int, k: int, n: int, failures: list[str], t_bf16: float) -> list[dict]:
    """Packed int4 x int8 against packed int4 x FP8, same kernel otherwise."""
    import triton
    from triton.tools.tensor_descriptor import TensorDescriptor

    kern = _w4_kernel()
    kh = k // 2
    packed = torch.randint(0, 256, (n, kh), device="cuda", dtype=torch.uint8)
    lo, hi = (packed & 15).double(), (packed >> 4).double()
    xi = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
    xf = torch.randn(m, k, device="cuda", dtype=torch.bfloat16).to(torch.float8_e4m3fn)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    rows = []
    for name, xa, fp8 in (("w4 x int8", xi, False), ("w4 x fp8 (nibble bitcast)", xf, True)):
        ref = xa[:, :kh].double() @ lo.T + xa[:, kh:].double() @ hi.T
        best = None
        for bn, bm, bk, warps, stages in W4_GRID:
            x_desc = TensorDescriptor.from_tensor(xa, [bm, bk // 2])
            w_desc = TensorDescriptor.from_tensor(packed, [bn, bk // 2])

            def launch(x_desc=x_desc, w_desc=w_desc, bm=bm, bn=bn, bk=bk, warps=warps, stages=stages):
                grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
                kern[grid](x_desc, w_desc, out, m, n, kh, out.stride(0), FP8=fp8, BM=bm, BN=bn, BK=bk, GROUP_M=8,
                           num_warps=warps, num_stages=stages)
            cfg = f"BN={bn} BM={bm} BK={bk} w={warps} s={stages}"
            us = kernel_bench.check_then_time(f"triton {name} {cfg} {m}x{k}x{n}", launch, out, ref,
                                              lambda: kernel_bench.timeit(launch), failures)
            if us is not None and (best is None or us < best["us"]):
                best = {"M": m, "K": k, "N": n, "kernel": f"triton {name} (swap, TMA, best tile)", "config": cfg,
                        "us": us}
            print(name, cfg, us, flush=True)
        if best:
            rows.append({**best, "vs bf16": t_bf16 / best["us"]})
    return rows


def probe(m: int, k: int, n: int, failures: list[str]) -> list[dict]:
    import triton
    from triton.tools.tensor_descriptor import TensorDescriptor

    kern, kern_persistent = _kernel()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    base = {"M": m, "K": k, "N": n}
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    rows = [{**base, "kernel": "bf16 cuBLAS", "us": kernel_bench.timeit(lambda: torch.nn.functional.linear(x, wb))}]
    xf, wf = x.to(torch.float8_e4m3fn), (wb * k ** 0.5).to(torch.float8_e4m3fn)
    sa, sb = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
    xi = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
    wi = torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8)  # int4 codes, as the widened W4 would be
    rows.append({**base, "kernel": "fp8 _scaled_mm (fast accum)", "us": kernel_bench.timeit(
        lambda: torch._scaled_mm(xf, wf.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=True))})
    try:
        rows.append({**base, "kernel": "int8 torch._int_mm (int32 out)",
                     "us": kernel_bench.timeit(lambda: torch._int_mm(xi, wi.t()))})
    except RuntimeError as e:
        failures.append(f"torch._int_mm {m}x{k}x{n}: {str(e)[:200]}")
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    cases = (("bf16", x, wb, False, 0), ("int8", xi, wi, True, 0), ("fp8 fast accum", xf, wf, False, 0),
             ("fp8 promoted every 64", xf, wf, False, 64), ("int8 persistent", xi, wi, True, -1),
             ("fp8 fast accum persistent", xf, wf, False, -1))
    for name, a, b, is_int, promote in cases:
        ref = a.double() @ b.double().T
        best = None
        for bm, bn, bk, warps, stages in GRID:
            a_desc = TensorDescriptor.from_tensor(a, [bm, bk])
            b_desc = TensorDescriptor.from_tensor(b, [bn, bk])

            def launch(a_desc=a_desc, b_desc=b_desc, bm=bm, bn=bn, bk=bk, warps=warps, stages=stages):
                tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
                if promote < 0:  # persistent, fast accumulation
                    kern_persistent[(min(tiles, sms),)](a_desc, b_desc, out, m, n, k, out.stride(0), INT=is_int,
                                                        NUM_SMS=sms, BM=bm, BN=bn, BK=bk, GROUP_M=8,
                                                        num_warps=warps, num_stages=stages)
                else:
                    kern[(tiles,)](a_desc, b_desc, out, m, n, k, out.stride(0), INT=is_int, PROMOTE=promote, BM=bm,
                                   BN=bn, BK=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
            cfg = f"BM={bm} BN={bn} BK={bk} w={warps} s={stages}"
            us = kernel_bench.check_then_time(f"triton {name} {cfg} {m}x{k}x{n}", launch, out, ref,
                                              lambda: kernel_bench.timeit(launch), failures)
            if us is not None and (best is None or us < best["us"]):
                best = {**base, "kernel": f"triton {name} (TMA, best tile)", "config": cfg, "us": us}
            print(name, cfg, us, flush=True)
        if best:
            rows.append(best)
    for r in rows:
        r["vs bf16"] = rows[0]["us"] / r["us"]
    return rows + probe_w4(m, k, n, failures, rows[0]["us"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--shapes", default="816x2048x32768,816x16384x2048", help="MxKxN, comma-separated")
    a = p.parse_args()
    code = kernel_bench.cannot_run("mainloop_probe")
    if code is not None:
        return code
    rows, failures = [], []
    for s in a.shapes.split(","):
        m, k, n = (int(v) for v in s.split("x"))
        rows += probe(m, k, n, failures)
    md = (f"GEMM mainloops, {kernel_bench.env_info()['gpu']}, commit {kernel_bench.env_info()['commit']}; µs with "
          "the L2 flushed, CUDA-graph replays\n\n"
          + kernel_bench.table(rows, ["M", "K", "N", "kernel", "config", "us", "vs bf16"]))
    return kernel_bench.finish(a.out, "mainloop_probe", {"env": kernel_bench.env_info(), "rows": rows}, md, failures)


if __name__ == "__main__":
    sys.exit(main())
