"""gptq-aq / gptq-clip-aq (GPTQ fitted to the layer's quantized activations) against hand-checkable answers."""

import torch
from torch import nn

from duquant import registry
from duquant.api import quantize
from duquant.config import DuQuantConfig
from duquant.layers import DuQuantLinear
from duquant.quantizers import fake_quantize_activation
from duquant.rounding import act_aware, gptq, gptq_clip


def _data(seed=0, t=2048, n=48, out=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, 6, generator=g) @ torch.randn(6, n, generator=g) + 0.3 * torch.randn(t, n, generator=g)
    x[:, 3] *= 6.0  # an outlier channel: 4-bit per-token activations lose the small ones
    w = torch.randn(out, n, generator=g)
    return x, w


def test_float_activations_give_plain_gptq_and_gptq_clip():
    x, w = _data()
    h = gptq.input_hessian(x)
    kw = dict(bits=4, symmetric=False, clip=0.9, group_size=None, damp=0.1)
    for aware, plain in ((act_aware.round_gptq, gptq.round_weight), (act_aware.round_gptq_clip,
                                                                      gptq_clip.round_weight)):
        ref = plain(w, x_t=x, hessian=h, **kw)
        for x_q in (None, x.clone()):  # no quantized sample, or one equal to the float one (e = 0)
            got = aware(w, x_t=x, hessian=h, x_q=x_q, **kw)
            assert torch.equal(got.codes, ref.codes) and torch.equal(got.scale, ref.scale)


def test_target_is_the_least_squares_fit_to_the_quantized_inputs():
    """Without a separate Hessian and with (almost) no damping, V solves min_V ||x W^T - q V^T||^2 on the sample,
    and B is q^T q / T."""
    x, w = _data(1)
    q = fake_quantize_activation(x, 4, clip=0.9)
    v, b = act_aware.target(w, x, q, None, damp=1e-12)
    ref = torch.linalg.lstsq(q.double(), (x.double() @ w.double().T)).solution.T
    assert torch.allclose(v.double(), ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(b, q.double().T @ q.double() / x.shape[0], atol=1e-9)


def test_lower_output_error_against_the_quantized_layer_than_gptq():
    """What the layer computes is q Q^T: the act-aware roundings bring it closer to the float x W^T than plain GPTQ
    (fitted to x), on the sample and on fresh tokens of the same distribution."""
    x, w = _data(2, t=4096)
    fit, fresh = x[:2048], x[2048:]
    kw = dict(bits=4, symmetric=False, clip=1.0, group_size=None, damp=0.01)

    def err(qw, xs):
        return float((xs @ w.T - fake_quantize_activation(xs, 4, clip=0.9) @ qw.dequantize().T).pow(2).sum())

    q = fake_quantize_activation(fit, 4, clip=0.9)
    for aware, plain in ((act_aware.round_gptq, gptq.round_weight), (act_aware.round_gptq_clip,
                                                                      gptq_clip.round_weight)):
        got, ref = aware(w, x_t=fit, x_q=q, **kw), plain(w, x_t=fit, **kw)
        assert err(got, fit) < 0.9 * err(ref, fit)
        assert err(got, fresh) < 0.9 * err(ref, fresh)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(32, 32), nn.Linear(32, 16)])

    def forward(self, x):
        return self.layers[1](torch.relu(self.layers[0](x)))


def test_registered_selectable_and_plain_gptq_at_float_activations():
    for name in ("gptq-aq", "gptq-clip-aq"):
        spec = registry.rounding(name)
        assert spec.needs_activations and spec.act_aware and spec.default_w_clip == 1.0
        cfg = DuQuantConfig.from_env({"OPENPI_DUQUANT_WEIGHT_ROUNDING": name})
        assert cfg.weight_rounding == name
        assert cfg.layer_hash("a") != cfg.replace(weight_rounding="gptq").layer_hash("a")
    x = torch.randn(128, 32, generator=torch.Generator().manual_seed(4))
    x[:, 5] *= 10.0

    def run(rounding, abits):
        model = Block()
        cfg = DuQuantConfig(method="hadamard", include="layers", block_size=8, weight_rounding=rounding,
                            wbits=4, abits=abits)
        quantize(model, cfg, calibrate=lambda m: m(x), progress=False, verbose=False)
        assert all(isinstance(m, DuQuantLinear) for m in model.layers)
        return model, [m.qweight.clone() for m in model.layers]

    # weight-only (w4a16): the activations stay in float, so gptq-aq stores gptq's codes
    assert all(torch.equal(a, b) for a, b in zip(run("gptq-aq", 16)[1], run("gptq", 16)[1]))
    # w4a4: a different weight, and the model's output is at least as close to the float model's on fresh inputs
    aware, codes_aware = run("gptq-aq", 4)
    plain, codes_plain = run("gptq", 4)
    assert any(not torch.equal(a, b) for a, b in zip(codes_aware, codes_plain))
    ref = Block()
    with torch.no_grad():
        fresh = torch.randn(512, 32, generator=torch.Generator().manual_seed(5))
        fresh[:, 5] *= 10.0
        e_aware = (aware(fresh) - ref(fresh)).pow(2).sum()
        e_plain = (plain(fresh) - ref(fresh)).pow(2).sum()
    assert e_aware < e_plain
