"""DuQuant activation transform for ``permute=shuffle``, with the permutation folded into the rotations' layout
("folded" kernel, Triton): smooth -> R1 -> shuffle -> R2 -> per-token int8 (or e4m3) codes, one launch, no scratch
row, no gather table.

Why it needs no gather. With NB = K / BS blocks and pieces of G = BS / NB channels, the shuffle permutation
(``transform.shuffle_permutation``) gives output block j, position b*G + e, the channel j*G + e of input block b
after R1. Reorder R1's columns once, on the host, so that column e*NB + j of ``R1k`` is column j*G + e of R1.
Then a token's R1 product Y = X R1k ([NB, BS], row b) read row-major as [BS, NB] has row b*G + e, column j:
column j of that view *is* output block j, in order. So

    Z = reshape(Y, [BS, NB])^T @ R2        ([NB, BS]: row j = output block j after R2)

is a reshape and one transposed dot operand, which Triton serves from the shared memory the second dot needs
anyway. With BR > 1 tokens per step the token axis sits between b and e and a 4-D permute remains (still one
shared-memory pass, no global scratch). That is ``fold="transpose"``. The default, ``fold="chunk"``, keeps R1 in
its own column order (column j * G + e) and moves whole pieces instead: Y read as [BR, NB(b), NB(j), G] is
permuted to [BR, NB(j), NB(b), G], so each piece keeps its G contiguous channels and the R2 operand goes through a
row-major buffer. The transposed product went through a column-major one, whose stores ncu measured with 10-way
bank conflicts on the H200 (half of the launch's shared-store wavefronts at 816 x 2048); where G = 1 (K = 16384)
the two are the same code. Rows of Z are (token, output block): the codes are stored exactly as the
tile kernel stores them, in natural order or in the packed-int4 GEMM's split order (even channels, then odd
ones). For the split order R2's columns are reordered too, even ones first: each half of a row of Z is then one
contiguous 64-byte run of the split layout, stored as it is (no deinterleave in registers).

Latency (ncu on the H100, BENCHMARKS.md §4): a persistent program reads the two 32 KB matrices once, and with
``PREFETCH`` (the default) its first x tile is requested before the matrices are staged and each next tile before
the current step computes; without it every program waited for two global latencies back to back. The smoothing
tile (``HOIST_SMOOTH``, the default) is the same [NB, BS] slice of 1/s at every step, so it too is requested once,
beside the first x tile, instead of once per step inside the latency chain (ncu had the smoothing multiply's wait
on it among the top stalls; H200, BENCHMARKS.md §4c: 49.2 -> 40.4 us at 816 x 16384 with the grid below, 8.7 ->
8.1 at 816 x 2048). Triton's own pipelining (``STAGES`` > 1) costs a shared-memory buffer per stage and measured
slower. The persistent grid is as many programs as fit on the device at once (``grid_programs``).

Numerics are the tile kernel's (``triton_act_tile``): fp16 rotations after a per-token power-of-two scaling,
float32 accumulation, round half to even for the codes (``reference.act_quant``'s spec); the int8 codes divide by
multiplying with 1/s for fp16 / bf16 rotations (``act_quant_shuffle``'s ``exact_div``), IEEE division otherwise.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from duquant.kernels.triton_act import ActPlan, _max_programs, libdevice, multiprocessors
from duquant.kernels.triton_act_tile import (
    _INTERPRET,
    PRECISIONS,
    _dot,
    _fp8_codes,
    _int8_codes,
    _load_block_table,
    _load_tile,
    _per_token,
    _times_block_table,
    _to_rows,
)


@triton.jit
def _fold_shuffle(y, BR: tl.constexpr, NB: tl.constexpr, G: tl.constexpr, BS: tl.constexpr):
    """[BR * NB, BS] R1 products (rows = token, input block b; columns e * NB + j) -> [BR * NB, BS] R2 inputs
    (rows = token, output block j; columns b * G + e)."""
    if BR == 1:
        out = tl.trans(tl.reshape(y, (BS, NB)))
    else:
        out = tl.reshape(tl.permute(tl.reshape(y, (BR, NB, G, NB)), (0, 3, 1, 2)), (BR * NB, BS))
    return out


@triton.jit
def _chunk_shuffle(y, BR: tl.constexpr, NB: tl.constexpr, G: tl.constexpr, BS: tl.constexpr):
    """The same fold for R1 in its own column order (``fold="chunk"``): [BR * NB, BS] R1 products (rows = token,
    input block b; columns j * G + e) -> R2 inputs (rows = token, output block j; columns b * G + e). Pieces of G
    channels move whole, so each keeps its 2 G contiguous bytes on the way through shared memory."""
    if BR == 1:
        out = tl.reshape(tl.permute(tl.reshape(y, (NB, NB, G)), (1, 0, 2)), (NB, BS))
    else:
        out = tl.reshape(tl.permute(tl.reshape(y, (BR, NB, NB, G)), (0, 2, 1, 3)), (BR * NB, BS))
    return out


@triton.jit
def _code_dest(blk, i, chan, K: tl.constexpr, BS: tl.constexpr, SPLIT: tl.constexpr):
    """Where tile element (block blk, column i) is stored in a token's code row: its channel, or in the split order
    (R2's columns came even-first, folded_matrices: each half-row is one contiguous run)."""
    if SPLIT:
        dest = blk[:, None] * (BS // 2) + (i % (BS // 2))[None, :] + (i // (BS // 2))[None, :] * (K // 2)
    else:
        dest = chan
    return dest


@triton.jit
def _gelu_tanh_mul(g, u, OUT_DTYPE: tl.constexpr):
    """gelu(g, approximate="tanh") * u in float32, rounded once to the model's dtype, as the compiled float path
    stores the down projection's input (tanh(z) = 1 - 2 / (exp(2z) + 1): no libdevice needed, also under the
    interpreter)."""
    g = g.to(tl.float32)
    z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    t = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)
    return (0.5 * g * (1.0 + t) * u.to(tl.float32)).to(OUT_DTYPE).to(tl.float32)


@triton.jit
def _shuffle_act_kernel(
    x_ptr, stride_xm, M, n_steps,
    inv_s_ptr, r1_ptr, r2_ptr,
    codes_ptr, stride_cm, scale_ptr, zero_ptr, rowsum_ptr,
    clip, u_ptr, stride_um,
    BR: tl.constexpr, NB: tl.constexpr, BS: tl.constexpr, G: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, SYMMETRIC: tl.constexpr, DOT: tl.constexpr, EXACT_DIV: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr, SPLIT: tl.constexpr, FP8: tl.constexpr, ROUND_E4M3: tl.constexpr,
    STAGES: tl.constexpr, PREFETCH: tl.constexpr, GEGLU: tl.constexpr, FP8_SUM: tl.constexpr, CHUNK: tl.constexpr,
    HOIST_SMOOTH: tl.constexpr = False,
):
    """GEGLU: x is the gate and ``u_ptr`` the up projection's output; the transformed input is their
    gelu-tanh product (``_gelu_tanh_mul``), computed here instead of in a kernel of its own (producer fusion
    for the down projection: its input is never written to memory)."""
    R: tl.constexpr = BR * NB
    K: tl.constexpr = NB * BS
    PRESCALE: tl.constexpr = DOT == 3
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if PREFETCH:  # this program's first x tile is in flight while the matrices are staged (ncu: two latencies)
        x_next = _load_tile(x_ptr, stride_xm, M, K, pid, BR, NB, BS, True)
        if GEGLU:
            u_next = _load_tile(u_ptr, stride_um, M, K, pid, BR, NB, BS, True)
    kk = tl.arange(0, BS)
    if HOIST_SMOOTH:  # the [NB, BS] smoothing tile is the same every step: requested once, beside the x prefetch
        inv_s_tile = _load_block_table(inv_s_ptr, NB, BS)
    r1 = tl.load(r1_ptr + kk[:, None] * BS + kk[None, :])
    r2 = tl.load(r2_ptr + kk[:, None] * BS + kk[None, :])
    for step in tl.range(pid, n_steps, nprog, num_stages=STAGES):
        z = step >> 30  # a zero the compiler cannot see through: index tensors stay inside the loop
        r = tl.arange(0, R) + z
        i = tl.arange(0, BS)
        tok_in = r // NB
        blk = r % NB  # input block on load; output block j on store (same row order: token, block)
        chan = blk[:, None] * BS + i[None, :]
        tok = step * BR + tok_in
        tmask = tok < M
        if PREFETCH:  # the next step's tile loads while this one computes (masked off past the last step)
            if GEGLU:
                x = _gelu_tanh_mul(x_next, u_next, x_next.dtype)
                u_next = _load_tile(u_ptr, stride_um, M, K, step + nprog, BR, NB, BS, True)
            else:
                x = x_next.to(tl.float32)
            x_next = _load_tile(x_ptr, stride_xm, M, K, step + nprog, BR, NB, BS, True)
        else:
            x = tl.load(x_ptr + tok[:, None].to(tl.int64) * stride_xm + chan, mask=tmask[:, None], other=0.0)
            if GEGLU:
                u = tl.load(u_ptr + tok[:, None].to(tl.int64) * stride_um + chan, mask=tmask[:, None], other=0.0)
                x = _gelu_tanh_mul(x, u, x.dtype)
            else:
                x = x.to(tl.float32)
        if HAS_SMOOTH:
            if HOIST_SMOOTH:
                x = _times_block_table(x, inv_s_tile, BR, NB, BS)
            else:
                x = x * tl.load(inv_s_ptr + chan)
        if PRESCALE:  # power of two per token: exact, keeps fp16 operands in range (triton_act_tile)
            amax = _per_token(tl.max(tl.abs(x), axis=1), BR, NB, 0)
            f = _to_rows(tl.exp2(11.0 - tl.floor(tl.log2(tl.maximum(amax, 1e-30)))), BR, NB)
            x = x * f[:, None]
        if DOT >= 2:
            x = x.to(r1.dtype)
        y = _dot(x, r1, DOT)
        if DOT >= 2:
            y = y.to(r2.dtype)
        if CHUNK:
            y = _dot(_chunk_shuffle(y, BR, NB, G, BS), r2, DOT)
        else:
            y = _dot(_fold_shuffle(y, BR, NB, G, BS), r2, DOT)
        if PRESCALE:
            y = y * (1.0 / f)[:, None]  # exact: f is a power of two

        toks = step * BR + tl.arange(0, BR)
        tm = toks < M
        every = tl.full((1, BS), 1, tl.int1)  # whole blocks: every channel is valid
        if FP8:  # e4m3 codes, scale = absmax * clip / 448 per token (formats/fp8.py)
            v, scale = _fp8_codes(y, every, clip, BR, NB, True, ROUND_E4M3, USE_LIBDEVICE)
            vq = v.to(tl.float8e4nv)
            dest = _code_dest(blk, i, chan, K, BS, SPLIT)
            tl.store(codes_ptr + tok[:, None].to(tl.int64) * stride_cm + dest, vq, mask=tmask[:, None])
            tl.store(scale_ptr + toks, scale, mask=tm)
            if FP8_SUM:  # the sum of the token's e4m3 values (the int4 x FP8 GEMM's weight zero-point term)
                tl.store(rowsum_ptr + toks, _per_token(tl.sum(vq.to(tl.float32), axis=1), BR, NB, 2), mask=tm)
        else:
            qi, scale, zero = _int8_codes(y, every, clip, BR, NB, True, SYMMETRIC, EXACT_DIV, USE_LIBDEVICE)
            dest = _code_dest(blk, i, chan, K, BS, SPLIT)
            tl.store(codes_ptr + tok[:, None].to(tl.int64) * stride_cm + dest, qi.to(tl.int8), mask=tmask[:, None])
            tl.store(scale_ptr + toks, scale, mask=tm)
            if not SYMMETRIC:
                tl.store(zero_ptr + toks, zero - 128.0, mask=tm)
            tl.store(rowsum_ptr + toks, _per_token(tl.sum(qi, axis=1), BR, NB, 2), mask=tm)


# ---- host side ----------------------------------------------------------------------------------------------------

FOLDS = ("chunk", "transpose")  # how the permutation passes between the rotations (act_quant_shuffle's `fold`)


def cannot_run(plan: ActPlan, precision: str = "fp16") -> str | None:
    """Why the folded kernel cannot run `plan` (None when it can): it runs exactly the shuffle permutation of whole
    128-wide blocks with one shared R1 and R2 (both present) and at least 16 blocks... or fewer with several tokens
    per step."""
    if not plan.fused:
        return f"this transform cannot run in a fused kernel: {plan.reason}"
    if not plan.shuffle_piece:
        return "the folded kernel runs only the shuffle permutation (permute=shuffle)"
    if plan.r1 is None or plan.r2 is None or plan.r1.shape[0] != 1 or plan.r2.shape[0] != 1:
        return "the folded kernel needs both rotations, one shared matrix each"
    if plan.K != plan.BS * (plan.K // plan.BS):
        return f"K={plan.K} is not whole {plan.BS}-wide blocks"
    if precision not in PRECISIONS:
        return f"precision {precision!r} not in {list(PRECISIONS)}"
    return None


def folded_matrices(plan: ActPlan, precision: str, split: bool = False,
                    fold: str = "chunk") -> tuple[torch.Tensor, torch.Tensor]:
    """(R1, R2) in the dot's operand dtype, cached on the plan: R1 in its own column order for ``fold="chunk"``
    (the kernel moves whole G-channel pieces, ``_chunk_shuffle``), with columns e * NB + j <- j * G + e for
    ``fold="transpose"`` (``_fold_shuffle``); with `split` R2's even columns first, then its odd ones."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    cache = plan.__dict__.setdefault("_folded_mats", {})
    if (dtype, split, fold) not in cache:
        bs, nb = plan.BS, plan.K // plan.BS
        g = bs // nb
        c = torch.arange(bs, device=plan.r1.device)
        kappa = (c % nb) * g + c // nb  # folded column c = e * NB + j takes column j * G + e
        r1 = plan.r1[0] if fold == "chunk" else plan.r1[0][:, kappa]
        r2 = plan.r2[0][:, torch.cat([c[0::2], c[1::2]])] if split else plan.r2[0]
        cache[dtype, split, fold] = (r1.to(dtype).contiguous(), r2.to(dtype).contiguous())
    return cache[dtype, split, fold]


def grid_programs(device, warps: int) -> int:
    """Programs of the persistent grid: as many as are resident at once (DUQUANT_ACT_PROGRAMS overrides). An
    8-warp program (one token of K = 16384 a step) needs about 254 registers a thread, so one fits per
    multiprocessor, and a grid of two per multiprocessor ran as two waves (H200, hoisted smoothing: 43.5 vs
    40.4 us at 816 x 16384); two 4-warp programs fit (82 KB of shared memory each), and one per multiprocessor was
    slower there (8.1 vs 9.1 us at 816 x 2048; BENCHMARKS.md §4c)."""
    if os.environ.get("DUQUANT_ACT_PROGRAMS"):
        return _max_programs(device)
    return multiprocessors(device) * (1 if warps >= 8 else 2)


def default_config(m: int, k: int, bs: int = 128) -> tuple[int, int, int]:
    """(BR tokens per step, num_warps, num_stages), from the H100 sweep (BENCHMARKS.md §4, bench/act_transform.py
    --fold-sweep, with the x prefetch): steps of 64 rows for many tokens of 16 blocks (K = 2048: 10.0 us at
    M = 816, 16 rows 15.3), else one token per step (or the 16 rows a dot needs); 8 warps for a 128-row step, 4
    below. One stage: a second stage's shared-memory buffer costs more occupancy than its prefetch gains (every
    stages = 2 / 3 row was slower); the kernel's own register prefetch does that job."""
    nb = k // bs
    br = max(1, (64 if m >= 256 and nb <= 16 else 16) // nb)
    warps = 8 if br * nb >= 128 else 4
    return br, warps, 1


def act_quant_shuffle(x: torch.Tensor, plan: ActPlan, *, symmetric: bool = False, clip: float = 1.0,
                      layout: str = "natural", precision: str = "fp16", exact_div: bool | None = None,
                      block_tokens: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                      programs: int | None = None, fp8: bool = False, prefetch: bool | None = None,
                      out: tuple | None = None, up: torch.Tensor | None = None, fp8_sum: bool = False,
                      fold: str | None = None, hoist_smooth: bool | None = None, max_registers: int | None = None):
    """``triton_act_tile.act_quant_tile``'s contract for a shuffle-permutation plan (``cannot_run`` says when
    not): x [M, K] -> (codes, scale, zero | None, rowsum | None). K is whole blocks, so the split layout has no pad
    column here.

    ``exact_div`` (default: IEEE division for the float32 precisions ``ieee`` / ``tf32`` only): with fp16 / bf16
    rotations the values being divided already carry the operands' rounding (codes within 2 of the spec's on a
    few %), and x * (1/s) adds at most an ulp before rounding, which moves a code only when the value sits within
    that ulp of a half-integer; it saves 15 % (H100, BENCHMARKS.md §4). ``prefetch`` (default on): the first x
    tile is requested before the matrices are staged and the next one before each step computes. ``up``: x is
    the gate and ``up`` the up projection's output of a GeGLU MLP; the kernel transforms gelu_tanh(x) * up
    (rounded once to x's dtype, as the compiled float path stores it) without that product ever being written.
    ``fold``: how the permutation passes through shared memory between the two rotations, ``"chunk"`` (the
    default: whole G-channel pieces moved, a row-major buffer) or ``"transpose"`` (R1's columns reordered, the
    R1 product transposed into a column-major buffer: 10-way bank conflicts on its stores, ncu on the H200); the
    same products, so the same codes. Default ``DUQUANT_FOLD``, else chunk (H200, BENCHMARKS.md §4b: 9.75 ->
    8.73 us at 816 x 2048, 93.1 -> 78.9 at 13056 x 2048; the same code where G = 1, K = 16384). ``hoist_smooth``
    (default: on, except with ``up``, where it would spill at K = 16384): the smoothing tile is loaded once per
    program, not once per step; the same products. ``max_registers``: a register cap for launch sweeps
    (Triton's ``maxnreg``; none by default: 128 lets two 8-warp programs share a multiprocessor, slower with the
    hoisted tile, BENCHMARKS.md §4c). ``programs``: the persistent grid (default ``grid_programs``)."""
    why = cannot_run(plan, precision)
    if why:
        raise ValueError(why)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if up is not None:
        if up.shape != x.shape or up.dtype != x.dtype:
            raise ValueError(f"GeGLU input: up {tuple(up.shape)} {up.dtype} must match the gate "
                             f"{tuple(x.shape)} {x.dtype}")
        if up.stride(-1) != 1:
            up = up.contiguous()
    m, k = x.shape
    if k != plan.K:
        raise ValueError(f"activation kernel built for K={plan.K}, got input with {k} channels")
    if fp8:
        symmetric = True
    dev = x.device
    if out is None:
        if fp8:
            out = (torch.empty(m, k, dtype=torch.float8_e4m3fn, device=dev), torch.empty(m, dtype=torch.float32,
                                                                                        device=dev), None,
                   torch.empty(m, dtype=torch.float32, device=dev) if fp8_sum else None)
        else:
            out = (torch.empty(m, k, dtype=torch.int8, device=dev), torch.empty(m, dtype=torch.float32, device=dev),
                   None if symmetric else torch.empty(m, dtype=torch.float32, device=dev),
                   torch.empty(m, dtype=torch.int32, device=dev))
    codes, scale, zero, rowsum = out
    if m == 0:
        return codes, scale, zero, rowsum
    bs, nb = plan.BS, k // plan.BS
    br, warps, stages = default_config(m, k, bs)
    br = block_tokens or br
    warps = num_warps or warps
    stages = num_stages or stages
    if br & (br - 1) or br * nb < 16:
        raise ValueError(f"block_tokens={br}: a power of two with at least 16 rows per step for tl.dot "
                         f"({nb} blocks per token)")
    fold = fold or os.environ.get("DUQUANT_FOLD", "chunk")
    if fold not in FOLDS:
        raise ValueError(f"fold={fold!r}: one of {FOLDS} (DUQUANT_FOLD)")
    r1, r2 = folded_matrices(plan, precision, split=layout == "split", fold=fold)
    n_steps = triton.cdiv(m, br)
    nprog = min(n_steps, programs or grid_programs(dev, warps))
    hoist_smooth = up is None if hoist_smooth is None else hoist_smooth
    inv_s = plan.inv_smooth if plan.inv_smooth is not None else scale
    _shuffle_act_kernel[(nprog,)](
        x, x.stride(0), m, n_steps, inv_s, r1, r2,
        codes, codes.stride(0), scale, zero if zero is not None else scale, rowsum if rowsum is not None else scale,
        float(clip), up if up is not None else x, (up if up is not None else x).stride(0),
        BR=br, NB=nb, BS=bs, G=bs // nb, HAS_SMOOTH=plan.inv_smooth is not None, SYMMETRIC=bool(symmetric),
        DOT=PRECISIONS[precision],
        EXACT_DIV=bool(precision in ("ieee", "tf32") if exact_div is None else exact_div),
        USE_LIBDEVICE=not _INTERPRET and libdevice is not None,
        SPLIT=layout == "split", FP8=bool(fp8), ROUND_E4M3=_INTERPRET, STAGES=stages,
        PREFETCH=bool(True if prefetch is None else prefetch), GEGLU=up is not None,
        FP8_SUM=bool(fp8 and rowsum is not None), CHUNK=fold == "chunk",
        HOIST_SMOOTH=bool(hoist_smooth and plan.inv_smooth is not None), num_warps=warps,
        **({} if max_registers is None else {"maxnreg": int(max_registers)}),
    )
    return codes, scale, zero, rowsum
