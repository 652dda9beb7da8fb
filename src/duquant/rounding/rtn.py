"""Round to nearest with a fixed (or searched) clip: ``quantizers.quantize_weight``."""

from __future__ import annotations

import torch

from duquant.quantizers import QuantizedWeight, quantize_weight


def round_weight(w_t: torch.Tensor, *, bits: int, symmetric: bool, clip: float | torch.Tensor,
                 group_size: int | None, x_t: torch.Tensor | None = None, hessian: torch.Tensor | None = None,
                 damp: float = 0.01, act_order: bool = False) -> QuantizedWeight:
    return quantize_weight(w_t, bits, symmetric=symmetric, clip=clip, group_size=group_size)
