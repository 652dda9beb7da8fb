"""transform.py and quantizers.py: exactness of the transform, the greedy rotation's effect, quantizer bounds."""

import pytest
import torch

from duquant.quantizers import (
    QuantizedWeight,
    fake_quantize_activation,
    pack_int4,
    quantize_activation,
    quantize_weight,
    search_weight_clip,
    unpack_int4,
)
from duquant.transform import (
    LayerTransform,
    build_transform,
    greedy_block_rotation,
    hadamard_block_rotation,
    zigzag_permutation,
)


def outlier_activations(t=256, c=256, channels=(5, 77), scale=50.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, c, generator=g)
    x[:, list(channels)] *= scale
    return x


@pytest.mark.parametrize("c,bs", [(4304, 128), (2048, 16), (100, 64), (256, 64), (130, 128)])
@pytest.mark.parametrize("method", ["duquant", "hadamard", "smoothquant", "rtn"])
def test_transform_preserves_function_in_float64(c, bs, method):
    g = torch.Generator().manual_seed(c + bs)
    x = torch.randn(64, c, generator=g, dtype=torch.float64)
    x[:, 3] *= 30
    w = torch.randn(24, c, generator=g, dtype=torch.float64)
    t = build_transform(method, weight=w.float(), act_absmax=x.abs().amax(0).float(), act_sample=x.float(),
                        block_size=bs, steps=16)
    y = t.apply(x) @ t.fold_into_weight(w).T
    ref = x @ w.T
    assert float((y - ref).abs().max() / ref.abs().max()) < 1e-5


def test_rotations_are_orthogonal_including_narrow_last_block():
    for rot in (greedy_block_rotation(outlier_activations(c=200), 64, steps=32), hadamard_block_rotation(200, 64)):
        eye = torch.eye(64).expand_as(rot)
        assert torch.allclose(rot @ rot.transpose(1, 2), eye, atol=1e-5)
        assert torch.equal(rot[-1, 8:, 8:], torch.eye(56))  # 200 = 3*64 + 8: identity padding


def test_greedy_rotation_spreads_outliers():
    x = outlier_activations()
    rot = greedy_block_rotation(x, 64, steps=64)
    t = LayerTransform(256, 64, rot1=rot)
    assert t.apply(x).abs().max() < 0.35 * x.abs().max()


def test_zigzag_balances_blocks():
    m = torch.arange(16, 0, -1).float()  # channel 0 largest
    perm = zigzag_permutation(m, 4)
    assert sorted(perm.tolist()) == list(range(16))
    blocks = perm.view(4, 4)
    assert blocks[:, 0].tolist() == [0, 1, 2, 3]  # the 4 largest go one per block
    sums = [float(m[b].sum()) for b in blocks]
    assert max(sums) - min(sums) <= 4
    odd = zigzag_permutation(torch.rand(10), 4)  # 4 + 4 + 2
    assert sorted(odd.tolist()) == list(range(10))


def test_duquant_transform_beats_baselines_on_outliers():
    x = outlier_activations(t=512)
    w = torch.randn(128, 256) / 16
    errs = {}
    for method in ("rtn", "smoothquant", "hadamard", "duquant"):
        t = build_transform(method, weight=w, act_absmax=x.abs().amax(0), act_sample=x, block_size=64, steps=64,
                            alpha=0.5 if method == "smoothquant" else 0.6)
        xt = t.apply(x)
        wq = quantize_weight(t.fold_into_weight(w), 4, clip=0.8).dequantize()
        y = fake_quantize_activation(xt, 8) @ wq.T
        errs[method] = float((y - x @ w.T).pow(2).sum() / (x @ w.T).pow(2).sum())
    assert errs["duquant"] < min(errs["rtn"], errs["smoothquant"], errs["hadamard"]), errs


@pytest.mark.parametrize("n", [7, 8, 33])
def test_int4_pack_roundtrip(n):
    codes = torch.randint(0, 16, (5, n), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, (n + 1) // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, n), codes)
    assert packed[0, 0] == codes[0, 0] | (codes[0, 1] << 4)  # element 2k low nibble


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits,group", [(4, None), (4, 32), (8, None), (3, None), (2, None)])
def test_weight_quantization_error_bound_and_packing(symmetric, bits, group):
    w = torch.randn(16, 70)
    qw = quantize_weight(w, bits, symmetric=symmetric, group_size=group)
    deq = qw.dequantize()
    step = qw.scale.repeat_interleave(group or 70, dim=1)[:, :70]
    assert torch.all((deq - w).abs() <= step / 2 + 1e-6)
    again = QuantizedWeight.from_packed(qw.packed(), qw.scale, qw.zero, bits=bits, symmetric=symmetric,
                                        group_size=group, shape=(16, 70))
    assert torch.equal(again.dequantize(), deq)
    if bits <= 4:
        assert qw.packed().numel() == 16 * 35


def test_activation_quantization_is_per_token():
    x = torch.randn(3, 10, 32)
    x[0, 0] *= 100  # one loud token must not hurt the others
    codes, scale, zero = quantize_activation(x, 8)
    assert scale.shape == (3, 10, 1) and codes.min() >= 0 and codes.max() <= 255
    err = (fake_quantize_activation(x, 8) - x).abs()
    assert err[1].max() < 0.05
    sym = fake_quantize_activation(x, 8, symmetric=True)
    assert (sym - x).abs()[1].max() < 0.05


def test_clip_search_never_worse_than_no_clip():
    w = torch.randn(32, 64)
    w[:, 0] *= 8
    x = torch.randn(128, 64)
    clip = search_weight_clip(w, x, 4)
    err = lambda c: float((x @ (w - quantize_weight(w, 4, clip=c).dequantize()).T).pow(2).sum())  # noqa: E731
    assert err(clip) <= err(1.0) + 1e-6
