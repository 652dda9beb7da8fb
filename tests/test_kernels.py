"""Kernels: the eager reference (CPU, CI), the Triton kernels under the interpreter (CPU, when triton is
installed), and the GPU kernels against the reference (marked gpu; skipped without CUDA)."""

import textwrap

import pytest
import torch

from duquant.kernels import gpu_available, reference
from duquant.quantizers import fake_quantize_activation
from duquant.random_layers import random_activations, random_group, random_layer
from gpu_marks import needs_gpu
from triton_interpreter import PREAMBLE, run_under_interpreter

CUDA = torch.cuda.is_available()


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


# ---- CPU reference ------------------------------------------------------------------------------------------------

def test_import_and_availability_without_cuda():
    ok, why = gpu_available()
    if not CUDA:
        assert not ok and "CUDA" in why


@pytest.mark.parametrize("symmetric", [False, True])
def test_act_quant_is_the_fake_quantizer(symmetric):
    layer = random_layer(300, 8, block_size=64, seed=1)
    x = random_activations(7, 300, seed=2)
    codes, scale, zero = reference.act_quant(x, layer.transform, 8, symmetric, 0.9)
    assert codes.dtype == torch.int8 and scale.shape == (7,)
    deq = (codes.float() - zero[:, None]) * scale[:, None] if zero is not None else codes.float() * scale[:, None]
    fake = fake_quantize_activation(layer.transform.apply(x), 8, symmetric=symmetric, clip=0.9)
    assert torch.equal(deq, fake)


CASES = [  # wbits, w_symmetric, group_size, act_symmetric
    (4, False, None, False), (4, True, None, False), (4, False, 64, False), (8, False, None, False),
    (8, True, None, True), (8, True, 64, False), (3, False, None, True), (4, True, 128, True),
]


@pytest.mark.parametrize("wbits,w_sym,gs,a_sym", CASES)
def test_integer_identity_equals_fake_quant_path(wbits, w_sym, gs, a_sym):
    # K = 4304 (SigLIP fc2): not a multiple of the 128 block, nor of the group; odd M
    layer = random_layer(4304, 24, wbits=wbits, w_symmetric=w_sym, group_size=gs, act_symmetric=a_sym,
                         block_size=128, seed=3, steps=2)
    x = random_activations(5, 4304, seed=4)
    y_int = reference.quantized_linear(x, layer, out_dtype=torch.float64)
    y_fake = reference.fake_linear(x, layer)
    assert _rel(y_int, y_fake) < 1e-5


def test_odd_in_features_int4_padding():
    layer = random_layer(77, 10, wbits=4, block_size=16, seed=5)
    x = random_activations(3, 77, seed=6)
    assert _rel(reference.quantized_linear(x, layer, out_dtype=torch.float64), reference.fake_linear(x, layer)) < 1e-5


def test_split_order_layout():
    codes = torch.arange(14, dtype=torch.int8).reshape(2, 7)
    s = reference.split_int4_order(codes)
    assert s.shape == (2, 8)
    assert s[0].tolist() == [0, 2, 4, 6, 1, 3, 5, 0]


def test_group_layers_share_transform():
    layers = random_group(64, [32, 16, 16], block_size=16, seed=7)
    assert all(la.transform is layers[0].transform for la in layers)


# ---- Triton interpreter (CPU) -------------------------------------------------------------------------------------

