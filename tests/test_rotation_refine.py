"""Learned refinement of the DuQuant block rotations (duquant.rotation_refine, rotation_refine_steps)."""

import argparse

import pytest
import torch
from torch import nn

from duquant import rotation_refine as rr
from duquant.api import quantize
from duquant.config import ConfigError, DuQuantConfig, add_cli_args
from duquant.quantizers import fake_quantize_activation, fake_quantize_weight
from duquant.transform import LayerTransform, build_transform, random_orthogonal

Q = dict(wbits=4, abits=4, act_clip=0.9, w_clip=0.9)


def _layer(c=64, out=48, t=384, seed=0):
    """Tokens with a few large outlier channels and a random weight."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, c, generator=g)
    x[:, [3, 17, 40]] *= torch.tensor([25.0, 12.0, 8.0])
    w = torch.randn(out, c, generator=g) / c ** 0.5
    return x, w


def _greedy(x, w, bs=16, seed=0):
    return build_transform("duquant", weight=w, act_absmax=None, act_sample=x, block_size=bs, steps=32, seed=seed)


def _orth_err(rot):
    r = rot.double()
    return float((r @ r.transpose(1, 2) - torch.eye(r.shape[-1], dtype=torch.float64)).abs().max())


def test_cayley_is_orthogonal_and_the_identity_at_zero():
    a = torch.randn(3, 8, 8, dtype=torch.float64)
    q = rr.cayley(a)
    assert float((q @ q.transpose(1, 2) - torch.eye(8, dtype=torch.float64)).abs().max()) < 1e-12
    assert torch.equal(rr.cayley(torch.zeros(2, 5, 5)), torch.eye(5).expand(2, 5, 5))


def test_the_fake_quantizers_match_the_engine_ones():
    x, w = _layer()
    for sym in (False, True):
        assert torch.equal(rr._fake_quant_rows(x, 4, sym, 0.9, True), fake_quantize_activation(x, 4, sym, 0.9))
        assert torch.equal(rr._fake_quant_rows(w, 4, sym, 0.9, False), fake_quantize_weight(w, 4, sym, 0.9))


@pytest.mark.parametrize("c", [64, 72])  # 72: four full blocks of 16 and a narrower last block of 8
def test_refined_rotations_stay_orthogonal_and_shared_and_lower_the_error(c):
    x, w = _layer(c=c)
    t = _greedy(x, w)
    assert t._shared("rot1", t.rot1) and t._shared("rot2", t.rot2)
    log = []
    r = rr.refine_rotations(t, w, x, steps=60, lr=1e-2, tokens=128, rows=32, seed=0, log=log, **Q)
    assert r is not t and log[0][0] == 0 and log[-1][0] == 60
    for name in ("rot1", "rot2"):
        new = getattr(r, name)
        assert new.dtype == torch.float32 and new.shape == getattr(t, name).shape
        assert _orth_err(new) < 1e-5
        assert not torch.equal(new, getattr(t, name))
        full = c // 16
        assert all(torch.equal(new[i], new[0]) for i in range(1, full))  # still one shared matrix
        assert r._shared(name, new)
        if c % 16:
            rr_ = c % 16  # the last block keeps its identity padding
            assert torch.equal(new[-1, rr_:, rr_:], torch.eye(16 - rr_)) and not new[-1, :rr_, rr_:].any()
    r.validate(check_values=True)
    assert torch.equal(r.smooth, t.smooth) and torch.equal(r.perm, t.perm)
    assert (r.kind, r.permutation) == (t.kind, t.permutation)
    # the same function before rounding, and a smaller quantized output error (strict; by a margin)
    assert torch.allclose(r.apply(x) @ r.fold_into_weight(w).T, x @ w.T, rtol=1e-4, atol=1e-3)
    before = rr.quantized_output_error(t, w, x, **Q)
    after = rr.quantized_output_error(r, w, x, **Q)
    assert after < 0.9 * before, (before, after)
    assert after == pytest.approx(min(v for _, v in log), rel=1e-4)


def test_per_block_rotations_are_refined_per_block():
    x, w = _layer(seed=1)
    g = torch.Generator().manual_seed(3)
    rot = torch.stack([random_orthogonal(16, g) for _ in range(4)]).float()
    t = LayerTransform(64, 16, rot1=rot, kind="duquant")
    assert not t._shared("rot1", rot)
    r = rr.refine_rotations(t, w, x, steps=30, lr=1e-2, tokens=128, seed=0, **Q)
    assert _orth_err(r.rot1) < 1e-5 and r.rot2 is None and r.perm is None
    assert rr.quantized_output_error(r, w, x, **Q) < rr.quantized_output_error(t, w, x, **Q)


def test_steps_zero_or_no_sample_keep_the_transform():
    x, w = _layer()
    t = _greedy(x, w)
    assert rr.refine_rotations(t, w, x, steps=0, **Q) is t
    assert rr.refine_rotations(t, w, None, steps=10, **Q) is t
    ident = LayerTransform(64, 16)
    assert rr.refine_rotations(ident, w, x, steps=10, **Q) is ident


def test_refinement_is_deterministic():
    x, w = _layer()
    t = _greedy(x, w)
    a = rr.refine_rotations(t, w, x, steps=20, tokens=64, rows=16, seed=5, **Q)
    b = rr.refine_rotations(t, w, x, steps=20, tokens=64, rows=16, seed=5, **Q)
    assert torch.equal(a.rot1, b.rot1) and torch.equal(a.rot2, b.rot2)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k = nn.Linear(64, 32), nn.Linear(64, 32)
        self.out = nn.Linear(32, 16)

    def forward(self, x):
        return self.out(torch.relu(self.q(x) + self.k(x)))


def _quantized(cfg, x):
    model = Block()
    with torch.no_grad():
        quantize(model, cfg, calibrate=lambda m: m(x), progress=False, verbose=False)
    return model


def test_config_env_cli_pack_key_and_quantize():
    cfg = DuQuantConfig.from_env({"OPENPI_DUQUANT_ROTATION_REFINE_STEPS": "40"})
    assert cfg.rotation_refine_steps == 40
    assert DuQuantConfig().rotation_refine_steps == 0
    assert cfg.layer_hash("a") != DuQuantConfig().layer_hash("a")
    assert DuQuantConfig(rotation_refine_steps=0).layer_hash("a") == DuQuantConfig().layer_hash("a")
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    assert parser.parse_args(["--rotation-refine-steps", "7"]).rotation_refine_steps == 7
    with pytest.raises(ConfigError, match="ROTATION_REFINE_STEPS"):
        DuQuantConfig(rotation_refine_steps=-1)

    x, _ = _layer(t=256)
    base = DuQuantConfig(include=r"^(q|k|out)$", block_size=16, abits=4, rotation_steps=32)
    plain = _quantized(base, x)
    zero = _quantized(base.replace(rotation_refine_steps=0), x)  # steps 0: today's transform, bit for bit
    for name in ("q", "k", "out"):
        a, b = getattr(plain, name).transform, getattr(zero, name).transform
        assert all(torch.equal(u, v) for u, v in zip(a.to_tensors().values(), b.to_tensors().values(), strict=True))
    refined = _quantized(base.replace(rotation_refine_steps=30), x)
    assert not torch.equal(refined.q.transform.rot1, plain.q.transform.rot1)
    assert torch.equal(refined.q.transform.perm, plain.q.transform.perm)
    assert _orth_err(refined.q.transform.rot2) < 1e-5
    # other methods are left alone
    had = _quantized(base.replace(method="hadamard", rotation_refine_steps=30), x)
    had0 = _quantized(base.replace(method="hadamard"), x)
    assert torch.equal(had.q.transform.rot1, had0.q.transform.rot1)


# ---- rotation_refine_smooth: the smoothing vector learned with the rotations ------------------------------------

def test_learned_smoothing_keeps_the_float_output_and_does_not_raise_the_error():
    for seed in (0, 2):
        x, w = _layer(seed=seed)
        t = _greedy(x, w)
        assert t.smooth is not None
        kw = dict(steps=60, lr=1e-2, tokens=128, rows=32, seed=0, **Q)
        rot_only = rr.refine_rotations(t, w, x, **kw)
        both = rr.refine_rotations(t, w, x, learn_smooth=True, **kw)
        both.validate(check_values=True)
        assert both.smooth.dtype == torch.float32 and both.smooth.shape == t.smooth.shape
        assert bool((both.smooth > 0).all()) and not torch.equal(both.smooth, t.smooth)
        assert torch.equal(rot_only.smooth, t.smooth)
        assert _orth_err(both.rot1) < 1e-5 and _orth_err(both.rot2) < 1e-5
        assert torch.equal(both.perm, t.perm)
        # an equivalence before rounding: x' W'^T == x W^T
        assert torch.allclose(both.apply(x) @ both.fold_into_weight(w).T, x @ w.T, rtol=1e-4, atol=1e-3)
        greedy = rr.quantized_output_error(t, w, x, **Q)
        smooth_err = rr.quantized_output_error(both, w, x, **Q)
        assert smooth_err <= rr.quantized_output_error(rot_only, w, x, **Q)
        assert smooth_err < 0.9 * greedy


def test_learned_smoothing_is_deterministic_and_a_no_op_without_a_smoothing_vector():
    x, w = _layer()
    t = _greedy(x, w)
    kw = dict(steps=20, tokens=64, rows=16, seed=5, **Q)
    a = rr.refine_rotations(t, w, x, learn_smooth=True, **kw)
    b = rr.refine_rotations(t, w, x, learn_smooth=True, **kw)
    assert torch.equal(a.smooth, b.smooth) and torch.equal(a.rot1, b.rot1) and torch.equal(a.rot2, b.rot2)
    plain = LayerTransform(64, 16, rot1=t.rot1, perm=t.perm, rot2=t.rot2, kind="duquant")  # no smoothing vector
    u = rr.refine_rotations(plain, w, x, **kw)
    v = rr.refine_rotations(plain, w, x, learn_smooth=True, **kw)
    assert v.smooth is None and torch.equal(u.rot1, v.rot1) and torch.equal(u.rot2, v.rot2)
    assert rr.refine_rotations(t, w, x, learn_smooth=True, **{**kw, "steps": 0}) is t


def test_refine_smooth_config_env_cli_pack_key_and_quantize():
    cfg = DuQuantConfig.from_env({"OPENPI_DUQUANT_ROTATION_REFINE_SMOOTH": "1",
                                  "OPENPI_DUQUANT_ROTATION_REFINE_STEPS": "40"})
    assert cfg.rotation_refine_smooth and cfg.rotation_refine_steps == 40
    assert DuQuantConfig().rotation_refine_smooth is False
    steps = DuQuantConfig(rotation_refine_steps=40)
    assert cfg.layer_hash("a") != steps.layer_hash("a")
    # the default is left out of the key: packs written before the option keep theirs
    assert steps.replace(rotation_refine_smooth=False).layer_hash("a") == steps.layer_hash("a")
    assert DuQuantConfig(rotation_refine_smooth=False).layer_hash("a") == DuQuantConfig().layer_hash("a")
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    assert parser.parse_args(["--rotation-refine-smooth"]).rotation_refine_smooth is True
    assert parser.parse_args([]).rotation_refine_smooth is None  # unset: the environment or the default decides

    x, _ = _layer(t=256)
    base = DuQuantConfig(include=r"^(q|k|out)$", block_size=16, abits=4, rotation_steps=32)
    plain = _quantized(base, x)
    flag_only = _quantized(base.replace(rotation_refine_smooth=True), x)  # no refinement steps: nothing learned
    for name in ("q", "k", "out"):
        a, b = getattr(plain, name).transform, getattr(flag_only, name).transform
        assert all(torch.equal(u, v) for u, v in zip(a.to_tensors().values(), b.to_tensors().values(), strict=True))
    rot = _quantized(base.replace(rotation_refine_steps=30), x)
    both = _quantized(base.replace(rotation_refine_steps=30, rotation_refine_smooth=True), x)
    assert torch.equal(rot.q.transform.smooth, plain.q.transform.smooth)
    assert not torch.equal(both.q.transform.smooth, plain.q.transform.smooth)
    assert not torch.equal(both.out.transform.smooth, plain.out.transform.smooth)
    assert torch.equal(both.q.transform.perm, plain.q.transform.perm)


def test_the_transform_cache_takes_refined_groups():
    """quantize(..., transforms={}) (the report's cache) with the refinement on: its key holds the refine settings
    hashably, and a second quantize with the same statistics object reuses the cached transforms."""
    x, _ = _layer(t=256)
    cfg = DuQuantConfig(include=r"^(q|k|out)$", block_size=16, abits=4, rotation_steps=32, rotation_refine_steps=10,
                        rotation_refine_smooth=True)
    cache = {}
    model = Block()
    with torch.no_grad():
        quantize(model, cfg, calibrate=lambda m: m(x), progress=False, verbose=False, transforms=cache)
    assert cache and all(isinstance(k, tuple) for k in cache)
    assert torch.equal(model.q.transform.smooth, next(v[0] for k, v in cache.items() if "q" in k[1]).smooth)
