"""GPTQ (Frantar et al., ICLR 2023): round the columns of W one at a time and push each column's rounding error
onto the columns not yet rounded, weighted by the inverse Hessian of the layer's inputs, so the layer's output
error ||X (W - Q)^T||^2 is small rather than the weight error.

Here X is the *transformed* calibration input (x_t = x / s · R1 · P · R2, the basis the weight is stored in), so
GPTQ composes with every transform. H = X^T X / T (+ damp · mean(diag H) · I). Scales and zero points are those
of round-to-nearest with the configured clip (per channel or per group), fixed before the error feedback (GPTQ's
"static groups"), so the result is stored exactly like an RTN weight and act-order needs no regrouping. With
act_order the columns are visited by decreasing diag(H) (the inputs with the most energy first).
"""

from __future__ import annotations

import torch

from duquant.quantizers import QuantizedWeight, quantize_weight

BLOCK = 128  # columns per lazy-batch update (the paper's B)


def input_hessian(x_t: torch.Tensor) -> torch.Tensor:
    """H = X^T X / T in float64 from a token sample [T, in] (non-finite tokens dropped)."""
    x = x_t.detach().reshape(-1, x_t.shape[-1])
    x = x[torch.isfinite(x).all(dim=1)].double()
    return x.T @ x / max(1, x.shape[0])


def round_weight(w_t: torch.Tensor, *, bits: int, symmetric: bool, clip: float | torch.Tensor,
                 group_size: int | None, x_t: torch.Tensor | None = None, hessian: torch.Tensor | None = None,
                 damp: float = 0.01, act_order: bool = False) -> QuantizedWeight:
    """GPTQ rounding of w_t [out, in] given the transformed inputs x_t [T, in] or their Hessian [in, in]."""
    if hessian is None:
        if x_t is None:
            raise ValueError("GPTQ needs the layer's calibration inputs (x_t) or their Hessian; calibrate first, "
                             "or use --weight-rounding rtn")
        hessian = input_hessian(x_t)
    out, n = w_t.shape
    if tuple(hessian.shape) != (n, n):
        raise ValueError(f"Hessian has shape {tuple(hessian.shape)}, expected ({n}, {n})")
    device = w_t.device
    w = w_t.detach().double().clone()
    h = hessian.detach().to(device=device, dtype=torch.float64).clone()

    # Fixed quantization grid from RTN (same clip, same groups): codes = clamp(round(w/scale) + zero).
    ref = quantize_weight(w_t, bits, symmetric=symmetric, clip=clip, group_size=group_size)
    col_group = torch.arange(n, device=device) // group_size if group_size else torch.zeros(n, dtype=torch.long,
                                                                                            device=device)
    scale = ref.scale.double().to(device)[:, col_group]  # [out, n]
    zero = ref.zero.double().to(device)[:, col_group] if ref.zero is not None else None
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)

    dead = torch.diagonal(h) <= 0  # inputs never active: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(n, device=device)
    w, h, scale = w[:, perm], h[perm][:, perm], scale[:, perm]
    zero = zero[:, perm] if zero is not None else None
    h += damp * torch.diagonal(h).mean() * torch.eye(n, dtype=torch.float64, device=device)
    hinv = _upper_cholesky_of_inverse(h)

    codes = torch.empty(out, n, dtype=torch.float64, device=device)
    for i1 in range(0, n, BLOCK):
        i2 = min(i1 + BLOCK, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, s = w1[:, i], scale[:, i1 + i]
            z = zero[:, i1 + i] if zero is not None else 0.0
            q = torch.clamp(torch.round(col / s) + z, qmin, qmax)
            codes[:, i1 + i] = q
            e = (col - (q - z) * s) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    codes = codes[:, torch.argsort(perm)]
    codes = codes.to(torch.int8 if symmetric else torch.uint8)
    return QuantizedWeight(codes.contiguous(), ref.scale, ref.zero, bits, symmetric, group_size, (out, n))


def _upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, adding damping until H is positive definite (badly conditioned samples)."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    extra = 0.0
    for _ in range(8):
        lower, info = torch.linalg.cholesky_ex(h + extra * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper
        extra = max(extra * 10.0, 1e-6 * float(torch.diagonal(h).mean()))
    raise ValueError("GPTQ: the Hessian is not positive definite even with extra damping; raise --gptq-damp")
