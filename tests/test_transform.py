"""transform.py: exactness of the transform, orthogonality, the greedy rotation, zigzag, Hadamard,
builders."""

import math

import pytest
import torch

from duquant.quantizers import fake_quantize_activation, quantize_weight
from duquant.transform import (
    LayerTransform,
    _greedy,
    build_transform,
    greedy_block_rotation,
    hadamard_block_rotation,
    random_orthogonal,
    smoothing_scales,
    uniform_first_row_rotation,
    zigzag_permutation,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # every test is deterministic, also where it draws without a generator


def outlier_activations(t=256, c=256, channels=(5, 77), scale=50.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, c, generator=g)
    x[:, list(channels)] *= scale
    return x


def max_rel_err(y, ref):
    return float((y - ref).abs().max() / ref.abs().max())


# ---- function preservation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("c,bs",
                         [(4304, 128), (2048, 16), (100, 64), (256, 64), (130, 128), (129, 128), (64, 64)])
@pytest.mark.parametrize("method", ["duquant", "duquant-weight-only", "hadamard", "smoothquant", "rtn"])
def test_transform_preserves_function_in_float64(c, bs, method):
    g = torch.Generator().manual_seed(c + bs)
    x = torch.randn(3, 40, c, generator=g, dtype=torch.float64)  # leading dims
    x[..., 3] *= 30
    w = torch.randn(24, c, generator=g, dtype=torch.float64)
    flat = x.reshape(-1, c).float()
    sample = None if method == "duquant-weight-only" else flat
    t = build_transform(method.split("-")[0], weight=w.float(), act_absmax=flat.abs().amax(0),
                        act_sample=sample, block_size=bs, steps=16)
    assert t.kind == method
    wt = t.fold_into_weight(w)
    assert wt.dtype == torch.float64 and wt.shape == w.shape
    assert max_rel_err(t.apply(x) @ wt.T, x @ w.T) < 1e-5


@pytest.mark.parametrize("c,bs", [(4304, 128), (100, 64), (96, 32)])
def test_distinct_blocks_random_smooth_and_perm_preserve_function(c, bs):
    """A transform whose blocks all differ (as a pack may hold) takes the per-block path, still exact."""
    g = torch.Generator().manual_seed(1)
    nb, r = -(-c // bs), c % bs
    rots = []
    for _ in range(2):
        rot = torch.stack([random_orthogonal(bs, g) for _ in range(nb)])
        if r:
            rot[-1] = torch.eye(bs, dtype=torch.float64)
            rot[-1, :r, :r] = random_orthogonal(r, g)
        rots.append(rot.float())
    smooth = torch.rand(c, generator=g) * 5 + 0.01
    t = LayerTransform(c, bs, smooth=smooth, rot1=rots[0], perm=torch.randperm(c, generator=g), rot2=rots[1],
                       kind="duquant")
    t.validate(check_values=True)
    x = torch.randn(50, c, generator=g, dtype=torch.float64)
    w = torch.randn(16, c, generator=g, dtype=torch.float64)
    assert max_rel_err(t.apply(x) @ t.fold_into_weight(w).T, x @ w.T) < 1e-5
    # apply == x @ M with M the dense matrix (checks the shared/per-block paths agree)
    if c <= 100:
        assert torch.allclose(t.apply(x), x @ t.matrix(), atol=1e-10)


def test_apply_dtypes_and_leading_dims():
    x = outlier_activations(t=64, c=200)
    t = build_transform("duquant", weight=torch.randn(8, 200), act_absmax=x.abs().amax(0), act_sample=x,
                        block_size=64, steps=8)
    ref = t.apply(x)
    assert ref.dtype == torch.float32
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float16, 3e-3)):
        y = t.apply(x.to(dtype))
        assert y.dtype == dtype
        assert float((y.float() - ref).abs().max() / ref.abs().max()) < tol
    assert torch.allclose(t.apply(x.reshape(4, 16, 200)).reshape(64, 200), ref, atol=1e-6)
    with pytest.raises(ValueError, match="200 input channels"):
        t.apply(torch.randn(3, 199))
    assert t.fold_into_weight(torch.randn(8, 200, dtype=torch.bfloat16)).dtype == torch.float32


# ---- rotations ---------------------------------------------------------------------------------------------

