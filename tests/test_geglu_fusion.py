"""Producer fusion of a GeGLU MLP's product into the down projection's activation kernel (issue 12): the model's
hook, the layer's fallback, the compile exclusion, and (GPU) the fused layer against the unfused one."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from duquant.layers import DuQuantLinear
from duquant.models.config import GemmaConfig
from duquant.models.gemma import GemmaMLP
from duquant.random_layers import random_group
from gpu_marks import needs_gpu

CFG = GemmaConfig(width=64, depth=1, mlp_dim=256, num_heads=2, num_kv_heads=1, head_dim=32, vocab_size=32)


class _Recorder(nn.Linear):
    """A down projection that says it fuses the product and records what it was given."""

    fuses_gelu_tanh_mul = True

    def forward_gelu_tanh_mul(self, gate, up):
        self.got = (gate, up)
        return self(F.gelu(gate, approximate="tanh") * up)


def test_mlp_hands_gate_and_up_to_a_fusing_down_projection():
    torch.manual_seed(0)
    mlp = GemmaMLP(CFG)
    x = torch.randn(2, 5, CFG.width)
    want = mlp(x)
    rec = _Recorder(CFG.mlp_dim, CFG.width, bias=False)
    rec.weight = mlp.down_proj.weight
    mlp.down_proj = rec
    got = mlp(x)
    assert torch.allclose(got, want, atol=1e-6)
    gate, up = rec.got  # the MLP passed the two projections, not their product
    assert torch.allclose(gate, mlp.gate_proj(x)) and torch.allclose(up, mlp.up_proj(x))


def test_layer_without_fusion_computes_the_product_first():
    """The fake backend (and any layer whose kernels cannot fuse) gives exactly layer(gelu_tanh(gate) * up)."""
    layer = random_group(256, [64], method="duquant", block_size=64, seed=1)[0]
    assert layer.fuses_gelu_tanh_mul is False
    gate, up = torch.randn(7, 256), torch.randn(7, 256)
    assert torch.equal(layer.forward_gelu_tanh_mul(gate, up), layer(F.gelu(gate, approximate="tanh") * up))


def test_compile_blocks_keeps_the_fused_entry_out_of_tracing():
    from duquant.runtime.compile import compile_blocks

    model = nn.Sequential(random_group(128, [32], method="rtn", seed=2)[0])
    compile_blocks(model)
    layer = model[0]
    assert getattr(layer.forward, "_duquant_not_traced", False)
    assert getattr(layer.forward_gelu_tanh_mul, "_duquant_not_traced", False)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fmt", ["w4a8", "w8a8-fp8"])
def test_gpu_fused_down_projection_matches_unfused(fmt, monkeypatch):
    """K = 16384 (the LLM's down projection), shuffle permutation: the fused call equals the layer on the
    product up to the activation codes' rare one-step differences (the product rounded once to bf16 inside the
    kernel, twice in eager PyTorch)."""
    monkeypatch.setenv("DUQUANT_FUSE_GEGLU", "1")
    from duquant.random_layers import random_transform

    k, n, m = 16384, 2048, 51
    t = random_transform(k, "duquant", 128, seed=0, steps=2, permute="shuffle").to("cuda")
    lin = nn.Linear(k, n, bias=False)
    layer = DuQuantLinear.from_linear(lin, fmt, transform=t, w_clip=0.9 if fmt == "w4a8" else 1.0, act_clip=0.9,
                                      method="duquant", backend="gpu").cuda()
    layer.prepare_gpu_group([layer])
    assert layer.fuses_gelu_tanh_mul, os.environ.get("DUQUANT_ACT_FOLD")
    gate = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    up = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    fused = layer.forward_gelu_tanh_mul(gate, up).float()
    plain = layer(F.gelu(gate.float(), approximate="tanh").mul(up.float()).to(torch.bfloat16)).float()
    err = float((fused - plain).norm() / plain.norm())
    assert err < 1e-2, err
