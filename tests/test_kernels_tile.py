"""The block-tile activation kernel (kernels/triton_act_tile.py) under the Triton interpreter (CPU), against the
eager spec ``reference.act_quant``; skipped when triton is not installed. GPU agreement: bench/act_transform.py."""

import textwrap

import pytest

from gpu_marks import needs_gpu
from triton_interpreter import PREAMBLE, run_under_interpreter

_SCRIPT = PREAMBLE + textwrap.dedent("""
    from duquant.kernels import reference
    from duquant.random_layers import random_activations, random_group
    from duquant.kernels.triton_act import build_act_plan
    from duquant.kernels.triton_act_tile import act_quant_tile

    CASES = [  # k, block, method, act symmetric, layout, precision, perm mode, tokens per tile
        (96, 32, "duquant", False, "natural", "ieee", "scratch", None),  # 5 tiles on 4 programs: scratch reuse
        (96, 32, "duquant", False, "split", "fp16", "gather", 8),
        (300, 64, "duquant", False, "split", "ieee", "gather", 4),     # partial last block: its own matrices
        (300, 64, "duquant", True, "natural", "fp16", "scratch", None),
        (77, 16, "duquant", False, "split", "ieee", "scratch", 2),       # odd K: split pad column
        (128, 64, "hadamard", True, "natural", "fp16", "scratch", None),
        (128, 32, "smoothquant", False, "natural", "fp16", "gather", None),
        (70, 16, "rtn", False, "split", "ieee", "scratch", None),
        (300, 16, "duquant", False, "split", "ieee", "chunk16", None),  # one token in chunks: 19 -> 2 x 16 blocks
        (512, 16, "duquant", True, "natural", "fp16", "chunk16", None),
    ]
    for k, bs, method, sym, layout, prec, pmode, br in CASES:
        chunk = 0
        if pmode.startswith("chunk"):
            chunk, pmode = int(pmode[5:]), None
        layer = random_group(k, [8], method=method, block_size=bs, act_symmetric=sym, seed=k + bs)[0]
        x = random_activations(19, k, seed=k)
        x[3] *= 1e-3  # tokens of very different magnitude share a tile (the fp16 per-token scaling)
        x[4] *= 300.0
        plan = build_act_plan(layer.transform, k, "cpu")
        assert plan.fused, plan.reason
        rc, rsx, rzx = reference.act_quant(x, layer.transform, 8, sym, 0.9)
        ref = reference.split_int4_order(rc) if layout == "split" else rc
        kc = ref.shape[1]
        poison = (torch.full((19, kc), 77, dtype=torch.int8), torch.full((19,), float("nan")),
                  None if sym else torch.full((19,), float("nan")), torch.full((19,), -7, dtype=torch.int32))
        codes, sx, zx, rs = act_quant_tile(x, plan, symmetric=sym, clip=0.9, layout=layout, precision=prec,
                                           perm_mode=pmode, block_tokens=br, chunk_rows=chunk, out=poison,
                                           prefetch=not chunk and k % 2 == 0)
        d = (codes.int() - ref.int()).abs()
        # ieee: float32 rotations, the spec's codes; fp16: operands rounded like tf32 -> rare +-1 (GPU: <= 2)
        max_d, max_rate, rtol = (0, 0.0, 1e-6) if prec == "ieee" else (1, 0.05, 2e-3)
        assert int(d.max()) <= max_d and float((d > 0).float().mean()) <= max_rate, (k, prec, int(d.max()))
        assert torch.allclose(sx, rsx, rtol=rtol, atol=0), (k, float(((sx - rsx) / rsx).abs().max()))
        if sym:
            assert zx is None
        else:
            assert bool(((zx - rzx).abs() <= (0 if prec == "ieee" else 1)).all()), k
        assert torch.equal(rs, reference.code_row_sums(codes)), k
        if not chunk:  # the smoothing table loaded at every tile (the 128-row tiles' default): the same products
            again = act_quant_tile(x, plan, symmetric=sym, clip=0.9, layout=layout, precision=prec, perm_mode=pmode,
                                   block_tokens=br, prefetch=k % 2 == 0, hoist_smooth=False)
            assert all(torch.equal(a, b) for a, b in zip(again, (codes, sx, zx, rs)) if a is not None), k
    print("TILE INTERPRETER OK")
""")


