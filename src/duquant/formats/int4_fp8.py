"""``w4a8-fp8``: 4-bit integer weights (per output channel; rtn, gptq or any integer weight rounding) and FP8 e4m3
activations (per token, dynamic, after the layer's online transform: DuQuant, Hadamard, SmoothQuant or none).

Why a second W4A8: on Hopper the FP8 tensor cores have the int8 ones' peak, and Triton's FP8 mainloop reached
cuBLAS FP8 on the LLM's down projection where its int8 one did not (BENCHMARKS.md §6c). The weights keep the
``w4a8`` storage (the same packed nibbles, scales and zero points), so the memory is the same 0.26x of bf16.

Scales: activations ``s = absmax * clip / 448`` per token, values rounded to e4m3 (formats/fp8.py); weights as
``w4a8``. Fake-quant reference: the transform, the e4m3 rounding times its scale, the dequantized 4-bit weight.
gpu backend: one activation pass per shared input writes the e4m3 codes in the packed-int4 GEMM's split order
and each token's code sum; one ``triton_gemm`` GEMM of kind ``W_INT4_FP8`` over the group's concatenated rows
reads each nibble as the e4m3 number n * 2^-9 (exact), accumulates in float32 and subtracts the weight zero
point's term (zero point x code sum) in its epilogue.
"""

from __future__ import annotations

import torch

from duquant.formats import register
from duquant.formats.fp8 import (
    Fp8ActGroup,
    Fp8State,
    check_fp8_device,
    fp8_fake_quantize,
    fp8_group_forward,
    fp8_group_states,
)
from duquant.formats.int_act import IntActivationFormat


class Int4Fp8Group(Fp8ActGroup):
    """Layers sharing one input (q/k/v, gate/up): one FP8 activation pass, one int4 x FP8 GEMM over their
    concatenated weight rows (with ``share_storage`` the members' buffers become views of it), outputs per member."""

    def __init__(self, layers: list, share_storage: bool = True):
        from duquant.kernels import _gemm_weight
        from duquant.kernels.triton_gemm import W_INT4_FP8

        super().__init__(layers)
        self.weight = _gemm_weight(list(layers), share_storage, kind=W_INT4_FP8)
        self.n_total = self.weight.N

    def num_bytes(self) -> int:
        return self.weight.num_bytes() + self.plan.num_bytes()

    def forward_all(self, x2: torch.Tensor, up2: torch.Tensor | None = None) -> list[torch.Tensor]:
        from duquant.kernels.triton_act_tile import act_quant_tile
        from duquant.kernels.triton_gemm import int_gemm

        codes, sx, _, code_sum = act_quant_tile(x2, self.plan, clip=self.clip, fp8=True, layout="split",
                                                precision=self.precision, up=up2, fp8_sum=True)
        return int_gemm(codes, sx, None, code_sum, self.weight, out_dtype=x2.dtype)


class Int4Fp8Format(IntActivationFormat):
    """The integer format's weights (``IntActivationFormat(4, 8)``: quantize_weight, weight_from_buffers) with FP8
    activations."""

    def __init__(self):
        super().__init__(4, 8)
        self.name = "w4a8-fp8"
        self.activations = "fp8-e4m3"
        self.description = "4-bit integer weights (per channel), FP8 e4m3 activations (per token)"

    def quantize_input(self, layer, x: torch.Tensor) -> torch.Tensor:
        return fp8_fake_quantize(layer.transform.apply(x.float()), layer.act_clip)

    def gpu_group_key(self, layer) -> tuple:
        return ("int4-fp8-act", id(layer.transform), layer.in_features, float(layer.act_clip),
                str(layer.qweight.device))

    def gpu_prepare(self, layers: list, share_storage: bool = True) -> list:
        from duquant import kernels

        for layer in layers:  # what no machine can run first, then what this one cannot
            if layer.out_rotation is not None or layer.act_static is not None:
                raise self.gpu_error(layer, "no output-side rotation or static activation scales with fp8")
            if layer.wbits != 4 or getattr(layer, "w_group_size", None) is not None:
                raise self.gpu_error(layer, "the int4 x FP8 GEMM takes 4-bit weights with one scale per output "
                                            "channel (no --w-group-size)")
        kernels.check_gpu()
        for layer in layers:
            check_fp8_device(self, layer)
        return fp8_group_states(self, Int4Fp8Group(list(layers), share_storage=share_storage))

    def gpu_forward(self, state: Fp8State, x: torch.Tensor) -> torch.Tensor:
        return fp8_group_forward(state, x)


register(Int4Fp8Format())