def test_rotations_are_orthogonal_including_narrow_last_block():
    x = outlier_activations(c=200)
    for rot in (greedy_block_rotation(x, 64, steps=32), hadamard_block_rotation(200, 64)):
        assert rot.dtype == torch.float32 and rot.shape == (4, 64, 64)
        eye = torch.eye(64).expand_as(rot)
        assert torch.allclose(rot @ rot.transpose(1, 2), eye, atol=1e-5)
        corner = rot[-1, :8, :8]  # 200 = 3 * 64 + 8
        assert torch.allclose(corner @ corner.T, torch.eye(8), atol=1e-5)
        assert torch.equal(rot[-1, 8:, 8:], torch.eye(56)) and not rot[-1, :8, 8:].any()  # identity padding
    one = greedy_block_rotation(outlier_activations(c=129), 128, steps=8)  # a 1-wide last block
    assert torch.equal(one[-1], torch.eye(128))


def test_full_blocks_share_one_matrix():
    rot = greedy_block_rotation(outlier_activations(c=320), 64, steps=16)
    assert all(torch.equal(rot[i], rot[0]) for i in range(5))


def test_base_matrix_has_uniform_first_row():
    for n in (2, 3, 16, 128):
        b = uniform_first_row_rotation(n, torch.Generator().manual_seed(n))
        assert torch.allclose(b @ b.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(b[0], torch.full((n,), 1 / math.sqrt(n), dtype=torch.float64), atol=1e-12)


def test_greedy_first_step_spreads_the_spike_channel_evenly():
    """The paper's step: the channel with the largest |value| is swapped to position 0 and spread
    uniformly."""
    x = 0.01 * torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    x[3, 17] = 8.0
    rot = greedy_block_rotation(x, 64, steps=1)
    y = x @ rot[0]
    assert abs(float(y[3].abs().max()) - 1.0) < 0.05  # 8 / sqrt(64)
    assert float(y.abs().max()) < 0.2 * float(x.abs().max())


def test_greedy_rotation_spreads_outliers():
    x = outlier_activations()
    rot = greedy_block_rotation(x, 64, steps=64)
    t = LayerTransform(256, 64, rot1=rot)
    assert t.apply(x).abs().max() < 0.3 * x.abs().max()


def test_greedy_never_increases_the_max_and_zero_steps_is_identity():
    x = torch.randn(128, 128, generator=torch.Generator().manual_seed(3))  # no outliers: nothing to gain
    rot = greedy_block_rotation(x, 32, steps=32)
    assert float(LayerTransform(128, 32, rot1=rot).apply(x).abs().max()) <= float(x.abs().max()) * (1 + 1e-5)
    assert torch.equal(greedy_block_rotation(x, 32, steps=0), torch.eye(32).repeat(4, 1, 1))


def test_greedy_ignores_non_finite_tokens_and_is_seeded():
    x = outlier_activations(c=128)
    x[7, 3] = float("nan")
    x[9, 0] = float("inf")
    r1 = greedy_block_rotation(x, 64, steps=16, generator=torch.Generator().manual_seed(5))
    r2 = greedy_block_rotation(x, 64, steps=16, generator=torch.Generator().manual_seed(5))
    assert torch.isfinite(r1).all() and torch.equal(r1, r2)


def test_greedy_search_matches_a_plain_reference_on_a_wide_layer():
    """The batched search (precomputed step matrices, choices recorded, product rebuilt once) makes the same
    choices as the step-by-step definition: y <- y E_d B E_d (E_d an explicit exchange matrix), d = the column of
    the largest |y|, the prefix with the smallest max kept."""
    x = outlier_activations(t=256, c=512, channels=(5, 300), seed=1)
    rows = x.reshape(-1, 128)
    got = _greedy(rows, 64, torch.Generator().manual_seed(7))
    base = uniform_first_row_rotation(128, torch.Generator().manual_seed(7))
    y, rot, best = rows.float(), torch.eye(128, dtype=torch.float64), float(rows.abs().max())
    best_rot = rot  # choices in float32 as documented
    for _ in range(64):
        d = int(y.abs().amax(0).argmax())
        e = torch.eye(128, dtype=torch.float64)
        e[[0, d]] = e[[d, 0]]
        s = e @ base @ e
        y, rot = y @ s.float(), rot @ s
        if float(y.abs().max()) < best:
            best, best_rot = float(y.abs().max()), rot
    assert torch.allclose(got, best_rot, atol=1e-5)  # float32 product, polar-corrected
    assert float((rows.double() @ got).abs().max()) < 0.5 * float(rows.abs().max())


def test_hadamard_blocks():
    h = hadamard_block_rotation(256, 64)
    assert torch.allclose(h[0].abs(), torch.full((64, 64), 1 / 8.0))  # Sylvester, entries +-1/sqrt(64)
    assert all(torch.equal(h[i], h[0]) for i in range(4))
    a = hadamard_block_rotation(4304, 128, torch.Generator().manual_seed(0))  # 33 x 128 + an 80-wide block
    b = hadamard_block_rotation(4304, 128, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    last = a[-1, :80, :80].double()
    assert torch.allclose(last @ last.T, torch.eye(80, dtype=torch.float64), atol=1e-5)


# ---- zigzag ------------------------------------------------------------------------------------------------

def test_zigzag_paper_example():
    """Paper Fig. 2: 8 channels, 2 blocks: block 0 gets ranks {1, 4, 5, 8}, block 1 gets {2, 3, 6, 7}."""
    m = torch.tensor([3.0, 8.0, 1.0, 6.0, 7.0, 2.0, 5.0, 4.0])  # rank k (1 = largest) has value 9 - k
    perm = zigzag_permutation(m, 4)
    ranks = (9 - m[perm]).int().tolist()
    assert ranks == [1, 4, 5, 8, 2, 3, 6, 7]


def test_zigzag_balances_blocks():
    m = torch.arange(16, 0, -1).float()  # channel 0 largest
    perm = zigzag_permutation(m, 4)
    assert sorted(perm.tolist()) == list(range(16))
    blocks = perm.view(4, 4)
    assert blocks[:, 0].tolist() == [0, 1, 2, 3]  # the 4 largest go one per block
    assert blocks[:, 1].tolist() == [7, 6, 5, 4]  # then back in snake order
    assert all(torch.equal(m[b], m[b].sort(descending=True).values) for b in blocks)  # largest first
    sums = [float(m[b].sum()) for b in blocks]
    assert max(sums) - min(sums) <= 4


def test_zigzag_keeps_block_widths_when_not_divisible():
    m = torch.rand(10, generator=torch.Generator().manual_seed(0))
    perm = zigzag_permutation(m, 4)  # blocks of 4, 4, 2
    assert sorted(perm.tolist()) == list(range(10))
    top3 = m.argsort(descending=True)[:3].tolist()
    assert {perm[0].item(), perm[4].item(), perm[8].item()} == set(top3)  # one large channel per block
    assert sorted(zigzag_permutation(torch.rand(7), 16).tolist()) == list(range(7))  # one narrow block
    assert sorted(zigzag_permutation(torch.rand(4304), 128).tolist()) == list(range(4304))


# ---- smoothing ---------------------------------------------------------------------------------------------

def test_smoothing_scales():
    a = torch.tensor([100.0, 1.0, 1e-9, 4.0])
    w = torch.tensor([1.0, 1.0, 1.0, 1e-9])
    s = smoothing_scales(a, w, 0.5)
    assert s.dtype == torch.float32
    assert torch.allclose(s[:2], torch.tensor([10.0, 1.0]))
    assert s[2] == pytest.approx(0.01)  # a^alpha / w^(1-alpha) below 0.01 -> 0.01
    assert s[3] == pytest.approx(2.0 / math.sqrt(1e-5), rel=1e-4)  # w clamped to 1e-5
    assert torch.allclose(smoothing_scales(a[:2], w[:2], 1.0), a[:2])
    assert (smoothing_scales(torch.rand(50) * 10, torch.rand(50), 0.6) >= 0.01).all()


# ---- builders ----------------------------------------------------------------------------------------------

def test_build_transform_kinds_determinism_and_errors():
    x = outlier_activations(t=64, c=128)
    w = torch.randn(16, 128)
    kw = dict(weight=w, act_absmax=x.abs().amax(0), act_sample=x, block_size=32, steps=8)
    a, b = build_transform("duquant", seed=3, **kw), build_transform("duquant", seed=3, **kw)
    assert a.kind == "duquant" and all(torch.equal(p, q) for p, q in zip(a.to_tensors().values(),
                                                                          b.to_tensors().values()))
    assert a.perm is not None and a.rot2 is not None and a.smooth is not None
    one = build_transform("duquant", permute=False, **kw)
    assert one.perm is None and one.rot2 is None
    assert build_transform("duquant", **{**kw, "alpha": 0.0}).smooth is None
    assert build_transform("rtn", **kw).is_identity
    assert build_transform("smoothquant", **kw).rot1 is None
    assert build_transform("hadamard", **kw).smooth is None
    wo = build_transform("duquant", **{**kw, "act_sample": None, "act_absmax": None})
    assert wo.kind == "duquant-weight-only" and wo.smooth is None
    assert build_transform("duquant", **{**kw, "act_sample": None}).smooth is not None  # stats, no sample
    with pytest.raises(ValueError, match="smoothquant needs"):
        build_transform("smoothquant", **{**kw, "act_absmax": None, "act_sample": None})
    with pytest.raises(ValueError, match="unknown method"):
        build_transform("gptq", **kw)


def test_weight_only_fallback_flattens_weight_outliers():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    w[:, 9] *= 40
    t = build_transform("duquant", weight=w, act_absmax=None, act_sample=None, block_size=64, steps=64)
    assert t.fold_into_weight(w).abs().max() < 0.3 * w.abs().max()


def test_pack_tensors_round_trip():
    x = outlier_activations(t=64, c=200)
    t = build_transform("duquant", weight=torch.randn(8, 200), act_absmax=x.abs().amax(0), act_sample=x,
                        block_size=64, steps=8)
    d = t.to_tensors("transform.")
    assert set(d) == {"transform.smooth", "transform.rot1", "transform.perm", "transform.rot2"}
    assert d["transform.perm"].dtype == torch.int64 and d["transform.rot1"].dtype == torch.float32
    back = LayerTransform.from_tensors(d, "transform.", in_features=200, block_size=64, kind="duquant")
    assert torch.equal(back.apply(x), t.apply(x)) and back.kind == "duquant"
    assert t.num_bytes() == 200 * 4 + 200 * 8 + 2 * 4 * 64 * 64 * 4
    assert t.to("cpu") is t
    with pytest.raises(ValueError, match="rot1 has shape"):
        LayerTransform.from_tensors(d, "transform.", in_features=200, block_size=32, kind="duquant")
    bad = LayerTransform(200, 64, rot1=torch.ones(4, 64, 64))
    with pytest.raises(ValueError, match="not orthogonal"):
        bad.validate(check_values=True)
    empty = LayerTransform(10, 4)
    assert empty.is_identity and empty.num_bytes() == 0 and torch.equal(empty.apply(torch.ones(2, 10)),
                                                                         torch.ones(2, 10))


# ---- quality -----------------------------------------------------------------------------------------------

def massive_outlier_layer(seed):
    """Activations with channel outliers (x10..x60 on 8 channels) and a few massive tokens (~1000), and a
    weight."""
    g = torch.Generator().manual_seed(seed)
    t, c = 512, 512
    x = torch.randn(t, c, generator=g) * torch.exp(0.5 * torch.randn(1, c, generator=g))
    ch = torch.randperm(c, generator=g)[:8]
    x[:, ch] *= torch.linspace(10, 60, 8)
    for tok in torch.randperm(t, generator=g)[:3]:
        x[tok, ch[:2]] = 800.0 * (1 + torch.rand(2, generator=g))
    w = torch.randn(256, c, generator=g) / math.sqrt(c)
    return x, w


def w4a8_error(method, x, w, seed):
    t = build_transform(method, weight=w, act_absmax=x.abs().amax(0), act_sample=x, block_size=64, steps=64,
                        alpha=0.5 if method == "smoothquant" else 0.6, seed=seed)
    wq = quantize_weight(t.fold_into_weight(w), 4, clip=0.8).dequantize()
    y = fake_quantize_activation(t.apply(x), 8) @ wq.T
    ref = x @ w.T
    return float((y - ref).pow(2).sum() / ref.pow(2).sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_duquant_w4a8_beats_rtn_smoothquant_and_hadamard_on_massive_outliers(seed):
    x, w = massive_outlier_layer(seed)
    errs = {m: w4a8_error(m, x, w, seed) for m in ("rtn", "smoothquant", "hadamard", "duquant")}
    assert errs["duquant"] < 0.5 * min(errs["rtn"], errs["smoothquant"]), errs
    assert errs["duquant"] < errs["hadamard"], errs
