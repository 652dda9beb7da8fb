"""DuQuantLinear.forward (fake backend) pinned, in float64, to the algorithm as docs/architecture.md and
docs/algorithm.md state it, written here from the stored transform and codes without the library's helpers:

    x_hat = (x / s) . R1 . P . R2          R1, R2 block-diagonal (last block: top-left r x r corner), P a permutation
    q_x   = clamp(round(x_hat / s_x) + z_x, 0, 2^b - 1)    per token: s_x = (max*clip - min*clip) / (2^b - 1),
    x_deq = (q_x - z_x) * s_x                              z_x = round(-min*clip / s_x)
    W_deq = (q_w - z_w) * s_w              q_w unpacked from the stored nibbles (element 2k low, 2k+1 high)
    y     = x_deq . W_deq^T + b
"""

import numpy as np
import pytest
import torch
from torch import nn

from duquant.api import quantize
from duquant.config import DuQuantConfig
from duquant.layers import DuQuantLinear

C, N, BLOCK = 72, 24, 16  # 72 = 4 full blocks of 16 + a partial block of 8


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(C, N)

    def forward(self, x):
        return self.q_proj(x)


def make_layer(seed: int) -> tuple[nn.Linear, DuQuantLinear, torch.Tensor]:
    torch.manual_seed(seed)
    model = Attn()
    float_layer = nn.Linear(C, N)
    float_layer.load_state_dict(model.q_proj.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    gains = torch.ones(C)
    gains[[3, 40, 70]] = torch.tensor([30.0, 12.0, 50.0])  # outlier channels, one in the partial block
    calib = [torch.randn(8, C, generator=g) * gains for _ in range(4)]
    cfg = DuQuantConfig(method="duquant", wbits=4, abits=8, block_size=BLOCK, rotation_steps=16)
    quantize(model, cfg, calibrate=lambda m: [m(x) for x in calib], progress=False, verbose=False)
    layer = model.q_proj
    assert isinstance(layer, DuQuantLinear)
    x = torch.randn(64, C, generator=g) * gains
    return float_layer, layer, x


def block_diagonal(blocks: torch.Tensor | None, width: int) -> np.ndarray:
    if blocks is None:
        return np.eye(width)
    blocks = blocks.double().numpy()
    nb, bs, _ = blocks.shape
    out = np.zeros((width, width))
    for i in range(nb):
        lo = i * bs
        r = min(bs, width - lo)
        out[lo:lo + r, lo:lo + r] = blocks[i][:r, :r]
    return out


def transform_matrix(t) -> tuple[np.ndarray, np.ndarray]:
    """(1/s, M) with x_hat = (x * (1/s)) @ M."""
    inv_s = np.ones(C) if t.smooth is None else 1.0 / t.smooth.double().numpy()
    perm = np.eye(C)
    if t.perm is not None:
        p = t.perm.numpy()
        perm = np.zeros((C, C))
        perm[p, np.arange(C)] = 1.0  # (x @ P)[j] = x[perm[j]]
    return inv_s, block_diagonal(t.rot1, C) @ perm @ block_diagonal(t.rot2, C)


def stored_weight(layer: DuQuantLinear) -> tuple[np.ndarray, np.ndarray]:
    """(W_deq, s_w) from the stored packed codes, scales and zero points (asymmetric 4-bit)."""
    packed = layer.qweight.numpy().astype(np.int64)
    assert packed.shape == (N, C // 2)
    codes = np.empty((N, C), dtype=np.int64)
    codes[:, 0::2], codes[:, 1::2] = packed & 0xF, packed >> 4
    scale = layer.w_scale.double().numpy().reshape(N, 1)
    zero = layer.w_zero.double().numpy().reshape(N, 1)
    return (codes - zero) * scale, scale


def spec_forward(layer: DuQuantLinear, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(y, ambiguous): the spec's output in float64, and which tokens hold a value within 1e-3 of a rounding
    tie (where float32 and float64 may round to different codes)."""
    inv_s, m = transform_matrix(layer.transform)
    xh = (x.double().numpy() * inv_s) @ m
    qmax = 2 ** layer.abits - 1
    lo = xh.min(-1, keepdims=True) * layer.act_clip
    hi = xh.max(-1, keepdims=True) * layer.act_clip
    sx = np.clip((hi - lo) / qmax, 1e-8, 1e8)
    zx = np.round(-lo / sx)
    frac = np.abs(xh / sx - np.floor(xh / sx) - 0.5)
    ambiguous = (frac < 1e-3).any(-1) | (np.abs(-lo / sx - np.floor(-lo / sx) - 0.5) < 1e-3)[:, 0]
    q = np.clip(np.round(xh / sx) + zx, 0, qmax)
    w, _ = stored_weight(layer)
    b = 0.0 if layer.bias is None else layer.bias.double().numpy()
    return ((q - zx) * sx) @ w.T + b, ambiguous


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forward_equals_the_spec_in_float64(seed):
    _, layer, x = make_layer(seed)
    t = layer.transform
    assert t.smooth is not None and t.rot1 is not None and t.perm is not None and t.rot2 is not None
    assert t.rot1.shape == (5, BLOCK, BLOCK)  # the partial last block is stored padded
    assert layer.abits == 8 and layer.wbits == 4 and layer.backend == "fake"
    y_spec, ambiguous = spec_forward(layer, x)
    assert ambiguous.mean() < 0.3  # most tokens are compared exactly
    with torch.no_grad():
        y = layer(x).double().numpy()
    keep = ~ambiguous
    scale = np.abs(y_spec).max()
    np.testing.assert_allclose(y[keep], y_spec[keep], rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize("seed", [0, 1])
def test_stored_codes_quantize_the_folded_weight(seed):
    """W_t = W . diag(s) . M, so that x_hat . W_t^T = x . W^T before rounding; the stored codes are W_t
    rounded per output channel (|W_deq - W_t| <= s_w / 2 inside the clip range)."""
    float_layer, layer, x = make_layer(seed)
    inv_s, m = transform_matrix(layer.transform)
    w = float_layer.weight.detach().double().numpy()
    w_t = (w / inv_s) @ m
    xh = (x.double().numpy() * inv_s) @ m
    np.testing.assert_allclose(xh @ w_t.T, x.double().numpy() @ w.T, atol=1e-9 * np.abs(x.numpy()).max() * C)
    w_deq, s_w = stored_weight(layer)
    clip = 0.8  # the paper's 4-bit weight clip (DuQuantConfig.weight_clip)
    inside = (w_t >= w_t.min(1, keepdims=True) * clip) & (w_t <= w_t.max(1, keepdims=True) * clip)
    err = np.abs(w_deq - w_t)
    assert inside.mean() > 0.9
    assert (err[inside] <= (s_w / 2 + 1e-6 * np.abs(w_t).max()).repeat(C, 1)[inside]).all()
    assert (err <= np.abs(w_t).max(1, keepdims=True)).all()  # clipped ones saturate, never wrap


def test_one_activation_clip_default():
    """The activation clip default lives in config.default_act_clip; the config and a layer built without a clip
    agree with it (the official code's 0.9 at <= 4 bits, no clip at 8: docs/algorithm.md)."""
    import inspect

    from duquant.config import ACT_CLIP, default_act_clip
    from duquant.random_layers import random_layer

    assert ACT_CLIP == 0.9 and default_act_clip(4) == 0.9 and default_act_clip(8) == 1.0
    for abits in (4, 8):
        assert DuQuantConfig(abits=abits).activation_clip == default_act_clip(abits)
    assert inspect.signature(DuQuantLinear.__init__).parameters["act_clip"].default is None
    assert random_layer(64, 8).act_clip == default_act_clip(8)
    _, layer, _ = make_layer(0)
    assert layer.act_clip == DuQuantConfig().activation_clip
