"""GPTQ with a searched per-row clip: a cheap stand-in for DuQuant's learnable weight clipping (LWC).

The paper's LWC learns one clip factor per output row by minimising the block's output error. Here every output
row picks, from a grid of clip ratios (and the configured clip), the one whose *GPTQ-rounded* row gives the
smallest layer output error on the calibration inputs, (w_o - q_o) H (w_o - q_o)^T with H = X^T X / T of the
transformed inputs x_t (undamped). GPTQ's error feedback is row-independent once the grid of a row is fixed (every
row shares H^-1 and only its own scale / zero enter its updates), so all candidates run as one GPTQ call on the
weight stacked once per candidate, and each row keeps its best candidate's codes, scale and zero. The configured
clip is always a candidate, so per row the result is never worse in that metric than plain GPTQ with that clip.

Unlike ``--clip-search`` (``quantizers.search_weight_clip``, which scores round-to-nearest rows), the clip is
chosen for the rounding that is actually stored: a ratio that helps RTN (clamping the row's extremes) can hurt
once GPTQ spreads the clamping error over the row, and the reverse.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from duquant.quantizers import QuantizedWeight
from duquant.rounding import gptq

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def round_weight(w_t: torch.Tensor, *, bits: int, symmetric: bool, clip: float | torch.Tensor,
                 group_size: int | None, x_t: torch.Tensor | None = None, hessian: torch.Tensor | None = None,
                 damp: float = 0.01, act_order: bool = False,
                 grid: Sequence[float] = CLIP_GRID) -> QuantizedWeight:
    """GPTQ rounding of w_t [out, in] with each row's clip chosen from `grid` and `clip` by output error."""
    if hessian is None:
        if x_t is None:
            raise ValueError("GPTQ needs the layer's calibration inputs (x_t) or their Hessian; calibrate first, "
                             "or use --weight-rounding rtn")
        hessian = gptq.input_hessian(x_t)
    out, n = w_t.shape
    device = w_t.device
    groups = 1 if not group_size else -(-n // group_size)
    given = torch.as_tensor(clip, dtype=torch.float32, device=device)  # the candidates' device (CUDA: cat below)
    given = given.reshape(out, -1).expand(out, groups) if given.numel() > 1 else given.reshape(1, 1).expand(out, groups)
    candidates = [given] + [torch.full((out, groups), float(c), device=device) for c in grid
                            if 0.0 < float(c) <= 1.0 and not torch.all(given == float(c))]
    k = len(candidates)
    stacked = gptq.round_weight(w_t.repeat(k, 1), bits=bits, symmetric=symmetric,
                                clip=torch.cat(candidates, 0), group_size=group_size, hessian=hessian, damp=damp,
                                act_order=act_order)
    h = hessian.detach().to(device=device, dtype=torch.float64)
    diff = (stacked.dequantize(torch.float64) - w_t.detach().double().repeat(k, 1))  # [k*out, n]
    err = ((diff @ h) * diff).sum(1).reshape(k, out)
    best = torch.argmin(err, dim=0)  # first minimum: ties keep the configured clip (candidate 0)
    rows = best * out + torch.arange(out, device=device)
    zero = stacked.zero[rows].contiguous() if stacked.zero is not None else None
    return QuantizedWeight(stacked.codes[rows].contiguous(), stacked.scale[rows].contiguous(), zero, bits,
                           symmetric, group_size, (out, n))
