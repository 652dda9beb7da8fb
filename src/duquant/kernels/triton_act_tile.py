"""DuQuant activation transform, "block tile" kernel (Triton): smooth -> R1 -> permutation -> R2 -> per-token
int8 codes + scale (+ zero) + code sum, one launch, one read of x and one write of the codes.

Why this layout. A program owns BR whole tokens and holds them as a [BR * NBP, BS] tile whose row r is (token
r // NBP, block r % NBP): the tile is loaded straight from x in that shape (each row 128 contiguous channels,
coalesced), so both rotations are one tensor-core ``tl.dot`` of the tile with the shared 128 x 128 matrix and no
register reshape sits between the load, the dots and the stores (today's ``triton_act`` reshapes [BM, K] <->
[BM * NB, BS] four times per tile and keeps both float32 matrices in registers). The permutation moves channels
between blocks, so it needs the whole token: the tile row (t, j) of the permuted tensor gathers channels
``perm[j * BS : (j + 1) * BS]`` of token t. Two ways, picked by ``PERM_MODE`` (the H100 decides:
bench/act_transform.py):

- 0 ``scratch``: the rotated tile goes to a per-program scratch row in global memory (L1/L2-resident, in the dot's
  input dtype: 2 bytes per element for fp16/bf16) and comes back through gather addresses;
- 1 ``gather``: ``tl.gather`` on the flattened tile (Triton lowers a cross-warp gather through shared memory);
- 2 ``transpose``: only for the shuffle permutation (``permute=shuffle``; ``ActPlan.shuffle_piece`` = G), whose
  exchange between blocks is fixed: the token's [NB, NB, G] view with two axes swapped, a register/shared-memory
  transpose with no table and no scratch round trip. Explicit only: on the H200 it took 22.9 us at 816 x 2048 where
  the scratch gather of the same permutation took 16.0 (Triton's layout conversions for the 4-D permute cost more
  than the gather they replace), and its 128-row tile (K = 16384) does not fit in shared memory.

Rotation precision (``precision``), all with float32 accumulation:

- ``fp16`` (default): operands in fp16 after scaling each token by a power of two that puts its max |x / s| in
  [2^11, 2^12) (exact, undone exactly after R2). Rotated values stay below 2^11 * sqrt(128) < 65504, and fp16's
  11-bit significand rounds the operands like tf32 does, at twice tf32's tensor-core rate and half its bytes.
- ``bf16``: 8-bit significand, no scaling (more code flips, docs/gpu.md).
- ``tf32`` / ``ieee``: float32 operands (``ieee`` is float32-faithful; for tests).

Quantization numerics are ``reference.act_quant``'s (IEEE div_rn, round half to even), as in ``triton_act``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from duquant.kernels.triton_act import ActPlan, _int8_quantize, _int8_scale, _max_programs, _next_pow2, _rint, libdevice

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

DOT_IEEE, DOT_TF32, DOT_BF16, DOT_FP16 = 0, 1, 2, 3
PRECISIONS = {"ieee": DOT_IEEE, "tf32": DOT_TF32, "bf16": DOT_BF16, "fp16": DOT_FP16}
PERM_MODES = {"scratch": 0, "gather": 1, "transpose": 2}


@triton.jit
def _dot(a, m, DOT: tl.constexpr):
    if DOT == 0:
        y = tl.dot(a, m, input_precision="ieee")
    elif DOT == 1:
        y = tl.dot(a, m, input_precision="tf32")
    else:
        y = tl.dot(a, m)
    return y


@triton.jit
def _rotate(a, m0, m1, is_last, TWO: tl.constexpr, DOT: tl.constexpr):
    """Each tile row (one block of one token) times the shared matrix; the narrower last block gets its own."""
    y = _dot(a, m0, DOT)
    if TWO:
        y = tl.where(is_last[:, None], _dot(a, m1, DOT), y)
    return y


@triton.jit
def _load_matrix(r_ptr, BS: tl.constexpr, TWO: tl.constexpr):
    kk = tl.arange(0, BS)
    m0 = tl.load(r_ptr + kk[:, None] * BS + kk[None, :])
    if TWO:
        m1 = tl.load(r_ptr + BS * BS + kk[:, None] * BS + kk[None, :])
    else:
        m1 = m0
    return m0, m1


@triton.jit
def _per_token(v, BR: tl.constexpr, NBP: tl.constexpr, OP: tl.constexpr):
    """[BR * NBP] per-tile-row partials -> [BR] per token (OP 0 max, 1 min, 2 sum)."""
    v2 = tl.reshape(v, (BR, NBP))
    if OP == 0:
        out = tl.max(v2, axis=1)
    elif OP == 1:
        out = tl.min(v2, axis=1)
    else:
        out = tl.sum(v2, axis=1)
    return out


@triton.jit
def _to_rows(v, BR: tl.constexpr, NBP: tl.constexpr):
    """[BR] per token -> [BR * NBP] per tile row."""
    return tl.reshape(tl.broadcast_to(v[:, None], (BR, NBP)), (BR * NBP,))


@triton.jit
def _block_transpose(y, BR: tl.constexpr, NB: tl.constexpr, G: tl.constexpr):
    """The shuffle permutation on a [BR * NB, BS] tile (rows = token, block): output block j of a token is the
    j-th G-wide piece of each of its NB blocks in block order (BS = NB * G), i.e. the token seen as [NB, NB, G]
    with its first two axes swapped. G = 1 (K = 16384): the token's [128, 128] transpose."""
    if G == 1:
        if BR == 1:
            out = tl.trans(y)
        else:
            out = tl.reshape(tl.permute(tl.reshape(y, (BR, NB, NB)), (0, 2, 1)), (BR * NB, NB))
    else:
        out = tl.reshape(tl.permute(tl.reshape(y, (BR, NB, NB, G)), (0, 2, 1, 3)), (BR * NB, NB * G))
    return out


