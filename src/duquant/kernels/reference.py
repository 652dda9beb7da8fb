"""Eager torch specification of every GPU kernel (the CPU reference path, tested on CI).

The GPU kernels compute exactly these functions; their tests compare against them on the same packed weights
and the same inputs. Conventions (docs/architecture.md, "Numerics contract"):

Activation quantization (``act_quant``), per token, dynamic, on ``x_t = transform.apply(x.float())``:

- asymmetric (default): ``q = clamp(round(x_t / s) + z, 0, 255)`` as in ``quantizers.quantize_activation``; the
  kernel stores ``q - 128`` as int8 (so a signed int8 MMA can use it) and the zero point shifted the same way,
  ``z' = z - 128`` (a float holding an integer; it can lie outside int8 when a token is all-positive).
- symmetric: ``q = clamp(round(x_t / s), -127, 127)`` as int8, no zero point.

Weights (``IntWeight``), per output channel or per group along the input axis, in "kernel units":
value ``w = s_w * (q_w - z_w)`` with ``q_w`` a small signed integer and ``z_w`` an integer:

- packed 4-bit (also 2 and 3 bits, stored as nibbles): ``q_w`` = the nibble 0..15; asymmetric ``z_w`` = the
  stored zero point, symmetric ``z_w = 2^(b-1)`` (symmetric codes are stored offset by that, quantizers.py).
- 8-bit symmetric: int8 codes, ``z_w = 0``. 8-bit asymmetric: ``q_w = code - 128``, ``z_w = zero - 128``.

Integer GEMM identity (exact: every term is an integer until the final scaling), per token m, channel n:

    sum_k (qx'_mk - zx'_m)(qw_nk - zw_n) = acc_mn - zw_n * rs_m - zx'_m * cw_n
    acc = qx' @ qw^T (int32),  rs_m = sum_k qx'_mk,  cw_n = sum_k (qw_nk - zw_n)  (precomputed offline)
    y_mn = sx_m * sw_n * (acc_mn - zw_n rs_m - zx'_m cw_n) + bias_n

With groups the bracket is summed per group with that group's ``sw``/``zw``. Symmetric activations have
``zx' = 0``. This equals the fake-quant float path ``fake_quant(x_t) @ dequant(W)^T + b`` up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from duquant.quantizers import quantize_activation, unpack_int4

__all__ = [
    "IntWeight",
    "act_quant",
    "code_row_sums",
    "fake_linear",
    "int_gemm",
    "int_weight_from_layer",
    "int_weight_from_packed",
    "quantized_linear",
    "split_int4_order",
]


# ---- activations --------------------------------------------------------------------------------------------------

def act_quant(x: torch.Tensor, transform=None, bits: int = 8, symmetric: bool = False, clip: float = 1.0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The fused activation op: transform (smooth, rot1, perm, rot2) + per-token quantization.

    x [..., K] (any float dtype; computed in float32) -> codes int8 [M, K], scale f32 [M], zero f32 [M] | None
    with M the product of the leading dims. Asymmetric codes and zero are shifted by -128 (module docstring)."""
    if bits != 8:
        raise ValueError(f"integer kernels take 8-bit activations, got {bits}")
    k = x.shape[-1]
    xt = x.reshape(-1, k).float()
    if transform is not None:
        xt = transform.apply(xt)
    q, scale, zero = quantize_activation(xt, bits, symmetric=symmetric, clip=clip)
    if symmetric:
        return q.to(torch.int8), scale.reshape(-1), None
    return (q - 128).to(torch.int8), scale.reshape(-1), (zero - 128).reshape(-1)


def code_row_sums(codes: torch.Tensor) -> torch.Tensor:
    """Per-token sum of the stored int8 codes (int32 [M]); the GEMM's zero-point correction needs it."""
    return codes.to(torch.int32).sum(-1, dtype=torch.int32)


