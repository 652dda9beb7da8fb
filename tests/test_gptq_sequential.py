"""GPTQ weight rounding against hand-derived solutions, the rounding registry and pack keys, and sequential
versus one-pass calibration statistics."""

import pytest
import torch
from torch import nn

from duquant import registry
from duquant.api import quantize
from duquant.calibration import block_of, sequential_stages
from duquant.config import ConfigError, DuQuantConfig
from duquant.packs import PackStore
from duquant.quantizers import quantize_weight
from duquant.rounding import gptq


def test_gptq_with_a_diagonal_hessian_is_round_to_nearest():
    """Uncorrelated inputs (H diagonal): no error can be compensated, so GPTQ gives RTN's codes."""
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    h = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(1)) + 0.5).double()
    for act_order in (False, True):
        got = gptq.round_weight(w, bits=4, symmetric=False, clip=0.9, group_size=None, hessian=h, act_order=act_order)
        ref = quantize_weight(w, 4, symmetric=False, clip=0.9)
        assert torch.equal(got.codes, ref.codes) and torch.equal(got.scale, ref.scale)


def test_gptq_on_two_identical_inputs_matches_the_closed_form():
    """x0 == x1: only w0 + w1 matters. With H = a[[1,1],[1,1]] + damp*a*I, column 0's rounding error e0 moves to
    column 1 as w1 + e0 / (1 + damp) (from H^-1), and column 1 is then rounded on the same grid."""
    damp = 0.01
    w = torch.tensor([[0.33, -0.71], [1.27, 0.05], [-0.52, 0.98]])
    a = 2.0
    h = torch.full((2, 2), a, dtype=torch.float64)
    got = gptq.round_weight(w, bits=3, symmetric=False, clip=1.0, group_size=None, hessian=h, damp=damp)
    ref = quantize_weight(w, 3, symmetric=False, clip=1.0)
    s, z = ref.scale.double()[:, 0], ref.zero.double()[:, 0]
    w = w.double()
    q0 = torch.clamp(torch.round(w[:, 0] / s) + z, 0, 7)
    w1 = w[:, 1] + (w[:, 0] - (q0 - z) * s) / (1 + damp)
    q1 = torch.clamp(torch.round(w1 / s) + z, 0, 7)
    assert torch.equal(got.codes[:, 0].double(), q0) and torch.equal(got.codes[:, 1].double(), q1)
    # ... and the sum w0 + w1 (all the layer computes) is closer than with round to nearest.
    assert (got.dequantize().sum(1) - w.sum(1).float()).abs().sum() < (ref.dequantize().sum(1)
                                                                       - w.sum(1).float()).abs().sum()


@pytest.mark.parametrize("group_size,act_order,symmetric",
                         [(None, False, False), (16, True, False), (None, True, True)])
def test_gptq_lowers_the_output_error_on_correlated_inputs(group_size, act_order, symmetric):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, 64, generator=g) + 0.1 * torch.randn(512, 64, generator=g)
    w = torch.randn(48, 64, generator=g)
    kw = dict(bits=4, symmetric=symmetric, clip=1.0, group_size=group_size)
    got = gptq.round_weight(w, x_t=x, act_order=act_order, **kw)
    ref = quantize_weight(w, 4, symmetric=symmetric, clip=1.0, group_size=group_size)
    assert torch.equal(got.scale, ref.scale)  # the grid is RTN's ("static groups"): stored like an RTN weight
    err = (x @ (got.dequantize() - w).T).pow(2).sum()
    err_rtn = (x @ (ref.dequantize() - w).T).pow(2).sum()
    assert err < 0.6 * err_rtn


def test_gptq_without_inputs_is_a_clear_error():
    with pytest.raises(ValueError, match="weight-rounding rtn"):
        gptq.round_weight(torch.randn(4, 8), bits=4, symmetric=False, clip=1.0, group_size=None)


def test_rounding_registry_config_env_and_pack_keys(tmp_path):
    assert set(registry.ROUNDINGS) >= {"rtn", "gptq"} and set(registry.METHODS) >= {"duquant", "rtn"}
    env = DuQuantConfig.from_env({"OPENPI_DUQUANT_WEIGHT_ROUNDING": "GPTQ", "OPENPI_DUQUANT_GPTQ_ACT_ORDER": "1"})
    assert env.weight_rounding == "gptq" and env.gptq_act_order
    with pytest.raises(ConfigError, match="WEIGHT_ROUNDING"):
        DuQuantConfig(weight_rounding="optq")
    rtn, gq = DuQuantConfig(), DuQuantConfig(weight_rounding="gptq")
    assert rtn.layer_hash("a") != gq.layer_hash("a")
    assert gq.layer_hash("a") != gq.replace(gptq_act_order=True).layer_hash("a")

    model = TwoBlocks()
    cfg = DuQuantConfig(method="hadamard", include="layers", block_size=8, weight_rounding="gptq",
                        packdir=str(tmp_path))
    quantize(model, cfg, calibrate=lambda m: m(torch.randn(64, 16)), progress=False, verbose=False)
    store = PackStore(tmp_path)
    assert store.read_meta("layers.0")["weight_rounding"] == "gptq"
    assert '"weight_rounding": "gptq"' in (tmp_path / "manifest.json").read_text()


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)])

    def forward(self, x):
        return self.layers[1](self.layers[0](x))


def test_stages_follow_blocks_in_forward_order():
    assert block_of("model.layers.3.mlp.up_proj") == "model.layers.3" and block_of("head.fc") == "head"
    order = ["enc.layers.0.q", "enc.layers.0.k", "enc.layers.1.q", "dec.layers.0.q", "enc.layers.1.fc"]
    assert sequential_stages(order) == [["enc.layers.0.q", "enc.layers.0.k"], ["enc.layers.1.q", "enc.layers.1.fc"],
                                        ["dec.layers.0.q"]]


@pytest.mark.parametrize("sequential", [False, True])
def test_sequential_statistics_come_from_the_quantized_earlier_blocks(sequential):
    """SmoothQuant (alpha 0.5) stores s = sqrt(a / w), so layer 1's smoothing gives back the activation absmax a it
    was calibrated on: the quantized layer 0's outputs in sequential mode, the float ones in one pass."""
    model = TwoBlocks()
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1)) * 3
    float0 = model.layers[0]
    w1 = model.layers[1].weight.detach().abs().amax(0)
    cfg = DuQuantConfig(method="smoothquant", wbits=2, abits=4, include="layers", sequential=sequential)
    calls = []

    def calibrate(m):
        calls.append(1)
        m(x)

    quantize(model, cfg, calibrate=calibrate, progress=False, verbose=False)
    a = model.layers[1].transform.smooth.double() ** 2 * w1.double()
    with torch.no_grad():
        a_float = float0(x).abs().amax(0).double()
        a_quant = model.layers[0](x).abs().amax(0).double()
    assert not torch.allclose(a_float, a_quant, rtol=1e-3)  # 2-bit weights: the two really differ
    expected = a_quant if sequential else a_float
    assert torch.allclose(a, expected, rtol=1e-4)
    assert len(calls) == (2 if sequential else 1)  # one calibration run per block in sequential mode