def test_tile_kernel_under_interpreter():
    run_under_interpreter(_SCRIPT, "TILE INTERPRETER OK", timeout=600)


def test_tile_config_has_mma_rows():
    pytest.importorskip("triton")
    from duquant.kernels.triton_act_tile import default_config

    for m, k in [(816, 2048), (816, 16384), (51, 1024), (51, 4096), (768, 1152), (768, 4304), (1, 128)]:
        br, warps, _ = default_config(m, k)
        nbp = 1 << max(0, (-(-k // 128) - 1).bit_length())
        assert br * nbp >= 16 and warps in (4, 8)


def test_float32_rotations_of_a_partial_last_block_are_refused_by_name():
    """Four float32 128 x 128 matrices do not fit in sm_90's shared memory (aot.py: 278 KB), so the tile kernel
    says so before launching and the gpu backend sends those widths to the fused kernel; fp16 runs them."""
    pytest.importorskip("triton")
    import torch

    from duquant.kernels.triton_act import build_act_plan
    from duquant.kernels.triton_act_tile import act_quant_tile, cannot_run
    from duquant.random_layers import random_layer

    partial = build_act_plan(random_layer(4304, 8, seed=1, steps=2).transform, 4304, "cpu")
    whole = build_act_plan(random_layer(256, 8, seed=1, steps=2).transform, 256, "cpu")
    for precision in ("ieee", "tf32"):
        assert "fp16 or bf16" in cannot_run(partial, precision)
        with pytest.raises(ValueError, match="fp16 or bf16"):
            act_quant_tile(torch.zeros(2, 4304), partial, precision=precision)
        assert cannot_run(whole, precision) is None
    assert cannot_run(partial, "fp16") is None and cannot_run(partial, "bf16") is None


def test_tile_modes_over_shared_memory_are_refused_by_name():
    """A 128-row tile (K = 16384, one token per tile) in the gather or transpose mode needs more shared memory
    than sm_90 has (gather: 448 KB, the H200's launch error): refused before launching, naming the mode that
    runs (scratch)."""
    pytest.importorskip("triton")
    import torch

    from duquant.kernels.triton_act import build_act_plan
    from duquant.kernels.triton_act_tile import act_quant_tile
    from duquant.random_layers import random_layer

    plan = build_act_plan(random_layer(16384, 8, seed=1, steps=2).transform, 16384, "cpu")
    with pytest.raises(ValueError, match="448 KB.*perm_mode='scratch'"):
        act_quant_tile(torch.zeros(4, 16384), plan, perm_mode="gather")


def test_default_config_compiles_for_sm90_without_spills():
    """The whole Triton pipeline for sm_90 on the CPU (its bundled ptxas): the LLM q/k/v input's default tile
    compiles and fits in registers (a hoisted [R, 128] index tensor once spilled every register)."""
    pytest.importorskip("triton")
    from duquant.kernels.aot import tile_kernel_report
    from duquant.kernels.triton_act_tile import default_config

    br, warps, pmode = default_config(816, 2048)
    rep = tile_kernel_report(br, 16, warps, perm_mode=pmode)
    assert rep["spill_bytes"] == 0 and rep["registers"] <= 255, rep


# ---- GPU (H100; skipped on CI) ----------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("m,k", [(816, 2048), (51, 1024), (816, 16384), (51, 4096), (768, 1152), (768, 4304),
                                 (7, 2048)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("perm_mode", ["scratch", "gather", "transpose"])
def test_gpu_tile_kernel_matches_reference(m, k, symmetric, perm_mode):
    """Same bounds as the fused kernel's GPU test (docs/gpu.md): ieee -> the spec's codes but a rare +-1; fp16
    (operands rounded like tf32) -> |dcode| <= 2 on a few %, scales within 0.5 %; split layout = natural reordered.
    transpose: the layer's permutation replaced by the shuffle (widths of a power-of-two number of blocks)."""
    import torch

    from duquant.kernels import reference
    from duquant.kernels.triton_act import build_act_plan
    from duquant.kernels.triton_act_tile import act_quant_tile
    from duquant.random_layers import random_activations, random_layer

    layer = random_layer(k, 16, seed=k, steps=4)
    if perm_mode == "transpose":
        nb = k // 128
        if k % 128 or nb & (nb - 1):
            pytest.skip("the shuffle permutation needs a power-of-two number of full blocks")
        g = 128 // nb
        layer.transform.perm = torch.arange(k).view(nb, nb, g).permute(1, 0, 2).reshape(-1)
    x = random_activations(m, k, seed=m, dtype=torch.bfloat16, device="cuda")
    if k == 16384 and perm_mode != "scratch":  # a 128-row tile: over sm_90's shared memory, refused by name
        with pytest.raises(ValueError, match="shared memory.*perm_mode='scratch'"):
            act_quant_tile(x, build_act_plan(layer.transform, k, "cuda"), clip=0.9, perm_mode=perm_mode)
        return
    rc, rsx, rzx = reference.act_quant(x.cpu(), layer.transform, 8, symmetric, 0.9)
    plan = build_act_plan(layer.transform, k, "cuda")
    for precision, max_d, max_flip, rtol in (("ieee", 1, 1e-4, 1e-5), ("fp16", 2, 0.1, 5e-3)):
        if precision == "ieee" and k % 128:  # float32 matrices of a partial last block: no room, says so
            with pytest.raises(ValueError, match="fp16 or bf16"):
                act_quant_tile(x, plan, symmetric=symmetric, clip=0.9, precision=precision)
            continue
        codes, sx, zx, rs = act_quant_tile(x, plan, symmetric=symmetric, clip=0.9, precision=precision,
                                           perm_mode=perm_mode)
        d = (codes.cpu().int() - rc.int()).abs()
        assert d.max() <= max_d and (d > 0).float().mean() <= max_flip, (precision, int(d.max()))
        assert torch.allclose(sx.cpu(), rsx, rtol=rtol)
        assert torch.equal(rs.cpu(), reference.code_row_sums(codes.cpu()))
        split = act_quant_tile(x, plan, symmetric=symmetric, clip=0.9, precision=precision, perm_mode=perm_mode,
                               layout="split")[0]
        assert torch.equal(split.cpu(), reference.split_int4_order(codes.cpu()))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("m,k", [(816, 2048), (51, 1024), (816, 16384), (51, 4096), (7, 2048), (51, 2048)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gpu_folded_shuffle_kernel_matches_reference(m, k, symmetric):
    """The folded kernel (triton_act_shuffle) on a shuffle transform, at its defaults (fp16, prefetch, x * (1/s))
    and with IEEE rotations: the fp16 bounds of the tile kernel's test; split order = natural reordered; fp8 codes
    within one e4m3 step of the spec's."""
    import torch

    from duquant.formats.fp8 import fp8_quantize
    from duquant.kernels import reference
    from duquant.kernels.triton_act import build_act_plan
    from duquant.kernels.triton_act_shuffle import act_quant_shuffle
    from duquant.random_layers import random_activations, random_transform

    t = random_transform(k, "duquant", 128, seed=k, steps=4, permute="shuffle")
    x = random_activations(m, k, seed=m, dtype=torch.bfloat16, device="cuda")
    rc, rsx, rzx = reference.act_quant(x.cpu(), t, 8, symmetric, 0.9)
    plan = build_act_plan(t, k, "cuda")
    assert plan.shuffle_piece
    for precision, max_d, max_flip, rtol in (("ieee", 1, 1e-4, 1e-5), ("fp16", 2, 0.1, 5e-3)):
        codes, sx, zx, rs = act_quant_shuffle(x, plan, symmetric=symmetric, clip=0.9, precision=precision)
        d = (codes.cpu().int() - rc.int()).abs()
        if not symmetric:
            # codes relative to their token's zero point: the value they stand for. A token whose -min/scale sits
            # next to a half-integer may get a zero point one off (fp16 rotations move min a little), which shifts
            # its every code by one and the dequantized values by nothing (H100: 1 of 7 tokens at M = 7)
            assert bool(((zx.cpu() - rzx).abs() <= (0 if precision == "ieee" else 1)).all())
            d = ((codes.cpu().int() - zx.cpu().round().int()[:, None])
                 - (rc.int() - rzx.round().int()[:, None])).abs()
        assert d.max() <= max_d and (d > 0).float().mean() <= max_flip, (precision, int(d.max()))
        assert torch.allclose(sx.cpu(), rsx, rtol=rtol)
        assert torch.equal(rs.cpu(), reference.code_row_sums(codes.cpu()))
        split = act_quant_shuffle(x, plan, symmetric=symmetric, clip=0.9, precision=precision, layout="split")[0]
        assert torch.equal(split.cpu(), reference.split_int4_order(codes.cpu()))
        tr = act_quant_shuffle(x, plan, symmetric=symmetric, clip=0.9, precision=precision, fold="transpose")
        assert torch.equal(tr[0], codes) and torch.equal(tr[1], sx), (precision, "transpose fold")
        ps = act_quant_shuffle(x, plan, symmetric=symmetric, clip=0.9, precision=precision, hoist_smooth=False)
        assert torch.equal(ps[0], codes) and torch.equal(ps[1], sx), (precision, "smoothing tile per step")
    c8, s8, _, _ = act_quant_shuffle(x, plan, clip=0.9, fp8=True)
    rc8, rs8 = fp8_quantize(t.apply(x.cpu().float()), 0.9)
    ulp = torch.exp2(torch.floor(torch.log2(rc8.float().abs().clamp(min=2.0 ** -9))) - 3).clamp(min=2.0 ** -9)
    assert bool(((c8.cpu().float() - rc8.float()).abs() <= ulp + 0.5).all())
    assert torch.allclose(s8.cpu(), rs8.reshape(-1), rtol=5e-3)


_SHUFFLE_SCRIPT = PREAMBLE + textwrap.dedent("""
    from duquant.kernels import reference
    from duquant.random_layers import random_activations, random_group
    from duquant.kernels.triton_act import build_act_plan
    from duquant.kernels.triton_act_tile import act_quant_tile

    def shuffle(k, bs):  # written out element by element: output block j = piece j of every block, in block order
        nb, g = k // bs, bs // (k // bs)
        return torch.tensor([b * bs + j * g + e for j in range(nb) for b in range(nb) for e in range(g)])

    CASES = [(256, 32, 4, None, "split"), (256, 16, 1, None, "natural"), (256, 16, 1, 1, "natural"),
             (64, 16, 4, 4, "split")]  # k, block, expected piece width, tokens per tile, layout
    for k, bs, g, br, layout in CASES:
        layer = random_group(k, [8], method="duquant", block_size=bs, seed=k + bs)[0]
        t = layer.transform
        t.perm = shuffle(k, bs)
        plan = build_act_plan(t, k, "cpu")
        assert plan.shuffle_piece == g, (k, bs, plan.shuffle_piece)
        x = random_activations(19, k, seed=k)
        x[4] *= 300.0
        rc, rsx, rzx = reference.act_quant(x, t, 8, False, 0.9)
        ref = reference.split_int4_order(rc) if layout == "split" else rc
        for prec in ("ieee", "fp16"):
            codes, sx, zx, rs = act_quant_tile(x, plan, symmetric=False, clip=0.9, layout=layout, precision=prec,
                                               block_tokens=br, perm_mode="transpose")
            d = (codes.int() - ref.int()).abs()
            max_d, max_rate, rtol = (0, 0.0, 1e-6) if prec == "ieee" else (1, 0.05, 2e-3)
            assert int(d.max()) <= max_d and float((d > 0).float().mean()) <= max_rate, (k, bs, prec)
            assert torch.allclose(sx, rsx, rtol=rtol, atol=0), (k, bs, prec)
            assert torch.equal(rs, reference.code_row_sums(codes)), k
    # a zigzag-like permutation is not the shuffle: the table path runs it, and asking for the transpose is refused
    layer = random_group(256, [8], method="duquant", block_size=32, seed=3)[0]
    plan = build_act_plan(layer.transform, 256, "cpu")
    assert plan.shuffle_piece == 0
    try:
        act_quant_tile(random_activations(4, 256, seed=0), plan, perm_mode="transpose")
    except ValueError as err:
        assert "shuffle" in str(err)
    else:
        raise AssertionError("transpose mode ran a permutation that is not the shuffle")
    print("SHUFFLE INTERPRETER OK")
""")


def test_shuffle_permutation_runs_as_a_block_transpose_under_interpreter():
    """permute=shuffle's exchange between blocks is a fixed transpose in the tile kernel (PERM_MODE 2): same codes
    as the eager spec, which applies the permutation as a plain gather."""
    run_under_interpreter(_SHUFFLE_SCRIPT, "SHUFFLE INTERPRETER OK", timeout=600)


_FOLD_SCRIPT = PREAMBLE + textwrap.dedent("""
    from duquant.kernels import reference
    from duquant.random_layers import random_activations, random_group
    from duquant.kernels.triton_act import build_act_plan
    from duquant.kernels.triton_act_shuffle import act_quant_shuffle, cannot_run
    from duquant.kernels.triton_act_tile import act_quant_tile

    def shuffle(k, bs):  # written out element by element: output block j = piece j of every block, in block order
        nb, g = k // bs, bs // (k // bs)
        return torch.tensor([b * bs + j * g + e for j in range(nb) for b in range(nb) for e in range(g)])

    CASES = [  # k, block, tokens per step (None: default), layout, symmetric
        (256, 16, None, "natural", False),   # 16 blocks of 16: pieces of 1, the fold is a transpose
        (256, 32, None, "split", False),     # 8 blocks, pieces of 4: two tokens per step (4-D permute)
        (512, 32, 1, "split", True),         # 16 blocks, pieces of 2, one token per step
        (64, 16, 4, "natural", True),        # 4 blocks: four tokens per step
        (256, 16, 2, "split", False),        # 2 tokens per step of 16 blocks: a partial last step (19 tokens)
    ]
    for k, bs, br, layout, sym in CASES:
        layer = random_group(k, [8], method="duquant", block_size=bs, seed=k + bs)[0]
        t = layer.transform
        t.perm = shuffle(k, bs)
        plan = build_act_plan(t, k, "cpu")
        assert cannot_run(plan) is None, cannot_run(plan)
        x = random_activations(19, k, seed=k)
        x[3] *= 1e-3  # tokens of very different magnitude share a step (the fp16 per-token scaling)
        x[4] *= 300.0
        rc, rsx, rzx = reference.act_quant(x, t, 8, sym, 0.9)
        ref = reference.split_int4_order(rc) if layout == "split" else rc
        for prec in ("ieee", "fp16"):
            poison = (torch.full(ref.shape, 77, dtype=torch.int8), torch.full((19,), float("nan")),
                      None if sym else torch.full((19,), float("nan")), torch.full((19,), -7, dtype=torch.int32))
            codes, sx, zx, rs = act_quant_shuffle(x, plan, symmetric=sym, clip=0.9, layout=layout, precision=prec,
                                                  block_tokens=br, out=poison, prefetch=br == 2, programs=3)
            d = (codes.int() - ref.int()).abs()
            max_d, max_rate, rtol = (0, 0.0, 1e-6) if prec == "ieee" else (1, 0.05, 2e-3)
            assert int(d.max()) <= max_d and float((d > 0).float().mean()) <= max_rate, (k, bs, prec, int(d.max()))
            assert torch.allclose(sx, rsx, rtol=rtol, atol=0), (k, bs, prec)
            if not sym:
                assert bool(((zx - rzx).abs() <= (0 if prec == "ieee" else 1)).all()), k
            assert torch.equal(rs, reference.code_row_sums(codes)), k
            # the transpose fold (R1's columns reordered) against the default chunk fold: the same products
            tr = act_quant_shuffle(x, plan, symmetric=sym, clip=0.9, layout=layout, precision=prec,
                                   block_tokens=br, prefetch=br == 2, programs=3, fold="transpose")
            assert torch.equal(tr[0], codes) and torch.equal(tr[1], sx), (k, bs, prec, "transpose")
            # the smoothing tile loaded once per program (the default) or once per step: the same products
            ps = act_quant_shuffle(x, plan, symmetric=sym, clip=0.9, layout=layout, precision=prec,
                                   block_tokens=br, prefetch=br == 2, programs=3, hoist_smooth=False)
            assert all(torch.equal(a, b) for a, b in zip(ps, (codes, sx, zx, rs)) if a is not None), (k, bs, prec)
        # the tile kernel's default call sends a shuffle plan here: same codes as asking for it by name
        got = act_quant_tile(x, plan, symmetric=sym, clip=0.9, layout=layout, precision="ieee")
        assert torch.equal(got[0], act_quant_shuffle(x, plan, symmetric=sym, clip=0.9, layout=layout,
                                                     precision="ieee")[0]), k
    # fp8 codes: e4m3 of the transformed values (formats/fp8.py's spec), one e4m3 step at most
    from duquant.formats.fp8 import fp8_quantize
    layer = random_group(256, [8], method="duquant", block_size=16, seed=5)[0]
    layer.transform.perm = shuffle(256, 16)
    plan = build_act_plan(layer.transform, 256, "cpu")
    x = random_activations(7, 256, seed=5)
    c8, s8, _, _ = act_quant_shuffle(x, plan, clip=0.9, fp8=True, precision="ieee")
    rc8, rs8 = fp8_quantize(layer.transform.apply(x.float()), 0.9)
    assert torch.allclose(s8, rs8.reshape(-1), rtol=1e-6), (s8, rs8)
    ulp = torch.exp2(torch.floor(torch.log2(rc8.float().abs().clamp(min=2.0 ** -9))) - 3)
    assert bool(((c8.float() - rc8.float()).abs() <= ulp).all())
    # not a shuffle: refused by name
    zig = build_act_plan(random_group(256, [8], method="duquant", block_size=16, seed=6)[0].transform, 256, "cpu")
    assert "shuffle" in cannot_run(zig)
    try:
        act_quant_shuffle(x, plan, block_tokens=3)
    except ValueError as err:
        assert "power of two" in str(err)
    else:
        raise AssertionError("3 tokens per step ran")
    try:
        act_quant_shuffle(x, plan, fold="gather")
    except ValueError as err:
        assert "DUQUANT_FOLD" in str(err)
    else:
        raise AssertionError("an unknown fold ran")
    print("FOLD INTERPRETER OK")
""")


def test_folded_shuffle_kernel_under_interpreter():
    """kernels/triton_act_shuffle.py (permute=shuffle folded into R1's column order) against the spec."""
    run_under_interpreter(_FOLD_SCRIPT, "FOLD INTERPRETER OK", timeout=600)


_GEGLU_SCRIPT = PREAMBLE + textwrap.dedent("""
    import torch.nn.functional as F
    from duquant.random_layers import random_activations, random_group
    from duquant.kernels.triton_act import build_act_plan
    from duquant.kernels.triton_act_shuffle import act_quant_shuffle
    from duquant.kernels.triton_act_tile import act_quant_tile, can_fuse_geglu

    k, bs = 256, 16
    nb, g = k // bs, bs // (k // bs)
    layer = random_group(k, [8], method="duquant", block_size=bs, seed=3)[0]
    layer.transform.perm = torch.tensor([b * bs + j * g + e for j in range(nb) for b in range(nb) for e in range(g)])
    plan = build_act_plan(layer.transform, k, "cpu")
    assert can_fuse_geglu(plan, "ieee")
    gate = random_activations(19, k, seed=1)
    up = random_activations(19, k, seed=2)
    h = F.gelu(gate, approximate="tanh") * up  # what the MLP would hand the down projection
    for layout, sym, prefetch in (("natural", False, True), ("split", True, False)):
        want = act_quant_shuffle(h, plan, symmetric=sym, clip=0.9, layout=layout, precision="ieee")
        got = act_quant_shuffle(gate, plan, symmetric=sym, clip=0.9, layout=layout, precision="ieee", up=up,
                                prefetch=prefetch, programs=3)
        d = (got[0].int() - want[0].int()).abs()  # gelu's tanh in another form: a rare one-code tie flip
        assert int(d.max()) <= 1 and float((d > 0).float().mean()) < 2e-3, (layout, int(d.max()))
        assert torch.allclose(got[1], want[1], rtol=1e-5), layout
        # the tile kernel's default call passes the up projection on to the folded kernel
        via_tile = act_quant_tile(gate, plan, symmetric=sym, clip=0.9, layout=layout, precision="ieee", up=up)
        assert torch.equal(via_tile[0], act_quant_shuffle(gate, plan, symmetric=sym, clip=0.9, layout=layout,
                                                          precision="ieee", up=up)[0]), layout
    # a permutation the folded kernel cannot run: the fusion is refused by name, not computed another way
    zig = build_act_plan(random_group(k, [8], method="duquant", block_size=bs, seed=4)[0].transform, k, "cpu")
    assert not can_fuse_geglu(zig, "ieee")
    try:
        act_quant_tile(gate, zig, precision="ieee", up=up)
    except ValueError as err:
        assert "folded kernel" in str(err)
    else:
        raise AssertionError("a zigzag plan took a GeGLU input")
    try:
        act_quant_shuffle(gate, plan, up=up[:, :128])
    except ValueError as err:
        assert "must match" in str(err)
    else:
        raise AssertionError("a mismatched up projection ran")
    print("GEGLU INTERPRETER OK")
""")


def test_folded_kernel_geglu_prologue_under_interpreter():
    """The folded kernel computes gelu_tanh(gate) * up itself (producer fusion for the down projection) and
    gives the codes of that product; refused for plans the folded kernel does not run."""
    run_under_interpreter(_GEGLU_SCRIPT, "GEGLU INTERPRETER OK", timeout=600)


def test_folded_shuffle_kernel_compiles_for_sm90_without_spills():
    """The folded kernel's default steps for pi0's shuffle widths compile for sm_90 on the CPU within registers
    and shared memory (two programs per multiprocessor at K = 2048)."""
    pytest.importorskip("triton")
    from duquant.kernels.aot import shuffle_kernel_report
    from duquant.kernels.triton_act_shuffle import default_config

    for m, k in [(816, 2048), (816, 16384), (51, 1024), (51, 4096)]:
        br, warps, stages = default_config(m, k)
        for split in (False, True):
            rep = shuffle_kernel_report(br, k // 128, warps, stages=stages, split=split)
            assert rep["spill_bytes"] == 0 and rep["registers"] <= 255, (m, k, rep)
            if k == 16384:  # the down projection's input: also with the GeGLU prologue (two tiles in flight)
                rep = shuffle_kernel_report(br, k // 128, warps, stages=stages, split=split, GEGLU=True)
                assert rep["spill_bytes"] == 0 and rep["registers"] <= 255, (m, k, "geglu", rep)
            assert rep["shared_bytes"] <= 227 * 1024 // (2 if k == 2048 else 1), (m, k, rep)


def test_plan_bytes_count_the_kernels_cached_copies():
    """A layer's resident bytes include the fp16 matrices and padded tables the kernels cache on its plan (the
    folded kernel's two 16 x 16 fp16 matrices here: 1024 bytes)."""
    pytest.importorskip("triton")
    from duquant.kernels.triton_act import build_act_plan
    from duquant.kernels.triton_act_shuffle import folded_matrices
    from duquant.random_layers import random_transform

    plan = build_act_plan(random_transform(256, "duquant", 16, seed=1, steps=2, permute="shuffle"), 256, "cpu")
    before = plan.num_bytes()
    folded_matrices(plan, "fp16")
    assert plan.num_bytes() == before + 2 * 16 * 16 * 2
    folded_matrices(plan, "fp16")  # cached: counted once
    assert plan.num_bytes() == before + 2 * 16 * 16 * 2
