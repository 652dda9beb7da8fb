"""quantizers.py: int4 packing, weight and activation quantizer bounds, static scales, clip search, int
GEMM."""

import pytest
import torch

from duquant.quantizers import (
    QuantizedWeight,
    dequantize_activation,
    fake_quantize_activation,
    fake_quantize_activation_static,
    fake_quantize_weight,
    pack_int4,
    quantization_error,
    quantize_activation,
    quantize_weight,
    relative_error,
    search_weight_clip,
    static_activation_qparams,
    unpack_int4,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # every test is deterministic, also where it draws without a generator


# ---- packing -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 8, 33, 4304])
def test_int4_pack_roundtrip(n):
    codes = torch.randint(0, 16, (5, n), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, (n + 1) // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, n), codes)
    assert packed[0, 0] == codes[0, 0] | ((codes[0, 1] << 4) if n > 1 else 0)  # element 2k low nibble
    if n % 2:
        assert torch.equal(packed[:, -1] >> 4, torch.zeros(5, dtype=torch.uint8))  # odd: a zero code pads


def test_int4_pack_leading_dims_and_range_check():
    codes = torch.randint(0, 16, (2, 3, 9), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes), 9), codes)
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.tensor([[16, 0]], dtype=torch.int16))
    with pytest.raises(ValueError, match="does not hold"):
        unpack_int4(torch.zeros(2, 4, dtype=torch.uint8), 9)


# ---- weights -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits,group",
                         [(4, None), (4, 32), (8, None), (8, 16), (3, None), (2, None), (2, 64)])
def test_weight_quantization_error_bound_and_packing(symmetric, bits, group):
    w = torch.randn(16, 70) * torch.logspace(-3, 1, 16).unsqueeze(1)
    qw = quantize_weight(w, bits, symmetric=symmetric, group_size=group)
    deq = qw.dequantize()
    step = qw.scale.repeat_interleave(group or 70, dim=1)[:, :70]
    # 1e-4: float32 rounding of w / scale at the ends of the range
    assert torch.all((deq - w).abs() <= step * (0.5 + 1e-4))
    if symmetric:
        assert qw.codes.dtype == torch.int8 and qw.zero is None
        assert int(qw.codes.min()) >= -(2 ** (bits - 1)) and int(qw.codes.max()) <= 2 ** (bits - 1) - 1
    else:
        assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= 2**bits - 1
        assert torch.equal(qw.zero, qw.zero.round())
    groups = -(-70 // group) if group else 1
    assert qw.scale.shape == (16, groups) and qw.scale.dtype == torch.float32
    again = QuantizedWeight.from_packed(qw.packed(), qw.scale, qw.zero, bits=bits, symmetric=symmetric,
                                        group_size=group, shape=(16, 70))
    assert torch.equal(again.codes, qw.codes) and torch.equal(again.dequantize(), deq)
    code_bytes = 16 * 35 if bits <= 4 else 16 * 70
    assert qw.packed().numel() == code_bytes
    assert qw.num_bytes() == code_bytes + 16 * groups * 4 * (1 if symmetric else 2)
    assert torch.equal(fake_quantize_weight(w, bits, symmetric, group_size=group), deq)


def test_symmetric_int4_nibbles_hold_code_plus_8():
    w = torch.tensor([[-7.0, 7.0, 0.0, -4.0, 2.5]])
    qw = quantize_weight(w, 4, symmetric=True)  # scale 1
    assert qw.codes.tolist() == [[-7, 7, 0, -4, 2]]  # round half to even: 2.5 -> 2
    clipped = quantize_weight(w, 4, symmetric=True, clip=0.5).codes  # -8 is reachable once clipped
    assert torch.equal(clipped, torch.tensor([[-8, 7, 0, -8, 5]], dtype=torch.int8))
    nibbles = unpack_int4(qw.packed(), 5)
    assert nibbles.tolist() == [[1, 15, 8, 4, 10]]


def test_weight_clip_per_row_and_bound_within_clip_range():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 256, generator=g)
    clip = torch.tensor([[1.0], [0.8], [0.6], [0.5]])
    for symmetric in (False, True):
        qw = quantize_weight(w, 4, symmetric=symmetric, clip=clip)
        full = quantize_weight(w, 4, symmetric=symmetric)
        assert torch.allclose(qw.scale, full.scale * clip, rtol=1e-6)
        deq = qw.dequantize()
        lo, hi = (w.amin(1, keepdim=True) * clip, w.amax(1, keepdim=True) * clip)
        if symmetric:
            a = w.abs().amax(1, keepdim=True) * clip
            lo, hi = -a, a
        inside = (w >= lo) & (w <= hi)
        assert torch.all(((deq - w).abs() <= qw.scale * (0.5 + 1e-4))[inside])
        # symmetric codes reach -2^(b-1): one step below -absmax*clip
        below = qw.scale if symmetric else qw.scale / 2
        assert torch.all(deq <= hi + qw.scale / 2 + 1e-6) and torch.all(deq >= lo - below - 1e-6)


