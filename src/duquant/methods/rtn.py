"""Round to nearest: no transform (the baseline every method is measured against)."""

from __future__ import annotations

import torch

from duquant.transform import LayerTransform


def build(weight: torch.Tensor, *, act_absmax: torch.Tensor | None, act_sample: torch.Tensor | None,
          block_size: int, alpha: float, steps: int, permute: str, generator: torch.Generator) -> LayerTransform:
    return LayerTransform(weight.shape[1], block_size, kind="rtn")