_INTERP_SCRIPT = PREAMBLE + textwrap.dedent("""
    from duquant.kernels import reference
    from duquant.random_layers import random_group, random_activations
    from duquant.kernels.triton_act import act_quant, build_act_plan
    from duquant.kernels.triton_gemm import TMA_VARIANTS, VARIANTS, int_gemm, tma_cannot_run
    from duquant.kernels import _gemm_weight
    tma_ran = 0
    for (k, outs, wbits, wsym, gs, asym, method, bs) in [
            (96, [32, 16], 4, False, None, False, "duquant", 32), (80, [16], 8, False, None, True, "duquant", 32),
            (128, [16, 16, 16], 8, True, 64, False, "hadamard", 64), (70, [24], 4, True, None, False, "rtn", 16),
            (128, [16], 4, False, 64, False, "smoothquant", 32)]:
        layers = random_group(k, outs, wbits=wbits, w_symmetric=wsym, group_size=gs, act_symmetric=asym,
                              method=method, block_size=bs, seed=k)
        x = random_activations(19, k, seed=1)
        plan = build_act_plan(layers[0].transform, k, "cpu")
        assert plan.fused, plan.reason
        w = _gemm_weight(layers, share_storage=False)
        codes, sx, zx, rs = act_quant(x, plan, symmetric=asym, clip=0.9, layout=w.act_layout, precision="ieee")
        rc, rsx, rzx = reference.act_quant(x, layers[0].transform, 8, asym, 0.9)
        ref_codes = reference.split_int4_order(rc) if w.act_layout == "split" else rc
        diff = (codes.int() - ref_codes.int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 1e-3, (k, diff.max(), diff.float().mean())
        assert torch.allclose(sx, rsx, rtol=1e-5)
        assert torch.equal(rs, reference.code_row_sums(codes))
        nat = act_quant(x, plan, symmetric=asym, clip=0.9, layout="natural", precision="ieee")[0]
        for variant in VARIANTS:
            if variant in TMA_VARIANTS and tma_cannot_run(codes, w):
                continue  # group scales, or rows that are not 16-byte multiples (K = 70 in int4: 35 bytes)
            tma_ran += variant in TMA_VARIANTS
            ys = int_gemm(codes, sx, zx, rs, w, out_dtype=torch.float32, variant=variant)
            for layer, y in zip(layers, ys):
                ref = reference.int_gemm(nat, sx, zx, reference.int_weight_from_layer(layer), layer.bias)
                err = float((y - ref).abs().max() / ref.abs().max())
                assert err < 1e-5, (k, variant, err)
    assert tma_ran == 4, tma_ran  # int4 (K = 96, two fused outputs) and uint8 (K = 80), each TMA variant
    print("INTERPRETER OK")
""")


def test_triton_kernels_under_interpreter():
    run_under_interpreter(_INTERP_SCRIPT, "INTERPRETER OK", timeout=600)


def test_auto_times_the_tma_variant_only_where_it_can_run():
    """auto's candidates: nt and swap always; the TMA variants for per-channel weights on 16-byte aligned rows only (the
    tensor memory accelerator's rule), never for group-wise scales or an offset activation view."""
    pytest.importorskip("triton")
    from duquant.kernels import _gemm_weight
    from duquant.kernels.triton_gemm import auto_candidates

    per_channel = _gemm_weight(random_group(256, [64], wbits=4, seed=1, steps=1), share_storage=False)
    grouped = _gemm_weight(random_group(256, [64], wbits=4, group_size=128, seed=1, steps=1), share_storage=False)
    codes = torch.zeros(32, 512, dtype=torch.int8)
    assert auto_candidates(codes[:, :256], per_channel) == ("nt", "swap", "swap-tma")  # persistent: explicit only
    assert auto_candidates(codes[:, :256], grouped) == ("nt", "swap")
    assert auto_candidates(codes[:, 8:264], per_channel) == ("nt", "swap")  # base 8 bytes off 16


def test_tma_gemm_compiles_for_sm90_with_pipelined_tma_loads():
    """The TMA variants' autotune configurations (one tile per program, and persistent) compile for sm_90 on the
    CPU without spills, and the software pipeline keeps several TMA copies in flight (prologue + loop) for each
    operand."""
    pytest.importorskip("triton")
    from duquant.kernels.aot import tma_gemm_report
    from duquant.kernels.triton_gemm import _TMA_CONFIGS, _TMA_PERSISTENT_CONFIGS, W_INT4, W_INT8

    for c in _TMA_CONFIGS:
        kw = c.kwargs
        for kind, persistent in ((W_INT4, False), (W_INT8, False), (W_INT4, True)):
            if persistent and c not in _TMA_PERSISTENT_CONFIGS:
                continue
            rep = tma_gemm_report(kw["BM"], kw["BN"], kw["BK"], c.num_warps, c.num_stages, w_kind=kind,
                                  persistent=persistent)
            assert rep["spill_bytes"] == 0 and rep["registers"] <= 255, (kw, kind, persistent, rep)
            loads = 3 if kind == W_INT4 else 2  # int4: weights + both halves of x
            assert rep["tma_copies"] >= loads * c.num_stages and rep["wgmma"] >= 1, (kw, kind, persistent, rep)


# ---- GPU ----------------------------------------------------------------------------------------------------------

