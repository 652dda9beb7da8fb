"""SmoothQuant: per-channel smoothing s = a^alpha / w^(1-alpha) only (alpha 0.5 unless given)."""

from __future__ import annotations

import torch

from duquant.transform import LayerTransform, smoothing_scales


def build(weight: torch.Tensor, *, act_absmax: torch.Tensor | None, act_sample: torch.Tensor | None,
          block_size: int, alpha: float, steps: int, permute: str, generator: torch.Generator) -> LayerTransform:
    if act_absmax is None:
        raise ValueError("smoothquant needs the activations' per-channel absmax (calibration data)")
    smooth = smoothing_scales(act_absmax, weight.abs().amax(dim=0), alpha)
    return LayerTransform(weight.shape[1], block_size, smooth=smooth, kind="smoothquant")
