"""bf16 activations x packed 4-bit weights (Triton): y = x @ W^T + b with W = s * (q - z) per output channel or per
group along K, read straight from the layer's storage (byte j of a row = codes 2j | 2j+1 << 4; 2- and 3-bit codes
are stored the same way). For the ``w4a16`` format: at the action expert's M ~ 51 the GEMMs are bound by weight
bytes, so reading 4 bits per weight instead of 16 is the whole point, and there is no activation kernel.

The unpacked codes minus the zero point are small integers, exact in bf16, so the tensor cores multiply x by the
integer matrix and the scales are applied to the float32 accumulator (per group: once per K step). The only
roundings are x's own dtype and the output's. Even and odd channels meet the low and high nibbles. Two kernels:

- ``natural`` (the default): x is read in whole contiguous tiles, which the software pipeline fetches
  asynchronously; the unpacked weights are interleaved back to channel order in registers (or x is split into
  its even / odd channels), and the integer zero point is subtracted in int8.
- ``stride2`` (the first version): x is read as two stride-2 halves, one per nibble. Those loads cannot be
  asynchronous, so every K step waits on them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from duquant.kernels.triton_gemm import _USE_ASM, _nibble_hi, _nibble_lo


def _cfg(bn, bm, ks, split, warps, stages):
    return triton.Config({"BN": bn, "BM": bm, "KS": ks, "SPLIT_K": split}, num_warps=warps, num_stages=stages)


# Small M (the expert: 51 tokens, 816 at batch 16 is another bucket): few output tiles, so K is split across
# programs to fill the 132 SMs; large M: ordinary tiles, no split.
_CONFIGS = [
    _cfg(64, 64, 128, 1, 4, 4), _cfg(64, 64, 128, 2, 4, 4), _cfg(64, 64, 128, 4, 4, 4), _cfg(64, 64, 256, 4, 4, 3),
    _cfg(128, 64, 128, 2, 4, 4), _cfg(128, 64, 128, 4, 8, 4), _cfg(64, 64, 128, 8, 4, 4), _cfg(32, 64, 128, 4, 4, 4),
    _cfg(128, 128, 64, 1, 8, 3), _cfg(128, 64, 64, 1, 4, 4), _cfg(64, 128, 128, 1, 4, 3), _cfg(128, 128, 128, 1, 8, 3),
]
if os.environ.get("DUQUANT_GEMM_QUICK") == "1" or os.environ.get("TRITON_INTERPRET") == "1":
    # one configuration (the interpreter cannot benchmark); the tests run it with and without split-K
    _CONFIGS = [_cfg(16, 16, 32, int(os.environ.get("DUQUANT_W4A16_SPLIT", "1")), 4, 2)]


def _bench_graph(fn, quantiles=None):
    return triton.testing.do_bench_cudagraph(fn, rep=10, quantiles=quantiles, return_mode="median")


_SPLIT_MAX_MB = 128  # split-K only for small M: its scratch grows with M * N


def _prune(configs, named_args, **kwargs):
    if named_args["MB"] <= _SPLIT_MAX_MB:
        return configs
    return [c for c in configs if c.kwargs["SPLIT_K"] == 1] or configs


@triton.jit
def _program_tile(M, N, BN: tl.constexpr, BM: tl.constexpr):
    """This program's output tile (grid axes 0 / 1: weight rows, tokens) and K split (axis 2): the program ids,
    the tile's rows and tokens, and their masks."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = pid_m * BM + tl.arange(0, BM)
    return pid_n, pid_m, pid_k, offs_n, offs_m, offs_n < N, offs_m < M


