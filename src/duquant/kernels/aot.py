"""Compile a Triton kernel for a GPU that is not here (sm_90 by default) and read what ptxas says: registers,
spills, shared memory. Triton's whole pipeline (TTIR -> TTGIR -> PTX -> cubin) runs on the CPU with the ptxas its
wheel ships, so a configuration that would spill or not compile on the H100 shows up before a GPU run.

    from duquant.kernels.aot import tile_kernel_report
    tile_kernel_report(block_tokens=2, nbp=16, num_warps=4)   # {'registers': 168, 'spill_bytes': 0, ...}
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile


def compile_report(fn, signature: dict, constexprs: dict, num_warps: int = 4, arch: int = 90,
                   divisible: tuple | None = None, num_stages: int | None = None) -> dict:
    """signature: {arg: type string ("*fp16", "i32", "fp32")}, constexprs: {arg: value}; -> registers, spill
    bytes (stores), shared memory bytes, and the TTGIR's convert_layout count (register <-> shared round trips).

    ``divisible``: arguments to mark divisible by 16, as Triton's JIT does at launch for 16-byte aligned pointers
    and integers that are multiples of 16 (without it the code is the worst case: byte-wise, unpipelined loads).
    Default: every pointer and every argument whose name starts with "stride". The JIT also marks integer
    arguments whose launch value is a multiple of 16 (K = 1024, say): name those here to compile what runs, since
    a mask on an unmarked bound keeps masked loads out of the software pipeline."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    order = getattr(fn, "arg_names", None)  # the kernel's parameter order: indices below refer to it
    if order is not None and set(order) == set(sig):
        sig = {name: sig[name] for name in order}
    names = list(sig)
    if divisible is None:
        divisible = tuple(k for k, v in signature.items() if v.startswith("*") or k.startswith("stride"))
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in divisible}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    options = {"num_warps": num_warps} | ({} if num_stages is None else {"num_stages": num_stages})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(kernel.asm["ptx"])
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", path, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": int(spill.group(1)) if spill else 0,
            "shared_bytes": int(kernel.metadata.shared), "convert_layouts": kernel.asm["ttgir"].count(
                "ttg.convert_layout"), "async_copies": kernel.asm["ttgir"].count("ttg.async_copy_global_to_local"),
            "tma_copies": kernel.asm["ttgir"].count("ttng.async_tma_copy_global_to_local"),
            "wgmma": kernel.asm["ttgir"].count("ttng.warp_group_dot ")}


