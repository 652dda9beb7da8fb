"""Quantization primitives: pure tensor functions, no modules.

Weights are quantized per output channel (optionally per group along the input axis), activations per token
(the last dim), dynamically. Both are asymmetric by default (the DuQuant paper's setting) or symmetric.

- asymmetric, b bits: ``scale = (max*clip - min*clip) / (2^b - 1)``, ``zero = round(-min*clip / scale)``,
  codes ``clamp(round(x / scale) + zero, 0, 2^b - 1)``, value ``(code - zero) * scale``.
- symmetric, b bits: ``scale = absmax*clip / (2^(b-1) - 1)``, codes ``clamp(round(x / scale), -2^(b-1), 2^(b-1)-1)``
  (activations use the symmetric range ``±(2^(b-1) - 1)``).
- 4-bit storage: two codes per uint8 along the input axis, element ``2k`` in the low nibble, ``2k+1`` in the high
  nibble; symmetric codes are stored offset by ``2^(b-1)`` so a nibble always holds 0..15; an odd input width pads
  one code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

SCALE_MIN, SCALE_MAX = 1e-8, 1e8


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in 0..15, [..., n] -> uint8 [..., ceil(n/2)]."""
    codes = codes.to(torch.uint8)
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [..., ceil(n/2)] -> uint8 codes [..., n]."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)[..., :n]


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[out, in] -> [out, G, gs] (zero-padded on the input axis)."""
    out, n = w.shape
    if group_size is None:
        return w.unsqueeze(1)
    g = -(-n // group_size)
    pad = g * group_size - n
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out, g, group_size)


def _affine_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    qmax = 2**bits - 1
    scale = ((xmax - xmin) / qmax).clamp(SCALE_MIN, SCALE_MAX)
    zero = torch.round(-xmin / scale)
    return scale, zero


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # [out, in]: uint8 (asymmetric, 0..2^b-1) or int8 (symmetric)
    scale: torch.Tensor  # float32 [out, G] (G = 1 per channel)
    zero: torch.Tensor | None  # float32 [out, G] integer-valued, None when symmetric
    bits: int
    symmetric: bool
    group_size: int | None
    shape: tuple[int, int]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, n = self.shape
        q = _grouped(self.codes.float(), self.group_size)
        if self.zero is not None:
            q = q - self.zero.unsqueeze(-1)
        w = (q * self.scale.unsqueeze(-1)).reshape(out, -1)[:, :n]
        return w.to(dtype)

    def packed(self) -> torch.Tensor:
        if self.bits <= 4:
            codes = self.codes.to(torch.int16) + (2 ** (self.bits - 1) if self.symmetric else 0)
            return pack_int4(codes.to(torch.uint8))
        return self.codes.clone()

    @classmethod
    def from_packed(cls, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, *, bits: int,
                    symmetric: bool, group_size: int | None, shape: tuple[int, int]) -> QuantizedWeight:
        out, n = shape
        if bits <= 4:
            expected = (out, -(-n // 2))
            if tuple(packed.shape) != expected:
                raise ValueError(f"packed 4-bit weight has shape {tuple(packed.shape)}, expected {expected}")
            codes = unpack_int4(packed, n)
            if symmetric:
                codes = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
        else:
            if tuple(packed.shape) != (out, n):
                raise ValueError(f"8-bit weight has shape {tuple(packed.shape)}, expected {(out, n)}")
            codes = packed
        return cls(codes, scale.float(), None if zero is None else zero.float(), bits, symmetric, group_size,
                   (out, n))

    def num_bytes(self) -> int:
        n = self.packed().numel() + self.scale.numel() * 4
        return n + (self.zero.numel() * 4 if self.zero is not None else 0)


def quantize_weight(w: torch.Tensor, bits: int, symmetric: bool = False, clip: float | torch.Tensor = 1.0,
                    group_size: int | None = None) -> QuantizedWeight:
    """Per-output-channel (or per-group) round-to-nearest quantization of w [out, in]."""
    if w.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    out, n = w.shape
    wg = _grouped(w.float(), group_size)  # [out, G, gs]
    c = clip if isinstance(clip, float | int) else clip.float().reshape(out, 1)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (wg.abs().amax(-1) * c / qmax).clamp(SCALE_MIN, SCALE_MAX)
        codes = torch.clamp(torch.round(wg / scale.unsqueeze(-1)), -qmax - 1, qmax).to(torch.int8)
        zero = None
    else:
        scale, zero = _affine_params(wg.amin(-1) * c, wg.amax(-1) * c, bits)
        codes = torch.clamp(torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, 2**bits - 1)
        codes = codes.to(torch.uint8)
    codes = codes.reshape(out, -1)[:, :n].contiguous()
    return QuantizedWeight(codes, scale, zero, bits, symmetric, group_size, (out, n))


def search_weight_clip(w: torch.Tensor, x_sample: torch.Tensor | None, bits: int, symmetric: bool = False,
                       grid: Sequence[float] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5),
                       group_size: int | None = None) -> torch.Tensor:
    """Per-output-channel clip ratio [out, 1] minimising ||x (w - deq(w))^T||^2 (weight MSE without x)."""
    w = w.float()
    best_err = torch.full((w.shape[0],), float("inf"))
    best = torch.ones(w.shape[0], 1)
    x = x_sample.float() if x_sample is not None else None
    for c in grid:
        diff = w - quantize_weight(w, bits, symmetric, float(c), group_size).dequantize()
        err = (x @ diff.T).pow(2).sum(0) if x is not None else diff.pow(2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best[better] = float(c)
    return best


# ---- activations --------------------------------------------------------------------------------------------------

def quantize_activation(x: torch.Tensor, bits: int, symmetric: bool = False, clip: float = 1.0
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token dynamic quantization of the last dim: (codes, scale [..., 1], zero [..., 1] | None)."""
    x = x.float()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (x.abs().amax(-1, keepdim=True) * clip / qmax).clamp(SCALE_MIN, SCALE_MAX)
        return torch.clamp(torch.round(x / scale), -qmax, qmax), scale, None
    scale, zero = _affine_params(x.amin(-1, keepdim=True) * clip, x.amax(-1, keepdim=True) * clip, bits)
    return torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1), scale, zero