def test_zero_and_constant_rows():
    w = torch.zeros(3, 10)
    w[1] = 0.25
    w[2, 4] = -3.0
    for symmetric in (False, True):
        deq = quantize_weight(w, 4, symmetric=symmetric).dequantize()
        assert torch.equal(deq[0], torch.zeros(10))
        assert torch.allclose(deq, w, atol=3.0 / 14 + 1e-6)


def test_bits_and_shape_validation():
    with pytest.raises(ValueError, match="weight bits"):
        quantize_weight(torch.randn(2, 4), 5)
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.randn(2, 4, 3), 4)
    qw = quantize_weight(torch.randn(4, 9), 4)
    with pytest.raises(ValueError, match="expected"):
        QuantizedWeight.from_packed(qw.packed()[:, :3], qw.scale, qw.zero, bits=4, symmetric=False,
                                    group_size=None, shape=(4, 9))
    with pytest.raises(ValueError, match="zero point"):
        QuantizedWeight.from_packed(qw.packed(), qw.scale, None, bits=4, symmetric=False, group_size=None,
                                    shape=(4, 9))
    with pytest.raises(ValueError, match="activation bits"):
        quantize_activation(torch.randn(2, 4), 16)


# ---- clip search -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("symmetric", [False, True])
def test_clip_search_never_worse_than_no_clip(symmetric):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    w[:, 0] *= 8
    x = torch.randn(128, 64, generator=g)

    def out_err(c):
        return (x @ (w - quantize_weight(w, 4, symmetric, clip=c).dequantize()).T).pow(2).sum(0)

    def w_err(c):
        return (w - quantize_weight(w, 4, symmetric, clip=c).dequantize()).pow(2).sum(1)

    clip = search_weight_clip(w, x, 4, symmetric)
    assert clip.shape == (32, 1) and float(clip.min()) >= 0.5 and float(clip.max()) <= 1.0
    assert torch.all(out_err(clip) <= out_err(1.0) * (1 + 1e-5))
    assert float(out_err(clip).sum()) < float(out_err(1.0).sum())  # the outlier column makes clipping pay
    clip_w = search_weight_clip(w, None, 4, symmetric, chunk_rows=7)  # chunked rows, weight MSE
    assert torch.all(w_err(clip_w) <= w_err(1.0) * (1 + 1e-5))
    only_small = search_weight_clip(w, x, 4, symmetric, grid=(0.5,))  # 1.0 is always a candidate
    assert torch.all(out_err(only_small) <= out_err(1.0) * (1 + 1e-5))


# ---- activations -------------------------------------------------------------------------------------------

