"""Integer GEMMs (Triton): int8 activations x {int8, uint8, packed int4} weights, int32 accumulation, the
zero-point identity of ``reference.py`` in the epilogue, per-token x per-channel (or per-group) scales, bias,
bf16 out, and up to three outputs (fused q/k/v or gate/up: one GEMM over the concatenated weight rows, each
member's columns written to its own tensor).

Two orientations, both autotuned on pi0's shapes:

- ``nt``: C[M, N] = X[M, K] @ W[N, K]^T with the weight as the MMA's B operand.
- ``swap``: C^T[N, M] = W @ X^T with the weight as the A operand. Hopper's wgmma takes A from registers, so
  weights that must be unpacked (int4 nibbles, uint8 -> int8) go through registers without leaving the tensor-core
  pipeline, and a small M (the action expert's 51 tokens) becomes the MMA's narrow N side.

Packed int4 weights stay in the layer's storage format (byte j of a row = codes 2j | 2j+1 << 4): the activation
kernel writes the codes in "split" order (even channels, then odd ones), so column j of each half meets the low /
high nibble of byte j and the unpack is one mask and one shift, with no interleave.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

W_INT8, W_UINT8, W_INT4 = 0, 1, 2
# packed int4 weights x FP8 e4m3 activations (formats/int4_fp8.py): a nibble n in a byte's low bits, read as e4m3,
# is exactly n * 2^-9 (subnormal below 8, exponent field 1 from 8 to 15), so the unpack is W_INT4's mask / shift
# plus a bitcast, the MMA runs on FP8 tensor cores (float32 accumulation), and 2^9 joins the epilogue
W_INT4_FP8 = 3


def _cfg(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": group_m}, num_warps=warps, num_stages=stages)


_NT_CONFIGS = [
    _cfg(128, 128, 64, 4, 4), _cfg(128, 128, 128, 8, 3), _cfg(128, 256, 64, 8, 3), _cfg(64, 128, 128, 4, 4),
    _cfg(64, 256, 128, 8, 3), _cfg(128, 64, 128, 4, 4), _cfg(64, 64, 128, 4, 5), _cfg(256, 128, 64, 8, 3),
    _cfg(128, 256, 128, 8, 3), _cfg(128, 128, 128, 4, 4),
]
# swap: BN = weight rows (the MMA's M side), BM = tokens (its N side)
_SWAP_CONFIGS = [
    _cfg(64, 128, 128, 4, 4), _cfg(128, 128, 64, 8, 3), _cfg(64, 64, 128, 4, 4), _cfg(32, 128, 128, 4, 4),
    _cfg(32, 64, 256, 4, 3), _cfg(16, 128, 256, 4, 3), _cfg(64, 256, 128, 8, 3), _cfg(128, 128, 128, 8, 3),
    _cfg(16, 64, 256, 4, 4), _cfg(128, 256, 128, 8, 3), _cfg(64, 256, 64, 8, 4), _cfg(128, 128, 128, 4, 4),
    # K steps of 256 (128 bytes of packed int4 per weight row): the LLM down projection (K = 16384) in W4A8 went
    # 84.5 -> 69.7 µs with this tile on an H200 (bench/gemm_sweep.py, BENCHMARKS.md section 6b)
    _cfg(128, 128, 256, 8, 3), _cfg(128, 128, 256, 8, 4),
]
if os.environ.get("DUQUANT_GEMM_QUICK") == "1" or os.environ.get("TRITON_INTERPRET") == "1":
    _NT_CONFIGS, _SWAP_CONFIGS = _NT_CONFIGS[:1], _SWAP_CONFIGS[:1]


def _bench_graph(fn, quantiles=None):
    """Autotuning times configs in a CUDA graph (host launch overhead would hide small-GEMM differences)."""
    return triton.testing.do_bench_cudagraph(fn, rep=10, quantiles=quantiles, return_mode="median")


_USE_ASM = os.environ.get("TRITON_INTERPRET", "0") != "1"


@triton.jit
def _nibble_lo(p, USE_ASM: tl.constexpr):
    """uint8 -> int8 low nibble; with inline PTX on 4 bytes at a time (one AND per 32-bit word)."""
    if USE_ASM:
        r = tl.inline_asm_elementwise("and.b32 $0, $1, 0x0F0F0F0F;", "=r,r", [p], dtype=tl.int8, is_pure=True,
                                      pack=4)
    else:
        r = (p & 15).to(tl.int8)
    return r


@triton.jit
def _nibble_hi(p, USE_ASM: tl.constexpr):
    if USE_ASM:
        r = tl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, 4; and.b32 $0, t, 0x0F0F0F0F; }", "=r,r", [p],
                                      dtype=tl.int8, is_pure=True, pack=4)
    else:
        r = (p >> 4).to(tl.int8)
    return r


@triton.jit
def _nibble_e4m3(n):
    """int8 nibble codes 0..15 -> the same bytes as e4m3: n * 2^-9 exactly (``W_INT4_FP8``)."""
    return n.to(tl.float8e4nv, bitcast=True)


@triton.jit
def _u8_to_s8(w, USE_ASM: tl.constexpr):
    """uint8 code u -> int8 u - 128 (flip the top bit of every byte)."""
    if USE_ASM:
        r = tl.inline_asm_elementwise("xor.b32 $0, $1, 0x80808080;", "=r,r", [w], dtype=tl.int8, is_pure=True,
                                      pack=4)
    else:
        r = (w ^ 0x80).to(tl.int8, bitcast=True)
    return r


@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, sx_ptr, zx_ptr, rs_ptr, sw_ptr, zw_ptr, cw_ptr, bias_ptr,
              o0, o1, o2, n1, n2, so0, so1, so2,
              ASYM_X: tl.constexpr, HAS_BIAS: tl.constexpr, NUM_OUT: tl.constexpr, GROUPED: tl.constexpr):
    mmask = offs_m < M
    nmask = offs_n < N
    sx = tl.load(sx_ptr + offs_m, mask=mmask, other=0.0)
    if GROUPED:  # acc already holds sum_g sw_g * (acc_g - zw_g rs_g) in float32
        y = acc
        if ASYM_X:
            zx = tl.load(zx_ptr + offs_m, mask=mmask, other=0.0)
            cz = tl.load(cw_ptr + offs_n, mask=nmask, other=0.0)
            y = y - zx[:, None] * cz[None, :]
        y = y * sx[:, None]
    else:
        rs = tl.load(rs_ptr + offs_m, mask=mmask, other=0)
        zw = tl.load(zw_ptr + offs_n, mask=nmask, other=0)
        t = (acc - zw[None, :] * rs[:, None]).to(tl.float32)
        if ASYM_X:
            zx = tl.load(zx_ptr + offs_m, mask=mmask, other=0.0)
            cw = tl.load(cw_ptr + offs_n, mask=nmask, other=0.0)
            t = t - zx[:, None] * cw[None, :]
        sw = tl.load(sw_ptr + offs_n, mask=nmask, other=0.0)
        y = t * sw[None, :] * sx[:, None]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    y = y.to(o0.dtype.element_ty)
    rows = offs_m[:, None].to(tl.int64)
    if NUM_OUT == 1:
        tl.store(o0 + rows * so0 + offs_n[None, :], y, mask=mmask[:, None] & nmask[None, :])
    else:
        tl.store(o0 + rows * so0 + offs_n[None, :], y, mask=mmask[:, None] & (offs_n < n1)[None, :])
        if NUM_OUT == 2:
            tl.store(o1 + rows * so1 + (offs_n - n1)[None, :], y,
                     mask=mmask[:, None] & ((offs_n >= n1) & nmask)[None, :])
        else:
            tl.store(o1 + rows * so1 + (offs_n - n1)[None, :], y,
                     mask=mmask[:, None] & ((offs_n >= n1) & (offs_n < n2))[None, :])
            tl.store(o2 + rows * so2 + (offs_n - n2)[None, :], y,
                     mask=mmask[:, None] & ((offs_n >= n2) & nmask)[None, :])


@triton.jit
def _tile_rows(pid_m, pid_n, M, N, BM: tl.constexpr, BN: tl.constexpr):
    """A tile's token and weight-row offsets, and the same wrapped into range as 64-bit load rows (rows past M / N
    re-read valid ones; the epilogue masks their outputs)."""
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    return offs_m, offs_n, (offs_m % M).to(tl.int64), (offs_n % N).to(tl.int64)


@triton.jit
def _zero_acc(R: tl.constexpr, C: tl.constexpr, FLOAT: tl.constexpr):
    """The accumulator: float32 for weight groups (scaled per group) and FP8 products, else exact int32."""
    if FLOAT:
        acc = tl.zeros((R, C), dtype=tl.float32)
    else:
        acc = tl.zeros((R, C), dtype=tl.int32)
    return acc


@triton.jit
def _add_weight_group(acc, part, rsg, zw_ptr, sw_ptr, wn, NG, it, W_ROWS: tl.constexpr):
    """acc += (part - zero_w * code_sum_x) * scale_w for weight group `it`, `part` its integer product and `rsg`
    the tokens' code sums over it. W_ROWS: acc's rows are weight rows (swap), else tokens (nt)."""
    zwg = tl.load(zw_ptr + wn * NG + it)
    swg = tl.load(sw_ptr + wn * NG + it)
    if W_ROWS:
        acc += (part - zwg[:, None] * rsg[None, :]).to(tl.float32) * swg[:, None]
    else:
        acc += (part - zwg[None, :] * rsg[:, None]).to(tl.float32) * swg[None, :]
    return acc


@triton.autotune(configs=_NT_CONFIGS, key=["MB", "N", "K", "W_KIND", "GROUPED", "GS"], do_bench=_bench_graph)
@triton.jit
def _gemm_nt_kernel(
    x_ptr, w_ptr, M, N, K, KH, stride_xm, stride_wn, NG,
    sx_ptr, zx_ptr, rs_ptr, sw_ptr, zw_ptr, cw_ptr, bias_ptr,
    o0, o1, o2, n1, n2, so0, so1, so2, MB,
    GS: tl.constexpr, W_KIND: tl.constexpr, ASYM_X: tl.constexpr, HAS_BIAS: tl.constexpr, NUM_OUT: tl.constexpr,
    GROUPED: tl.constexpr, USE_ASM: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    gsz = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % gsz
    pid_n = (pid % in_group) // gsz
    offs_m, offs_n, am, wn = _tile_rows(pid_m, pid_n, M, N, BM, BN)
    acc = _zero_acc(BM, BN, GROUPED or W_KIND == 3)
    if GROUPED:  # one K tile per weight group
        BKE: tl.constexpr = GS
    else:
        BKE: tl.constexpr = BK
    if W_KIND == 3:  # packed int4 x FP8 (per-channel weights only)
        BKH3: tl.constexpr = BKE // 2
        kk = tl.arange(0, BKH3)
        for it in range(0, tl.cdiv(KH, BKH3)):
            j = it * BKH3 + kk
            a_lo = tl.load(x_ptr + am[:, None] * stride_xm + j[None, :], mask=(j < KH)[None, :], other=0.0)
            a_hi = tl.load(x_ptr + am[:, None] * stride_xm + (KH + j)[None, :], mask=(j < K // 2)[None, :],
                           other=0.0)
            p = tl.load(w_ptr + wn[None, :] * stride_wn + j[:, None], mask=(j < KH)[:, None], other=0)
            acc = tl.dot(a_lo, _nibble_e4m3(_nibble_lo(p, USE_ASM)), acc)
            acc = tl.dot(a_hi, _nibble_e4m3(_nibble_hi(p, USE_ASM)), acc)
        acc = acc * 512.0
    elif W_KIND == 2:
        BKH: tl.constexpr = BKE // 2
        kk = tl.arange(0, BKH)
        khi = K // 2
        for it in range(0, tl.cdiv(KH, BKH)):
            j = it * BKH + kk
            a_lo = tl.load(x_ptr + am[:, None] * stride_xm + j[None, :], mask=(j < KH)[None, :], other=0)
            a_hi = tl.load(x_ptr + am[:, None] * stride_xm + (KH + j)[None, :], mask=(j < khi)[None, :], other=0)
            p = tl.load(w_ptr + wn[None, :] * stride_wn + j[:, None], mask=(j < KH)[:, None], other=0)
            lo = _nibble_lo(p, USE_ASM)
            hi = _nibble_hi(p, USE_ASM)
            if GROUPED:
                part = tl.dot(a_lo, lo, out_dtype=tl.int32)
                part = tl.dot(a_hi, hi, part, out_dtype=tl.int32)
                rsg = tl.sum(a_lo.to(tl.int32), axis=1) + tl.sum(a_hi.to(tl.int32), axis=1)
                acc = _add_weight_group(acc, part, rsg, zw_ptr, sw_ptr, wn, NG, it, False)
            else:
                acc = tl.dot(a_lo, lo, acc, out_dtype=tl.int32)
                acc = tl.dot(a_hi, hi, acc, out_dtype=tl.int32)
    else:
        kk = tl.arange(0, BKE)
        for it in range(0, tl.cdiv(K, BKE)):
            k = it * BKE + kk
            a = tl.load(x_ptr + am[:, None] * stride_xm + k[None, :], mask=(k < K)[None, :], other=0)
            b = tl.load(w_ptr + wn[None, :] * stride_wn + k[:, None], mask=(k < K)[:, None], other=0)
            if W_KIND == 1:
                b = _u8_to_s8(b, USE_ASM)
            if GROUPED:
                part = tl.dot(a, b, out_dtype=tl.int32)
                rsg = tl.sum(a.to(tl.int32), axis=1)
                acc = _add_weight_group(acc, part, rsg, zw_ptr, sw_ptr, wn, NG, it, False)
            else:
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    _epilogue(acc, offs_m, offs_n, M, N, sx_ptr, zx_ptr, rs_ptr, sw_ptr, zw_ptr, cw_ptr, bias_ptr,
              o0, o1, o2, n1, n2, so0, so1, so2, ASYM_X, HAS_BIAS, NUM_OUT, GROUPED)


@triton.autotune(configs=_SWAP_CONFIGS, key=["MB", "N", "K", "W_KIND", "GROUPED", "GS"], do_bench=_bench_graph)
@triton.jit
def _gemm_swap_kernel(
    x_ptr, w_ptr, M, N, K, KH, stride_xm, stride_wn, NG,
    sx_ptr, zx_ptr, rs_ptr, sw_ptr, zw_ptr, cw_ptr, bias_ptr,
    o0, o1, o2, n1, n2, so0, so1, so2, MB,
    GS: tl.constexpr, W_KIND: tl.constexpr, ASYM_X: tl.constexpr, HAS_BIAS: tl.constexpr, NUM_OUT: tl.constexpr,
    GROUPED: tl.constexpr, USE_ASM: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    pid_m = pid % num_m
    pid_n = pid // num_m
    offs_m, offs_n, am, wn = _tile_rows(pid_m, pid_n, M, N, BM, BN)
    acc = _zero_acc(BN, BM, GROUPED or W_KIND == 3)
    if GROUPED:  # one K tile per weight group
        BKE: tl.constexpr = GS
    else:
        BKE: tl.constexpr = BK
    if W_KIND == 3:  # packed int4 x FP8 (per-channel weights only)
        BKH3: tl.constexpr = BKE // 2
        kk = tl.arange(0, BKH3)
        for it in range(0, tl.cdiv(KH, BKH3)):
            j = it * BKH3 + kk
            p = tl.load(w_ptr + wn[:, None] * stride_wn + j[None, :], mask=(j < KH)[None, :], other=0)
            x_lo = tl.load(x_ptr + am[:, None] * stride_xm + j[None, :], mask=(j < KH)[None, :], other=0.0)
            x_hi = tl.load(x_ptr + am[:, None] * stride_xm + (KH + j)[None, :], mask=(j < K // 2)[None, :],
                           other=0.0)
            acc = tl.dot(_nibble_e4m3(_nibble_lo(p, USE_ASM)), tl.trans(x_lo), acc)
            acc = tl.dot(_nibble_e4m3(_nibble_hi(p, USE_ASM)), tl.trans(x_hi), acc)
        acc = acc * 512.0
    elif W_KIND == 2:
        BKH: tl.constexpr = BKE // 2
        kk = tl.arange(0, BKH)
        khi = K // 2
        for it in range(0, tl.cdiv(KH, BKH)):
            j = it * BKH + kk
            p = tl.load(w_ptr + wn[:, None] * stride_wn + j[None, :], mask=(j < KH)[None, :], other=0)
            lo = _nibble_lo(p, USE_ASM)
            hi = _nibble_hi(p, USE_ASM)
            x_lo = tl.load(x_ptr + am[:, None] * stride_xm + j[None, :], mask=(j < KH)[None, :], other=0)
            x_hi = tl.load(x_ptr + am[:, None] * stride_xm + (KH + j)[None, :], mask=(j < khi)[None, :], other=0)
            if GROUPED:
                part = tl.dot(lo, tl.trans(x_lo), out_dtype=tl.int32)
                part = tl.dot(hi, tl.trans(x_hi), part, out_dtype=tl.int32)
                rsg = tl.sum(x_lo.to(tl.int32), axis=1) + tl.sum(x_hi.to(tl.int32), axis=1)
                acc = _add_weight_group(acc, part, rsg, zw_ptr, sw_ptr, wn, NG, it, True)
            else:
                acc = tl.dot(lo, tl.trans(x_lo), acc, out_dtype=tl.int32)
                acc = tl.dot(hi, tl.trans(x_hi), acc, out_dtype=tl.int32)
    else:
        kk = tl.arange(0, BKE)
        for it in range(0, tl.cdiv(K, BKE)):
            k = it * BKE + kk
            w = tl.load(w_ptr + wn[:, None] * stride_wn + k[None, :], mask=(k < K)[None, :], other=0)
            if W_KIND == 1:
                w = _u8_to_s8(w, USE_ASM)
            x = tl.load(x_ptr + am[:, None] * stride_xm + k[None, :], mask=(k < K)[None, :], other=0)
            if GROUPED:
                part = tl.dot(w, tl.trans(x), out_dtype=tl.int32)
                rsg = tl.sum(x.to(tl.int32), axis=1)
                acc = _add_weight_group(acc, part, rsg, zw_ptr, sw_ptr, wn, NG, it, True)
            else:
                acc = tl.dot(w, tl.trans(x), acc, out_dtype=tl.int32)
    _epilogue(tl.trans(acc), offs_m, offs_n, M, N, sx_ptr, zx_ptr, rs_ptr, sw_ptr, zw_ptr, cw_ptr, bias_ptr,
              o0, o1, o2, n1, n2, so0, so1, so2, ASYM_X, HAS_BIAS, NUM_OUT, GROUPED)


_TMA_CONFIGS = [
    _cfg(128, 128, 128, 8, 3), _cfg(128, 128, 256, 8, 3), _cfg(64, 128, 128, 4, 4), _cfg(128, 256, 128, 8, 3),
    _cfg(64, 256, 128, 8, 3), _cfg(128, 128, 128, 4, 4),
]
if os.environ.get("DUQUANT_GEMM_QUICK") == "1" or os.environ.get("TRITON_INTERPRET") == "1":
    _TMA_CONFIGS = [_cfg(16, 16, 64, 4, 2)]


def _tma_block_shapes(nargs):
    """Autotune pre-hook: the descriptors' tiles follow the configuration (x: [BM, BK'], w: [BN, BK'], with BK'
    = BK // 2 for packed int4 weights: bytes of a row and codes of one half of x)."""
    bk = nargs["BK"] // 2 if nargs["W_KIND"] in (W_INT4, W_INT4_FP8) else nargs["BK"]
    nargs["x_desc"].block_shape = [nargs["BM"], bk]
    nargs["w_desc"].block_shape = [nargs["BN"], bk]


for _c in _TMA_CONFIGS:
    _c.pre_hook = _tma_block_shapes
# the persistent kernel keeps more alive across its tile loop: 128 x 256 tiles spill there (ptxas, sm_90)
_TMA_PERSISTENT_CONFIGS = [c for c in _TMA_CONFIGS if c.kwargs["BM"] * c.kwargs["BN"] < 128 * 256]


@triton.jit
def _swap_tma_tile(x_desc, w_desc, pid_m, pid_n, K, KH, W_KIND: tl.constexpr, USE_ASM: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """One output tile's mainloop of the TMA variants: acc [BN weight rows, BM tokens] (int32, or float32 for
    W_INT4_FP8, already scaled by 2^9)."""
    acc = _zero_acc(BN, BM, W_KIND == 3)
    if W_KIND >= 2:
        BKH: tl.constexpr = BK // 2
        for it in range(0, tl.cdiv(KH, BKH)):
            p = w_desc.load([pid_n * BN, it * BKH])
            x_lo = x_desc.load([pid_m * BM, it * BKH])
            x_hi = x_desc.load([pid_m * BM, KH + it * BKH])
            if W_KIND == 3:
                acc = tl.dot(_nibble_e4m3(_nibble_lo(p, USE_ASM)), tl.trans(x_lo), acc)
                acc = tl.dot(_nibble_e4m3(_nibble_hi(p, USE_ASM)), tl.trans(x_hi), acc)
            else:
                acc = tl.dot(_nibble_lo(p, USE_ASM), tl.trans(x_lo), acc, out_dtype=tl.int32)
                acc = tl.dot(_nibble_hi(p, USE_ASM), tl.trans(x_hi), acc, out_dtype=tl.int32)
        if W_KIND == 3:
            acc = acc * 512.0
    else:
        for it in range(0, tl.cdiv(K, BK)):
            w = w_desc.load([pid_n * BN, it * BK])
            if W_KIND == 1:
                w = _u8_to_s8(w, USE_ASM)
            acc = tl.dot(w, tl.trans(x_desc.load([pid_m * BM, it * BK])), acc, out_dtype=tl.int32)
    return acc


@triton.autotune(configs=_TMA_CONFIGS, key=["MB", "N", "K", "W_KIND"], do_bench=_bench_graph)
@triton.jit
def _gemm_swap_tma_kernel(
    x_desc, w_desc, M, N, K, KH,
    sx_ptr, zx_ptr, rs_ptr, sw_ptr, zw_ptr, cw_ptr, bias_ptr,
    o0, o1, o2, n1, n2, so0, so1, so2, MB,
    W_KIND: tl.constexpr, ASYM_X: tl.constexpr, HAS_BIAS: tl.constexpr, NUM_OUT: tl.constexpr,
    USE_ASM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``_gemm_swap_kernel`` (per-channel weights) with both operands fetched by the Hopper tensor memory
    accelerator: one descriptor load per tile instead of per-thread addresses and masks, zero fill past the
    edges. Packed int4: bytes past KH read as 0, so the low half of x may run into the high half's columns (its
    product with a zero code is 0), and the zero point stays in the epilogue as in the other kernels."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    pid_m = pid % num_m
    pid_n = pid // num_m
    acc = _swap_tma_tile(x_desc, w_desc, pid_m, pid_n, K, KH, W_KIND, USE_ASM, BM, BN, BK)
    offs_m, offs_n, _, _ = _tile_rows(pid_m, pid_n, M, N, BM, BN)
    _epilogue(tl.trans(acc), offs_m, offs_n, M, N, sx_ptr, zx_ptr, rs_ptr, sw_ptr, zw_ptr, cw_ptr, bias_ptr,
              o0, o1, o2, n1, n2, so0, so1, so2, ASYM_X, HAS_BIAS, NUM_OUT, False)


@triton.autotune(configs=_TMA_PERSISTENT_CONFIGS, key=["MB", "N", "K", "W_KIND"], do_bench=_bench_graph)
@triton.jit
def _gemm_swap_tma_persistent_kernel(
    x_desc, w_desc, M, N, K, KH,
    sx_ptr, zx_ptr, rs_ptr, sw_ptr, zw_ptr, cw_ptr, bias_ptr,
    o0, o1, o2, n1, n2, so0, so1, so2, MB,
    W_KIND: tl.constexpr, ASYM_X: tl.constexpr, HAS_BIAS: tl.constexpr, NUM_OUT: tl.constexpr,
    USE_ASM: tl.constexpr, NUM_SMS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``_gemm_swap_tma_kernel`` as a persistent kernel: one program per multiprocessor walks the output tiles,
    and the tile loop is flattened with the K loop (``tl.range(flatten=True)``, Triton's Hopper recipe) so the
    next tile's TMA loads are in flight during this tile's epilogue, which the one-tile-per-program kernel pays
    for at every tile (short K loops: the gate+up product has 8-16 K steps per tile)."""
    start = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_tiles = num_m * tl.cdiv(N, BN)
    for tile in tl.range(start, num_tiles, NUM_SMS, flatten=True):
        pid_m = tile % num_m
        pid_n = tile // num_m
        acc = _swap_tma_tile(x_desc, w_desc, pid_m, pid_n, K, KH, W_KIND, USE_ASM, BM, BN, BK)
        offs_m, offs_n, _, _ = _tile_rows(pid_m, pid_n, M, N, BM, BN)
        _epilogue(tl.trans(acc), offs_m, offs_n, M, N, sx_ptr, zx_ptr, rs_ptr, sw_ptr, zw_ptr, cw_ptr, bias_ptr,
                  o0, o1, o2, n1, n2, so0, so1, so2, ASYM_X, HAS_BIAS, NUM_OUT, False)


# ---- host side ----------------------------------------------------------------------------------------------------

@dataclass
class GemmWeight:
    """A weight (or the concatenated rows of a fused group) in the GEMM's layout. ``data`` is the layer's own
    storage (no copy): int8 [N, K], uint8 [N, K] (8-bit asymmetric) or packed uint8 [N, ceil(K/2)]."""
    data: torch.Tensor
    kind: int
    N: int
    K: int
    scale: torch.Tensor  # f32 [N] (per channel) or [N, NG]
    zero: torch.Tensor  # int32 [N] or [N, NG] (kernel units, reference.py)
    colsum: torch.Tensor  # f32 [N]: sum_k (q - z); grouped: sum_g scale_g * colsum_g
    bias: torch.Tensor | None
    group_size: int | None
    splits: tuple[int, ...]  # member widths (sum = N)

    @property
    def KH(self) -> int:
        return -(-self.K // 2)

    @property
    def ngroups(self) -> int:
        return 1 if self.group_size is None else -(-self.K // self.group_size)

    @property
    def act_layout(self) -> str:
        return "split" if self.kind in (W_INT4, W_INT4_FP8) else "natural"

    def num_bytes(self) -> int:
        ts = [self.data, self.scale, self.zero, self.colsum] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


_VARIANT_CACHE: dict[tuple, str] = {}


def _mb(m: int) -> int:
    return 1 << max(4, (int(m) - 1).bit_length())


def int_gemm(codes: torch.Tensor, sx: torch.Tensor, zx: torch.Tensor | None, rowsum: torch.Tensor, w: GemmWeight,
             out_dtype: torch.dtype = torch.bfloat16, variant: str | None = None) -> list[torch.Tensor]:
    """codes int8 [M, Kc] from the activation kernel (split order for int4 weights) -> one [M, n_i] tensor per
    member of ``w.splits``. ``W_INT4_FP8`` weights: e4m3 codes in split order, ``rowsum`` the float32 sum of
    each token's e4m3 values (the weight zero point's term), zx None."""
    m = codes.shape[0]
    if w.kind == W_INT4_FP8 and (w.group_size is not None or zx is not None or codes.dtype != torch.float8_e4m3fn):
        raise ValueError("int4 x FP8 GEMM: per-channel weights, symmetric e4m3 activation codes (zx None) only")
    outs = [torch.empty(m, n, dtype=out_dtype, device=codes.device) for n in w.splits]
    if m == 0:
        return outs
    variant = variant or os.environ.get("DUQUANT_GEMM_VARIANT", "auto")
    if variant == "auto":
        key = (_mb(m), w.N, w.K, w.kind, w.group_size)
        variant = _VARIANT_CACHE.get(key)
        if variant is None:
            variant = _pick_variant(codes, sx, zx, rowsum, w, outs)
            _VARIANT_CACHE[key] = variant
        if variant in TMA_VARIANTS and tma_cannot_run(codes, w):
            variant = "swap"  # picked on aligned operands; these are not (a sliced, offset activation)
    _launch(variant, codes, sx, zx, rowsum, w, outs)
    return outs


def auto_candidates(codes: torch.Tensor, w: GemmWeight) -> tuple[str, ...]:
    """The variants ``auto`` times for these operands: every one that can run them."""
    return tuple(v for v in AUTO_VARIANTS if v not in TMA_VARIANTS or not tma_cannot_run(codes, w))


def _pick_variant(codes, sx, zx, rowsum, w, outs) -> str:
    times = {}
    for v in auto_candidates(codes, w):
        _launch(v, codes, sx, zx, rowsum, w, outs)  # autotunes
        times[v] = _bench_graph(lambda v=v: _launch(v, codes, sx, zx, rowsum, w, outs))
    return min(times, key=times.get)


# swap-tma joined "auto" after the sixth session's sweep (H200, f10cc29): gate+up W4A8 143 -> 121 us, down 70 -> 66.
# swap-tma-persistent (sixth session) is explicit only (DUQUANT_GEMM_VARIANT) until its GPU tests have run: "auto"
# would pick it wherever it is faster, so it must be known correct first
TMA_VARIANTS = ("swap-tma", "swap-tma-persistent")
VARIANTS = ("nt", "swap", *TMA_VARIANTS)
AUTO_VARIANTS = ("nt", "swap", "swap-tma")


def tma_cannot_run(codes: torch.Tensor, w: GemmWeight) -> str | None:
    """Why the TMA kernel cannot take these operands (None when it can): per-channel weights, 16-byte aligned
    rows and bases (the tensor memory accelerator's rule)."""
    if w.group_size is not None:
        return "group-wise weight scales are not implemented in the TMA kernel"
    for name, t in (("activation codes", codes), ("weights", w.data)):
        if t.stride(-1) != 1 or t.stride(0) % 16 or t.data_ptr() % 16:
            return f"{name}: rows must be contiguous and 16-byte aligned for TMA"
    return None


def _launch_tma(codes, sx, zx, rowsum, w: GemmWeight, o, n1, n2, num_out, persistent: bool = False):
    from triton.tools.tensor_descriptor import TensorDescriptor

    from duquant.kernels.triton_act import multiprocessors

    why = tma_cannot_run(codes, w)
    if why:
        raise ValueError(f"GEMM variant swap-tma: {why}")
    m = codes.shape[0]
    # block shapes are placeholders: the autotuner's pre-hook sets them per configuration
    x_desc = TensorDescriptor.from_tensor(codes, [16, 32])
    w_desc = TensorDescriptor.from_tensor(w.data, [16, 32])
    sms = multiprocessors(codes.device)

    def grid(meta):
        tiles = triton.cdiv(m, meta["BM"]) * triton.cdiv(w.N, meta["BN"])
        return (min(tiles, sms),) if persistent else (tiles,)

    args = (x_desc, w_desc, m, w.N, w.K, w.KH, sx, zx if zx is not None else sx, rowsum, w.scale, w.zero, w.colsum,
            w.bias if w.bias is not None else sx, o[0], o[1], o[2], n1, n2, o[0].stride(0), o[1].stride(0),
            o[2].stride(0), _mb(m))
    flags = dict(W_KIND=w.kind, ASYM_X=zx is not None, HAS_BIAS=w.bias is not None, NUM_OUT=num_out,
                 USE_ASM=_USE_ASM)
    if persistent:
        _gemm_swap_tma_persistent_kernel[grid](*args, NUM_SMS=sms, **flags)
    else:
        _gemm_swap_tma_kernel[grid](*args, **flags)


def _launch(variant, codes, sx, zx, rowsum, w: GemmWeight, outs):
    m = codes.shape[0]
    n1 = w.splits[0]
    n2 = n1 + (w.splits[1] if len(w.splits) > 1 else 0)
    o = list(outs) + [outs[0]] * (3 - len(outs))
    if variant not in VARIANTS:
        raise ValueError(f"unknown GEMM variant {variant!r} ({', '.join(VARIANTS)}, auto)")
    if len(outs) > 3:
        raise ValueError("at most three fused outputs")
    if variant in TMA_VARIANTS:
        return _launch_tma(codes, sx, zx, rowsum, w, o, n1, n2, len(outs), persistent=variant != "swap-tma")
    kernel = _gemm_nt_kernel if variant == "nt" else _gemm_swap_kernel

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(w.N, meta["BN"]),)

    kernel[grid](
        codes, w.data, m, w.N, w.K, w.KH, codes.stride(0), w.data.stride(0), w.ngroups,
        sx, zx if zx is not None else sx, rowsum, w.scale, w.zero, w.colsum,
        w.bias if w.bias is not None else sx,
        o[0], o[1], o[2], n1, n2, o[0].stride(0), o[1].stride(0), o[2].stride(0), _mb(m), w.group_size or 0,
        W_KIND=w.kind, ASYM_X=zx is not None, HAS_BIAS=w.bias is not None, NUM_OUT=len(outs),
        GROUPED=w.group_size is not None, USE_ASM=_USE_ASM,
    )
