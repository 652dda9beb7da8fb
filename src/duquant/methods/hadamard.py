"""Block Hadamard rotation (QuaRot-style), no smoothing; needs no calibration data."""

from __future__ import annotations

import torch

from duquant.transform import LayerTransform, hadamard_block_rotation


def build(weight: torch.Tensor, *, act_absmax: torch.Tensor | None, act_sample: torch.Tensor | None,
          block_size: int, alpha: float, steps: int, permute: str, generator: torch.Generator) -> LayerTransform:
    c = weight.shape[1]
    return LayerTransform(c, block_size, rot1=hadamard_block_rotation(c, block_size, generator), kind="hadamard")
