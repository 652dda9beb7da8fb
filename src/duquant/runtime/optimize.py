"""The fast inference path in one call: fuse projections, compile blocks, capture one CUDA graph."""

from __future__ import annotations

from torch import nn

from duquant.models.observation import Observation
from duquant.runtime.compile import compile_blocks
from duquant.runtime.fuse import fuse_projections
from duquant.runtime.graph import CapturedPolicy


def optimize(policy: nn.Module, example: Observation, *, fuse: bool = True, compile: bool = True,
             num_steps: int | None = None) -> CapturedPolicy:
    """`policy` made fast in place (fused projections, compiled blocks) and captured for `example`'s layout.
    Quantize first: quantized layers keep their own kernels and fusion (call `kernels.prepare_gpu_model` before)."""
    if fuse:
        fuse_projections(policy)
    if compile:
        compile_blocks(policy)
    return CapturedPolicy(policy, example, num_steps=num_steps)
