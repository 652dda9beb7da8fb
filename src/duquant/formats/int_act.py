"""Integer weights x per-token integer activations (``w4a8``, the DuQuant default; ``w8a8``, ``w4a4``, ...).

Fake-quant reference: the layer's online transform, per-token dynamic (or static) activation quantize-dequantize,
the dequantized weight (docs/architecture.md, "Numerics contract"). gpu backend: the Triton kernels in
``duquant.kernels`` (8-bit activations; one activation kernel per shared input, one fused GEMM per group).
"""

from __future__ import annotations

import torch

from duquant.formats import Format, register


class IntActivationFormat(Format):
    online_transform = True

    def __init__(self, wbits: int, abits: int):
        self.wbits, self.abits = wbits, abits
        self.name = f"w{wbits}a{abits}"
        self.weights = f"int{wbits}"
        self.activations = f"int{abits}"
        self.description = f"{wbits}-bit integer weights, per-token {abits}-bit integer activations"

    def quantize_input(self, layer, x: torch.Tensor) -> torch.Tensor:
        from duquant.quantizers import fake_quantize_activation, fake_quantize_activation_static

        xt = layer.transform.apply(x.float())
        if layer.act_static is not None:
            scale, zero = layer.act_static
            return fake_quantize_activation_static(xt, scale, zero, layer.abits, layer.act_symmetric)
        return fake_quantize_activation(xt, layer.abits, symmetric=layer.act_symmetric, clip=layer.act_clip)

    def gpu_group_key(self, layer) -> tuple:
        # the activation side only: members with different weight bits still share the activation kernel
        return ("int-act", id(layer.transform), layer.in_features, layer.abits, bool(layer.act_symmetric),
                float(layer.act_clip), str(layer.qweight.device))

    def gpu_prepare(self, layers: list, share_storage: bool = True) -> list:
        from duquant import kernels

        return kernels.prepare_gpu_linear(list(layers), share_storage=share_storage)

    def gpu_forward(self, state, x: torch.Tensor) -> torch.Tensor:
        from duquant import kernels

        return kernels.gpu_linear(x, state)


for _w in (2, 3, 4, 8):
    for _a in (4, 8):
        register(IntActivationFormat(_w, _a))