# pi0's input widths: LLM 2048 / 16384, expert 1024 / 2048 / 4096, SigLIP 1152 / 4304
SHAPE_CLASSES = [(816, 2048), (51, 1024), (816, 16384), (51, 4096), (768, 1152), (768, 4304), (7, 2048)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("m,k", SHAPE_CLASSES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_gpu_act_kernel_matches_reference(m, k, symmetric):
    from duquant.kernels.triton_act import act_quant, build_act_plan

    layer = random_layer(k, 16, seed=k, steps=4)
    x = random_activations(m, k, seed=m, dtype=torch.bfloat16, device="cuda")
    rc, rsx, rzx = reference.act_quant(x.cpu(), layer.transform, 8, symmetric, 0.9)
    plan = build_act_plan(layer.transform, k, "cuda")
    assert plan.fused
    # ieee: the transform in float32 -> the reference's codes (a rare +-1 where float32 sums round differently);
    # tf32 (default): |code - reference| <= 2 on a few % of the entries, scales within 0.5 %
    for precision, max_d, max_flip, rtol in (("ieee", 1, 1e-4, 1e-5), ("tf32", 2, 0.1, 5e-3),
                                             ("bf16", 8, 0.5, 5e-2)):
        codes, sx, zx, rs = act_quant(x, plan, symmetric=symmetric, clip=0.9, precision=precision)
        d = (codes.cpu().int() - rc.int()).abs()
        print(f"FLIP m={m} k={k} sym={symmetric} {precision}: max|d|={int(d.max())} "
              f"rate={float((d > 0).float().mean()):.2e} scale_rel={float(((sx.cpu() - rsx) / rsx).abs().max()):.1e}")
        assert d.max() <= max_d and (d > 0).float().mean() <= max_flip, (precision, int(d.max()),
                                                                          float((d > 0).float().mean()))
        assert torch.allclose(sx.cpu(), rsx, rtol=rtol)
        assert torch.equal(rs.cpu(), reference.code_row_sums(codes.cpu()))


GEMM_CASES = [(4, False, None), (4, True, None), (8, False, None), (8, True, None), (4, False, 128),
              (8, True, 128)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("wbits,w_sym,gs", GEMM_CASES)
@pytest.mark.parametrize("variant", ["nt", "swap", "swap-tma", "swap-tma-persistent"])
@pytest.mark.parametrize("m,k,outs", [(816, 2048, [2048, 256, 256]), (51, 4096, [1024]), (768, 4304, [1152]),
                                      (33, 1152, [1152, 1152, 1152])])
def test_gpu_gemm_matches_reference(wbits, w_sym, gs, variant, m, k, outs):
    """Integer accumulation is exact: outputs agree with the float64 identity to bf16 rounding
    (|y - ref| <= 2^-8 |ref| + 1e-5 max|ref|)."""
    from duquant.kernels import _gemm_weight
    from duquant.kernels.triton_act import act_quant, build_act_plan
    from duquant.kernels.triton_gemm import int_gemm, tma_cannot_run

    layers = [la.cuda() for la in random_group(k, outs, wbits=wbits, w_symmetric=w_sym, group_size=gs, seed=k,
                                               steps=2)]
    x = random_activations(m, k, seed=1, dtype=torch.bfloat16, device="cuda")
    w = _gemm_weight(layers, share_storage=False)
    plan = build_act_plan(layers[0].transform, k, "cuda")
    codes, sx, zx, rs = act_quant(x, plan, clip=0.9, layout="natural")
    cg, *_ = act_quant(x, plan, clip=0.9, layout=w.act_layout)
    if variant.startswith("swap-tma") and tma_cannot_run(cg, w):
        pytest.skip(tma_cannot_run(cg, w))
    ys = int_gemm(cg, sx, zx, rs, w, out_dtype=torch.bfloat16, variant=variant)
    for layer, y in zip(layers, ys):
        ref = reference.int_gemm(codes.cpu(), sx.cpu(), zx.cpu(), reference.int_weight_from_layer(layer.cpu()),
                                 None if layer.bias is None else layer.bias.cpu(), out_dtype=torch.float64)
        err = (y.cpu().double() - ref).abs()
        tol = 2 ** -8 * ref.abs() + 1e-5 * ref.abs().max()
        assert bool((err <= tol).all()), float((err / tol).max())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("wbits", [4, 8])
def test_gpu_backend_layers_match_fake(wbits):
    """DuQuantLinear(backend=gpu) vs the reference integer path on the same bf16 input, grouped q/k/v."""
    from duquant import kernels

    layers = random_group(2048, [2048, 256, 256], wbits=wbits, seed=11, steps=4)
    x = random_activations(816, 2048, seed=12, dtype=torch.bfloat16)
    refs = [reference.quantized_linear(x.float(), la, out_dtype=torch.float64) for la in layers]
    model = torch.nn.ModuleList(layers).cuda()
    x = x.cuda()
    for la in model:
        la.backend = "gpu"
    kernels.prepare_gpu_model(model)
    ys = [la(x) for la in model]
    for y, ref in zip(ys, refs):
        assert y.dtype == torch.bfloat16
        assert _rel(y.float().cpu(), ref) < 1e-2
