"""Random DuQuantLinear layers and layer groups with real DuQuant transforms, for kernel and format tests and
benchmarks (no model, no calibration run: Gaussian weights, activations with a few massive channels)."""

from __future__ import annotations

import math

import torch

from duquant.layers import DuQuantLinear
from duquant.quantizers import quantize_weight
from duquant.transform import LayerTransform, build_transform, hadamard_block_rotation


def random_activations(m: int, k: int, seed: int = 0, outliers: int = 4, scale: float = 30.0,
                       dtype=torch.float32, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    idx = torch.randperm(k, generator=g)[:outliers]
    x[:, idx] *= scale
    return x.to(device=device, dtype=dtype)


def random_transform(k: int, method: str = "duquant", block_size: int = 128, seed: int = 0, steps: int = 8,
                     weight: torch.Tensor | None = None, permute: bool | str = True) -> LayerTransform:
    """duquant (greedy, calibrated on random outlier activations), hadamard, smoothquant or rtn."""
    g = torch.Generator().manual_seed(seed)
    if method == "rtn":
        return LayerTransform(k, block_size, kind="rtn")
    if method == "hadamard":
        return LayerTransform(k, block_size, rot1=hadamard_block_rotation(k, block_size, g), kind="hadamard")
    sample = random_activations(256, k, seed=seed + 1)
    w = weight if weight is not None else torch.randn(64, k, generator=g) / math.sqrt(k)
    return build_transform(method, weight=w, act_absmax=sample.abs().amax(0), act_sample=sample,
                           block_size=block_size, steps=steps, seed=seed, permute=permute)


def random_group(k: int, outs: list[int], *, wbits: int = 4, w_symmetric: bool = False,
                 group_size: int | None = None, act_symmetric: bool = False, act_clip: float | None = None,
                 method: str = "duquant", block_size: int = 128, bias: bool = True, seed: int = 0,
                 steps: int = 8, device="cpu") -> list[DuQuantLinear]:
    """Layers of widths `outs` sharing one input (one transform object), quantized like the engine does (the
    transform is searched on the CPU, folding and quantization run on `device`)."""
    g = torch.Generator().manual_seed(seed + 7)
    weights = [torch.randn(n, k, generator=g) / math.sqrt(k) for n in outs]
    t = random_transform(k, method, block_size, seed, steps, weight=torch.cat([w[:256] for w in weights])[:256])
    t = t.to(device)
    layers = []
    for w in weights:
        w = w.to(device)
        qw = quantize_weight(t.fold_into_weight(w), wbits, symmetric=w_symmetric, clip=0.9 if wbits <= 4 else 1.0,
                             group_size=group_size)
        b = (0.1 * torch.randn(w.shape[0], generator=g)).to(device) if bias else None
        layers.append(DuQuantLinear(k, w.shape[0], qweight=qw, transform=t, bias=b, abits=8,
                                    act_symmetric=act_symmetric, act_clip=act_clip, method=method))
    return layers


def random_layer(k: int, n: int, **kw) -> DuQuantLinear:
    return random_group(k, [n], **kw)[0]