@triton.autotune(configs=_CONFIGS, key=["MB", "N", "K", "GS"], do_bench=_bench_graph, reset_to_zero=["lock_ptr"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _w4a16_kernel(x_ptr, stride_xm, w_ptr, stride_wn, s_ptr, z_ptr, b_ptr, y_ptr, stride_ym, ws_ptr, lock_ptr,
                  M, N, K, KH, NG, MB,
                  GS: tl.constexpr, HAS_BIAS: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, KS: tl.constexpr,
                  SPLIT_K: tl.constexpr):
    """acc[BN, BM] = W[BN, K-range] . x[BM, K-range]^T: the weights are the MMA's A operand (rows of N fill the
    64-row MMA even when M is 51). With SPLIT_K > 1 each program takes a K range, writes its float32 partial, and
    the last program of an output tile to arrive (a counter per tile) adds the partials in split order: one
    launch, and the same sum every run (no atomics on the data)."""
    pid_n, pid_m, pid_k, offs_n, offs_m, nmask, mmask = _program_tile(M, N, BN, BM)
    STEP: tl.constexpr = KS if (GS == 0 or KS <= GS) else GS  # a K step never straddles two scale groups
    jj = tl.arange(0, STEP // 2)
    steps = tl.cdiv(K, STEP)
    per_split = tl.cdiv(steps, SPLIT_K)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    if GS == 0:
        zero = tl.load(z_ptr + offs_n, mask=nmask, other=0.0)
    xrow = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    wrow = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    for kb in range(pid_k * per_split, tl.minimum(steps, (pid_k + 1) * per_split)):
        byte = kb * (STEP // 2) + jj
        ke = 2 * byte
        xe = tl.load(xrow + ke[None, :], mask=mmask[:, None] & (ke < K)[None, :], other=0.0)
        xo = tl.load(xrow + ke[None, :] + 1, mask=mmask[:, None] & (ke + 1 < K)[None, :], other=0.0)
        wb = tl.load(wrow + byte[None, :], mask=nmask[:, None] & (byte < KH)[None, :], other=0).to(tl.int32)
        if GS != 0:
            g = (kb * STEP) // GS
            zero = tl.load(z_ptr + offs_n * NG + g, mask=nmask, other=0.0)
            scale_g = tl.load(s_ptr + offs_n * NG + g, mask=nmask, other=0.0)
        wl = ((wb & 15).to(tl.float32) - zero[:, None]).to(xe.dtype)  # small integers: exact
        wh = ((wb >> 4).to(tl.float32) - zero[:, None]).to(xe.dtype)
        part = tl.dot(wl, tl.trans(xe)) + tl.dot(wh, tl.trans(xo))
        if GS != 0:
            acc += part * scale_g[:, None]
        else:
            acc += part
    _finish(acc, s_ptr, b_ptr, y_ptr, stride_ym, ws_ptr, lock_ptr, offs_n, offs_m, nmask, mmask, pid_n, pid_m, pid_k,
            GS, HAS_BIAS, BN, BM, SPLIT_K)


def _ncfg(bn, bm, bk, split, ilv, warps, stages):
    return triton.Config({"BN": bn, "BM": bm, "BK": bk, "SPLIT_K": split, "ILV": ilv}, num_warps=warps,
                         num_stages=stages)


_NAT_CONFIGS = [
    _ncfg(64, 64, 128, 1, 0, 4, 4), _ncfg(64, 64, 128, 2, 0, 4, 4), _ncfg(64, 64, 128, 4, 0, 4, 4),
    _ncfg(64, 64, 256, 1, 0, 4, 3), _ncfg(64, 64, 256, 2, 0, 4, 3), _ncfg(128, 64, 128, 1, 0, 4, 4),
    _ncfg(128, 64, 128, 2, 0, 8, 4), _ncfg(64, 64, 128, 1, 1, 4, 4), _ncfg(64, 64, 128, 4, 1, 4, 4),
    _ncfg(128, 128, 64, 1, 0, 8, 3), _ncfg(128, 128, 128, 1, 0, 8, 3), _ncfg(64, 128, 128, 1, 0, 4, 3),
]
if os.environ.get("DUQUANT_GEMM_QUICK") == "1" or os.environ.get("TRITON_INTERPRET") == "1":
    _NAT_CONFIGS = [_ncfg(16, 16, 32, int(os.environ.get("DUQUANT_W4A16_SPLIT", "1")),
                          int(os.environ.get("DUQUANT_W4A16_ILV", "0")), 4, 2)]


@triton.autotune(configs=_NAT_CONFIGS, key=["MB", "N", "K", "GS"], do_bench=_bench_graph, reset_to_zero=["lock_ptr"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _w4a16_natural_kernel(x_ptr, stride_xm, w_ptr, stride_wn, s_ptr, z_ptr, b_ptr, y_ptr, stride_ym, ws_ptr,
                          lock_ptr, M, N, K, KH, NG, MB,
                          GS: tl.constexpr, HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr, BN: tl.constexpr,
                          BM: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, ILV: tl.constexpr):
    """The same product with x read in its natural order, whole contiguous [BM, BK] tiles (which the pipeliner can
    fetch asynchronously; the stride-2 halves of ``_w4a16_kernel`` cannot be). The nibbles are pulled apart with
    one AND / one SHIFT+AND per 4 bytes and the integer zero point is subtracted in int8 (codes - zero is within
    +-15); then either the weights are interleaved back to channel order in registers (ILV = 0: one MMA per step,
    the weights as its register A operand) or x is split into its even / odd channels (ILV = 1: two MMAs)."""
    pid_n, pid_m, pid_k, offs_n, offs_m, nmask, mmask = _program_tile(M, N, BN, BM)
    STEP: tl.constexpr = BK if (GS == 0 or BK <= GS) else GS  # a K step never straddles two scale groups
    kk = tl.arange(0, STEP)
    jj = tl.arange(0, STEP // 2)
    steps = tl.cdiv(K, STEP)
    per_split = tl.cdiv(steps, SPLIT_K)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    if GS == 0:
        zero = tl.load(z_ptr + offs_n, mask=nmask, other=0.0).to(tl.int8)
    xrow = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    wrow = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    for kb in range(pid_k * per_split, tl.minimum(steps, (pid_k + 1) * per_split)):
        k = kb * STEP + kk
        x = tl.load(xrow + k[None, :], mask=mmask[:, None] & (k < K)[None, :], other=0.0)
        byte = kb * (STEP // 2) + jj
        p = tl.load(wrow + byte[None, :], mask=nmask[:, None] & (byte < KH)[None, :], other=0)
        if GS != 0:
            g = (kb * STEP) // GS
            zero = tl.load(z_ptr + offs_n * NG + g, mask=nmask, other=0.0).to(tl.int8)
            scale_g = tl.load(s_ptr + offs_n * NG + g, mask=nmask, other=0.0)
        lo = (_nibble_lo(p, USE_ASM) - zero[:, None]).to(x.dtype)  # small integers: exact
        hi = (_nibble_hi(p, USE_ASM) - zero[:, None]).to(x.dtype)
        if ILV == 0:
            part = tl.dot(tl.join(lo, hi).reshape(BN, STEP), tl.trans(x))
        else:
            xe, xo = tl.split(x.reshape(BM, STEP // 2, 2))
            part = tl.dot(lo, tl.trans(xe))
            part = tl.dot(hi, tl.trans(xo), part)
        if GS != 0:
            acc += part * scale_g[:, None]
        else:
            acc += part
    _finish(acc, s_ptr, b_ptr, y_ptr, stride_ym, ws_ptr, lock_ptr, offs_n, offs_m, nmask, mmask, pid_n, pid_m, pid_k,
            GS, HAS_BIAS, BN, BM, SPLIT_K)


@triton.jit
def _finish(acc, s_ptr, b_ptr, y_ptr, stride_ym, ws_ptr, lock_ptr, offs_n, offs_m, nmask, mmask, pid_n, pid_m, pid_k,
            GS: tl.constexpr, HAS_BIAS: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, SPLIT_K: tl.constexpr):
    """Store the tile, or with SPLIT_K > 1 write this program's float32 partial and let the last program of the
    tile to arrive (a counter per tile) add the partials in split order: one launch, and the same sum every run
    (no atomics on the data)."""
    if SPLIT_K > 1:
        tile = pid_m * tl.num_programs(0) + pid_n
        tile_elems = BN * BM
        wsp = ws_ptr + tile.to(tl.int64) * (SPLIT_K * tile_elems) + tl.arange(0, BN)[:, None] * BM \
            + tl.arange(0, BM)[None, :]
        tl.store(wsp + pid_k * tile_elems, acc)
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # the last partial of this tile: sum them in split order, finish, rearm
            acc = tl.load(wsp, cache_modifier=".cg")
            for s in range(1, SPLIT_K):
                acc += tl.load(wsp + s * tile_elems, cache_modifier=".cg")
            _epilogue(acc, s_ptr, b_ptr, y_ptr, stride_ym, offs_n, offs_m, nmask, mmask, GS, HAS_BIAS)
            tl.atomic_xchg(lock_ptr + tile, 0)
    else:
        _epilogue(acc, s_ptr, b_ptr, y_ptr, stride_ym, offs_n, offs_m, nmask, mmask, GS, HAS_BIAS)


@triton.jit
def _epilogue(acc, s_ptr, b_ptr, y_ptr, stride_ym, offs_n, offs_m, nmask, mmask, GS: tl.constexpr,
              HAS_BIAS: tl.constexpr):
    if GS == 0:
        acc = acc * tl.load(s_ptr + offs_n, mask=nmask, other=0.0)[:, None]
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + offs_n, mask=nmask, other=0.0)[:, None]
    tl.store(y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=nmask[:, None] & mmask[None, :])


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
    if not torch.equal(zero, zero.round()):
        raise ValueError("the w4a16 kernel subtracts integer zero points (as quantize_weight makes them)")
    data = qweight if qweight.dtype == torch.uint8 else qweight.view(torch.uint8)
    return W4A16Weight(data=data.contiguous(), scale=scale, zero=zero,
                       bias=None if bias is None else bias.detach().float().contiguous(), N=n, K=k,
                       group_size=group_size)


def _mb(m: int) -> int:
    """Autotuning bucket of M (powers of two): one tuning per bucket, not per token count."""
    return 1 << max(4, (m - 1).bit_length())


IMPLS = ("natural", "stride2")
# "natural" (whole x tiles, interleaved weights) unless DUQUANT_W4A16_IMPL says otherwise; the choice is measured in
# BENCHMARKS.md section 9 (bench/w4a16_sweep.py)
DEFAULT_IMPL = "natural"


def w4a16_gemm(x: torch.Tensor, w: W4A16Weight, out: torch.Tensor | None = None,
               impl: str | None = None) -> torch.Tensor:
    """x [M, K] (bf16 / fp16, last dim contiguous) -> y [M, N] in x's dtype."""
    impl = impl or os.environ.get("DUQUANT_W4A16_IMPL", DEFAULT_IMPL)
    if impl not in IMPLS:
        raise ValueError(f"unknown w4a16 kernel {impl!r}: one of {', '.join(IMPLS)} (DUQUANT_W4A16_IMPL)")
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    if k != w.K:
        raise ValueError(f"w4a16 weight has K={w.K}, input has {k}")
    y = out if out is not None else torch.empty(m, w.N, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    ng = 1 if w.group_size is None else -(-k // w.group_size)
    ws, lock = _split_buffers(w.N, m, x.device)

    def grid(meta):
        return (triton.cdiv(w.N, meta["BN"]), triton.cdiv(m, meta["BM"]), meta["SPLIT_K"])

    args = (x, x.stride(0), w.data, w.data.stride(0), w.scale, w.zero, w.bias if w.bias is not None else w.scale, y,
            y.stride(0), ws, lock, m, w.N, k, w.data.shape[1], ng, _mb(m))
    if impl == "natural":
        _w4a16_natural_kernel[grid](*args, GS=w.group_size or 0, HAS_BIAS=w.bias is not None, USE_ASM=_USE_ASM)
    else:
        _w4a16_kernel[grid](*args, GS=w.group_size or 0, HAS_BIAS=w.bias is not None)
    return y


_SCRATCH: dict = {}  # device -> (partials, tile counters), shared by every layer (one stream: launches never overlap)


def _split_buffers(n: int, m: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K scratch (float32 partials of every output tile) and tile counters for an [m, n] output, grown to the
    largest call seen and allocated outside CUDA-graph capture (the first eager call at a batch size); the counters
    rearm themselves. Sized for the largest split configuration of _CONFIGS (tiles of at most 128 x 64, 8 splits);
    large M runs no split (_prune) and gets the smallest buffers."""
    if _mb(m) > _SPLIT_MAX_MB:
        need_ws, tiles = 1, 1
    else:
        split = max(c.kwargs["SPLIT_K"] for c in _CONFIGS + _NAT_CONFIGS)
        need_ws = triton.cdiv(n, 128) * 128 * triton.cdiv(m, 64) * 64 * split
        tiles = triton.cdiv(n, 16) * triton.cdiv(m, 16)
    ws, lock = _SCRATCH.get(device, (None, None))
    if ws is None or ws.numel() < need_ws or lock.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("w4a16: run the layer once eagerly at this batch size before capturing a CUDA graph "
                               "(its split-K scratch is allocated on the first call)")
        ws = torch.empty(max(need_ws, 0 if ws is None else ws.numel()), dtype=torch.float32, device=device)
        lock = torch.zeros(max(tiles, 0 if lock is None else lock.numel()), dtype=torch.int32, device=device)
        _SCRATCH[device] = (ws, lock)
    return ws, lock
