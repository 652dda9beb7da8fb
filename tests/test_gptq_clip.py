"""The gptq-clip rounding (GPTQ with a per-row clip searched by output error) against hand-checkable answers."""

import torch

from duquant import registry
from duquant.config import DuQuantConfig
from duquant.quantizers import quantize_weight
from duquant.rounding import gptq, gptq_clip


def _row_error(w, q, h):
    d = (q.dequantize(torch.float64) - w.double())
    return ((d @ h) * d).sum(1)


def test_identity_hessian_picks_each_rows_best_round_to_nearest_clip():
    """H = I: GPTQ is round to nearest and the output error is the weight error, so each row must get the RTN
    codes of the grid ratio with the smallest weight error (found here by brute force)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 256, generator=g)
    w[1] = torch.linspace(-1, 1, 256)  # evenly spaced: the full range is best
    h = torch.eye(256, dtype=torch.float64)
    grid = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
    got = gptq_clip.round_weight(w, bits=4, symmetric=False, clip=1.0, group_size=None, hessian=h, grid=grid)
    refs = [quantize_weight(w, 4, symmetric=False, clip=c) for c in grid]
    errs = torch.stack([_row_error(w, r, h) for r in refs])
    best = errs.argmin(0)
    for o in range(w.shape[0]):
        ref = refs[int(best[o])]
        assert torch.equal(got.codes[o], ref.codes[o]) and torch.equal(got.scale[o], ref.scale[o])
    assert int(best[1]) == 0 and (best > 0).sum() >= 12  # Gaussian rows: mostly clipped


def test_rows_match_plain_gptq_at_their_chosen_clip_and_are_never_worse_than_the_configured_clip():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, 64, generator=g) + 0.1 * torch.randn(512, 64, generator=g)
    w = torch.randn(40, 64, generator=g)
    w[::7, 5] *= 8.0
    h = gptq.input_hessian(x)
    for group_size, act_order in ((None, False), (16, True)):
        kw = dict(bits=4, symmetric=False, group_size=group_size, hessian=h, act_order=act_order)
        got = gptq_clip.round_weight(w, clip=0.9, **kw)
        plain = gptq.round_weight(w, clip=0.9, **kw)
        assert torch.all(_row_error(w, got, h) <= _row_error(w, plain, h) + 1e-9)
        assert _row_error(w, got, h).sum() < _row_error(w, plain, h).sum()
        # GPTQ is row-independent for a fixed grid: one call with every row's chosen clip gives the same codes
        grid_clip = [0.9] + list(gptq_clip.CLIP_GRID)
        ref_scale = torch.stack([quantize_weight(w, 4, clip=c, group_size=group_size).scale for c in grid_clip])
        chosen = torch.tensor([[grid_clip[int(torch.nonzero((ref_scale[:, o] == got.scale[o]).all(1))[0])]]
                               for o in range(w.shape[0])])
        again = gptq.round_weight(w, clip=chosen, **kw)
        assert torch.equal(again.codes, got.codes) and torch.equal(again.scale, got.scale)


def test_registered_and_selectable_from_the_environment():
    assert registry.rounding("gptq-clip").needs_activations
    cfg = DuQuantConfig.from_env({"OPENPI_DUQUANT_WEIGHT_ROUNDING": "gptq-clip"})
    assert cfg.weight_rounding == "gptq-clip" and cfg.weight_clip(4) == 1.0
    assert cfg.layer_hash("a") != cfg.replace(weight_rounding="gptq").layer_hash("a")
