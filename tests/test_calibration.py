"""Calibration recording (`duquant.calibration`, `duquant.token_sample`): the hooks never read device values on the
host (on a GPU each read is a sync; the full pi0 makes ~50,000 hook calls), the statistics are exact over every
finite token whatever the call sizes, and the token sample keeps the outlier carriers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from duquant.calibration import ActivationRecorder, LayerStats
from duquant.config import DuQuantConfig
from duquant.models import build_policy, make_synthetic_observation
from duquant.selection import select_layers
from duquant.token_sample import TokenReservoir
from host_reads import HostReads


def test_the_watch_sees_host_reads():
    x = torch.empty(5, device="meta")
    for bad in (lambda: (x > 0).nonzero(), lambda: x.sum().item(), lambda: torch.zeros(2).to("meta")):
        with HostReads() as w:
            with pytest.raises((NotImplementedError, RuntimeError)):
                bad()
                raise RuntimeError("the watch must have seen it")  # .to("meta") succeeds: only the event counts
        assert w.events


@pytest.mark.parametrize("hessian", [False, True])
def test_calibration_hooks_never_read_the_device(hessian):
    model = build_policy("pi0-tiny", device="meta")
    modules = select_layers(model, DuQuantConfig(preset="full")).modules
    obs = make_synthetic_observation(model.config, batch_size=2, seed=0).to("meta")
    noise = torch.empty(2, model.config.action_horizon, model.config.action_dim, device="meta")
    with ActivationRecorder(modules, max_tokens=64, hessian=hessian) as rec, torch.no_grad(), HostReads() as w:
        for _ in range(2):  # the second pass merges into full samples and partly filled staging buffers
            model.sample_actions(obs, noise=noise)
    assert w.events == []
    calls = {n: s.calls for n, s in rec.stats.items()}
    assert min(calls.values()) == 2 and max(calls.values()) == 2 * model.config.num_steps  # the expert: per step


def _rows(n: int, c: int, seed: int) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("call_rows", [3, 100, 5000])  # staged calls, and calls processed on their own
def test_statistics_are_exact_over_every_finite_token(call_rows):
    c = 16
    x = _rows(6000, c, 0)
    x[17, 3] = float("nan")
    x[4000, 0] = float("inf")
    stats = LayerStats(c, max_tokens=64, keep_hessian=True)
    for i in range(0, x.shape[0], call_rows):
        stats.update(x[i:i + call_rows].reshape(-1, 1, c))  # any leading dims
    finite = x[torch.isfinite(x).all(dim=1)]
    assert stats.tokens_seen == finite.shape[0] == 5998
    assert torch.equal(stats.absmax, finite.abs().amax(dim=0))
    torch.testing.assert_close(stats.hessian, finite.T @ finite, rtol=1e-4, atol=1e-3)
    sample = stats.sample
    # a call adds up to max_tokens // 8 random rows plus the outlier rows: two large calls leave the sample short
    assert sample.shape == ((64 if call_rows <= 100 else 24), c) and bool(torch.isfinite(sample).all())
    # every sampled row is an input row, listed in input order
    pos = [int(((finite - r).abs().sum(dim=1) == 0).nonzero()[0]) for r in sample]
    assert pos == sorted(pos) and len(set(pos)) == len(pos)


def test_sample_keeps_the_outlier_tokens_and_spreads_over_the_calls():
    c, cap = 32, 64
    stats = LayerStats(c, max_tokens=cap)
    spikes = []
    for call in range(200):
        x = _rows(100, c, call + 1)
        if call % 50 == 7:
            x[call % 100, call % c] = 1000.0 + call  # a massive activation on one token
            spikes.append(x[call % 100].clone())
        stats.update(x)
    sample = stats.sample
    assert sample.shape == (cap, c)
    for s in spikes:
        assert bool(((sample - s).abs().sum(dim=1) == 0).any())
    # the random part comes from the whole run, not only the last calls
    first_half = torch.cat([_rows(100, c, call + 1) for call in range(100)])
    hits = sum(bool(((first_half - r).abs().sum(dim=1) == 0).any()) for r in sample)
    assert 10 <= hits <= cap - 10


def test_reservoir_ranks_rows_and_ignores_invalid_ones():
    res = TokenReservoir(capacity=8, width=2, generator=torch.Generator().manual_seed(0))
    assert res.rows() is None
    rows = torch.arange(40, dtype=torch.float32).reshape(20, 2)
    valid = torch.ones(20, dtype=torch.bool)
    valid[19] = False  # the largest row, but invalid
    res.offer(rows, valid, rows.abs().amax(dim=1), torch.arange(20))
    out = res.rows()
    assert out.shape == (8, 2)
    kept = out[:, 0].long().div(2, rounding_mode="floor").tolist()
    assert 19 not in kept and 18 in kept and 17 in kept  # the top quarter (2 rows) by max |value|
    assert kept == sorted(kept)
    res2 = TokenReservoir(capacity=8, width=2)
    res2.offer(rows[:3], torch.tensor([True, False, True]), torch.ones(3), torch.arange(3))
    assert res2.rows().tolist() == [[0.0, 1.0], [4.0, 5.0]]  # fewer valid rows than slots: all of them, no filler


def test_a_layer_seen_only_with_non_finite_tokens_has_no_statistics():
    stats = LayerStats(4, max_tokens=16)
    stats.update(torch.full((3, 4), float("nan")))
    assert stats.calls == 1 and stats.tokens_seen == 0
    assert stats.absmax is None and stats.sample is None and stats.hessian is None


def test_recorder_settles_statistics_after_the_run():
    lin = nn.Linear(8, 4)
    with ActivationRecorder({"lin": lin}, max_tokens=32) as rec, torch.no_grad():
        for i in range(10):
            lin(_rows(5, 8, i))
    s = rec.stats["lin"]
    assert s.calls == 10 and s.tokens_seen == 50 and s.sample.shape == (32, 8)
    with torch.no_grad():
        lin(_rows(5, 8, 99))  # hooks are gone: nothing more is recorded
    assert s.calls == 10
