"""DuQuant (Lin et al., NeurIPS 2024): smoothing -> greedy rotation R1 -> zigzag permutation -> greedy R2.

The math lives in ``duquant.transform``; this module only composes it (docs/algorithm.md)."""

from __future__ import annotations

import torch

from duquant.transform import LayerTransform, greedy_blocks, smoothing_scales, zigzag_permutation


def build(weight: torch.Tensor, *, act_absmax: torch.Tensor | None, act_sample: torch.Tensor | None,
          block_size: int, alpha: float, steps: int, permute: bool, generator: torch.Generator) -> LayerTransform:
    """alpha <= 0 switches smoothing off; permute=False keeps R1 only (the paper's "Perm0"). Without a sample
    (kind "duquant-weight-only") the rows of the smoothed weight W*s stand in for tokens."""
    c = weight.shape[1]
    w = weight
    smooth = None
    if act_absmax is not None and alpha > 0:
        smooth = smoothing_scales(act_absmax, w.abs().amax(dim=0), alpha)
    if act_sample is not None:
        x, kind = (act_sample / smooth if smooth is not None else act_sample), "duquant"
    else:
        x, kind = (w * smooth if smooth is not None else w), "duquant-weight-only"
    rot1 = greedy_blocks(x, block_size, steps, generator)
    t = LayerTransform(c, block_size, smooth=smooth, rot1=rot1, kind=kind)
    if permute:
        x1 = t._rotate(x, "rot1")
        del x
        perm = zigzag_permutation(x1.abs().amax(dim=0), block_size).to(x1.device)
        x2 = x1[:, perm]
        del x1
        rot2 = greedy_blocks(x2, block_size, steps, generator)
        t = LayerTransform(c, block_size, smooth=smooth, rot1=rot1, perm=perm, rot2=rot2, kind=kind)
    return t
