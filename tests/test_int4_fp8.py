"""The ``w4a8-fp8`` format (formats/int4_fp8.py): 4-bit integer weights with FP8 e4m3 activations. Its fake-quant
reference pinned to the e4m3 grid, its report rows, the nibble-as-e4m3 identity the GEMM rests on, the activation
kernels' split-order FP8 codes and code sums and the int4 x FP8 GEMM under the Triton interpreter, the sm_90
compile, and the gpu backend against the reference (marked gpu)."""

import os
import textwrap

import pytest
import torch
from torch import nn

from duquant import formats
from duquant.layers import DuQuantLinear
from duquant.random_layers import random_activations, random_transform
from gpu_marks import needs_gpu
from triton_interpreter import PREAMBLE, run_under_interpreter

E4M3_GRID = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
E4M3_GRID = torch.unique(E4M3_GRID[torch.isfinite(E4M3_GRID)])  # every finite e4m3 value, sorted


def _round_to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Nearest e4m3 value by search over the 253 finite ones (ties to the even mantissa), saturating at 448."""
    v = v.clamp(-448.0, 448.0)
    hi = torch.searchsorted(E4M3_GRID, v.contiguous()).clamp(1, len(E4M3_GRID) - 1)
    lo_v, hi_v = E4M3_GRID[hi - 1], E4M3_GRID[hi]
    d_lo, d_hi = v - lo_v, hi_v - v
    even_hi = (hi_v.to(torch.float8_e4m3fn).view(torch.uint8) & 1) == 0  # (exact: hi_v is on the grid)
    return torch.where((d_hi < d_lo) | ((d_hi == d_lo) & even_hi), hi_v, lo_v)


def test_a_nibble_read_as_e4m3_is_n_times_2_to_minus_9():
    """The identity the int4 x FP8 GEMM rests on: byte n (0..15) is the e4m3 number n / 512 exactly (subnormal
    m / 8 * 2^-6 below 8; exponent field 1, (1 + m / 8) * 2^-6 from 8 to 15)."""
    n = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(n.view(torch.float8_e4m3fn).float() * 512.0, n.float())


def test_reference_is_int4_weights_times_e4m3_activations():
    torch.manual_seed(3)
    lin = nn.Linear(128, 24)
    t = random_transform(128, "duquant", 32, seed=4)
    layer = DuQuantLinear.from_linear(lin, "w4a8-fp8", transform=t, act_clip=0.9)
    twin = DuQuantLinear.from_linear(lin, "w4a8", transform=t, act_clip=0.9)
    assert torch.equal(layer.qweight, twin.qweight) and layer.weight_bytes() == twin.weight_bytes()
    x = random_activations(7, 128, seed=5)
    xt = t.apply(x)
    s = xt.abs().amax(-1, keepdim=True) * 0.9 / 448.0
    want_x = _round_to_e4m3(xt / s) * s
    got_x = layer.fmt.quantize_input(layer, x)
    assert torch.allclose(got_x, want_x, rtol=0, atol=1e-6 * float(want_x.abs().max()))
    want = want_x @ twin.dequantized_weight(torch.float32).T + lin.bias.detach()
    assert torch.allclose(layer(x), want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(layer.fmt.reference(layer, x), want, rtol=1e-5, atol=1e-5)


def test_label_and_report_rows():
    from duquant.report import format_rows, parse_formats

    fmt = formats.get("w4a8-fp8")
    assert fmt.weights == "int4" and fmt.activations == "fp8-e4m3" and "int8" not in fmt.label()
    assert parse_formats("w4a8,w4a8-fp8") == ["w4a8", "w4a8-fp8"]
    rows = format_rows(["w4a8-fp8"], ["rtn", "duquant"], ["rtn", "gptq"])  # integer weights: every rounding
    assert rows == [("w4a8-fp8", m, r) for m in ("rtn", "duquant") for r in ("rtn", "gptq")]


def test_gpu_prepare_refuses_group_wise_weights_by_name():
    """A setting the GEMM has no kernel for is named before anything looks for a GPU."""
    from duquant.kernels import GpuBackendError

    layer = DuQuantLinear.from_linear(nn.Linear(256, 32), "w4a8-fp8", group_size=128)
    with pytest.raises(GpuBackendError, match="one scale per output channel"):
        layer.fmt.gpu_prepare([layer])


_SCRIPT = PREAMBLE + textwrap.dedent("""
    os.environ["DUQUANT_GEMM_VARIANT"] = "swap"  # auto times variants on a GPU
    from torch import nn
    from duquant.kernels import reference, _gemm_weight
    from duquant.kernels.triton_act import build_act_plan
    from duquant.kernels.triton_act_tile import act_quant_tile
    from duquant.kernels.triton_gemm import TMA_VARIANTS, VARIANTS, W_INT4_FP8, int_gemm, tma_cannot_run
    from duquant.layers import DuQuantLinear
    from duquant.random_layers import random_activations, random_group, random_transform
    from duquant.formats.int4_fp8 import Int4Fp8Group

    def shuffle(k, bs):
        nb, g = k // bs, bs // (k // bs)
        return torch.tensor([b * bs + j * g + e for j in range(nb) for b in range(nb) for e in range(g)])

    # activation kernels: split-order e4m3 codes = the natural ones reordered (pad column 0), code sums
    for k, bs, method, kw in [(96, 32, "duquant", dict(perm_mode="scratch")), (77, 16, "rtn", {}),
                              (300, 16, "duquant", dict(chunk_rows=16)), (256, 16, "shuffle", {})]:
        t = random_transform(k, "duquant" if method == "shuffle" else method, bs, seed=k)
        if method == "shuffle":
            t.perm = shuffle(k, bs)
        plan = build_act_plan(t, k, "cpu")
        x = random_activations(19, k, seed=k)
        x[4] *= 300.0
        prec = "fp16" if method == "shuffle" else "ieee"
        nat, sx, z, r = act_quant_tile(x, plan, clip=0.9, fp8=True, precision=prec, **kw)
        assert r is None and z is None
        sp, sx2, _, rs = act_quant_tile(x, plan, clip=0.9, fp8=True, precision=prec, layout="split", fp8_sum=True,
                                        **kw)
        assert sp.dtype == torch.float8_e4m3fn and sp.shape == (19, 2 * (-(-k // 2)))
        assert torch.equal(sp.view(torch.uint8), reference.split_int4_order(nat.view(torch.uint8))), (k, method)
        assert torch.equal(sx, sx2)
        assert torch.allclose(rs, nat.float().sum(1), rtol=1e-6, atol=1e-6), (k, method)

    # the int4 x FP8 GEMM, every variant, against the integer identity on the e4m3 values (float64)
    tma_ran = 0
    for k, outs, wsym, method, bs in [(96, [32, 16], False, "duquant", 32), (128, [16, 16, 16], True, "hadamard", 64),
                                      (70, [24], False, "rtn", 16)]:
        layers = random_group(k, outs, wbits=4, w_symmetric=wsym, method=method, block_size=bs, seed=k)
        x = random_activations(19, k, seed=1)
        plan = build_act_plan(layers[0].transform, k, "cpu")
        nat, sx, _, _ = act_quant_tile(x, plan, clip=0.9, fp8=True, precision="ieee")
        codes, _, _, rs = act_quant_tile(x, plan, clip=0.9, fp8=True, precision="ieee", layout="split",
                                         fp8_sum=True)
        w = _gemm_weight(layers, share_storage=False, kind=W_INT4_FP8)
        assert w.act_layout == "split"
        for variant in VARIANTS:
            if variant in TMA_VARIANTS and tma_cannot_run(codes, w):
                continue
            tma_ran += variant in TMA_VARIANTS
            ys = int_gemm(codes, sx, None, rs, w, out_dtype=torch.float32, variant=variant)
            for layer, y in zip(layers, ys):
                ref = reference.int_gemm(nat.float(), sx, None, reference.int_weight_from_layer(layer), layer.bias)
                err = float((y - ref).abs().max() / ref.abs().max())
                assert err < 1e-5, (k, variant, err)
    assert tma_ran == 4, tma_ran  # two shapes x two TMA variants (K = 70: 35-byte weight rows, no TMA)

    # the format's gpu group (q/k/v sharing one input) against the format's reference on the kernel's codes
    torch.manual_seed(0)
    t = random_transform(128, "duquant", 32, seed=9)
    lins = [nn.Linear(128, n) for n in (32, 16, 16)]
    layers = [DuQuantLinear.from_linear(lin, "w4a8-fp8", transform=t, act_clip=0.9) for lin in lins]
    x = random_activations(13, 128, seed=2)
    group = Int4Fp8Group(layers, share_storage=True)
    group.precision = "ieee"
    ys = group.forward_all(x)
    nat, sx, _, _ = act_quant_tile(x, group.plan, clip=0.9, fp8=True, precision="ieee")
    for la, y in zip(layers, ys):
        ref = (nat.float() * sx[:, None]) @ la.dequantized_weight(torch.float32).T + la.bias.detach()
        assert y.shape == ref.shape
        assert float((y - ref).abs().max() / ref.abs().max()) < 1e-5
    assert len({la.qweight.untyped_storage().data_ptr() for la in layers}) == 1  # views of one weight
    print("INT4 FP8 INTERPRETER OK")
""")


def test_int4_fp8_kernels_under_interpreter():
    run_under_interpreter(_SCRIPT, "INT4 FP8 INTERPRETER OK", timeout=600)


def test_int4_fp8_kernels_compile_for_sm90():
    """The TMA GEMM of kind W_INT4_FP8 keeps its operands' TMA copies pipelined and runs wgmma without spills at
    every autotune configuration; the folded activation kernel in the split FP8 mode with code sums fits."""
    pytest.importorskip("triton")
    if os.environ.get("DUQUANT_GEMM_QUICK"):
        pytest.skip("DUQUANT_GEMM_QUICK: the quick autotune list (tiles too small for wgmma) is not the shipped one")
    from duquant.kernels.aot import shuffle_kernel_report, tma_gemm_report
    from duquant.kernels.triton_gemm import _TMA_CONFIGS, _TMA_PERSISTENT_CONFIGS, W_INT4_FP8

    for configs, persistent in ((_TMA_CONFIGS, False), (_TMA_PERSISTENT_CONFIGS, True)):
        for c in configs:
            kw = c.kwargs
            rep = tma_gemm_report(kw["BM"], kw["BN"], kw["BK"], c.num_warps, c.num_stages, w_kind=W_INT4_FP8,
                                  persistent=persistent)
            assert rep["spill_bytes"] == 0 and rep["registers"] <= 255, (kw, persistent, rep)
            assert rep["tma_copies"] >= 3 * c.num_stages and rep["wgmma"] >= 1, (kw, persistent, rep)
    rep = shuffle_kernel_report(4, 16, 4, fp8=True, split=True, FP8_SUM=True)
    assert rep["spill_bytes"] == 0 and rep["registers"] <= 255, rep


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("method", ["duquant", "rtn"])
@pytest.mark.parametrize("m,k,n", [(51, 1024, 4096), (816, 2048, 2048), (816, 16384, 2048), (33, 1152, 1152)])
def test_gpu_w4a8_fp8_layer_matches_reference(m, k, n, method):
    """The split-order e4m3 codes the layer's GEMM reads against the natural-order ones, bit for bit; IEEE-precision
    codes against the spec (rare one-step differences where x / s lands on a rounding boundary); then bf16 in / out
    against the format's product on the kernel's own codes. FP8 fast accumulation (as cuBLAS's use_fast_accum)
    loses precision with K: its error is bounded by K and held to within 1.25x of cuBLAS's on the same operands."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm89+")
    from duquant.formats.fp8 import fp8_quantize
    from duquant.kernels import reference
    from duquant.kernels.triton_act import build_act_plan
    from duquant.kernels.triton_act_tile import act_quant_tile

    torch.manual_seed(k + n)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.mul_(3.0)
    t = random_transform(k, method, 128, seed=k)
    layer = DuQuantLinear.from_linear(lin, "w4a8-fp8", transform=t, act_clip=0.9).cuda()
    x = (torch.randn(m, k, device="cuda") * 2).to(torch.bfloat16)
    plan = build_act_plan(layer.transform, k, "cuda")
    for prec in ("fp16", "ieee"):
        nat, _, _, _ = act_quant_tile(x, plan, clip=0.9, fp8=True, precision=prec)
        split, _, _, rs = act_quant_tile(x, plan, clip=0.9, fp8=True, precision=prec, layout="split", fp8_sum=True)
        assert torch.equal(split.view(torch.uint8), reference.split_int4_order(nat.view(torch.uint8))), prec
        assert torch.allclose(rs, nat.float().sum(1), rtol=1e-5, atol=1e-3), prec
    codes, sx, _, _ = act_quant_tile(x, plan, clip=0.9, fp8=True, precision="ieee")
    spec, spec_scale = fp8_quantize(layer.transform.apply(x.float()), 0.9)
    assert torch.allclose(sx, spec_scale.reshape(-1), rtol=1e-6)
    step = (codes.float() - spec.float()).abs() / spec.float().abs().clamp(min=2.0 ** -6)
    assert float(step.max()) <= 0.126 and float((step > 0).float().mean()) < 2e-3

    codes, sx, _, _ = act_quant_tile(x, plan, clip=0.9, fp8=True)  # the layer's own (fp16 rotations)
    w = reference.int_weight_from_layer(layer)
    ref = reference.int_gemm(codes.float(), sx, None, w, layer.bias).double()
    layer.backend = "gpu"
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    err = (y.double() - ref).abs()
    tol = 2.0 ** -7 * ref.abs() + max(1e-2, 4e-6 * k) * ref.abs().max()
    assert bool((err <= tol).all()), float((err / tol).max())
    one = torch.ones((), device="cuda")  # cuBLAS on the same e4m3 operands: nibble n read as n / 512
    acc = torch._scaled_mm(codes, w.codes.to(torch.uint8).contiguous().view(torch.float8_e4m3fn).t(), scale_a=one,
                           scale_b=one, out_dtype=torch.float32, use_fast_accum=True).double()
    cublas = ((acc * 512 - w.zero[:, :1].double().T * codes.double().sum(1, keepdim=True))
              * w.scale[:, :1].double().T * sx.double()[:, None] + layer.bias.double())
    assert float(err.max()) <= 1.25 * float((cublas - ref).abs().max()) + 2.0 ** -7 * float(ref.abs().max())
