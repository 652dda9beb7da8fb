"""bf16 activations x packed 4-bit weights (Triton): y = x @ W^T + b with W = s * (q - z) per output channel or per
group along K, read straight from the layer's storage (byte j of a row = codes 2j | 2j+1 << 4; 2- and 3-bit codes
are stored the same way). For the ``w4a16`` format: at the action expert's M ~ 51 the GEMMs are bound by weight
bytes, so reading 4 bits per weight instead of 16 is the whole point, and there is no activation kernel.

The unpacked codes minus the zero point are small integers, exact in bf16, so the tensor cores multiply x by the
integer matrix and the scales are applied to the float32 accumulator (per group: once per K step). The only
roundings are x's own dtype and the output's. Even and odd channels meet the low and high nibbles: x is read as
two stride-2 halves, which costs nothing at these M (x is a few hundred KB, L2-resident).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=warps, num_stages=stages)


_CONFIGS = [
    _cfg(16, 64, 128, 4, 4), _cfg(16, 128, 128, 4, 4), _cfg(32, 64, 128, 4, 4), _cfg(64, 64, 128, 4, 4),
    _cfg(64, 128, 64, 4, 4), _cfg(16, 32, 256, 4, 3), _cfg(32, 128, 64, 4, 4), _cfg(64, 128, 128, 8, 3),
    _cfg(128, 128, 64, 8, 3), _cfg(16, 64, 64, 4, 5),
]
if os.environ.get("DUQUANT_GEMM_QUICK") == "1" or os.environ.get("TRITON_INTERPRET") == "1":
    _CONFIGS = [_cfg(16, 32, 64, 4, 2)]


def _bench_graph(fn, quantiles=None):
    return triton.testing.do_bench_cudagraph(fn, rep=10, quantiles=quantiles, return_mode="median")


@triton.autotune(configs=_CONFIGS, key=["MB", "N", "K", "GS"], do_bench=_bench_graph)
@triton.jit
def _w4a16_kernel(x_ptr, stride_xm, w_ptr, stride_wn, s_ptr, z_ptr, b_ptr, y_ptr, stride_ym, M, N, K, KH, NG, MB,
                  GS: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mmask = offs_m < M
    nmask = offs_n < N
    KS: tl.constexpr = BK if (GS == 0 or BK <= GS) else GS  # a K step never straddles two scale groups
    jj = tl.arange(0, KS // 2)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if GS == 0:
        zero = tl.load(z_ptr + offs_n, mask=nmask, other=0.0)
    for kb in range(0, tl.cdiv(K, KS)):
        byte = kb * (KS // 2) + jj
        ke = 2 * byte
        xrow = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
        xe = tl.load(xrow + ke[None, :], mask=mmask[:, None] & (ke < K)[None, :], other=0.0)
        xo = tl.load(xrow + ke[None, :] + 1, mask=mmask[:, None] & (ke + 1 < K)[None, :], other=0.0)
        wb = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + byte[None, :],
                     mask=nmask[:, None] & (byte < KH)[None, :], other=0).to(tl.int32)
        if GS != 0:
            g = (kb * KS) // GS
            zero = tl.load(z_ptr + offs_n * NG + g, mask=nmask, other=0.0)
            scale_g = tl.load(s_ptr + offs_n * NG + g, mask=nmask, other=0.0)
        wl = ((wb & 15).to(tl.float32) - zero[:, None]).to(xe.dtype)  # small integers: exact
        wh = ((wb >> 4).to(tl.float32) - zero[:, None]).to(xe.dtype)
        part = tl.dot(xe, tl.trans(wl)) + tl.dot(xo, tl.trans(wh))
        if GS != 0:
            acc += part * scale_g[None, :]
        else:
            acc += part
    if GS == 0:
        acc = acc * tl.load(s_ptr + offs_n, mask=nmask, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + offs_n, mask=nmask, other=0.0)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


@dataclass
class W4A16Weight:
    """Kernel layout of one weight-only layer: the packed bytes as stored, float32 scales / zero points [N * G]."""
    data: torch.Tensor  # uint8 [N, ceil(K/2)]
    scale: torch.Tensor
    zero: torch.Tensor
    bias: torch.Tensor | None
    N: int
    K: int
    group_size: int | None

    def num_bytes(self) -> int:
        ts = [self.data, self.scale, self.zero, self.bias]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def w4a16_weight(qweight: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None, *, bits: int,
                 symmetric: bool, group_size: int | None, shape: tuple[int, int],
                 bias: torch.Tensor | None = None) -> W4A16Weight:
    """From a layer's stored buffers (no requantization). Symmetric codes are stored offset by 2^(b-1)."""
    n, k = shape
    if bits > 4:
        raise ValueError(f"the w4a16 kernel reads packed nibbles (2..4-bit weights), got {bits}-bit")
    if group_size is not None and (group_size < 16 or group_size & (group_size - 1)):
        raise ValueError(f"group size {group_size}: the w4a16 kernel needs a power of two >= 16 (or per-channel)")
    ng = 1 if group_size is None else -(-k // group_size)
    scale = w_scale.float().reshape(n, ng).contiguous().reshape(-1)
    if symmetric or w_zero is None:
        zero = torch.full((n * ng,), float(2 ** (bits - 1)), device=qweight.device)
    else:
        zero = w_zero.float().reshape(n, ng).contiguous().reshape(-1)
    data = qweight if qweight.dtype == torch.uint8 else qweight.view(torch.uint8)
    return W4A16Weight(data=data.contiguous(), scale=scale, zero=zero,
                       bias=None if bias is None else bias.detach().float().contiguous(), N=n, K=k,
                       group_size=group_size)


def _mb(m: int) -> int:
    """Autotuning bucket of M (powers of two): one tuning per bucket, not per token count."""
    return 1 << max(4, (m - 1).bit_length())


def w4a16_gemm(x: torch.Tensor, w: W4A16Weight, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (bf16 / fp16, last dim contiguous) -> y [M, N] in x's dtype."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    if k != w.K:
        raise ValueError(f"w4a16 weight has K={w.K}, input has {k}")
    y = out if out is not None else torch.empty(m, w.N, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    ng = 1 if w.group_size is None else -(-k // w.group_size)

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]), triton.cdiv(w.N, meta["BN"]))

    _w4a16_kernel[grid](x, x.stride(0), w.data, w.data.stride(0), w.scale, w.zero,
                        w.bias if w.bias is not None else w.scale, y, y.stride(0), m, w.N, k, w.data.shape[1], ng,
                        _mb(m), GS=w.group_size or 0, HAS_BIAS=w.bias is not None)
    return y
