"""``w8a8-fp8``: FP8 e4m3 weights (one scale per output channel) and FP8 e4m3 activations (one scale per token,
dynamic), multiplied by ``torch._scaled_mm`` with rowwise scales (sm89+; 1.2-1.8x bf16 on pi0's LLM GEMMs).

Scales: ``s = absmax * clip / 448`` (448 = the largest e4m3 value), values ``(v / s)`` rounded to e4m3 (round to
nearest even, saturating). Fake-quant reference: the same rounding in torch (CPU or CUDA) times the scales. The
weight is stored as the e4m3 bytes viewed as uint8, so ``model.to(dtype)`` cannot convert it.
gpu backend: identity transform only (an online transform would need its own fp8 activation kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from duquant.formats import Format, FormatError, register

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
SCALE_MIN = 1e-12


def fp8_quantize(v: torch.Tensor, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rowwise over the last dim: v [..., K] -> (e4m3 codes [..., K], float32 scale [..., 1])."""
    v = v.float()
    scale = (v.abs().amax(-1, keepdim=True) * clip / E4M3_MAX).clamp(min=SCALE_MIN)
    return (v / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def fp8_fake_quantize(v: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    codes, scale = fp8_quantize(v, clip)
    return codes.float() * scale


@dataclass
class Fp8Weight:
    """A weight container like ``QuantizedWeight``: e4m3 codes [N, K] and a float32 scale per output channel."""
    codes: torch.Tensor  # float8_e4m3fn [N, K]
    scale: torch.Tensor  # float32 [N]
    bits: int = 8
    symmetric: bool = True
    group_size: int | None = None
    zero: torch.Tensor | None = None

    def packed(self) -> torch.Tensor:
        return self.codes.view(torch.uint8)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.codes.float() * self.scale.float()[:, None]).to(dtype)

    def num_bytes(self) -> int:
        return self.codes.numel() + self.scale.numel() * 4


@dataclass
class Fp8GpuState:
    weight_t: torch.Tensor  # e4m3 [K, N], column-major (the layout _scaled_mm wants for its second operand)
    scale_w: torch.Tensor  # float32 [1, N]
    bias: torch.Tensor | None
    clip: float
    N: int
    K: int

    def num_bytes(self) -> int:
        return self.weight_t.numel() + self.scale_w.numel() * 4 + (0 if self.bias is None else self.bias.numel() * 4)


class Fp8Format(Format):
    name = "w8a8-fp8"
    weights = "fp8-e4m3"
    activations = "fp8-e4m3"
    online_transform = True
    wbits = 8
    abits = 8
    description = "FP8 e4m3 weights (per channel) and activations (per token), torch._scaled_mm"

    def quantize_weight(self, w: torch.Tensor, *, bits: int = 8, symmetric: bool = True, clip=1.0,
                        group_size: int | None = None) -> Fp8Weight:
        if group_size is not None:
            raise FormatError("w8a8-fp8 has one scale per output channel (no weight groups)")
        if not isinstance(clip, (int, float)):
            raise FormatError("w8a8-fp8 takes a scalar weight clip")
        codes, scale = fp8_quantize(w, float(clip))
        return Fp8Weight(codes=codes, scale=scale.reshape(-1))

    def weight_from_buffers(self, layer) -> Fp8Weight:
        return Fp8Weight(codes=layer.qweight.view(E4M3), scale=layer.w_scale)

    def quantize_input(self, layer, x: torch.Tensor) -> torch.Tensor:
        return fp8_fake_quantize(layer.transform.apply(x.float()), layer.act_clip)

    def gpu_prepare(self, layers: list, share_storage: bool = True) -> list:
        from duquant import kernels

        kernels.check_gpu()
        states = []
        for layer in layers:
            if torch.cuda.get_device_capability(layer.qweight.device) < (8, 9):
                raise self.gpu_error(layer, "FP8 tensor cores need compute capability 8.9 or newer")
            if not layer.transform.is_identity:
                raise self.gpu_error(layer, f"the gpu backend runs it without an activation transform, this layer "
                                            f"has a {layer.transform.kind!r} one (quantize it with method rtn)")
            if layer.out_rotation is not None or layer.act_static is not None:
                raise self.gpu_error(layer, "no output-side rotation or static activation scales with fp8")
            if layer.in_features % 16 or layer.out_features % 16:
                raise self.gpu_error(layer, "torch._scaled_mm needs in and out features divisible by 16")
            w = self.weight_from_buffers(layer)
            st = Fp8GpuState(weight_t=w.codes.t(), scale_w=w.scale.float().reshape(1, -1).contiguous(),
                             bias=None if layer.bias is None else layer.bias.detach().to(torch.bfloat16),
                             clip=float(layer.act_clip), N=layer.out_features, K=layer.in_features)
            layer._gpu_state = st
            states.append(st)
        return states

    def gpu_forward(self, state: Fp8GpuState, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, state.K)
        xq, sx = fp8_quantize(x2, state.clip)
        y = torch._scaled_mm(xq, state.weight_t, scale_a=sx, scale_b=state.scale_w, out_dtype=torch.bfloat16,
                             use_fast_accum=True)
        if state.bias is not None:
            y = y + state.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], state.N)


register(Fp8Format())