@triton.jit
def _store_codes(row_ptr, q, blk, rmask, K, R: tl.constexpr, BS: tl.constexpr, SPLIT: tl.constexpr,
                 FP8: tl.constexpr = False):
    """Store an [R, BS] tile of int8 codes (row r = block blk[r] of the token at row_ptr[r]). SPLIT: the packed-
    int4 GEMM's order, even channels then odd ones (reference.split_int4_order): the tile is deinterleaved in
    registers and each half is stored through addresses built from a fresh arange, so the compiler sees 64
    contiguous bytes per row and coalesces them. (Addresses computed per channel as c // 2 + (c % 2) * K/2 left it
    no contiguity to see: ncu measured 2.8 of 32 bytes used per stored sector, 11x the sectors of the natural
    order and 2.2x the kernel's time at 816 x 2048.)
    FP8: `q` is float32 on the e4m3 range, converted to e4m3 here, after the split and half by half. Splitting an
    e4m3 tile instead stored wrong bytes in the odd half on an H200 (Triton 3.6) whenever the tile was in a load's
    or a float32 dot's register layout (rtn, smoothquant, `ieee` rotations); the fp16 dot's layout was right."""
    if SPLIT:
        ev, od = tl.split(tl.reshape(q, (R, BS // 2, 2)))
        if FP8:
            ev, od = ev.to(tl.float8e4nv), od.to(tl.float8e4nv)
        pos = blk[:, None] * (BS // 2) + tl.arange(0, BS // 2)[None, :]
        tl.store(row_ptr + pos, ev, mask=rmask & (2 * pos < K))
        tl.store(row_ptr + ((K + 1) // 2) + pos, od, mask=rmask & (2 * pos + 1 < K))
    else:
        if FP8:
            q = q.to(tl.float8e4nv)
        chan = blk[:, None] * BS + tl.arange(0, BS)[None, :]
        tl.store(row_ptr + chan, q, mask=rmask & (chan < K))


@triton.jit
def _masked(v, valid, other, EVEN: tl.constexpr):
    if EVEN:
        out = v
    else:
        out = tl.where(valid, v, other)
    return out


@triton.jit
def _fp8_sum_terms(vq, valid, EVEN: tl.constexpr):
    """e4m3 codes -> their float32 values, zero outside `valid` (the terms of a token's code sum)."""
    return _masked(vq.to(tl.float32), valid, 0.0, EVEN)


@triton.jit
def _fp8_codes(y, valid, clip, BR: tl.constexpr, NBP: tl.constexpr, EVEN: tl.constexpr, ROUND_E4M3: tl.constexpr,
               USE_LIBDEVICE: tl.constexpr):
    """A [BR * NBP, BS] tile (rows = token, block) -> (e4m3 values in float32, to be cast; scale [BR] =
    absmax * clip / 448 per token, formats/fp8.py). Channels outside `valid` are left out of the absmax."""
    amax = _per_token(tl.max(_masked(tl.abs(y), valid, 0.0, EVEN), axis=1), BR, NBP, 0)
    scale = tl.maximum(tl.div_rn(amax * clip, 448.0), 1e-12)
    v = tl.div_rn(y, _to_rows(scale, BR, NBP)[:, None])
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    if ROUND_E4M3:  # the interpreter's fp8 cast loses the rounding carry: round on the e4m3 grid first
        e = tl.maximum(tl.floor(tl.log2(tl.maximum(tl.abs(v), 1e-30))), -6.0)
        step = tl.exp2(e - 3.0)
        v = _rint(v / step, USE_LIBDEVICE) * step
    return v, scale


@triton.jit
def _int8_codes(y, valid, clip, BR: tl.constexpr, NBP: tl.constexpr, EVEN: tl.constexpr, SYMMETRIC: tl.constexpr,
                EXACT_DIV: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """A [BR * NBP, BS] tile (rows = token, block) -> (int32 codes in their stored form, scale [BR], zero [BR])
    per ``reference.act_quant``: symmetric clamp(round(y/s), -127, 127) (zero unused), asymmetric
    clamp(round(y/s) + z, 0, 255) - 128 with min / max clipped by `clip`. EXACT_DIV: IEEE division, else
    y * (1/s). Channels outside `valid` are left out of the statistics."""
    if SYMMETRIC:
        scale, zero = _int8_scale(0.0, _per_token(tl.max(_masked(tl.abs(y), valid, 0.0, EVEN), axis=1), BR, NBP, 0),
                                  clip, SYMMETRIC, USE_LIBDEVICE)
        q = _int8_quantize(y, _to_rows(scale, BR, NBP)[:, None], 0.0, SYMMETRIC, EXACT_DIV, USE_LIBDEVICE)
    else:
        scale, zero = _int8_scale(_per_token(tl.min(_masked(y, valid, float("inf"), EVEN), axis=1), BR, NBP, 1),
                                  _per_token(tl.max(_masked(y, valid, float("-inf"), EVEN), axis=1), BR, NBP, 0),
                                  clip, SYMMETRIC, USE_LIBDEVICE)
        q = _int8_quantize(y, _to_rows(scale, BR, NBP)[:, None], _to_rows(zero, BR, NBP)[:, None], SYMMETRIC,
                           EXACT_DIV, USE_LIBDEVICE)
    return q.to(tl.int32), scale, zero


@triton.jit
def _load_block_table(t_ptr, NBP: tl.constexpr, BS: tl.constexpr):
    """A [NBP * BS] per-channel table as the [NBP, BS] tile every step of a program multiplies by (loaded once,
    outside the step loop: ``HOIST_SMOOTH``)."""
    return tl.load(t_ptr + tl.arange(0, NBP)[:, None] * BS + tl.arange(0, BS)[None, :])


@triton.jit
def _times_block_table(x, table, BR: tl.constexpr, NBP: tl.constexpr, BS: tl.constexpr):
    """A [BR * NBP, BS] tile (rows = token, block) times a [NBP, BS] per-channel table, the same for every token."""
    return tl.reshape(tl.reshape(x, (BR, NBP, BS)) * table[None, :, :], (BR * NBP, BS))


def hoist_smooth_default(rows: int) -> bool:
    """Whether a kernel step of `rows` tile rows keeps the smoothing table in registers across steps by default: below
    128 rows (a 128-row tile would spill; BENCHMARKS.md §4c)."""
    return rows < 128


@triton.jit
def _load_tile(x_ptr, stride_xm, M, K, tile, BR: tl.constexpr, NBP: tl.constexpr, BS: tl.constexpr,
               EVEN: tl.constexpr):
    """The [BR * NBP, BS] x tile of `tile` (rows = token, block), zero past M and K."""
    r = tl.arange(0, BR * NBP)
    tok = tile * BR + r // NBP
    chan = (r % NBP)[:, None] * BS + tl.arange(0, BS)[None, :]
    mask = (tok < M)[:, None]
    if not EVEN:
        mask = mask & (chan < K)
    return tl.load(x_ptr + tok[:, None].to(tl.int64) * stride_xm + chan, mask=mask, other=0.0)


@triton.jit
def _tile_act_kernel(
    x_ptr, stride_xm, M, K, num_tiles,
    inv_s_ptr, r1_ptr, r2_ptr, perm_ptr, scratch_ptr,
    codes_ptr, stride_cm, scale_ptr, zero_ptr, rowsum_ptr,
    clip, last_block,
    BR: tl.constexpr, NBP: tl.constexpr, BS: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, HAS_R1: tl.constexpr, R1_TWO: tl.constexpr, HAS_PERM: tl.constexpr,
    HAS_R2: tl.constexpr, R2_TWO: tl.constexpr, SYMMETRIC: tl.constexpr, DOT: tl.constexpr,
    PERM_MODE: tl.constexpr, EXACT_DIV: tl.constexpr, USE_LIBDEVICE: tl.constexpr, HOIST: tl.constexpr,
    SPLIT: tl.constexpr, FP8: tl.constexpr, ROUND_E4M3: tl.constexpr, EVEN: tl.constexpr, G: tl.constexpr,
    PREFETCH: tl.constexpr, FP8_SUM: tl.constexpr, HOIST_SMOOTH: tl.constexpr = False,
):
    R: tl.constexpr = BR * NBP
    KP: tl.constexpr = NBP * BS
    PRESCALE: tl.constexpr = DOT == 3 and (HAS_R1 or HAS_R2)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if PREFETCH:  # the first x tile is in flight while the matrices load (triton_act_shuffle measured this)
        x_next = _load_tile(x_ptr, stride_xm, M, K, pid, BR, NBP, BS, EVEN)
    if HOIST:  # once per program (registers / shared memory across the tile loop), else per tile from L1
        if HAS_R1:
            a0, a1 = _load_matrix(r1_ptr, BS, R1_TWO)
        if HAS_R2:
            b0, b1 = _load_matrix(r2_ptr, BS, R2_TWO)
    if HOIST_SMOOTH:  # the [NBP, BS] smoothing table is the same every tile: loaded once (the folded kernel's gain)
        inv_s_tile = _load_block_table(inv_s_ptr, NBP, BS)
    for tile in range(pid, num_tiles, nprog):
        # Index tensors are built inside the loop from a zero the compiler cannot see through: hoisted out of it,
        # the [R, BS] channel / mask / pointer tensors (two layouts each, 64-bit pointers) stay live across the
        # loop and spill every register (ptxas: 255 registers + spills at R = 64, 8 warps).
        z = tile >> 30
        r = tl.arange(0, R) + z
        i = tl.arange(0, BS)
        tok_in_tile = r // NBP
        blk = r % NBP
        chan = blk[:, None] * BS + i[None, :]  # channel of tile element (r, i): input order and output order alike
        if EVEN:  # K fills every block of the tile: no channel masks (fewer live [R, BS] tensors)
            valid = tl.full((1, BS), 1, tl.int1)
        else:
            valid = chan < K
        is_last = blk == last_block
        if not HOIST:
            if HAS_R1:
                a0, a1 = _load_matrix(r1_ptr, BS, R1_TWO)
            if HAS_R2:
                b0, b1 = _load_matrix(r2_ptr, BS, R2_TWO)
        tok = tile * BR + tok_in_tile
        tmask = tok < M
        if PREFETCH:  # the next tile loads while this one computes (masked off past the last tile)
            x = x_next.to(tl.float32)
            x_next = _load_tile(x_ptr, stride_xm, M, K, tile + nprog, BR, NBP, BS, EVEN)
        else:
            x = tl.load(x_ptr + tok[:, None].to(tl.int64) * stride_xm + chan, mask=tmask[:, None] & valid,
                        other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            if HOIST_SMOOTH:
                x = _times_block_table(x, inv_s_tile, BR, NBP, BS)
            else:
                x = x * tl.load(inv_s_ptr + chan)  # [KP] table, zero beyond K
        if PRESCALE:  # power of two per token: exact, keeps fp16 operands in range (module docstring)
            amax = _per_token(tl.max(tl.abs(x), axis=1), BR, NBP, 0)
            e = tl.floor(tl.log2(tl.maximum(amax, 1e-30)))
            f = _to_rows(tl.exp2(11.0 - e), BR, NBP)
            x = x * f[:, None]
        y = x
        if HAS_R1:
            if DOT >= 2:
                y = y.to(a0.dtype)
            y = _rotate(y, a0, a1, is_last, R1_TWO, DOT)
        if HAS_PERM:
            if DOT >= 2:  # the scratch row / gather in the operand dtype: half the bytes of float32
                if HAS_R2:
                    y = y.to(b0.dtype)
                elif HAS_R1:
                    y = y.to(a0.dtype)
            if PERM_MODE == 2:  # permute=shuffle: a fixed exchange of G-wide pieces between blocks, no table
                y = _block_transpose(y, BR, NBP, G)
            elif PERM_MODE == 0:
                src = tok_in_tile[:, None] * KP + tl.load(perm_ptr + chan).to(tl.int32)  # x_new[:,c] = x[:,perm[c]]
                base = scratch_ptr + pid.to(tl.int64) * (R * BS)
                tl.debug_barrier()  # the previous tile's gathers are done before this tile overwrites the row
                tl.store(base + r[:, None] * BS + i[None, :], y)
                tl.debug_barrier()
                y = tl.load(base + src)
            else:
                src = tok_in_tile[:, None] * KP + tl.load(perm_ptr + chan).to(tl.int32)
                y = tl.reshape(tl.gather(tl.reshape(y, (R * BS,)), tl.reshape(src, (R * BS,)), 0), (R, BS))
        if HAS_R2:
            if DOT >= 2:
                y = y.to(b0.dtype)
            y = _rotate(y, b0, b1, is_last, R2_TWO, DOT)
        y = y.to(tl.float32)
        if PRESCALE:
            y = y * (1.0 / f)[:, None]  # exact: f is a power of two

        toks = tile * BR + tl.arange(0, BR)
        tm = toks < M
        if FP8:  # e4m3 codes, scale = absmax * clip / 448 per token (formats/fp8.py), no zero point
            v, scale = _fp8_codes(y, valid, clip, BR, NBP, EVEN, ROUND_E4M3, USE_LIBDEVICE)
            vq = v.to(tl.float8e4nv)
            if SPLIT:
                _store_codes(codes_ptr + tok[:, None].to(tl.int64) * stride_cm, v, blk, tmask[:, None], K, R, BS,
                             SPLIT, True)
            else:
                tl.store(codes_ptr + tok[:, None].to(tl.int64) * stride_cm + chan, vq, mask=tmask[:, None] & valid)
            tl.store(scale_ptr + toks, scale, mask=tm)
            if FP8_SUM:  # the sum of the token's e4m3 values: the int4 x FP8 GEMM's weight zero-point term
                tl.store(rowsum_ptr + toks, _per_token(tl.sum(_fp8_sum_terms(vq, valid, EVEN), axis=1), BR, NBP, 2),
                         mask=tm)
        else:
            qi, scale, zero = _int8_codes(y, valid, clip, BR, NBP, EVEN, SYMMETRIC, EXACT_DIV, USE_LIBDEVICE)
            smask = tmask[:, None] & valid
            _store_codes(codes_ptr + tok[:, None].to(tl.int64) * stride_cm, qi.to(tl.int8), blk, tmask[:, None], K,
                         R, BS, SPLIT)
            tl.store(scale_ptr + toks, scale, mask=tm)
            if not SYMMETRIC:
                tl.store(zero_ptr + toks, zero - 128.0, mask=tm)
            tl.store(rowsum_ptr + toks, _per_token(tl.sum(tl.where(smask, qi, 0), axis=1), BR, NBP, 2), mask=tm)


# ---- one token at a time in row chunks (tokens wider than a register tile: K = 16384) ----------------------------

@triton.jit
def _chunk_index(c, z, RC: tl.constexpr, BS: tl.constexpr):
    rows = c * RC + tl.arange(0, RC) + z  # the blocks of this chunk
    return rows, rows[:, None] * BS + tl.arange(0, BS)[None, :]


@triton.jit
def _chunk_rotated(base, perm_ptr, c, z, f, b0, b1, last_block, RC: tl.constexpr, BS: tl.constexpr,
                   HAS_PERM: tl.constexpr, HAS_R2: tl.constexpr, R2_TWO: tl.constexpr, DOT: tl.constexpr,
                   PRESCALE: tl.constexpr):
    """Output blocks c*RC.. of the token: gather the permuted channels from the scratch row, R2, unscale."""
    rows, chan = _chunk_index(c, z, RC, BS)
    if HAS_PERM:
        y = tl.load(base + tl.load(perm_ptr + chan).to(tl.int32))
    else:
        y = tl.load(base + chan)
    if HAS_R2:
        y = _rotate(y, b0, b1, rows == last_block, R2_TWO, DOT)
    y = y.to(tl.float32)
    if PRESCALE:
        y = y * (1.0 / f)
    return y, chan


@triton.jit
def _tile_act_chunked_kernel(
    x_ptr, stride_xm, M, K,
    inv_s_ptr, r1_ptr, r2_ptr, perm_ptr, scratch_ptr,
    codes_ptr, stride_cm, scale_ptr, zero_ptr, rowsum_ptr,
    clip, last_block,
    RC: tl.constexpr, NBP: tl.constexpr, BS: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, HAS_R1: tl.constexpr, R1_TWO: tl.constexpr, HAS_PERM: tl.constexpr,
    HAS_R2: tl.constexpr, R2_TWO: tl.constexpr, SYMMETRIC: tl.constexpr, DOT: tl.constexpr,
    EXACT_DIV: tl.constexpr, USE_LIBDEVICE: tl.constexpr, SPLIT: tl.constexpr, FP8: tl.constexpr,
    ROUND_E4M3: tl.constexpr, EVEN: tl.constexpr, OP_DTYPE: tl.constexpr, FP8_SUM: tl.constexpr,
):
    """Persistent over tokens; each token in chunks of RC blocks, four passes so that only an [RC, BS] chunk is
    ever in registers: (A) max |x/s| for the fp16 scaling, (B) smooth, R1, into the scratch row, (C) gather the
    permutation, R2, token min / max, (D) the same again, quantize, store. x is read twice (the second time from
    L1/L2), the scratch row is written once and gathered twice; every pass is the 128-row kernel's work split
    into register-sized pieces (that kernel spills at K = 16384). Chunks wholly beyond K (NBP is a power of two:
    K = 4304 has 34 blocks of 64) are skipped."""
    KP: tl.constexpr = NBP * BS
    PRESCALE: tl.constexpr = DOT == 3 and (HAS_R1 or HAS_R2)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    NCH = tl.cdiv(tl.cdiv(K, BS), RC)
    a0, a1, b0, b1 = 0, 0, 0, 0
    if HAS_R1:
        a0, a1 = _load_matrix(r1_ptr, BS, R1_TWO)
    if HAS_R2:
        b0, b1 = _load_matrix(r2_ptr, BS, R2_TWO)
    base = scratch_ptr + pid.to(tl.int64) * KP
    for tok in range(pid, M, nprog):
        z = tok >> 30  # a zero the compiler cannot see through: index tensors stay inside the loops
        xrow = x_ptr + tl.cast(tok, tl.int64) * stride_xm
        f = 1.0
        if PRESCALE:  # (A)
            amax = 0.0
            for c in range(NCH):
                rows, chan = _chunk_index(c, z, RC, BS)
                xv = tl.load(xrow + chan, mask=chan < K, other=0.0).to(tl.float32)
                if HAS_SMOOTH:
                    xv = xv * tl.load(inv_s_ptr + chan)
                amax = tl.maximum(amax, tl.max(tl.max(tl.abs(xv), axis=1), axis=0))
            f = tl.exp2(11.0 - tl.floor(tl.log2(tl.maximum(amax, 1e-30))))
        tl.debug_barrier()  # the previous token's gathers are done before its scratch row is overwritten
        for c in range(NCH):  # (B)
            rows, chan = _chunk_index(c, z, RC, BS)
            xv = tl.load(xrow + chan, mask=chan < K, other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                xv = xv * tl.load(inv_s_ptr + chan)
            if PRESCALE:
                xv = xv * f
            y = xv.to(OP_DTYPE)
            if HAS_R1:
                y = _rotate(y, a0, a1, rows == last_block, R1_TWO, DOT).to(OP_DTYPE)
            tl.store(base + chan, y)
        tl.debug_barrier()
        mn = float("inf")
        mx = float("-inf")
        for c in range(NCH):  # (C)
            y, chan = _chunk_rotated(base, perm_ptr, c, z, f, b0, b1, last_block, RC, BS, HAS_PERM, HAS_R2, R2_TWO,
                                     DOT, PRESCALE)
            if FP8 or SYMMETRIC:
                mx = tl.maximum(mx, tl.max(tl.max(_masked(tl.abs(y), chan < K, 0.0, EVEN), axis=1), axis=0))
            else:
                mn = tl.minimum(mn, tl.min(tl.min(_masked(y, chan < K, float("inf"), EVEN), axis=1), axis=0))
                mx = tl.maximum(mx, tl.max(tl.max(_masked(y, chan < K, float("-inf"), EVEN), axis=1), axis=0))
        if FP8:
            scale = tl.maximum(tl.div_rn(mx * clip, 448.0), 1e-12)
        else:
            scale, zero = _int8_scale(mn, mx, clip, SYMMETRIC, USE_LIBDEVICE)
        rsum = 0
        fsum = 0.0
        for c in range(NCH):  # (D)
            y, chan = _chunk_rotated(base, perm_ptr, c, z, f, b0, b1, last_block, RC, BS, HAS_PERM, HAS_R2, R2_TWO,
                                     DOT, PRESCALE)
            valid = chan < K
            if FP8:
                v = tl.minimum(tl.maximum(tl.div_rn(y, scale), -448.0), 448.0)
                if ROUND_E4M3:
                    e = tl.maximum(tl.floor(tl.log2(tl.maximum(tl.abs(v), 1e-30))), -6.0)
                    step = tl.exp2(e - 3.0)
                    v = _rint(v / step, USE_LIBDEVICE) * step
                vq = v.to(tl.float8e4nv)
                if SPLIT:
                    _store_codes(codes_ptr + tl.cast(tok, tl.int64) * stride_cm, v, c * RC + tl.arange(0, RC),
                                 tl.full((RC, 1), 1, tl.int1), K, RC, BS, SPLIT, True)
                else:
                    tl.store(codes_ptr + tl.cast(tok, tl.int64) * stride_cm + chan, vq, mask=valid)
                if FP8_SUM:
                    fsum += tl.sum(tl.sum(_fp8_sum_terms(vq, valid, False), axis=1), axis=0)
            else:
                qi = _int8_quantize(y, scale, zero, SYMMETRIC, EXACT_DIV, USE_LIBDEVICE).to(tl.int32)
                _store_codes(codes_ptr + tl.cast(tok, tl.int64) * stride_cm, qi.to(tl.int8), c * RC + tl.arange(0, RC),
                             tl.full((RC, 1), 1, tl.int1), K, RC, BS, SPLIT)
                rsum += tl.sum(tl.sum(tl.where(valid, qi, 0), axis=1), axis=0)
        tl.store(scale_ptr + tok, scale)
        if FP8 and FP8_SUM:
            tl.store(rowsum_ptr + tok, fsum)
        if not FP8:
            if not SYMMETRIC:
                tl.store(zero_ptr + tok, zero - 128.0)
            tl.store(rowsum_ptr + tok, rsum)


# ---- host side ----------------------------------------------------------------------------------------------------

def _matrices(plan: ActPlan, name: str, precision: str) -> torch.Tensor | None:
    """plan.r1 / plan.r2 in the dot's operand dtype, cached on the plan (fp16 / bf16 copies are 32 KB each)."""
    mats = getattr(plan, name)
    if mats is None:
        return None
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    cache = plan.__dict__.setdefault("_tile_mats", {})
    key = (name, dtype)
    if key not in cache:
        cache[key] = mats.to(dtype).contiguous()
    return cache[key]


def default_config(m: int, k: int, bs: int = 128) -> tuple[int, int, int]:
    """(BR tokens per tile, num_warps, PERM_MODE) before tuning on the H100: tiles of 32 rows (16 at small M,
    the tl.dot minimum) on 4 warps, which ptxas fits in registers (sm_90: 168-200 registers, no spills); a
    token of more than 32 blocks is one tile of NBP rows on 8 warps (K = 16384: 128 rows, ~1 KB of spills per
    thread: the bench sweeps 16 warps and per-tile matrix loads there). DUQUANT_ACT_TILE="BR,WARPS,PERM"
    overrides."""
    env = os.environ.get("DUQUANT_ACT_TILE")
    if env:
        a, b, c = (int(v) for v in env.split(","))
        return a, b, c
    nbp = _next_pow2(-(-k // bs))
    rows = 32 if m >= 256 else 16
    br = max(1, rows // nbp, 16 // nbp)
    warps = 8 if br * nbp >= 64 else 4
    return br, warps, 0


def act_quant_tile(x: torch.Tensor, plan: ActPlan, *, symmetric: bool = False, clip: float = 1.0,
                   layout: str = "natural", precision: str = "fp16", exact_div: bool | None = None,
                   block_tokens: int | None = None, num_warps: int | None = None, perm_mode: str | int | None = None,
                   programs: int | None = None, hoist: bool = True, fp8: bool = False, chunk_rows: int | None = None,
                   prefetch: bool | None = None, out: tuple | None = None, up: torch.Tensor | None = None,
                   fp8_sum: bool = False, hoist_smooth: bool | None = None):
    """Same contract as ``triton_act.act_quant``: x [M, K] -> (codes int8 [M, Kc], scale f32 [M], zero f32 [M] |
    None, rowsum int32 [M]). ``out`` = preallocated (codes, scale, zero, rowsum) to write into (CUDA graphs,
    poisoned-output checks). ``programs``: persistent grid size (default 2 per multiprocessor); each program
    reads the two 32 KB matrices once when ``hoist``, which at K = 2048 is more L2 traffic than its tokens.
    ``fp8``: e4m3 codes [M, Kc] and scale = absmax * clip / 448 per token instead (zero None; the ``w8a8-fp8``
    format, and ``w4a8-fp8`` in the split layout), symmetric ignored; rowsum None, or with ``fp8_sum`` the float32
    sum of each token's e4m3 values (the int4 x FP8 GEMM's weight zero-point term). ``chunk_rows``: one token
    per program step in chunks of that many blocks (``_tile_act_chunked_kernel``; default for tokens of more than
    32 blocks, 0 = never).
    ``exact_div``: IEEE division for the codes (None, the default: IEEE here, and a shuffle plan's folded kernel
    keeps its own default). ``prefetch`` (one-tile kernel, default on): request the first x tile before the
    matrices load and each next one before the current one computes. ``up``: x is a
    GeGLU gate and ``up`` its up projection; the transformed input is gelu_tanh(x) * up, fused into the folded
    kernel (``can_fuse_geglu`` says when that kernel runs this plan). ``hoist_smooth`` (one-tile kernel; default
    on below 128-row tiles, where it would spill): load the smoothing table once per program instead of once per
    tile; the same products. Both defaults since the ninth session (H200, zigzag, BENCHMARKS.md §4c: 19.9 -> 18.8
    us at 816 x 2048, 162.5 -> 156.8 at 816 x 16384 with the prefetch alone, 206.9 -> 195.0 at 13056 x 2048)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} not in {list(PRECISIONS)}")
    default_launch = (block_tokens is None and num_warps is None and perm_mode is None and chunk_rows is None
                      and hoist and programs is None and prefetch is None and hoist_smooth is None)
    if default_launch and _fold_default(plan, precision):
        from duquant.kernels.triton_act_shuffle import act_quant_shuffle

        # exact_div None: its own default (IEEE for float32 rotations, x * (1/s) for fp16 / bf16 ones)
        return act_quant_shuffle(x, plan, symmetric=symmetric, clip=clip, layout=layout, precision=precision,
                                 exact_div=exact_div, fp8=fp8, out=out, up=up, fp8_sum=fp8_sum)
    if up is not None:
        raise ValueError("the GeGLU input fusion runs in the folded kernel only (permute=shuffle, default launch, "
                         "DUQUANT_ACT_FOLD not 0)")
    exact_div = True if exact_div is None else exact_div  # this kernel's default: IEEE division
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    if k != plan.K:
        raise ValueError(f"activation kernel built for K={plan.K}, got input with {k} channels")
    why = cannot_run(plan, precision)
    if why:
        raise ValueError(why)
    bs = plan.BS
    if fp8:
        symmetric = True
    kc = k if layout == "natural" else 2 * (-(-k // 2))
    dev = x.device
    if fp8 and out is None:
        out = (torch.empty(m, kc, dtype=torch.float8_e4m3fn, device=dev), torch.empty(m, dtype=torch.float32,
                                                                                     device=dev), None,
               torch.empty(m, dtype=torch.float32, device=dev) if fp8_sum else None)
    if out is not None:
        codes, scale, zero, rowsum = out
        if kc != k:
            codes.view(torch.uint8)[:, k:] = 0  # the split layout's pad column (odd K): code 0, e4m3 0.0
    else:
        codes = torch.empty(m, kc, dtype=torch.int8, device=dev) if kc == k else \
            torch.zeros(m, kc, dtype=torch.int8, device=dev)
        scale = torch.empty(m, dtype=torch.float32, device=dev)
        zero = None if symmetric else torch.empty(m, dtype=torch.float32, device=dev)
        rowsum = torch.empty(m, dtype=torch.int32, device=dev)
    if m == 0:
        return codes, scale, zero, rowsum
    br, warps, pmode = default_config(m, k, bs)
    nbp = _next_pow2(-(-k // bs))
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(k, bs) if block_tokens is None and num_warps is None else 0
    if chunk_rows:
        warps = 8 if chunk_rows >= 32 else 4  # ptxas, sm_90: 250 registers, no spills (32 rows on 4 warps spill)
    br = block_tokens or br
    warps = num_warps or warps
    if perm_mode is not None:
        pmode = PERM_MODES[perm_mode] if isinstance(perm_mode, str) else int(perm_mode)
    if pmode == PERM_MODES["transpose"]:
        if not plan.shuffle_piece:
            raise ValueError("perm_mode='transpose' runs only the shuffle permutation (permute=shuffle, K a power-of-"
                             "two number of blocks dividing the block size); this layer's permutation is another")
        if (block_tokens or br) * nbp >= 128:
            raise ValueError("perm_mode='transpose' with a 128-row tile needs 288 KB of shared memory (sm_90 has "
                             "227 KB); use perm_mode='scratch'")
    if pmode == PERM_MODES["gather"] and not chunk_rows and (block_tokens or br) * nbp >= 128:
        # Triton 3.6 stages the cross-warp gather through 448 KB of shared memory at 128 rows (H200, sixth session)
        raise ValueError("perm_mode='gather' with a 128-row tile needs 448 KB of shared memory (sm_90 has 227 KB); "
                         "use perm_mode='scratch'")
    if chunk_rows:
        return _launch_chunked(x, plan, codes, scale, zero, rowsum, symmetric, clip, layout, precision, exact_div,
                               programs, fp8, int(chunk_rows), nbp, warps)
    if br * nbp < 16:
        raise ValueError(f"a tile needs >= 16 rows for tl.dot: BR={br} x {nbp} blocks")
    prefetch = True if prefetch is None else prefetch
    hoist_smooth = hoist_smooth_default(br * nbp) if hoist_smooth is None else hoist_smooth
    flags = dict(HAS_SMOOTH=plan.inv_smooth is not None, HAS_R1=plan.r1 is not None,
                 R1_TWO=plan.r1 is not None and plan.r1.shape[0] == 2, HAS_PERM=plan.perm_fwd is not None,
                 HAS_R2=plan.r2 is not None, R2_TWO=plan.r2 is not None and plan.r2.shape[0] == 2)
    r1 = _matrices(plan, "r1", precision)
    r2 = _matrices(plan, "r2", precision)
    num_tiles = triton.cdiv(m, br)
    nprog = min(num_tiles, programs or _max_programs(dev))
    if flags["HAS_PERM"] and pmode == 0:
        sdtype = r2.dtype if r2 is not None else (r1.dtype if r1 is not None else torch.float32)
        scratch = torch.empty(nprog * br * nbp * bs, dtype=sdtype, device=dev)
    else:
        scratch = scale
    dummy = plan.dest_natural
    tables = _tables(plan, nbp * bs)
    _tile_act_kernel[(nprog,)](
        x, x.stride(0), m, k, num_tiles,
        tables["inv_s"] if flags["HAS_SMOOTH"] else dummy,
        r1 if r1 is not None else dummy, r2 if r2 is not None else dummy,
        tables["perm"] if flags["HAS_PERM"] else dummy, scratch,
        codes, codes.stride(0), scale, zero if zero is not None else scale, rowsum if rowsum is not None else scale,
        float(clip), int(plan.last_block),
        BR=br, NBP=nbp, BS=bs, SYMMETRIC=bool(symmetric), DOT=PRECISIONS[precision], PERM_MODE=pmode,
        EXACT_DIV=bool(exact_div), USE_LIBDEVICE=not _INTERPRET and libdevice is not None, HOIST=bool(hoist),
        SPLIT=layout == "split", FP8=bool(fp8), ROUND_E4M3=_INTERPRET, EVEN=k == nbp * bs,
        G=plan.shuffle_piece if pmode == PERM_MODES["transpose"] else 1,  # (other modes: no extra specialization)
        PREFETCH=bool(prefetch), FP8_SUM=bool(fp8 and rowsum is not None),
        HOIST_SMOOTH=bool(hoist_smooth and flags["HAS_SMOOTH"]), num_warps=warps, **flags,
    )
    return codes, scale, zero, rowsum


def can_fuse_geglu(plan: ActPlan, precision: str) -> bool:
    """Whether ``act_quant_tile(gate, plan, up=up)`` can take a GeGLU MLP's gate and up outputs in place of the
    down projection's input (the folded kernel's GEGLU prologue)."""
    return _fold_default(plan, precision)


def _fold_default(plan: ActPlan, precision: str) -> bool:
    """Whether the default launch of a shuffle-permutation plan goes to the folded kernel (triton_act_shuffle:
    the permutation folded into R1's column order, no scratch row); DUQUANT_ACT_FOLD=0 keeps the tile kernel."""
    if not plan.shuffle_piece or os.environ.get("DUQUANT_ACT_FOLD", "1") == "0":
        return False
    from duquant.kernels.triton_act_shuffle import cannot_run as fold_cannot_run

    return fold_cannot_run(plan, precision) is None


def cannot_run(plan: ActPlan, precision: str) -> str | None:
    """Why ``act_quant_tile`` cannot run `plan` at `precision` (None when it can)."""
    if not plan.fused:
        return f"this transform cannot run in the tile kernel: {plan.reason}"
    two = any(m is not None and m.shape[0] == 2 for m in (plan.r1, plan.r2))
    if two and precision in ("ieee", "tf32") and plan.BS >= 128:
        # a partial last block brings its own matrices: four float32 128 x 128 ones need 278+ KB of shared memory
        # in the one-tile and the chunked kernel alike (sm_90 has 227 KB; kernels/aot.py measures it on the CPU)
        return (f"K={plan.K}: a partial last block needs fp16 or bf16 rotations in the tile kernel (got "
                f"{precision!r}); use triton_act.act_quant for float32 rotations")
    return None


def default_chunk_rows(k: int, bs: int = 128) -> int:
    """Blocks per chunk of the chunked kernel, or 0 for the one-tile kernel: tokens of more than 32 blocks that
    are not a power of two of them (K = 4304: 34 blocks) go in chunks of 16 rows on 4 warps."""
    env = os.environ.get("DUQUANT_ACT_CHUNK")
    if env is not None:
        return int(env)
    nb = -(-k // bs)
    if _next_pow2(nb) <= 32 or nb == _next_pow2(nb):
        # whole tiles: the 128-row tile (K = 16384) spills a little but took 155 us on the H100 where the chunked
        # kernel took 303 us (BENCHMARKS.md)
        return 0
    return 16  # K = 4304 (34 blocks): the 64-row tile does not fit in shared memory; 16-row chunks waste least


def _launch_chunked(x, plan, codes, scale, zero, rowsum, symmetric, clip, layout, precision, exact_div, programs,
                    fp8, chunk, nbp, warps):
    m, k = x.shape
    bs = plan.BS
    if chunk < 16 or chunk > nbp or nbp % chunk:
        raise ValueError(f"chunk_rows={chunk}: a power of two in [16, {nbp}]")
    flags = dict(HAS_SMOOTH=plan.inv_smooth is not None, HAS_R1=plan.r1 is not None,
                 R1_TWO=plan.r1 is not None and plan.r1.shape[0] == 2, HAS_PERM=plan.perm_fwd is not None,
                 HAS_R2=plan.r2 is not None, R2_TWO=plan.r2 is not None and plan.r2.shape[0] == 2)
    r1 = _matrices(plan, "r1", precision)
    r2 = _matrices(plan, "r2", precision)
    op = {"fp16": (torch.float16, tl.float16), "bf16": (torch.bfloat16, tl.bfloat16)}.get(
        precision, (torch.float32, tl.float32))
    nprog = min(m, programs or _max_programs(x.device))
    scratch = torch.empty(nprog * nbp * bs, dtype=op[0], device=x.device)  # one token's rotated row per program
    dummy = plan.dest_natural
    tables = _tables(plan, nbp * bs)
    _tile_act_chunked_kernel[(nprog,)](
        x, x.stride(0), m, k,
        tables["inv_s"] if flags["HAS_SMOOTH"] else dummy,
        r1 if r1 is not None else dummy, r2 if r2 is not None else dummy,
        tables["perm"] if flags["HAS_PERM"] else dummy, scratch,
        codes, codes.stride(0), scale, zero if zero is not None else scale, rowsum if rowsum is not None else scale,
        float(clip), int(plan.last_block),
        RC=chunk, NBP=nbp, BS=bs, SYMMETRIC=bool(symmetric), DOT=PRECISIONS[precision], EXACT_DIV=bool(exact_div),
        USE_LIBDEVICE=not _INTERPRET and libdevice is not None, SPLIT=layout == "split", FP8=bool(fp8),
        ROUND_E4M3=_INTERPRET, EVEN=k == nbp * bs, OP_DTYPE=op[1], FP8_SUM=bool(fp8 and rowsum is not None),
        num_warps=warps, **flags,
    )
    return codes, scale, zero, rowsum


def _tables(plan: ActPlan, width: int) -> dict:
    """The plan's smoothing and permutation tables padded to `width` = NBP * BS (the tile's channel span), cached
    on the plan."""
    cache = plan.__dict__.setdefault("_tile_tables", {})
    if width in cache:
        return cache[width]
    dev = plan.dest_natural.device

    def pad(t, fill, dtype):
        out = torch.full((width,), fill, dtype=dtype, device=dev)
        n = min(width, t.numel())
        out[:n] = t[:n]
        return out

    ar = torch.arange(width, dtype=torch.int32, device=dev)
    tables = {
        "inv_s": None if plan.inv_smooth is None else pad(plan.inv_smooth[:plan.K], 0.0, torch.float32),
        # int16 when it fits: the table is re-read per tile, half the bytes of int32
        "perm": None if plan.perm_fwd is None else torch.where(ar < plan.K, pad(plan.perm_fwd, 0, torch.int32), ar)
        .to(torch.int16 if width <= 32768 else torch.int32),
    }
    cache[width] = tables
    return tables
