"""Fused DuQuant activation kernel (Triton): smooth -> block rotation -> permutation -> block rotation ->
per-token min/max (or absmax) -> int8 codes + per-token scale (+ zero) + per-token code sum.

One program owns BM whole tokens: it reads them once, keeps the row tile in registers through both rotations and
the permutation (a ``tl.gather`` along the row), reduces the row statistics, and writes the codes once. The block
rotations are one ``tl.dot`` of the [BM*NB, BS] view with the block matrix; DuQuant (and block Hadamard) share one
matrix across all full blocks, and a narrower last block (K % bs != 0) gets a second one, selected per row of
the view. Transforms whose full blocks do not share a matrix are quantized after an eager torch transform
(``ActPlan.fused`` is False); same numerics, not fused.

Numerics follow ``reference.act_quant``: the rotations run on the tensor cores in ``precision`` ("tf32" by
default; "ieee" or "tf32x3" for a bit-faithful transform), the scale / zero / code arithmetic is IEEE (div_rn,
round-half-even) so identical transformed values give identical codes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from duquant.transform import is_shuffle_permutation

try:  # the interpreter (TRITON_INTERPRET=1, CPU) has no libdevice
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    libdevice = None

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _rint(v, USE_LIBDEVICE: tl.constexpr):
    if USE_LIBDEVICE:
        r = libdevice.rint(v)
    else:  # round half to even by the 1.5*2^23 trick, exact for |v| < 2^22
        r = tl.where(tl.abs(v) < 4194304.0, (v + 12582912.0) - 12582912.0, v)
    return r


@triton.jit
def _int8_scale(lo, hi, clip, SYMMETRIC: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """Per-token scale and zero point of ``reference.act_quant`` from the token's statistics: symmetric, `hi` is
    the absmax (zero 0, unused); asymmetric, `lo` / `hi` are min / max, both clipped by `clip`."""
    if SYMMETRIC:
        scale = tl.minimum(tl.maximum(tl.div_rn(hi * clip, 127.0), 1e-8), 1e8)
        zero = scale * 0.0
    else:
        mn = lo * clip
        mx = hi * clip
        scale = tl.minimum(tl.maximum(tl.div_rn(mx - mn, 255.0), 1e-8), 1e8)
        zero = _rint(tl.div_rn(-mn, scale), USE_LIBDEVICE)
    return scale, zero


@triton.jit
def _int8_quantize(y, scale, zero, SYMMETRIC: tl.constexpr, EXACT_DIV: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """Codes of `y` in their stored form, as float: symmetric clamp(round(y/s), -127, 127), asymmetric
    clamp(round(y/s) + z, 0, 255) - 128; `scale` / `zero` broadcast against y. EXACT_DIV: IEEE division, else
    y * (1/s)."""
    if EXACT_DIV:
        v = tl.div_rn(y, scale)
    else:
        v = y * tl.div_rn(1.0, scale)
    q = _rint(v, USE_LIBDEVICE)
    if SYMMETRIC:
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    else:
        q = tl.minimum(tl.maximum(q + zero, 0.0), 255.0) - 128.0
    return q


@triton.jit
def _load_mats(r_ptr, BS: tl.constexpr, TWO: tl.constexpr, LOWP: tl.constexpr):
    """The block matrix (and the last block's own when TWO), row-major [k, n]; bf16 when LOWP."""
    kk = tl.arange(0, BS)
    r0 = tl.load(r_ptr + kk[:, None] * BS + kk[None, :])
    if TWO:
        r1 = tl.load(r_ptr + BS * BS + kk[:, None] * BS + kk[None, :])
    else:
        r1 = r0
    if LOWP:
        r0 = r0.to(tl.bfloat16)
        r1 = r1.to(tl.bfloat16)
    return r0, r1


@triton.jit
def _block_rotate(x, r0, r1, last_block, BM: tl.constexpr, KP: tl.constexpr, BS: tl.constexpr,
                  TWO: tl.constexpr, PRECISION: tl.constexpr, LOWP: tl.constexpr):
    """x [BM, KP] -> per block of BS channels, x_b @ R: one dot of the [BM*NB, BS] view."""
    NB: tl.constexpr = KP // BS
    xb = tl.reshape(x, (BM * NB, BS))
    if LOWP:
        xb = xb.to(tl.bfloat16)
        y = tl.dot(xb, r0)
    else:
        y = tl.dot(xb, r0, input_precision=PRECISION)
    if TWO:
        if LOWP:
            y1 = tl.dot(xb, r1)
        else:
            y1 = tl.dot(xb, r1, input_precision=PRECISION)
        blk = tl.arange(0, BM * NB) % NB
        y = tl.where((blk == last_block)[:, None], y1, y)
    return tl.reshape(y, (BM, KP))


@triton.jit
def _act_quant_kernel(
    x_ptr, stride_xm, M, K,
    inv_s_ptr, r1_ptr, r2_ptr, perm_ptr, dest_ptr, scratch_ptr,
    codes_ptr, stride_cm, scale_ptr, zero_ptr, rowsum_ptr,
    clip, last_block,
    BM: tl.constexpr, KP: tl.constexpr, BS: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, HAS_R1: tl.constexpr, R1_TWO: tl.constexpr, HAS_PERM: tl.constexpr,
    HAS_R2: tl.constexpr, R2_TWO: tl.constexpr, SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr,
    LOWP: tl.constexpr, EXACT_DIV: tl.constexpr, USE_LIBDEVICE: tl.constexpr, HOIST: tl.constexpr,
):
    """Persistent: each program loads the block matrices once and walks row tiles pid, pid + nprog, ..."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, KP)
    cmask = cols < K
    valid = cmask[None, :]
    if HOIST:  # matrices loaded once per program (register-resident across tiles)
        if HAS_R1:
            a0, a1 = _load_mats(r1_ptr, BS, R1_TWO, LOWP)
        if HAS_R2:
            b0, b1 = _load_mats(r2_ptr, BS, R2_TWO, LOWP)
    if HAS_SMOOTH:
        inv_s = tl.load(inv_s_ptr + cols)
    if HAS_PERM:
        src = tl.load(perm_ptr + cols)  # x_new[:, p] = x[:, perm[p]]
    dest = tl.load(dest_ptr + cols)
    for tile in range(pid, tl.cdiv(M, BM), nprog):
        rows = tile * BM + tl.arange(0, BM)
        rmask = rows < M
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = x * inv_s[None, :]
        if HAS_R1:
            if not HOIST:
                a0, a1 = _load_mats(r1_ptr, BS, R1_TWO, LOWP)
            x = _block_rotate(x, a0, a1, last_block, BM, KP, BS, R1_TWO, PRECISION, LOWP)
        if HAS_PERM:  # through a cache-resident scratch row: store in order, gather back permuted
            srow = scratch_ptr + (pid * BM + tl.arange(0, BM))[:, None].to(tl.int64) * KP
            tl.debug_barrier()
            tl.store(srow + cols[None, :], x)
            tl.debug_barrier()
            x = tl.load(srow + src[None, :])
        if HAS_R2:
            if not HOIST:
                b0, b1 = _load_mats(r2_ptr, BS, R2_TWO, LOWP)
            x = _block_rotate(x, b0, b1, last_block, BM, KP, BS, R2_TWO, PRECISION, LOWP)

        if SYMMETRIC:
            scale, zero = _int8_scale(0.0, tl.max(tl.where(valid, tl.abs(x), 0.0), axis=1), clip, SYMMETRIC,
                                      USE_LIBDEVICE)
        else:
            scale, zero = _int8_scale(tl.min(tl.where(valid, x, float("inf")), axis=1),
                                      tl.max(tl.where(valid, x, float("-inf")), axis=1), clip, SYMMETRIC,
                                      USE_LIBDEVICE)
        qi = _int8_quantize(x, scale[:, None], zero[:, None], SYMMETRIC, EXACT_DIV, USE_LIBDEVICE).to(tl.int32)
        smask = rmask[:, None] & (dest >= 0)[None, :]
        tl.store(codes_ptr + rows[:, None].to(tl.int64) * stride_cm + dest[None, :], qi.to(tl.int8), mask=smask)
        tl.store(scale_ptr + rows, scale, mask=rmask)
        if not SYMMETRIC:
            tl.store(zero_ptr + rows, zero - 128.0, mask=rmask)
        tl.store(rowsum_ptr + rows, tl.sum(tl.where(smask, qi, 0), axis=1), mask=rmask)

# ---- three-kernel variant: full parallelism over (row tile, block) ----------------------------------------------

@triton.jit
def _block_matrix(r_ptr, pid_b, last_block, BS: tl.constexpr, TWO: tl.constexpr):
    kk = tl.arange(0, BS)
    off = r_ptr
    if TWO:
        off = r_ptr + (pid_b == last_block).to(tl.int32) * (BS * BS)
    return tl.load(off + kk[:, None] * BS + kk[None, :])


@triton.jit
def _rot1_scatter_kernel(x_ptr, stride_xm, M, K, inv_s_ptr, r1_ptr, perm_ptr, y1_ptr, last_block,
                         BM: tl.constexpr, BS: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_R1: tl.constexpr,
                         R1_TWO: tl.constexpr, HAS_PERM: tl.constexpr, PRECISION: tl.constexpr):
    """y1[:, inv[c]] = ((x / s) @ R1_block)[:, c] for one (row tile, block)."""
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_b * BS + tl.arange(0, BS)
    m2 = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        x = x * tl.load(inv_s_ptr + cols)[None, :]
    if HAS_R1:
        x = tl.dot(x, _block_matrix(r1_ptr, pid_b, last_block, BS, R1_TWO), input_precision=PRECISION)
    if HAS_PERM:
        dest = tl.load(perm_ptr + cols)
    else:
        dest = cols
    tl.store(y1_ptr + rows[:, None].to(tl.int64) * K + dest[None, :], x, mask=m2)


@triton.jit
def _rot2_block(y1_ptr, rows, cols, M, K, r2_ptr, pid_b, last_block, BS: tl.constexpr, HAS_R2: tl.constexpr,
                R2_TWO: tl.constexpr, PRECISION: tl.constexpr):
    m2 = (rows < M)[:, None] & (cols < K)[None, :]
    y = tl.load(y1_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=m2, other=0.0)
    if HAS_R2:
        y = tl.dot(y, _block_matrix(r2_ptr, pid_b, last_block, BS, R2_TWO), input_precision=PRECISION)
    return y


@triton.jit
def _rot2_stats_kernel(y1_ptr, M, K, r2_ptr, lo_ptr, hi_ptr, NBP, last_block,
                       BM: tl.constexpr, BS: tl.constexpr, HAS_R2: tl.constexpr, R2_TWO: tl.constexpr,
                       SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr):
    """Per (row, block) min / max (or absmax) of y2 = y1_block @ R2."""
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_b * BS + tl.arange(0, BS)
    y = _rot2_block(y1_ptr, rows, cols, M, K, r2_ptr, pid_b, last_block, BS, HAS_R2, R2_TWO, PRECISION)
    valid = (cols < K)[None, :]
    rmask = rows < M
    if SYMMETRIC:
        tl.store(hi_ptr + rows * NBP + pid_b, tl.max(tl.where(valid, tl.abs(y), 0.0), axis=1), mask=rmask)
    else:
        tl.store(lo_ptr + rows * NBP + pid_b, tl.min(tl.where(valid, y, float("inf")), axis=1), mask=rmask)
        tl.store(hi_ptr + rows * NBP + pid_b, tl.max(tl.where(valid, y, float("-inf")), axis=1), mask=rmask)


@triton.jit
def _quant_kernel(y1_ptr, M, K, r2_ptr, lo_ptr, hi_ptr, NBP, NB, last_block, dest_ptr, codes_ptr, stride_cm,
                  scale_ptr, zero_ptr, rowsum_ptr, clip,
                  BM: tl.constexpr, BS: tl.constexpr, NBP2: tl.constexpr, HAS_R2: tl.constexpr,
                  R2_TWO: tl.constexpr, SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr,
                  EXACT_DIV: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """Row statistics -> scale / zero; recompute y2 for the block, quantize, store codes (+ row sums)."""
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < M
    bidx = tl.arange(0, NBP2)
    smask = rmask[:, None] & (bidx < NB)[None, :]
    hi = tl.max(tl.load(hi_ptr + rows[:, None] * NBP + bidx[None, :], mask=smask, other=0.0 if SYMMETRIC else
                        float("-inf")), axis=1)
    if SYMMETRIC:
        scale, zero = _int8_scale(0.0, hi, clip, SYMMETRIC, USE_LIBDEVICE)
    else:
        lo = tl.min(tl.load(lo_ptr + rows[:, None] * NBP + bidx[None, :], mask=smask, other=float("inf")), axis=1)
        scale, zero = _int8_scale(lo, hi, clip, SYMMETRIC, USE_LIBDEVICE)
    cols = pid_b * BS + tl.arange(0, BS)
    y = _rot2_block(y1_ptr, rows, cols, M, K, r2_ptr, pid_b, last_block, BS, HAS_R2, R2_TWO, PRECISION)
    qi = _int8_quantize(y, scale[:, None], zero[:, None], SYMMETRIC, EXACT_DIV, USE_LIBDEVICE).to(tl.int32)
    dest = tl.load(dest_ptr + cols, mask=cols < K, other=-1)
    m2 = rmask[:, None] & (dest >= 0)[None, :]
    tl.store(codes_ptr + rows[:, None].to(tl.int64) * stride_cm + dest[None, :], qi.to(tl.int8), mask=m2)
    tl.atomic_add(rowsum_ptr + rows, tl.sum(tl.where(m2, qi, 0), axis=1), mask=rmask)
    if pid_b == 0:
        tl.store(scale_ptr + rows, scale, mask=rmask)
        if not SYMMETRIC:
            tl.store(zero_ptr + rows, zero - 128.0, mask=rmask)

_SMS: dict = {}


def multiprocessors(device) -> int:
    """The device's multiprocessor count, cached (2 under the interpreter or off CUDA: a small persistent grid)."""
    if _INTERPRET or torch.device(device).type != "cuda":
        return 2
    key = str(device)
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[key]


def _max_programs(device) -> int:
    """Persistent grid size: a few programs per multiprocessor (DUQUANT_ACT_PROGRAMS overrides)."""
    env = os.environ.get("DUQUANT_ACT_PROGRAMS")
    if env:
        return int(env)
    return 2 * multiprocessors(device)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass
class ActPlan:
    """Kernel-ready layout of one LayerTransform (built once per shared input group)."""
    K: int
    KP: int
    BS: int
    fused: bool
    transform: object
    inv_smooth: torch.Tensor | None = None
    r1: torch.Tensor | None = None  # [1 or 2, BS, BS] row-major
    r2: torch.Tensor | None = None
    perm: torch.Tensor | None = None  # [KP] int32, the inverse permutation (identity on padding)
    perm_fwd: torch.Tensor | None = None  # [KP] int32, the permutation itself (identity on padding)
    last_block: int = -1
    shuffle_piece: int = 0  # G when perm is the shuffle permutation (triton_act_tile's transpose mode), else 0
    dest_natural: torch.Tensor | None = None
    dest_split: torch.Tensor | None = None
    reason: str = ""

    def dest(self, layout: str) -> torch.Tensor:
        return self.dest_split if layout == "split" else self.dest_natural

    def num_bytes(self) -> int:
        """Bytes of the plan's tensors, and of the kernel-dtype copies the kernels cached on it (fp16 matrices,
        padded tables: ``_tile_mats``, ``_folded_mats``, ``_tile_tables``)."""
        ts = [self.inv_smooth, self.r1, self.r2, self.perm, self.perm_fwd, self.dest_natural, self.dest_split]
        for name in ("_tile_mats", "_folded_mats", "_tile_tables"):
            for v in self.__dict__.get(name, {}).values():
                ts += list(v.values()) if isinstance(v, dict) else list(v) if isinstance(v, tuple) else [v]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _shared_matrices(rot: torch.Tensor, k: int, bs: int) -> tuple[torch.Tensor, bool] | None:
    """[nb, bs, bs] -> ([1 or 2, bs, bs], two) when all full blocks share one matrix, else None.
    A narrower last block (r = k % bs) gets its own matrix: the top-left r x r of rot[-1], identity elsewhere, so
    its zero-padded channels stay zero through both rotations."""
    full, r = k // bs, k % bs
    if full and not all(torch.equal(rot[i], rot[0]) for i in range(1, full)):
        return None

    def corner(m: torch.Tensor) -> torch.Tensor:
        out = torch.eye(bs, dtype=torch.float32, device=rot.device)
        out[:r, :r] = m[:r, :r].float()
        return out

    mats = [rot[0].float()] if full else [corner(rot[-1])]
    if full and r:
        mats.append(corner(rot[-1]))
    return torch.stack(mats).contiguous(), len(mats) == 2


def _dest_tables(k: int, kp: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.arange(kp, device=device, dtype=torch.int64)
    natural = torch.where(c < k, c, -1).to(torch.int32)
    kh = -(-k // 2)
    split = torch.where(c % 2 == 0, c // 2, kh + c // 2)
    split = torch.where(c < k, split, -1).to(torch.int32)
    return natural.contiguous(), split.contiguous()


def build_act_plan(transform, in_features: int, device) -> ActPlan:
    """Kernel layout of a LayerTransform (or None = identity): small tensors only, built once."""
    k = int(in_features)
    t = transform
    bs = int(getattr(t, "block_size", 128) or 128) if t is not None else 128
    bsp = max(16, _next_pow2(bs))
    has_rot = t is not None and (t.rot1 is not None or t.rot2 is not None)
    reason = ""
    fused = True
    if has_rot and bsp != bs:
        fused, reason = False, f"block size {bs} is not a power of two"
    kp = max(_next_pow2(k), bsp if has_rot else 16)
    nat, split = _dest_tables(k, kp, device)
    plan = ActPlan(K=k, KP=kp, BS=bsp, fused=fused, transform=t, dest_natural=nat, dest_split=split,
                   reason=reason)
    if t is None or not fused:
        return plan
    if t.smooth is not None:
        inv = torch.zeros(kp, dtype=torch.float32, device=device)
        inv[:k] = 1.0 / t.smooth.float().to(device)
        plan.inv_smooth = inv
    nb = -(-k // bs)
    for name in ("rot1", "rot2"):
        rot = getattr(t, name)
        if rot is None:
            continue
        got = _shared_matrices(rot.to(device), k, bs)
        if got is None:
            plan.fused, plan.reason = False, f"{name} does not share one matrix across full blocks"
            return plan
        mats, two = got
        setattr(plan, name.replace("rot", "r"), mats)
        if two:
            plan.last_block = nb - 1
    if t.perm is not None:  # the kernel scatters channel c to position inv[c] (x_new = x[..., perm])
        inv = torch.arange(kp, dtype=torch.int32, device=device)
        inv[t.perm.to(device=device, dtype=torch.long)] = torch.arange(k, dtype=torch.int32, device=device)
        plan.perm = inv
        fwd = torch.arange(kp, dtype=torch.int32, device=device)
        fwd[:k] = t.perm.to(device=device, dtype=torch.int32)
        plan.perm_fwd = fwd
        # decided here, once and outside any CUDA graph capture (the check reads the permutation on the host)
        if bsp == bs and is_shuffle_permutation(t):
            plan.shuffle_piece = bs // (k // bs)
    return plan


def _launch_config(m: int, kp: int, bs: int, has_rot: bool) -> tuple[int, int]:
    """Rows per program and warps, from the H100 sweep (BENCHMARKS.md): the [BM*NB, BS] rotation view gets the
    16 rows an MMA needs and a program holds <= 4K row values when it can (K <= 2048: 2 rows, 8 warps)."""
    nb = kp // bs
    if has_rot:
        bm = max(_next_pow2(max(1, -(-16 // nb))), min(2, max(1, 4096 // kp)))
    else:
        bm = max(1, 4096 // kp)
    warps = 8 if bm * kp >= 2048 else 4
    env = os.environ.get("DUQUANT_ACT_CONFIG")  # "BM,WARPS" override for tuning
    if env:
        a, b = env.split(",")
        bm, warps = int(a), int(b)
    return bm, warps


def act_quant(x: torch.Tensor, plan: ActPlan, *, symmetric: bool = False, clip: float = 1.0,
              layout: str = "natural", precision: str = "tf32", exact_div: bool = True,
              block_m: int | None = None, num_warps: int | None = None, impl: str | None = None,
              disable: tuple = (), hoist: bool | None = None, programs: int | None = None):
    """x [M, K] (bf16/fp16/fp32, last dim contiguous) -> (codes int8 [M, Kc], scale f32 [M], zero f32 [M] | None,
    rowsum int32 [M]). layout "natural": Kc = K; "split": even channels then odd ones (Kc = 2*ceil(K/2)), the
    order the packed-int4 GEMM reads."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    if k != plan.K:
        raise ValueError(f"activation kernel built for K={plan.K}, got input with {k} channels")
    if not plan.fused:  # eager transform, then the same kernel with no transform
        x = plan.transform.apply(x.float()).contiguous()
        flags = dict(HAS_SMOOTH=False, HAS_R1=False, R1_TWO=False, HAS_PERM=False, HAS_R2=False, R2_TWO=False)
    else:
        flags = dict(HAS_SMOOTH=plan.inv_smooth is not None, HAS_R1=plan.r1 is not None,
                     R1_TWO=plan.r1 is not None and plan.r1.shape[0] == 2, HAS_PERM=plan.perm is not None,
                     HAS_R2=plan.r2 is not None, R2_TWO=plan.r2 is not None and plan.r2.shape[0] == 2)
    for f in disable:  # ablation switches for benchmarks only (wrong numerics)
        flags[f] = False
    impl = impl or os.environ.get("DUQUANT_ACT_IMPL", "fused")
    kc = k if layout == "natural" else 2 * (-(-k // 2))
    dev = x.device
    codes = torch.empty(m, kc, dtype=torch.int8, device=dev) if kc == k else \
        torch.zeros(m, kc, dtype=torch.int8, device=dev)
    scale = torch.empty(m, dtype=torch.float32, device=dev)
    zero = None if symmetric else torch.empty(m, dtype=torch.float32, device=dev)
    rowsum = torch.empty(m, dtype=torch.int32, device=dev) if impl == "fused" else \
        torch.zeros(m, dtype=torch.int32, device=dev)
    if m == 0:
        return codes, scale, zero, rowsum
    use_libdevice = not _INTERPRET and libdevice is not None
    if impl == "split":
        _act_quant_split(x, plan, flags, codes, scale, zero, rowsum, symmetric, clip, layout, precision, exact_div,
                         use_libdevice, block_m, num_warps)
        return codes, scale, zero, rowsum
    has_rot = flags["HAS_R1"] or flags["HAS_R2"]
    bm, warps = _launch_config(m, plan.KP, plan.BS, has_rot)
    if block_m is not None:
        bm = block_m
    if num_warps is not None:
        warps = num_warps
    dummy = plan.dest_natural
    nprog = min(triton.cdiv(m, bm), programs or _max_programs(dev))
    grid = (nprog,)
    scratch = torch.empty(nprog * bm, plan.KP, dtype=torch.float32, device=dev) if flags["HAS_PERM"] else scale
    _act_quant_kernel[grid](
        x, x.stride(0), m, k,
        plan.inv_smooth if flags["HAS_SMOOTH"] else dummy,
        plan.r1 if flags["HAS_R1"] else dummy,
        plan.r2 if flags["HAS_R2"] else dummy,
        plan.perm_fwd if flags["HAS_PERM"] else dummy,
        plan.dest(layout), scratch,
        codes, codes.stride(0), scale, zero if zero is not None else scale, rowsum,
        float(clip), int(plan.last_block),
        BM=bm, KP=plan.KP, BS=plan.BS, SYMMETRIC=bool(symmetric),
        PRECISION="tf32" if precision == "bf16" else precision, LOWP=precision == "bf16",
        EXACT_DIV=bool(exact_div), USE_LIBDEVICE=use_libdevice,
        HOIST=bool(plan.KP <= 4096 if hoist is None else hoist),
        num_warps=warps, **flags,
    )
    return codes, scale, zero, rowsum


def _act_quant_split(x, plan, flags, codes, scale, zero, rowsum, symmetric, clip, layout, precision, exact_div,
                     use_libdevice, block_m, num_warps):
    """Three launches, each over (row tile, channel block): rot1 + scatter to the permuted order, rot2 + per-block
    statistics, then rot2 again + quantize (y1 round-trips through an L2-resident float32 buffer)."""
    m, k = x.shape
    bs = plan.BS if (flags["HAS_R1"] or flags["HAS_R2"]) else min(128, plan.KP)
    nb = triton.cdiv(k, bs)
    bm = block_m or (64 if m >= 64 else max(16, _next_pow2(m)))
    warps = num_warps or 4
    dev = x.device
    y1 = torch.empty(m, k, dtype=torch.float32, device=dev)
    nbp = nb
    lo = torch.empty(m, nbp, dtype=torch.float32, device=dev)
    hi = torch.empty(m, nbp, dtype=torch.float32, device=dev)
    grid = (triton.cdiv(m, bm), nb)
    dummy = plan.dest_natural
    _rot1_scatter_kernel[grid](
        x, x.stride(0), m, k, plan.inv_smooth if flags["HAS_SMOOTH"] else dummy,
        plan.r1 if flags["HAS_R1"] else dummy, plan.perm if flags["HAS_PERM"] else dummy, y1, int(plan.last_block),
        BM=bm, BS=bs, HAS_SMOOTH=flags["HAS_SMOOTH"], HAS_R1=flags["HAS_R1"], R1_TWO=flags["R1_TWO"],
        HAS_PERM=flags["HAS_PERM"], PRECISION=precision, num_warps=warps)
    r2 = plan.r2 if flags["HAS_R2"] else dummy
    _rot2_stats_kernel[grid](
        y1, m, k, r2, lo, hi, nbp, int(plan.last_block), BM=bm, BS=bs, HAS_R2=flags["HAS_R2"],
        R2_TWO=flags["R2_TWO"], SYMMETRIC=bool(symmetric), PRECISION=precision, num_warps=warps)
    _quant_kernel[grid](
        y1, m, k, r2, lo, hi, nbp, nb, int(plan.last_block), plan.dest(layout), codes, codes.stride(0), scale,
        zero if zero is not None else scale, rowsum, float(clip),
        BM=bm, BS=bs, NBP2=_next_pow2(nb), HAS_R2=flags["HAS_R2"], R2_TWO=flags["R2_TWO"],
        SYMMETRIC=bool(symmetric), PRECISION=precision, EXACT_DIV=bool(exact_div), USE_LIBDEVICE=use_libdevice,
        num_warps=warps)
