"""GPTQ aware of the layer's own activation quantization (``gptq-aq``, ``gptq-clip-aq``).

Plain GPTQ makes ``X_t Q^T`` close to ``X_t W_t^T``, but at run time the layer computes ``Q_a(X_t) Q^T``: the
quantized weight meets 4-bit activations. These roundings target what the layer actually computes,

    min_Q  E || x_t W_t^T - q Q^T ||^2,   q = Q_a(x_t) (the layer's activation quantizer, per token),

in the spirit of GPTAQ (Li et al., 2025, "asymmetric calibration": the quantized weight is fitted to the
quantized layer's inputs while the target stays the float output). With e = q - x_t, C = E[x_t^T e],
D = E[e^T e] and H = E[x_t^T x_t], the objective is ||(V - Q) B^{1/2}||^2 + const, where

    B = E[q^T q] = H + C + C^T + D,     V = W_t E[x_t^T q] B^{-1} = W_t - W_t (C^T + D) B^{-1},

so plain GPTQ (or gptq-clip) run on the target V with the Hessian B minimises the true objective. H is the
calibration's every-token Hessian; C and D come from the layer's transformed token sample, quantized exactly as
the layer will quantize it. The inverse in V is damped like GPTQ's (``damp * mean(diag B)``), which only shrinks
the correction: with float activations (e = 0) V is W_t and B is H, and the result is plain GPTQ's.
"""

from __future__ import annotations

import torch

from duquant.quantizers import QuantizedWeight
from duquant.rounding import gptq, gptq_clip


def target(w_t: torch.Tensor, x_t: torch.Tensor, x_q: torch.Tensor, hessian: torch.Tensor | None,
           damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(V [out, in] float32, B [in, in] float64) as in the module docstring, from the transformed sample x_t
    [T, in] and its quantized copy x_q (same shape); non-finite tokens dropped."""
    x = x_t.detach().reshape(-1, x_t.shape[-1])
    q = x_q.detach().reshape(-1, x_q.shape[-1]).to(x.device)
    ok = torch.isfinite(x).all(1) & torch.isfinite(q).all(1)
    x, q = x[ok].double(), q[ok].double()
    t = max(1, x.shape[0])
    e = q - x
    c = x.T @ e / t
    d = e.T @ e / t
    h = (hessian.detach().double().to(x.device) if hessian is not None else x.T @ x / t)
    b = h + c + c.T + d
    b = (b + b.T) / 2
    lam = damp * float(torch.diagonal(b).clamp(min=0).mean())
    eye = torch.eye(b.shape[0], dtype=b.dtype, device=b.device)
    corr = torch.linalg.solve(b + lam * eye, c + d)  # W (C^T + D) B^-1 = (B^-1 (C + D) W^T)^T: B, D symmetric
    w = w_t.detach().double().to(x.device)
    v = w - (corr @ w.T).T
    return v.to(torch.float32).to(w_t.device), b.to(w_t.device)


def _with_target(base, w_t, x_q, *, x_t, hessian, damp, **kw) -> QuantizedWeight:
    if x_q is None or x_t is None:  # activations in float (or no sample): the base rounding as it is
        return base(w_t, x_t=x_t, hessian=hessian, damp=damp, **kw)
    v, b = target(w_t, x_t, x_q, hessian, damp)
    return base(v, x_t=None, hessian=b, damp=damp, **kw)


def round_gptq(w_t: torch.Tensor, *, bits: int, symmetric: bool, clip: float | torch.Tensor,
               group_size: int | None, x_t: torch.Tensor | None = None, hessian: torch.Tensor | None = None,
               damp: float = 0.01, act_order: bool = False, x_q: torch.Tensor | None = None) -> QuantizedWeight:
    """``gptq`` on the activation-aware target V with the Hessian of the quantized inputs."""
    return _with_target(gptq.round_weight, w_t, x_q, x_t=x_t, hessian=hessian, damp=damp, bits=bits,
                        symmetric=symmetric, clip=clip, group_size=group_size, act_order=act_order)


def round_gptq_clip(w_t: torch.Tensor, *, bits: int, symmetric: bool, clip: float | torch.Tensor,
                    group_size: int | None, x_t: torch.Tensor | None = None, hessian: torch.Tensor | None = None,
                    damp: float = 0.01, act_order: bool = False, x_q: torch.Tensor | None = None) -> QuantizedWeight:
    """``gptq-clip`` (per-row clip searched by output error, now the error against the activation-aware
    objective) on the target V with the Hessian of the quantized inputs."""
    return _with_target(gptq_clip.round_weight, w_t, x_q, x_t=x_t, hessian=hessian, damp=damp, bits=bits,
                        symmetric=symmetric, clip=clip, group_size=group_size, act_order=act_order)
