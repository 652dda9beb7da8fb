"""Projections that read the same input run as one GEMM: q/k/v of every attention, gate/up of every Gemma MLP.

The concatenated weight is stored once; the original Linears keep their names and become views of it, so
checkpoint keys, layer selection and loading are unchanged and no weight memory is duplicated. Fuse after the
model has its final device and dtype (a later `.to()` gives the views their own storage again, correct but no
longer shared). Quantized layers (anything but a plain `nn.Linear`) are left alone: the gpu backend fuses its own
groups (`kernels.prepare_gpu_model`).
"""

from __future__ import annotations

import torch
from torch import nn

from duquant.models.gemma import GemmaAttention, GemmaMLP
from duquant.models.siglip import SiglipAttention

# module type -> (names of the Linears sharing an input, fused weight buffer, fused bias buffer or None)
FUSED_GROUPS = {
    GemmaAttention: (("q_proj", "k_proj", "v_proj"), "qkv_weight", None),
    GemmaMLP: (("gate_proj", "up_proj"), "gate_up_weight", None),
    SiglipAttention: (("q_proj", "k_proj", "v_proj"), "qkv_weight", "qkv_bias"),
}


def _fuse(module: nn.Module, names: tuple[str, ...], weight_buf: str, bias_buf: str | None) -> bool:
    parts = [getattr(module, n) for n in names]
    if not all(type(p) is nn.Linear for p in parts):
        return False
    with torch.no_grad():
        weight = torch.cat([p.weight for p in parts]).contiguous()
        bias = torch.cat([p.bias for p in parts]).contiguous() if bias_buf is not None else None
    setattr(module, weight_buf, weight)
    if bias_buf is not None:
        setattr(module, bias_buf, bias)
    start = 0
    for p in parts:  # the Linears now view the fused storage: one copy of the weights in memory
        n = p.out_features
        p.weight = nn.Parameter(weight[start:start + n], requires_grad=p.weight.requires_grad)
        if bias is not None:
            p.bias = nn.Parameter(bias[start:start + n], requires_grad=p.bias.requires_grad)
        start += n
    return True


def fuse_projections(model: nn.Module) -> int:
    """Fuse every q/k/v and gate/up group of plain Linears in `model`; returns the number of groups fused."""
    fused = 0
    for module in model.modules():
        spec = FUSED_GROUPS.get(type(module))
        if spec is not None and _fuse(module, *spec):
            fused += 1
    return fused
