"""DuQuant (Lin et al., NeurIPS 2024): smoothing -> greedy rotation R1 -> permutation -> greedy R2.

The math lives in ``duquant.transform``; this module only composes it (docs/algorithm.md). The permutation is a
registered choice (``duquant.registry.PERMUTATIONS``: zigzag, the paper's; shuffle; none)."""

from __future__ import annotations

import torch

from duquant import registry
from duquant.transform import LayerTransform, greedy_blocks, smoothing_scales


def build(weight: torch.Tensor, *, act_absmax: torch.Tensor | None, act_sample: torch.Tensor | None,
          block_size: int, alpha: float, steps: int, permute: str, generator: torch.Generator) -> LayerTransform:
    """alpha <= 0 switches smoothing off; permute="none" keeps R1 only (the paper's "Perm0"). Without a sample
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
    planner = registry.permutation(permute).planner
    if planner is None:
        return t
    x1 = t._rotate(x, "rot1")
    del x
    plan = registry.load(planner)(x1, rot1, block_size)
    del x1
    rot2 = greedy_blocks(plan.x2, block_size, steps, generator)
    return LayerTransform(c, block_size, smooth=smooth, rot1=plan.rot1, perm=plan.perm, rot2=rot2, kind=kind,
                          permutation=plan.name)