def dequantize_activation(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    return (codes - zero) * scale if zero is not None else codes * scale


def fake_quantize_activation(x: torch.Tensor, bits: int, symmetric: bool = False, clip: float = 1.0) -> torch.Tensor:
    """Quantize-dequantize per token; same dtype as x, computed in float32."""
    return dequantize_activation(*quantize_activation(x, bits, symmetric, clip)).to(x.dtype)


def static_activation_qparams(x: torch.Tensor, bits: int, symmetric: bool = False, clip: float = 1.0
                              ) -> tuple[float, float]:
    """One per-tensor (scale, zero) from calibration activations (zero is 0 when symmetric)."""
    x = x.float()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return float((x.abs().max() * clip / qmax).clamp(SCALE_MIN, SCALE_MAX)), 0.0
    scale, zero = _affine_params(x.min() * clip, x.max() * clip, bits)
    return float(scale), float(zero)


def fake_quantize_activation_static(x: torch.Tensor, scale: float, zero: float, bits: int,
                                    symmetric: bool = False) -> torch.Tensor:
    xf = x.float()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return (torch.clamp(torch.round(xf / scale), -qmax, qmax) * scale).to(x.dtype)
    q = torch.clamp(torch.round(xf / scale) + zero, 0, 2**bits - 1)
    return ((q - zero) * scale).to(x.dtype)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||^2 / ||b||^2."""
    return float((a.double() - b.double()).pow(2).sum() / b.double().pow(2).sum().clamp(min=1e-300))
