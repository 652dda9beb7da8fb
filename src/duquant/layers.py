"""DuQuantLinear: the drop-in replacement for a selected nn.Linear.

It stores what its format says (``duquant.formats``: packed 4-bit or 8-bit integer codes, or fp8 bytes, scales
and zero points, the layer's transform) and runs one of two backends, both chosen by the format:

- ``fake``: the reference. Transform the activation online, quantize-dequantize it as the format says (per-token
  int8 / int4, fp8, or not at all for weight-only formats), multiply by the dequantized weight. Works on CPU and
  CUDA, in fp32/bf16/fp16.
- ``gpu``: the format's GPU kernels on the same buffers; an error (never a silent fallback) when they cannot run.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from duquant import formats
from duquant.config import default_act_clip
from duquant.quantizers import QuantizedWeight
from duquant.transform import LayerTransform


class DuQuantLinear(nn.Module):
    """A quantized ``nn.Linear``: same name in the model, same call signature, same output shape."""

    def __init__(self, in_features: int, out_features: int, *, qweight: QuantizedWeight,
                 transform: LayerTransform, bias: torch.Tensor | None, abits: int, act_symmetric: bool = False,
                 act_clip: float | None = None, act_static: tuple[float, float] | None = None, method: str = "duquant",
                 backend: str = "fake", out_rotation: torch.Tensor | None = None, format: str | None = None):
        super().__init__()
        # the format's name: given (w8a8-fp8, ...), else the integer format the bits mean (w4a8, w8a8, w4a16)
        self.format = format or formats.name_for_bits(qweight.bits, abits)
        formats.get(self.format)  # an unknown name fails here, not at the first forward
        self.in_features = in_features
        self.out_features = out_features
        self.wbits = qweight.bits
        self.w_symmetric = qweight.symmetric
        self.w_group_size = qweight.group_size
        self.abits = abits
        self.act_symmetric = act_symmetric
        self.act_clip = float(default_act_clip(abits) if act_clip is None else act_clip)
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
        # set by prepare_gpu_group: a GeGLU MLP may hand this layer its gate and up (forward_gelu_tanh_mul)
        self.fuses_gelu_tanh_mul = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, format: str, *, transform: LayerTransform | None = None,
                    w_symmetric: bool = False, w_clip: float = 1.0, group_size: int | None = None,
                    act_symmetric: bool = False, act_clip: float | None = None, method: str = "rtn",
                    backend: str = "fake") -> DuQuantLinear:
        """A layer of the named format from a float ``nn.Linear``: the transform (identity when None) folded into
        the weight, then the format's weight quantizer. For formats without an online transform (``w4a16``) a
        non-identity transform is an error."""
        fmt = formats.get(format)
        k, n = linear.in_features, linear.out_features
        t = transform if transform is not None else LayerTransform(k, 128, kind="rtn")
        if not fmt.online_transform and not t.is_identity:
            raise formats.FormatError(f"{fmt.name} runs without an activation transform; got a {t.kind!r} one")
        w = linear.weight.detach()
        w_t = t.fold_into_weight(w.float())
        qw = fmt.quantize_weight(w_t, bits=fmt.wbits, symmetric=w_symmetric, clip=w_clip, group_size=group_size)
        return cls(k, n, qweight=qw, transform=t, bias=linear.bias, abits=fmt.abits, act_symmetric=act_symmetric,
                   act_clip=act_clip, method=method, backend=backend, format=fmt.name).to(w.device)

    # ---- storage ------------------------------------------------------------------------------------------------
    @property
    def fmt(self) -> formats.Format:
        return formats.get(self.format)

    def quantized_weight(self) -> QuantizedWeight:
        """The stored weight as its format's container (``QuantizedWeight`` for integer formats)."""
        return self.fmt.weight_from_buffers(self)

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
        # model.to(dtype) must not convert the stored format: codes, scales and zero points keep their dtype
        stored = {n: getattr(self, n) for n in ("qweight", "w_scale", "w_zero") if getattr(self, n) is not None}
        super()._apply(fn, recurse)
        for n, old in stored.items():
            new = getattr(self, n)
            if new.dtype != old.dtype:  # take the move, not the conversion
                setattr(self, n, old.to(device=new.device))
        probe = fn(torch.zeros(1, device=self.qweight.device))
        self.transform = self.transform.to(probe.device)
        self._weight_cache = {}
        self._gpu_state = None
        return self

    # ---- compute ------------------------------------------------------------------------------------------------
    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Online transform + activation quantize-dequantize as the format says, in float32."""
        return self.fmt.quantize_input(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "gpu":
            return self._forward_gpu(x)
        y = self.fmt.fake_linear(self, x)
        if self.out_rotation is not None:
            y = _restore_rows(y, self.out_rotation)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def _forward_gpu(self, x: torch.Tensor) -> torch.Tensor:
        if self._gpu_state is None:
            if not x.is_cuda:
                raise RuntimeError("backend 'gpu' needs CUDA inputs; move the model with .cuda()")
            if self.out_rotation is not None:
                raise RuntimeError("backend 'gpu' does not implement the output-side rotation (ROW_ROT=restore); "
                                   "use ROW_ROT=0 with the gpu backend")
            self.prepare_gpu_group([self])  # a lone layer; kernels.prepare_gpu_model groups shared inputs
        return self.fmt.gpu_forward(self._gpu_state, x)

    # the protocol kernels.prepare_gpu_model groups and prepares layers by (it knows no layer class)
    def gpu_group_key(self) -> tuple:
        return self.fmt.gpu_group_key(self)

    def prepare_gpu_group(self, layers: list, share_storage: bool = True) -> list:
        """Kernel states of `layers` (this one among them, same group key), stored as each ``_gpu_state``. Raises
        ``kernels.GpuBackendError`` naming why when the format's kernels cannot run here. With
        ``DUQUANT_FUSE_GEGLU=1`` a layer whose activation kernel can compute a GeGLU product itself says so
        (``fuses_gelu_tanh_mul``)."""
        states = self.fmt.gpu_prepare(list(layers), share_storage=share_storage)
        fuse = os.environ.get("DUQUANT_FUSE_GEGLU", "0") == "1"
        for layer, st in zip(layers, states):
            layer._gpu_state = st
            layer.fuses_gelu_tanh_mul = fuse and bool(getattr(getattr(st, "group", None), "can_fuse_geglu", False))
        return states

    def forward_gelu_tanh_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``self(gelu(gate, approximate="tanh") * up)``, a GeGLU MLP's down projection. When the gpu kernels can
        (``fuses_gelu_tanh_mul``), the product is computed inside the activation kernel and never written: one
        [tokens, mlp width] tensor less to write and read back (producer fusion, issue 12)."""
        if self.fuses_gelu_tanh_mul and self.backend == "gpu" and self._gpu_state is not None:
            return self.fmt.gpu_forward_geglu(self._gpu_state, gate, up)
        return self(F.gelu(gate, approximate="tanh") * up)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
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
