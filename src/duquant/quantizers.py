"""Quantization primitives: pure tensor functions, no modules (imports only torch and the standard library).

Weights are quantized per output channel (optionally per group along the input axis), activations per token
(the last dim), dynamically, or with one static per-tensor scale. Both are asymmetric by default (the DuQuant
paper's setting) or symmetric. Rounding is round-half-to-even (torch.round) everywhere.

- asymmetric, b bits: ``scale = (max*clip - min*clip) / (2^b - 1)``, ``zero = round(-min*clip / scale)``,
  codes ``clamp(round(x / scale) + zero, 0, 2^b - 1)`` (uint8), value ``(code - zero) * scale``.
- symmetric weights, b bits: ``scale = absmax*clip / (2^(b-1) - 1)``, codes
  ``clamp(round(x / scale), -2^(b-1), 2^(b-1) - 1)`` (int8), value ``code * scale``.
- symmetric activations use the symmetric range ``±(2^(b-1) - 1)`` (so -x quantizes to -q).
- scales are clamped to [1e-8, 1e8]; an all-zero row or token quantizes to exact zeros.
- 2/3/4-bit storage: two codes per uint8 along the input axis, element ``2k`` in the low nibble, ``2k+1`` in
  the high nibble; an odd input width pads one zero code. Symmetric codes are stored offset by ``2^(b-1)``
  (code + 8 for 4 bits), so a nibble always holds 0..15 and the kernels read
  ``value = scale * (nibble - 2^(b-1))``. 8-bit codes are stored as they are (uint8 asymmetric,
  int8 symmetric).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SCALE_MIN, SCALE_MAX = 1e-8, 1e8
WEIGHT_BITS = (2, 3, 4, 8)
DEFAULT_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)

__all__ = [
    "DEFAULT_CLIP_GRID",
    "QuantizedWeight",
    "dequantize_activation",
    "fake_quantize_activation",
    "fake_quantize_activation_static",
    "fake_quantize_weight",
    "pack_int4",
    "quantization_error",
    "quantize_activation",
    "quantize_weight",
    "relative_error",
    "search_weight_clip",
    "static_activation_qparams",
    "unpack_int4",
]


# ---- int4 packing ------------------------------------------------------------------------------------------

def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in 0..15, [..., n] -> uint8 [..., ceil(n/2)]: element 2k low nibble, 2k+1 high nibble."""
    if codes.is_floating_point() or codes.dtype == torch.bool:
        raise TypeError(f"pack_int4 takes integer codes, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("pack_int4 takes codes in 0..15 (store symmetric codes offset by 2^(b-1))")
    codes = codes.to(torch.uint8)
    if codes.shape[-1] % 2:
        codes = F.pad(codes, (0, 1))
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [..., ceil(n/2)] -> uint8 codes [..., n] (inverse of pack_int4)."""
    if packed.shape[-1] != -(-in_features // 2):
        raise ValueError(f"packed last dim {packed.shape[-1]} does not hold {in_features} codes")
    packed = packed.to(torch.uint8)
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)[..., :in_features].contiguous()


# ---- weights -----------------------------------------------------------------------------------------------

def _check_weight_bits(bits: int) -> None:
    if bits not in WEIGHT_BITS:
        raise ValueError(f"weight bits must be one of {WEIGHT_BITS}, got {bits}")


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[out, in] -> [out, G, gs] (zero-padded on the input axis; G = 1 without groups)."""
    out, n = w.shape
    if group_size is None:
        return w.unsqueeze(1)
    g = -(-n // group_size)
    pad = g * group_size - n
    if pad:
        w = F.pad(w, (0, pad))
    return w.reshape(out, g, group_size)


def _num_groups(n: int, group_size: int | None) -> int:
    return 1 if group_size is None else -(-n // group_size)


def _affine_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    qmax = 2**bits - 1
    scale = ((xmax - xmin) / qmax).clamp(SCALE_MIN, SCALE_MAX)
    zero = torch.round(-xmin / scale)
    return scale, zero


def _group_minmax(wg: torch.Tensor, n: int, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min / max ignoring the zero padding of a partial last group."""
    pad = wg.shape[1] * wg.shape[2] - n
    if not pad:
        return wg.amin(-1), wg.amax(-1)
    valid = torch.ones(wg.shape[1], wg.shape[2], dtype=torch.bool, device=wg.device)
    valid[-1, wg.shape[2] - pad:] = False
    big = torch.finfo(wg.dtype).max
    return (torch.where(valid, wg, torch.full_like(wg, big)).amin(-1),
            torch.where(valid, wg, torch.full_like(wg, -big)).amax(-1))


@dataclass
class QuantizedWeight:
    """A per-output-channel (or per-group) quantized weight [out, in]."""

    codes: torch.Tensor  # [out, in]: uint8 (asymmetric, 0..2^b-1) or int8 (symmetric, -2^(b-1)..2^(b-1)-1)
    scale: torch.Tensor  # float32 [out, G] (G = 1 per channel)
    zero: torch.Tensor | None  # float32 [out, G], integer-valued; None when symmetric
    bits: int
    symmetric: bool
    group_size: int | None
    shape: tuple[int, int]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(code - zero) * scale (symmetric: code * scale), computed in float32, returned in `dtype`."""
        out, n = self.shape
        q = _grouped(self.codes.float(), self.group_size)
        if self.zero is not None:
            q = q - self.zero.float().unsqueeze(-1)
        w = (q * self.scale.float().unsqueeze(-1)).reshape(out, -1)[:, :n]
        return w.to(dtype)

    def storage_codes(self) -> torch.Tensor:
        """Unpacked codes as stored: uint8, symmetric low-bit codes offset by 2^(b-1); 8-bit codes
        unchanged."""
        if self.bits <= 4:
            off = 2 ** (self.bits - 1) if self.symmetric else 0
            return (self.codes.to(torch.int16) + off).to(torch.uint8)
        return self.codes

    def packed(self) -> torch.Tensor:
        """uint8 [out, ceil(in/2)] (two codes a byte) for bits <= 4, else the codes as they are [out, in]."""
        if self.bits <= 4:
            return pack_int4(self.storage_codes())
        return self.codes.clone()

    @classmethod
    def from_packed(cls, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, *, bits: int,
                    symmetric: bool, group_size: int | None, shape: tuple[int, int]) -> QuantizedWeight:
        """Inverse of `packed()` (with the scale and zero stored beside it); validates every shape."""
        _check_weight_bits(bits)
        out, n = (int(s) for s in shape)
        groups = _num_groups(n, group_size)
        if bits <= 4:
            expected = (out, -(-n // 2))
            if tuple(packed.shape) != expected:
                raise ValueError(f"packed {bits}-bit weight has shape {tuple(packed.shape)}, "
                                 f"expected {expected}")
            codes = unpack_int4(packed, n)
            if symmetric:
                codes = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
        else:
            if tuple(packed.shape) != (out, n):
                raise ValueError(f"8-bit weight has shape {tuple(packed.shape)}, expected {(out, n)}")
            want = torch.int8 if symmetric else torch.uint8
            if packed.dtype != want:
                raise ValueError(f"8-bit {'symmetric' if symmetric else 'asymmetric'} codes must be {want}, "
                                 f"got {packed.dtype}")
            codes = packed
        if tuple(scale.shape) != (out, groups):
            raise ValueError(f"weight scale has shape {tuple(scale.shape)}, expected {(out, groups)}")
        if symmetric != (zero is None):
            raise ValueError("a symmetric weight has no zero point; an asymmetric one needs it")
        if zero is not None and tuple(zero.shape) != (out, groups):
            raise ValueError(f"weight zero point has shape {tuple(zero.shape)}, expected {(out, groups)}")
        return cls(codes, scale.float(), None if zero is None else zero.float(), bits, symmetric, group_size,
                   (out, n))

    def num_bytes(self) -> int:
        """Bytes of the stored form: packed codes + float32 scales (+ float32 zero points)."""
        out, n = self.shape
        code_bytes = out * -(-n // 2) if self.bits <= 4 else out * n
        return code_bytes + self.scale.numel() * 4 + (self.zero.numel() * 4 if self.zero is not None else 0)


def quantize_weight(w: torch.Tensor, bits: int, symmetric: bool = False, clip: float | torch.Tensor = 1.0,
                    group_size: int | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of w [out, in], per output channel (or per group of `group_size` inputs).

    clip: a float, or a tensor [out, 1] (per row) / [out, G] (per group) multiplying the row's min and max
    (symmetric: its absmax). Computed in float32."""
    _check_weight_bits(bits)
    if w.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size must be >= 1 or None, got {group_size}")
    out, n = w.shape
    wg = _grouped(w.detach().float(), group_size)  # [out, G, gs]
    if isinstance(clip, torch.Tensor):
        c = clip.detach().float().to(wg.device)
        c = c.reshape(out, 1) if c.numel() == out else c.reshape(out, wg.shape[1])
    else:
        c = float(clip)
    wmin, wmax = _group_minmax(wg, n, group_size)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (torch.maximum(wmin.abs(), wmax.abs()) * c / qmax).clamp(SCALE_MIN, SCALE_MAX)
        codes = torch.clamp(torch.round(wg / scale.unsqueeze(-1)), -qmax - 1, qmax).to(torch.int8)
        zero = None
    else:
        scale, zero = _affine_params(wmin * c, wmax * c, bits)
        codes = torch.clamp(torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, 2**bits - 1)
        codes = codes.to(torch.uint8)
    codes = codes.reshape(out, -1)[:, :n].contiguous()
    return QuantizedWeight(codes, scale, zero, bits, symmetric, group_size, (out, n))


def fake_quantize_weight(w: torch.Tensor, bits: int, symmetric: bool = False,
                         clip: float | torch.Tensor = 1.0, group_size: int | None = None) -> torch.Tensor:
    """dequantize(quantize_weight(w, ...)) in w's dtype."""
    return quantize_weight(w, bits, symmetric, clip, group_size).dequantize(torch.float32).to(w.dtype)


def search_weight_clip(w: torch.Tensor, x_sample: torch.Tensor | None, bits: int, symmetric: bool = False,
                       grid: Sequence[float] = DEFAULT_CLIP_GRID, group_size: int | None = None,
                       chunk_rows: int = 1024) -> torch.Tensor:
    """Per-output-channel clip ratio [out, 1] minimising ||x (w_o - deq(w)_o)^T||^2 for every output channel o
    (the layer's output error on the sample), or the weight MSE ||w_o - deq(w)_o||^2 without a sample.

    The grid always includes 1.0 and a ratio replaces the current one only when strictly better, so the result
    is never worse than clip 1.0 in the searched metric (ties keep the larger ratio). Output rows are
    processed in chunks of `chunk_rows` to bound memory. x_sample must be in the same basis as w (the
    transformed input)."""
    _check_weight_bits(bits)
    w = w.detach().float()
    out, n = w.shape
    x = None
    if x_sample is not None:
        x = x_sample.detach().float().reshape(-1, n).to(w.device)
        x = x[torch.isfinite(x).all(dim=1)]
    ratios = [1.0] + sorted({float(c) for c in grid if 0.0 < float(c) < 1.0}, reverse=True)
    best = torch.ones(out, 1, device=w.device)
    for start in range(0, out, chunk_rows):
        wc = w[start:start + chunk_rows]
        best_err = torch.full((wc.shape[0],), float("inf"), device=w.device)
        for c in ratios:
            diff = wc - quantize_weight(wc, bits, symmetric, c, group_size).dequantize()
            err = (x @ diff.T).pow(2).sum(0) if x is not None and x.shape[0] else diff.pow(2).sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[start:start + chunk_rows][better] = c
    return best


# ---- activations -------------------------------------------------------------------------------------------

def _check_act_bits(bits: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"activation bits must be 2..8 (16 = unquantized is handled by the caller), "
                         f"got {bits}")


def quantize_activation(x: torch.Tensor, bits: int, symmetric: bool = False, clip: float = 1.0
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token dynamic quantization over the last dim, in float32.

    Returns (codes, scale, zero): codes float32 holding integers, same shape as x (asymmetric 0..2^b-1,
    symmetric -(2^(b-1)-1)..2^(b-1)-1); scale float32 [..., 1]; zero float32 [..., 1] (integer-valued) or
    None. clip multiplies the token's min and max (symmetric: its absmax)."""
    _check_act_bits(bits)
    x = x.float()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (x.abs().amax(-1, keepdim=True) * clip / qmax).clamp(SCALE_MIN, SCALE_MAX)
        return torch.clamp(torch.round(x / scale), -qmax, qmax), scale, None
    scale, zero = _affine_params(x.amin(-1, keepdim=True) * clip, x.amax(-1, keepdim=True) * clip, bits)
    return torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1), scale, zero


def dequantize_activation(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
                          ) -> torch.Tensor:
    """(codes - zero) * scale (symmetric: codes * scale), float32."""
    codes = codes.float()
    return (codes - zero) * scale if zero is not None else codes * scale


def fake_quantize_activation(x: torch.Tensor, bits: int, symmetric: bool = False, clip: float = 1.0
                             ) -> torch.Tensor:
    """Per-token quantize-dequantize: exactly dequantize_activation(*quantize_activation(x, ...)), computed in
    float32 and returned in x's dtype."""
    return dequantize_activation(*quantize_activation(x, bits, symmetric, clip)).to(x.dtype)


def _percentile(v: torch.Tensor, pct: float) -> torch.Tensor:
    """The pct-th percentile (0..100, nearest rank) of a flat float tensor, any size."""
    v = v.reshape(-1)
    k = min(max(int(round(pct / 100.0 * v.numel())), 1), v.numel())
    return v.kthvalue(k).values


def static_activation_qparams(stats: torch.Tensor | float | tuple[float, float], bits: int,
                              symmetric: bool = False, clip: float = 1.0, percentile: float | None = None
                              ) -> tuple[float, float]:
    """One per-tensor (scale, zero) for `fake_quantize_activation_static` (zero is 0.0 when symmetric).

    stats: a sample of (transformed) activations (any shape with >= 2 elements), a (min, max) pair, or one
    absmax (a float or a 1-element tensor, taken as the range [-absmax, absmax]). With a sample, `percentile`
    (e.g. 99.9) replaces the max |x| (symmetric) or the min / max (asymmetric: the (100 - p)-th and p-th
    percentiles) by percentiles of the sample. clip multiplies the range afterwards."""
    _check_act_bits(bits)
    if isinstance(stats, tuple | list):
        lo, hi = float(stats[0]), float(stats[1])
    elif isinstance(stats, torch.Tensor) and stats.numel() >= 2:
        x = stats.detach().float().reshape(-1)
        x = x[torch.isfinite(x)]
        if x.numel() == 0:
            raise ValueError("static_activation_qparams: the sample has no finite values")
        if percentile is None:
            lo, hi = float(x.min()), float(x.max())
        elif symmetric:
            a = float(_percentile(x.abs(), percentile))
            lo, hi = -a, a
        else:
            lo, hi = float(_percentile(x, 100.0 - percentile)), float(_percentile(x, percentile))
    else:
        a = abs(float(stats))
        lo, hi = -a, a
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return float(min(max(max(abs(lo), abs(hi)) * clip / qmax, SCALE_MIN), SCALE_MAX)), 0.0
    scale, zero = _affine_params(torch.tensor(lo * clip, dtype=torch.float32),
                                 torch.tensor(hi * clip, dtype=torch.float32), bits)
    return float(scale), float(zero)


def fake_quantize_activation_static(x: torch.Tensor, scale: float, zero: float, bits: int,
                                    symmetric: bool = False) -> torch.Tensor:
    """Quantize-dequantize with one per-tensor (scale, zero), computed in float32, returned in x's dtype."""
    _check_act_bits(bits)
    xf = x.float()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return (torch.clamp(torch.round(xf / scale), -qmax, qmax) * scale).to(x.dtype)
    q = torch.clamp(torch.round(xf / scale) + zero, 0, 2**bits - 1)
    return ((q - zero) * scale).to(x.dtype)


# ---- error metrics -----------------------------------------------------------------------------------------

def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||^2 / ||b||^2 (b is the reference), in float64."""
    return float((a.double() - b.double()).pow(2).sum() / b.double().pow(2).sum().clamp(min=1e-300))


def quantization_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (relative L2 error, not squared; b is the reference), in float64."""
    return relative_error(a, b) ** 0.5
