"""``w8a8-fp8``: FP8 e4m3 weights (one scale per output channel) and FP8 e4m3 activations (one scale per token,
dynamic), multiplied by ``torch._scaled_mm`` with rowwise scales (sm89+; 1.2-1.8x bf16 on pi0's LLM GEMMs).

Scales: ``s = absmax * clip / 448`` (448 = the largest e4m3 value), values ``(v / s)`` rounded to e4m3 (round to
nearest even, saturating). Fake-quant reference: the same rounding in torch (CPU or CUDA) times the scales. The
weight is stored as the e4m3 bytes viewed as uint8, so ``model.to(dtype)`` cannot convert it.
gpu backend: the layer's activation transform (any the kernels fuse: DuQuant, Hadamard, SmoothQuant, none) and the
fp8 quantization in one ``triton_act_tile`` pass, then ``_scaled_mm`` over a group's concatenated weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from duquant.formats import Format, FormatError, register
from duquant.kernels import SharedInputGroup

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
class Fp8State:
    """A layer's handle on its group (layers sharing one input)."""
    group: Fp8Group
    index: int
    N: int

    def resident_bytes(self) -> int:
        return self.group.num_bytes() * self.N // self.group.n_total


class Fp8ActGroup(SharedInputGroup):
    """Layers sharing one input whose activation pass is ``triton_act_tile`` in FP8 mode (``w8a8-fp8``,
    ``w4a8-fp8``): the first member's transform as a kernel plan, its activation clip, the rotation precision."""

    def __init__(self, layers: list):
        from duquant.kernels.triton_act import build_act_plan

        first = layers[0]
        self.layers, self.in_features = layers, first.in_features
        self.plan = build_act_plan(first.transform, first.in_features, first.qweight.device)
        self.clip = float(first.act_clip)
        self.precision = os.environ.get("DUQUANT_ACT_PRECISION") or "fp16"
        self._cache = None

    @property
    def can_fuse_geglu(self) -> bool:
        from duquant.kernels.triton_act_tile import can_fuse_geglu

        return len(self.layers) == 1 and can_fuse_geglu(self.plan, self.precision)


class Fp8Group(Fp8ActGroup):
    """fp8 layers sharing an input (q/k/v, gate/up): one activation kernel (``triton_act_tile`` in fp8 mode, the
    layers' transform fused into it), one ``torch._scaled_mm`` over the concatenated weight rows, outputs split
    per member. With ``share_storage`` the members' qweight / w_scale become views of the concatenated tensors."""

    def __init__(self, layers: list, share_storage: bool = True):
        super().__init__(layers)
        first = layers[0]
        self.splits = [la.out_features for la in layers]
        self.n_total = sum(self.splits)
        data = torch.cat([la.qweight for la in layers]) if len(layers) > 1 else first.qweight
        scale = torch.cat([la.w_scale.float().reshape(-1) for la in layers])
        if share_storage and len(layers) > 1:
            off = 0
            for la, n in zip(layers, self.splits):
                la.qweight, la.w_scale = data[off:off + n], scale[off:off + n]
                off += n
        self.weight_t = data.view(E4M3).t()  # [K, N], column-major: the layout _scaled_mm wants
        self.scale_w = scale.reshape(1, -1)
        biases = [la.bias for la in layers]
        zeros = [torch.zeros(n, device=data.device) for n in self.splits]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [(b.detach() if b is not None else z).to(torch.bfloat16) for b, z in zip(biases, zeros)])

    def num_bytes(self) -> int:
        b = self.weight_t.numel() + self.scale_w.numel() * 4 + self.plan.num_bytes()
        return b + (0 if self.bias is None else self.bias.numel() * 2)

    def forward_all(self, x2: torch.Tensor, up2: torch.Tensor | None = None) -> list[torch.Tensor]:
        from duquant.kernels.triton_act_tile import act_quant_tile

        codes, sx, _, _ = act_quant_tile(x2, self.plan, clip=self.clip, fp8=True, precision=self.precision,
                                         up=up2)
        y = torch._scaled_mm(codes, self.weight_t, scale_a=sx.reshape(-1, 1), scale_b=self.scale_w,
                             out_dtype=torch.bfloat16, use_fast_accum=True)
        if self.bias is not None:
            y = y + self.bias
        return [y] if len(self.splits) == 1 else list(y.split(self.splits, dim=1))


def check_fp8_device(fmt: Format, layer) -> None:
    """The FP8 formats' gpu backends need the layer's buffers on a CUDA device with FP8 tensor cores."""
    if not layer.qweight.is_cuda:
        raise fmt.gpu_error(layer, f"buffers are on {layer.qweight.device}; move the model with .cuda()")
    if torch.cuda.get_device_capability(layer.qweight.device) < (8, 9):
        raise fmt.gpu_error(layer, "FP8 tensor cores need compute capability 8.9 or newer")


def fp8_group_states(fmt: Format, group) -> list[Fp8State]:
    """Each member's state on a prepared FP8 group (its transform must run in the activation kernel)."""
    if not group.plan.fused:
        raise fmt.gpu_error(group.layers[0], f"its transform cannot run in the activation kernel: {group.plan.reason}")
    return [Fp8State(group, i, la.out_features) for i, la in enumerate(group.layers)]


def fp8_group_forward(state: Fp8State, x: torch.Tensor) -> torch.Tensor:
    y = state.group.output(x, state.index)
    return y.to(x.dtype).reshape(*x.shape[:-1], state.N)


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

    def gpu_group_key(self, layer) -> tuple:
        return ("fp8-act", id(layer.transform), layer.in_features, float(layer.act_clip), str(layer.qweight.device))

    def gpu_prepare(self, layers: list, share_storage: bool = True) -> list:
        from duquant import kernels

        kernels.check_gpu()
        for layer in layers:
            check_fp8_device(self, layer)
            if layer.out_rotation is not None or layer.act_static is not None:
                raise self.gpu_error(layer, "no output-side rotation or static activation scales with fp8")
            if layer.in_features % 16 or layer.out_features % 16:
                raise self.gpu_error(layer, "torch._scaled_mm needs in and out features divisible by 16")
        return fp8_group_states(self, Fp8Group(list(layers), share_storage=share_storage))

    def gpu_forward(self, state: Fp8State, x: torch.Tensor) -> torch.Tensor:
        return fp8_group_forward(state, x)


register(Fp8Format())
