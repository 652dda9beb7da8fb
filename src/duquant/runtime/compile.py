"""`torch.compile` per transformer block: norms, RoPE, softmax, GeGLU and residuals become a few fused kernels
between the GEMMs. Blocks of one kind share their code, so each kind compiles once (per input shape) and every
layer reuses it; compiling the whole 10-step call instead costs minutes of compile time for the same kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from duquant.models.gemma import GemmaDecoderLayer
from duquant.models.siglip import SiglipEncoderLayer

BLOCK_TYPES = (GemmaDecoderLayer, SiglipEncoderLayer)


def _is_quantized(module: nn.Module) -> bool:
    return type(module).__name__ == "DuQuantLinear"  # the model package never imports the quantization core


def compile_blocks(model: nn.Module, mode: str | None = None) -> int:
    """Compile the forward of every decoder / encoder block in place; returns the number of blocks. Quantized
    layers inside a block run their own kernels (excluded from tracing), so the compiled graph fuses around them."""
    # One compiled graph per (block kind, shapes) serves all 18-27 layers; leave room for the few distinct shapes.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for module in model.modules():
        if not _is_quantized(module):
            continue
        for name in ("forward", "forward_gelu_tanh_mul"):  # the second: a GeGLU MLP's fused down projection
            fn = getattr(module, name, None)
            if fn is not None and not getattr(fn, "_duquant_not_traced", False):
                fn = torch.compiler.disable(fn)
                fn._duquant_not_traced = True
                setattr(module, name, fn)
    blocks = [m for m in model.modules() if isinstance(m, BLOCK_TYPES)]
    for block in blocks:
        block.forward = torch.compile(block.forward, mode=mode, dynamic=False)
    return len(blocks)
