"""Weight-only formats (``w4a16``; also ``w2a16``, ``w3a16``, ``w8a16``): integer weights, activations stay in the
model's float dtype, no activation quantization.

Meant to run without an online activation transform (method ``rtn`` or a weight-only calibration): the point is
the action expert at M ~ 51, where the GEMMs are bound by weight bytes and an activation kernel costs more than it
saves. Fake-quant reference: x (through the layer's transform, identity for this use) @ dequantized W^T.
gpu backend: ``kernels/triton_w4a16.py`` (packed 2/3/4-bit weights, identity transform).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from duquant.formats import Format, register
from duquant.kernels import SharedInputGroup


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

    def gpu_group_key(self, layer) -> tuple:
        # layers sharing an input (one transform object: q/k/v, gate/up) and a weight layout run one fused GEMM
        return ("w-only", id(layer.transform), layer.in_features, layer.wbits, layer.w_group_size,
                str(layer.qweight.device))

    def gpu_prepare(self, layers: list, share_storage: bool = True) -> list:
        from duquant import kernels

        kernels.check_gpu()
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
            group = WeightOnlyGroup(list(layers), share_storage=share_storage)
        except ValueError as e:
            raise self.gpu_error(layers[0], str(e)) from None
        return [WeightOnlyState(group, i, la.out_features) for i, la in enumerate(layers)]

    def gpu_forward(self, state, x: torch.Tensor) -> torch.Tensor:
        return state.group.output(x, state.index).reshape(*x.shape[:-1], state.N)


@dataclass
class WeightOnlyState:
    group: WeightOnlyGroup
    index: int
    N: int

    def resident_bytes(self) -> int:
        return self.group.weight.num_bytes() * self.N // self.group.weight.N


class WeightOnlyGroup(SharedInputGroup):
    """Weight-only layers sharing an input: one bf16 x int4 GEMM over the concatenated rows (the expert's q/k/v and
    gate/up are one launch), outputs split per member. With ``share_storage`` the members' qweight / w_scale /
    w_zero become views of the concatenated tensors (no second copy)."""

    def __init__(self, layers: list, share_storage: bool = True):
        from duquant.kernels.triton_w4a16 import W4A16Weight, w4a16_weight

        first = layers[0]
        self.layers, self.in_features = layers, first.in_features
        self.splits = [la.out_features for la in layers]
        ws = [w4a16_weight(la.qweight, la.w_scale, la.w_zero, bits=la.wbits, symmetric=la.w_symmetric,
                           group_size=la.w_group_size, shape=(la.out_features, la.in_features), bias=la.bias)
              for la in layers]
        if len(ws) == 1:
            self.weight = ws[0]
        else:
            dev = first.qweight.device
            bias = None
            if any(w.bias is not None for w in ws):
                bias = torch.cat([w.bias if w.bias is not None else torch.zeros(w.N, device=dev) for w in ws])
            self.weight = W4A16Weight(data=torch.cat([w.data for w in ws]), scale=torch.cat([w.scale for w in ws]),
                                      zero=torch.cat([w.zero for w in ws]), bias=bias, N=sum(self.splits),
                                      K=first.in_features, group_size=first.w_group_size)
            if share_storage:
                ng = self.weight.scale.numel() // self.weight.N
                off = 0
                for la, n in zip(layers, self.splits):
                    la.qweight = self.weight.data[off:off + n]
                    la.w_scale = self.weight.scale[off * ng:(off + n) * ng].reshape(la.w_scale.shape)
                    if la.w_zero is not None and not la.w_symmetric:
                        la.w_zero = self.weight.zero[off * ng:(off + n) * ng].reshape(la.w_zero.shape)
                    off += n
        self._cache = None

    def forward_all(self, x2: torch.Tensor) -> list[torch.Tensor]:
        from duquant.kernels.triton_w4a16 import w4a16_gemm

        y = w4a16_gemm(x2, self.weight)
        return [y] if len(self.splits) == 1 else list(y.split(self.splits, dim=1))


for _w in (2, 3, 4, 8):
    register(WeightOnlyFormat(_w))
