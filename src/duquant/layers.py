"""DuQuantLinear: the drop-in replacement for a selected nn.Linear.

It stores what the format says (packed 4-bit codes or 8-bit codes, per-channel scales and zero points, the
layer's transform) and runs one of two backends:

- ``fake``: the reference. Transform the activation online, quantize-dequantize it per token, multiply by the
  dequantized weight. Works on CPU and CUDA, in fp32/bf16/fp16.
- ``gpu``: the Triton kernels in ``duquant.kernels`` on the same buffers; an error (never a silent fallback)
  when they cannot run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from duquant.quantizers import (
    QuantizedWeight,
    fake_quantize_activation,
    fake_quantize_activation_static,
)
from duquant.transform import LayerTransform


class DuQuantLinear(nn.Module):
    """A quantized ``nn.Linear``: same name in the model, same call signature, same output shape."""

    def __init__(self, in_features: int, out_features: int, *, qweight: QuantizedWeight,
                 transform: LayerTransform, bias: torch.Tensor | None, abits: int, act_symmetric: bool = False,
                 act_clip: float = 0.9, act_static: tuple[float, float] | None = None, method: str = "duquant",
                 backend: str = "fake", out_rotation: torch.Tensor | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.wbits = qweight.bits
        self.w_symmetric = qweight.symmetric
        self.w_group_size = qweight.group_size
        self.abits = abits
        self.act_symmetric = act_symmetric
        self.act_clip = float(act_clip)
        self.method = method
        self.transform = transform
        self.register_buffer("qweight", qweight.packed())
        self.register_buffer("w_scale", qweight.scale.float())
        self.register_buffer("w_zero", None if qweight.zero is None else qweight.zero.float())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("out_rotation", out_rotation)  # [nb, bo, bo] for ROW_ROT=restore, else None
        self.act_static = act_static
        self.backend = backend
        self._weight_cache: dict[tuple, torch.Tensor] = {}
        self._gpu_state = None

    # ---- storage ------------------------------------------------------------------------------------------------
    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight.from_packed(self.qweight, self.w_scale, self.w_zero, bits=self.wbits,
                                           symmetric=self.w_symmetric, group_size=self.w_group_size,
                                           shape=(self.out_features, self.in_features))

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in the rotated basis (what the integer GEMM multiplies), dequantized."""
        key = (dtype, self.qweight.device)
        w = self._weight_cache.get(key)
        if w is None:
            w = self.quantized_weight().dequantize(torch.float32).to(dtype)
            self._weight_cache = {key: w}  # one cached copy: fake-quant is for accuracy, not memory
        return w

    def weight_bytes(self) -> int:
        """Resident bytes of the quantized weight: codes + scales + zero points (+ bias)."""
        n = self.qweight.numel() * self.qweight.element_size() + self.w_scale.numel() * 4
        if self.w_zero is not None:
            n += self.w_zero.numel() * 4
        if self.bias is not None:
            n += self.bias.numel() * self.bias.element_size()
        return n

    def transform_bytes(self) -> int:
        return self.transform.num_bytes()

    def _apply(self, fn, recurse=True):  # keep the transform on the same device as the buffers
        super()._apply(fn, recurse)
        probe = fn(torch.zeros(1, device=self.qweight.device))
        self.transform = self.transform.to(probe.device)
        self._weight_cache = {}
        self._gpu_state = None
        return self

    # ---- compute ------------------------------------------------------------------------------------------------
    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Online transform + activation quantize-dequantize, in float32."""
        xt = self.transform.apply(x.float())
        if self.abits in (0, 16):
            return xt
        if self.act_static is not None:
            scale, zero = self.act_static
            return fake_quantize_activation_static(xt, scale, zero, self.abits, self.act_symmetric)
        return fake_quantize_activation(xt, self.abits, symmetric=self.act_symmetric, clip=self.act_clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "gpu":
            return self._forward_gpu(x)
        xq = self.quantize_input(x).to(x.dtype)
        y = F.linear(xq, self.dequantized_weight(x.dtype))
        if self.out_rotation is not None:
            y = _restore_rows(y, self.out_rotation)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def _forward_gpu(self, x: torch.Tensor) -> torch.Tensor:
        from duquant import kernels

        if self._gpu_state is None:
            ok, why = kernels.gpu_available()
            if not ok:
                raise RuntimeError(f"backend 'gpu' cannot run: {why}. Use --backend fake "
                                   "(OPENPI_DUQUANT_BACKEND=fake) for the reference path.")
            if self.out_rotation is not None:
                raise RuntimeError("backend 'gpu' does not implement the output-side rotation (ROW_ROT=restore); "
                                   "use ROW_ROT=0 with the gpu backend")
            if not x.is_cuda:
                raise RuntimeError("backend 'gpu' needs CUDA inputs; move the model with .cuda()")
            self._gpu_state = kernels.prepare_gpu_linear(self)
        return kernels.gpu_linear(x, self._gpu_state)

    def extra_repr(self) -> str:
        a = self.abits if self.abits not in (0, 16) else 16
        return (f"in_features={self.in_features}, out_features={self.out_features}, W{self.wbits}A{a}, "
                f"method={self.method}, block={self.transform.block_size}, backend={self.backend}")


def _restore_rows(y: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Undo an output-side block rotation (the fork's ROW_ROT=restore): W_t = R^T W per block gives
    y_t = y R, so y = y_t R^T. A partial last block uses the top-left corner of an identity-padded R."""
    nb, bo, _ = rot.shape
    n = y.shape[-1]
    pad = nb * bo - n
    yp = F.pad(y, (0, pad)) if pad else y
    out = torch.einsum("...nb,ncb->...nc", yp.reshape(*y.shape[:-1], nb, bo), rot.to(y.dtype))
    out = out.reshape(*y.shape[:-1], nb * bo)
    return out[..., :n] if pad else out


def rotate_rows(w: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate W's rows blockwise, W_t = R^T W, which `_restore_rows` undoes on the output."""
    nb, bo, _ = rot.shape
    n = w.shape[0]
    pad = nb * bo - n
    wp = F.pad(w, (0, 0, 0, pad)) if pad else w
    blocks = wp.reshape(nb, bo, -1)
    out = torch.einsum("nbc,nbk->nck", rot.to(w.dtype), blocks).reshape(nb * bo, -1)
    return out[:n]


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, DuQuantLinear)
