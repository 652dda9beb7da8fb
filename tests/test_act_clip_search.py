"""The activation clip searched per layer group by output error (act_clip_search) against brute force."""

import argparse

import pytest
import torch
from torch import nn

from duquant.api import ACT_CLIP_GRID, quantize, search_act_clip
from duquant.config import ConfigError, DuQuantConfig, add_cli_args
from duquant.layers import DuQuantLinear
from duquant.quantizers import fake_quantize_activation


def _tokens(seed=0, t=512, n=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, generator=g)
    x[:, 0] *= 12.0  # one large channel sets every token's range
    return x


def test_the_brute_force_minimum_of_the_summed_output_error():
    x = _tokens()
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(16, 32, generator=g), torch.randn(8, 32, generator=g)]
    got = search_act_clip(x, ws, 4, False, 0.9)
    cands = [0.9] + [c for c in ACT_CLIP_GRID if c != 0.9]
    errs = [sum(float(((fake_quantize_activation(x, 4, clip=c) - x) @ w.T).pow(2).sum()) for w in ws) for c in cands]
    assert got == cands[errs.index(min(errs))]


def test_the_weights_decide_the_clip():
    """A layer that reads only the large channel wants it unclipped (1.0); one that reads only the small channels
    wants the finer grid a clip gives them (below 1.0). The activation error alone cannot tell them apart."""
    x = _tokens()
    reads_large = torch.zeros(4, 32)
    reads_large[:, 0] = 1.0
    reads_small = torch.ones(4, 32)
    reads_small[:, 0] = 0.0
    assert search_act_clip(x, [reads_large], 4, False, 0.9) == 1.0
    assert search_act_clip(x, [reads_small], 4, False, 0.9) < 1.0
    # a zero weight sees no error at any clip: the tie keeps the configured clip
    assert search_act_clip(x, [torch.zeros(4, 32)], 4, False, 0.85) == 0.85
    assert search_act_clip(torch.full((3, 32), float("nan")), [reads_small], 4, False, 0.9) == 0.9


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k = nn.Linear(32, 16), nn.Linear(32, 16)
        self.out = nn.Linear(16, 8)

    def forward(self, x):
        return self.out(torch.relu(self.q(x) + self.k(x)))


def test_config_env_cli_pack_key_and_quantize():
    cfg = DuQuantConfig.from_env({"OPENPI_DUQUANT_ACT_CLIP_SEARCH": "1"})
    assert cfg.act_clip_search
    assert cfg.layer_hash("a") != DuQuantConfig().layer_hash("a")
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    assert parser.parse_args(["--act-clip-search"]).act_clip_search is True
    for bad in (dict(act_pct=99.0), dict(act_static=True)):
        with pytest.raises(ConfigError, match="ACT_CLIP_SEARCH"):
            DuQuantConfig(act_clip_search=True, **bad)

    x = _tokens(2, t=256)
    model = Block()
    quantize(model, DuQuantConfig(method="hadamard", include=r"^(q|k|out)$", block_size=8, abits=4,
                                  act_clip_search=True), calibrate=lambda m: m(x), progress=False, verbose=False)
    assert all(isinstance(m, DuQuantLinear) for m in (model.q, model.k, model.out))
    assert model.q.act_clip == model.k.act_clip  # q and k share their input: one clip for the group
    assert {model.q.act_clip, model.out.act_clip} <= {0.9, *ACT_CLIP_GRID}
    # the searched clip is the brute-force one for the group (both weights, in the transformed basis)
    t = model.q.transform
    ws = [t.fold_into_weight(w) for w in (Block().q.weight.detach(), Block().k.weight.detach())]
    with torch.no_grad():
        assert model.q.act_clip == search_act_clip(t.apply(x), ws, 4, False, 0.9)
