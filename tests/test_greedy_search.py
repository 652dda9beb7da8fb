"""The greedy rotation search (`duquant.transform._greedy`) on a GPU: no device value read on the host per step
(a sync per step stalled ~500 searches x 256 steps on the full pi0), and the same result as the plain step-by-step
rule, whatever window of running products it keeps."""

from __future__ import annotations

import pytest
import torch

from duquant import transform
from duquant.transform import _greedy, _step_matrices, uniform_first_row_rotation
from host_reads import HostReads


def _reference(y: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    """The paper's rule written plainly: step to the channel holding max |y|, keep the first prefix with the
    smallest max |y|, polar factor of its product."""
    n = y.shape[1]
    s = _step_matrices(uniform_first_row_rotation(n, torch.Generator().manual_seed(seed)).float())
    cur, rot = y.float().clone(), torch.eye(n)
    best_m, best_rot = float(cur.abs().max()), rot.clone()
    for _ in range(steps):
        d = int(cur.abs().amax(dim=0).argmax())
        cur, rot = cur @ s[d], rot @ s[d]
        if float(cur.abs().max()) < best_m:
            best_m, best_rot = float(cur.abs().max()), rot.clone()
    u, _, vh = torch.linalg.svd(best_rot.double())
    return u @ vh


def _activations(rows: int, n: int) -> torch.Tensor:
    y = torch.randn(rows, n, generator=torch.Generator().manual_seed(n))
    y[:4, 1] *= 40.0  # an outlier channel: the search has something to spread
    return y


@pytest.mark.parametrize("window_steps", [None, 1, 5])
def test_search_matches_the_plain_rule(monkeypatch, window_steps):
    n, steps = 16, 40
    if window_steps is not None:
        monkeypatch.setattr(transform, "GREEDY_WINDOW_ELEMENTS", window_steps * n * n)
    y = _activations(96, n)
    got = _greedy(y, steps, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, _reference(y, steps, 3), rtol=0, atol=1e-6)
    assert not torch.equal(got, torch.eye(n, dtype=torch.float64))  # the outlier made it rotate


def test_search_reads_nothing_back_per_step():
    y = torch.empty(96, 16, device="meta")
    with HostReads() as w, pytest.raises((NotImplementedError, RuntimeError)):
        _greedy(y, 64, torch.Generator().manual_seed(0))  # the final copy to the host fails on meta: expected
    assert w.reads == []
    assert len(w.events) <= 4  # setup copies to the device and the one copy of the result, not one per step