def tile_kernel_report(block_tokens: int, nbp: int, num_warps: int, precision: str = "fp16", perm_mode: int = 0,
                       hoist: bool = True, fp8: bool = False, two: bool = False, exact_div: bool = True,
                       arch: int = 90, **flags) -> dict:
    """compile_report of ``triton_act_tile._tile_act_kernel`` with a DuQuant transform (smooth, R1, perm, R2)."""
    from duquant.kernels.triton_act_tile import PRECISIONS, _tile_act_kernel, hoist_smooth_default

    dot = PRECISIONS[precision]
    op = {0: "fp32", 1: "fp32", 2: "bf16", 3: "fp16"}[dot]
    sig = {"x_ptr": "*bf16", "stride_xm": "i32", "M": "i32", "K": "i32", "num_tiles": "i32", "inv_s_ptr": "*fp32",
           "r1_ptr": f"*{op}", "r2_ptr": f"*{op}", "perm_ptr": "*i16", "scratch_ptr": f"*{op}",
           "codes_ptr": "*fp8e4nv" if fp8 else "*i8", "stride_cm": "i32", "scale_ptr": "*fp32", "zero_ptr": "*fp32",
           "rowsum_ptr": "*i32", "clip": "fp32", "last_block": "i32"}
    cons = dict(BR=block_tokens, NBP=nbp, BS=128, HAS_SMOOTH=True, HAS_R1=True, R1_TWO=two, HAS_PERM=True,
                HAS_R2=True, R2_TWO=two, SYMMETRIC=False, DOT=dot, PERM_MODE=perm_mode, EXACT_DIV=exact_div,
                USE_LIBDEVICE=True, HOIST=hoist, SPLIT=False, FP8=fp8, ROUND_E4M3=False, EVEN=not two,
                G=max(1, 128 // nbp) if perm_mode == 2 else 1, PREFETCH=True, FP8_SUM=False,
                HOIST_SMOOTH=hoist_smooth_default(block_tokens * nbp))  # the host's defaults (act_quant_tile)
    cons.update(flags)  # e.g. HAS_PERM=False: what one stage costs in registers
    if cons["FP8_SUM"]:
        sig["rowsum_ptr"] = "*fp32"
    return compile_report(_tile_act_kernel, sig, cons, num_warps=num_warps, arch=arch)


def chunked_kernel_report(chunk_rows: int, nbp: int, num_warps: int = 4, precision: str = "fp16",
                          fp8: bool = False, arch: int = 90, **flags) -> dict:
    """compile_report of ``triton_act_tile._tile_act_chunked_kernel`` (one token in chunks), DuQuant transform."""
    import triton.language as tl

    from duquant.kernels.triton_act_tile import PRECISIONS, _tile_act_chunked_kernel

    dot = PRECISIONS[precision]
    op = {0: "fp32", 1: "fp32", 2: "bf16", 3: "fp16"}[dot]
    sig = {"x_ptr": "*bf16", "stride_xm": "i32", "M": "i32", "K": "i32", "inv_s_ptr": "*fp32",
           "r1_ptr": f"*{op}", "r2_ptr": f"*{op}", "perm_ptr": "*i16", "scratch_ptr": f"*{op}",
           "codes_ptr": "*fp8e4nv" if fp8 else "*i8", "stride_cm": "i32", "scale_ptr": "*fp32", "zero_ptr": "*fp32",
           "rowsum_ptr": "*i32", "clip": "fp32", "last_block": "i32"}
    cons = dict(RC=chunk_rows, NBP=nbp, BS=128, HAS_SMOOTH=True, HAS_R1=True, R1_TWO=False, HAS_PERM=True,
                HAS_R2=True, R2_TWO=False, SYMMETRIC=False, DOT=dot, EXACT_DIV=True, USE_LIBDEVICE=True, SPLIT=False,
                FP8=fp8, ROUND_E4M3=False, EVEN=True,
                OP_DTYPE={"fp16": tl.float16, "bf16": tl.bfloat16}.get(precision, tl.float32), FP8_SUM=False)
    cons.update(flags)
    if cons["FP8_SUM"]:
        sig["rowsum_ptr"] = "*fp32"
    return compile_report(_tile_act_chunked_kernel, sig, cons, num_warps=num_warps, arch=arch)


def shuffle_kernel_report(block_tokens: int, nb: int, num_warps: int, precision: str = "fp16", stages: int = 1,
                          fp8: bool = False, split: bool = False, arch: int = 90, **flags) -> dict:
    """compile_report of ``triton_act_shuffle._shuffle_act_kernel`` (permute=shuffle folded into the matrices)."""
    from duquant.kernels.triton_act_shuffle import PRECISIONS, _shuffle_act_kernel

    dot = PRECISIONS[precision]
    op = {0: "fp32", 1: "fp32", 2: "bf16", 3: "fp16"}[dot]
    sig = {"x_ptr": "*bf16", "stride_xm": "i32", "M": "i32", "n_steps": "i32", "inv_s_ptr": "*fp32",
           "r1_ptr": f"*{op}", "r2_ptr": f"*{op}", "codes_ptr": "*fp8e4nv" if fp8 else "*i8", "stride_cm": "i32",
           "scale_ptr": "*fp32", "zero_ptr": "*fp32", "rowsum_ptr": "*i32", "clip": "fp32", "u_ptr": "*bf16",
           "stride_um": "i32"}
    cons = dict(BR=block_tokens, NB=nb, BS=128, G=128 // nb, HAS_SMOOTH=True, SYMMETRIC=False, DOT=dot,
                EXACT_DIV=precision in ("ieee", "tf32"), USE_LIBDEVICE=True, SPLIT=split, FP8=fp8, ROUND_E4M3=False,
                STAGES=stages, PREFETCH=True, GEGLU=False, FP8_SUM=False, CHUNK=True)  # the host's defaults
    cons.update(flags)
    cons.setdefault("HOIST_SMOOTH", not cons["GEGLU"])  # the host hoists the smoothing tile except with GEGLU
    if cons["FP8_SUM"]:
        sig["rowsum_ptr"] = "*fp32"
    return compile_report(_shuffle_act_kernel, sig, cons, num_warps=num_warps, arch=arch)


def w4a16_kernel_report(impl: str = "natural", bn: int = 64, bm: int = 64, bk: int = 128, split_k: int = 1,
                        ilv: int = 0, num_warps: int = 4, num_stages: int = 4, group_size: int = 0,
                        arch: int = 90) -> dict:
    """compile_report of a w4a16 kernel (``natural`` or ``stride2``) at one launch configuration, per channel."""
    from duquant.kernels import triton_w4a16 as w4

    sig = {"x_ptr": "*bf16", "stride_xm": "i32", "w_ptr": "*u8", "stride_wn": "i32", "s_ptr": "*fp32",
           "z_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*bf16", "stride_ym": "i32", "ws_ptr": "*fp32",
           "lock_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "KH": "i32", "NG": "i32", "MB": "i32"}
    if impl == "natural":
        fn, cons = w4._w4a16_natural_kernel.fn, dict(GS=group_size, HAS_BIAS=False, USE_ASM=True, BN=bn, BM=bm,
                                                     BK=bk, SPLIT_K=split_k, ILV=ilv)
    else:
        fn, cons = w4._w4a16_kernel.fn, dict(GS=group_size, HAS_BIAS=False, BN=bn, BM=bm, KS=bk, SPLIT_K=split_k)
    div = tuple(k for k, v in sig.items() if v.startswith("*") or k.startswith("stride")) + ("K", "KH", "N", "MB")
    return compile_report(fn, sig, cons, num_warps=num_warps, arch=arch, num_stages=num_stages, divisible=div)


def tma_gemm_report(bm: int, bn: int, bk: int, num_warps: int, num_stages: int, w_kind: int = 2,
                    arch: int = 90, persistent: bool = False, num_sms: int = 132) -> dict:
    """compile_report of ``triton_gemm._gemm_swap_tma_kernel`` (weights as the MMA's A operand, both operands
    through TMA descriptors) at one launch configuration; ``w_kind`` 2 = packed int4, 0 = int8, 1 = uint8,
    3 = packed int4 x FP8 activations; ``persistent``: ``_gemm_swap_tma_persistent_kernel`` (num_sms programs)."""
    from duquant.kernels import triton_gemm as g

    fp8 = w_kind == g.W_INT4_FP8
    bkd = bk // 2 if w_kind in (g.W_INT4, g.W_INT4_FP8) else bk
    wty = "i8" if w_kind == g.W_INT8 else "u8"
    sig = {"x_desc": f"tensordesc<{'fp8e4nv' if fp8 else 'i8'}[{bm}, {bkd}]>",
           "w_desc": f"tensordesc<{wty}[{bn}, {bkd}]>", "M": "i32", "N": "i32", "K": "i32", "KH": "i32",
           "sx_ptr": "*fp32", "zx_ptr": "*fp32", "rs_ptr": "*fp32" if fp8 else "*i32",
           "sw_ptr": "*fp32", "zw_ptr": "*i32", "cw_ptr": "*fp32", "bias_ptr": "*fp32", "o0": "*bf16", "o1": "*bf16",
           "o2": "*bf16", "n1": "i32", "n2": "i32", "so0": "i32", "so1": "i32", "so2": "i32", "MB": "i32"}
    cons = dict(W_KIND=w_kind, ASYM_X=not fp8, HAS_BIAS=False, NUM_OUT=1, USE_ASM=True, BM=bm, BN=bn, BK=bk,
                GROUP_M=8)
    div = tuple(k for k, v in sig.items() if v.startswith("*")) + ("N", "K", "KH", "so0", "so1", "so2")
    fn = g._gemm_swap_tma_kernel.fn
    if persistent:
        fn, cons["NUM_SMS"] = g._gemm_swap_tma_persistent_kernel.fn, num_sms
    return compile_report(fn, sig, cons, num_warps=num_warps, arch=arch, num_stages=num_stages, divisible=div)
