"""Weight-only formats (``w4a16``; also ``w2a16``, ``w3a16``, ``w8a16``): integer weights, activations stay in the
model's float dtype, no activation quantization.

Meant to run without an online activation transform (method ``rtn`` or a weight-only calibration): the point is
the action expert at M ~ 51, where the GEMMs are bound by weight bytes and an activation kernel costs more than it
saves. Fake-quant reference: x (through the layer's transform, identity for this use) @ dequantized W^T.
gpu backend: ``kernels/triton_w4a16.py`` (packed 2/3/4-bit weights, identity transform).
"""

from __future__ import annotations

import torch

from duquant.formats import Format, register


class WeightOnlyFormat(Format):
    online_transform = False

    def __init__(self, wbits: int):
        self.wbits, self.abits = wbits, 16
        self.name = f"w{wbits}a16"
        self.weights = f"int{wbits}"
        self.activations = "bf16"  # the model's float dtype (bf16 on the GPU)
        self.description = f"{wbits}-bit integer weights, float activations, no activation transform"

    def quantize_input(self, layer, x: torch.Tensor) -> torch.Tensor:
        return layer.transform.apply(x.float())

    def gpu_prepare(self, layers: list, share_storage: bool = True) -> list:
        from duquant import kernels
        from duquant.kernels.triton_w4a16 import w4a16_weight

        kernels.check_gpu()
        states = []
        for layer in layers:
            if layer.wbits > 4:
                raise self.gpu_error(layer, "no weight-only kernel for 8-bit weights (use w8a8 or bf16)")
            if not layer.transform.is_identity:
                raise self.gpu_error(layer, f"runs without an activation transform, this layer has a "
                                            f"{layer.transform.kind!r} one (quantize it with method rtn)")
            if layer.out_rotation is not None:
                raise self.gpu_error(layer, "the output-side rotation (ROW_ROT=restore) is not implemented")
            if not layer.qweight.is_cuda:
                raise self.gpu_error(layer, f"buffers are on {layer.qweight.device}; move the model with .cuda()")
            try:
                w = w4a16_weight(layer.qweight, layer.w_scale, layer.w_zero, bits=layer.wbits,
                                 symmetric=layer.w_symmetric, group_size=layer.w_group_size,
                                 shape=(layer.out_features, layer.in_features), bias=layer.bias)
            except ValueError as e:
                raise self.gpu_error(layer, str(e)) from None
            layer._gpu_state = w
            states.append(w)
        return states

    def gpu_forward(self, state, x: torch.Tensor) -> torch.Tensor:
        from duquant.kernels.triton_w4a16 import w4a16_gemm

        y = w4a16_gemm(x.reshape(-1, state.K), state)
        return y.reshape(*x.shape[:-1], state.N)


for _w in (2, 3, 4, 8):
    register(WeightOnlyFormat(_w))