def test_activation_quantization_is_per_token():
    x = torch.randn(3, 10, 32)
    x[0, 0] *= 100  # one loud token must not hurt the others
    codes, scale, zero = quantize_activation(x, 8)
    assert scale.shape == (3, 10, 1) and zero.shape == (3, 10, 1) and codes.shape == x.shape
    assert codes.min() >= 0 and codes.max() <= 255 and torch.equal(codes, codes.round())
    err = (fake_quantize_activation(x, 8) - x).abs()
    assert torch.all(err <= scale * (0.5 + 1e-4))
    assert err[1].max() < 0.05
    sym_codes, sym_scale, sym_zero = quantize_activation(x, 8, symmetric=True)
    assert sym_zero is None and sym_codes.abs().max() <= 127
    assert torch.equal(quantize_activation(-x, 8, symmetric=True)[0], -sym_codes)  # symmetric range
    assert (fake_quantize_activation(x, 8, symmetric=True) - x).abs()[1].max() < 0.05


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quant_is_exactly_quantize_then_dequantize(symmetric, bits):
    x = torch.randn(64, 100, dtype=torch.bfloat16) * 3
    for clip in (1.0, 0.9):
        fq = fake_quantize_activation(x, bits, symmetric, clip)
        assert fq.dtype == torch.bfloat16
        composed = dequantize_activation(*quantize_activation(x, bits, symmetric, clip))
        assert torch.equal(fq, composed.bfloat16())
    assert torch.equal(fake_quantize_activation(torch.zeros(2, 8), 8), torch.zeros(2, 8))


def test_activation_clip_clamps_the_extremes():
    x = torch.linspace(-1, 1, 101).unsqueeze(0)
    fq = fake_quantize_activation(x, 8, clip=0.9)
    assert float(fq.max()) <= 0.9 + 0.9 * 2 / 255 and float(fq.min()) >= -0.9 - 0.9 * 2 / 255


def test_static_per_tensor_activation_quantization():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    for symmetric in (False, True):
        scale, zero = static_activation_qparams(x, 8, symmetric)
        if symmetric:
            assert zero == 0.0 and scale == pytest.approx(float(x.abs().max()) / 127)
        else:
            assert scale == pytest.approx(float(x.max() - x.min()) / 255) and zero == round(zero)
        fq = fake_quantize_activation_static(x.bfloat16(), scale, zero, 8, symmetric)
        assert fq.dtype == torch.bfloat16
        fq32 = fake_quantize_activation_static(x, scale, zero, 8, symmetric)
        assert torch.all((fq32 - x).abs() <= scale * (0.5 + 1e-4))
        big = fake_quantize_activation_static(x * 10, scale, zero, 8, symmetric)  # out of range: clamped
        assert float(big.abs().max()) <= float(x.abs().max()) + scale
    assert static_activation_qparams((-1.0, 3.0), 8) == pytest.approx((4.0 / 255, round(255 / 4)))
    assert static_activation_qparams(2.0, 8, symmetric=True) == pytest.approx((2.0 / 127, 0.0))
    pct, _ = static_activation_qparams(x, 8, symmetric=True, percentile=99.0)
    assert pct < static_activation_qparams(x, 8, symmetric=True)[0]
    assert pct == pytest.approx(float(torch.quantile(x.abs().reshape(-1), 0.99)) / 127, rel=0.02)


def test_integer_gemm_reproduces_fake_quant():
    """y = s_x s_w sum_k (q_x - z_x)(q_w - z_w): the integer form of the fake-quant matmul (asymmetric
    both)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 96, generator=g), torch.randn(12, 96, generator=g)
    qx, sx, zx = quantize_activation(x, 8)
    qw = quantize_weight(w, 4)
    acc = (qx.double() - zx.double()) @ (qw.codes.double() - qw.zero.double()).T
    y_int = sx.double() * acc * qw.scale.double().T
    y_fake = fake_quantize_activation(x, 8).double() @ qw.dequantize().double().T
    assert torch.allclose(y_int, y_fake, rtol=1e-5, atol=1e-5)


def test_error_helpers():
    b = torch.tensor([3.0, 4.0])
    assert relative_error(b * 1.1, b) == pytest.approx(0.01)
    assert quantization_error(b * 1.1, b) == pytest.approx(0.1)