def split_int4_order(codes: torch.Tensor) -> torch.Tensor:
    """The activation layout the packed-int4 GEMM reads: even channels first, then odd ones, so that column j of
    each half meets the low / high nibble of packed weight byte j. [M, K] -> [M, 2*ceil(K/2)] (pad 0)."""
    m, k = codes.shape
    kh = -(-k // 2)
    out = torch.zeros(m, 2 * kh, dtype=codes.dtype, device=codes.device)
    out[:, :kh] = codes[:, 0::2]
    out[:, kh:kh + k // 2] = codes[:, 1::2]
    return out


# ---- weights ------------------------------------------------------------------------------------------------------

@dataclass
class IntWeight:
    """A weight in kernel units (module docstring). ``codes`` int16 [N, K] (unpacked), ``scale`` f32 [N, G],
    ``zero`` f32 [N, G] (integer-valued), ``colsum`` f32 [N, G] = sum over the group of (q_w - z_w)."""
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    colsum: torch.Tensor
    group_size: int | None
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        gs = self.group_size or k
        idx = torch.arange(k, device=self.codes.device) // gs
        return (self.codes.float() - self.zero[:, idx]) * self.scale[:, idx]


def _kernel_zero_and_codes(qweight: torch.Tensor, w_zero: torch.Tensor | None, bits: int, symmetric: bool,
                           shape: tuple[int, int], ngroups: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = shape
    if bits <= 4:
        codes = unpack_int4(qweight, k).to(torch.int16)  # nibbles 0..15
        if symmetric:
            zero = torch.full((n, ngroups), float(2 ** (bits - 1)), device=qweight.device)
        else:
            zero = w_zero.float().reshape(n, ngroups)
    elif bits == 8:
        if symmetric:
            codes = qweight.view(torch.int8).to(torch.int16)
            zero = torch.zeros(n, ngroups, device=qweight.device)
        else:
            codes = qweight.to(torch.int16) - 128
            zero = w_zero.float().reshape(n, ngroups) - 128
    else:
        raise ValueError(f"no integer kernel for {bits}-bit weights (use 2, 3, 4 or 8)")
    return codes, zero


def int_weight_from_packed(qweight: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None, *, bits: int,
                           symmetric: bool, group_size: int | None, shape: tuple[int, int]) -> IntWeight:
    """Kernel units from a layer's stored buffers (packed nibbles or 8-bit codes, scales, zero points)."""
    n, k = shape
    ngroups = 1 if group_size is None else -(-k // group_size)
    codes, zero = _kernel_zero_and_codes(qweight, w_zero, bits, symmetric, shape, ngroups)
    gs = group_size or k
    pad = ngroups * gs - k
    cg = torch.nn.functional.pad(codes.float(), (0, pad)).reshape(n, ngroups, gs)
    valid = torch.nn.functional.pad(torch.ones(k, device=codes.device), (0, pad)).reshape(ngroups, gs)
    colsum = cg.sum(-1) - zero * valid.sum(-1)
    return IntWeight(codes, w_scale.float().reshape(n, ngroups), zero, colsum, group_size, bits)


def int_weight_from_layer(layer) -> IntWeight:
    return int_weight_from_packed(layer.qweight, layer.w_scale, layer.w_zero, bits=layer.wbits,
                                  symmetric=layer.w_symmetric, group_size=getattr(layer, "w_group_size", None),
                                  shape=(layer.out_features, layer.in_features))


# ---- GEMM ---------------------------------------------------------------------------------------------------------

def int_gemm(codes_x: torch.Tensor, scale_x: torch.Tensor, zero_x: torch.Tensor | None, w: IntWeight,
             bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The integer GEMM through the identity of the module docstring (float64 inside, exact for the integers).
    codes_x int8 [M, K] (as act_quant returns), -> [M, N] in out_dtype."""
    m, k = codes_x.shape
    n = w.codes.shape[0]
    gs = w.group_size or k
    ng = w.scale.shape[1]
    qx = codes_x.double()
    qw = w.codes.double()
    y = torch.zeros(m, n, dtype=torch.float64, device=codes_x.device)
    for g in range(ng):
        sl = slice(g * gs, min((g + 1) * gs, k))
        acc = qx[:, sl] @ qw[:, sl].T  # exact: integers < 2^53
        rs = qx[:, sl].sum(1)
        t = acc - w.zero[:, g].double()[None, :] * rs[:, None]
        if zero_x is not None:
            t = t - zero_x.double()[:, None] * w.colsum[:, g].double()[None, :]
        y += w.scale[:, g].double()[None, :] * t
    y = y * scale_x.double()[:, None]
    if bias is not None:
        y = y + bias.double()
    return y.to(out_dtype)


def quantized_linear(x: torch.Tensor, layer, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """What the `gpu` backend computes for a DuQuantLinear: act_quant + int_gemm on the layer's buffers."""
    codes, sx, zx = act_quant(x, layer.transform, layer.abits, layer.act_symmetric, layer.act_clip)
    y = int_gemm(codes, sx, zx, int_weight_from_layer(layer), layer.bias, out_dtype=out_dtype or x.dtype)
    return y.reshape(*x.shape[:-1], layer.out_features)


def fake_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """The fake-quant float path in float32 (no bf16 rounding): fake_quant(transform(x)) @ dequant(W)^T + b."""
    from duquant.quantizers import fake_quantize_activation

    xt = layer.transform.apply(x.float())
    xq = fake_quantize_activation(xt, layer.abits, symmetric=layer.act_symmetric, clip=layer.act_clip)
    w = layer.quantized_weight().dequantize(torch.float32)
    y = xq @ w.T
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y
