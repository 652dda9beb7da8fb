"""Learned refinement of DuQuant's block rotations (opt-in: ``rotation_refine_steps`` > 0).

After the greedy transform of a group of layers fed one input is built (``duquant.methods.duquant``), each of its
block rotations R (rot1, rot2) is replaced by ``R @ cayley(S)``, S = A - Aᵀ skew-symmetric, so the rotation stays
exactly orthogonal whatever A is, and A starts at 0 (step 0 is the greedy transform). A is fitted by Adam on the
group's calibration sample, in the spirit of SpinQuant / FlatQuant / OSTQuant: the loss is the relative squared
error between the group's quantized output ``Q_a(x_t) Q_w(W_t)ᵀ`` (per-token activations at the configured bits
and clip, per-output-channel weights at the configured bits and clip, both round-to-nearest with a
straight-through estimator for the rounding; scales and zero points follow the values, as the quantizers compute
them) and its float output ``x Wᵀ``. The permutation stays as the greedy search made it; so does the smoothing,
unless ``learn_smooth`` (``rotation_refine_smooth``) is on: then the per-channel smoothing vector s (x / s, W * s, an
exact equivalence before rounding) is learned too, in the spirit of OmniQuant's learnable equivalent transformation,
as log s (initialised to the greedy s, so step 0 is still the greedy transform), jointly with the rotations and by
the same loss and optimizer; the returned transform carries the learned s. A transform without a smoothing vector
(alpha 0) is refined as without the option.

Structure kept for the kernels: where all full blocks of a rotation share one matrix (``LayerTransform._shared``,
what the greedy search always builds), one A is learned for them and the refined matrix is written to every full
block (bit-identical copies, so the sharing is still detected); a narrower last block gets its own A; rotations
whose full blocks differ get one A per block. The refined rotation is kept only when its loss on the whole sample
is below the greedy transform's (the best of the checkpoints evaluated every ``eval_every`` steps), so the
refinement never makes the fitted objective worse. Each step draws ``tokens`` calibration tokens and ``rows``
output rows of the group's weights at random (seeded): per-row weight quantization makes the loss a sum over
rows. The weight rounding (gptq, gptq-clip, ...) then runs on the refined transform as before.

Imports only torch and the standard library (plus duquant.transform / duquant.quantizers).
"""

from __future__ import annotations

import torch

from duquant.quantizers import SCALE_MAX, SCALE_MIN
from duquant.transform import LayerTransform

DEFAULT_LR = 3e-3  # Adam's learning rate on A (the skew-symmetric generator)
DEFAULT_TOKENS = 256  # calibration tokens per Adam step (a fresh random batch each step)
DEFAULT_ROWS = 512  # output rows (of the group's weights) per Adam step: per-row weight quantization makes the
# loss a sum over rows, so a random subset estimates it without rotating every row of a wide group each step
EVAL_EVERY = 25  # steps between evaluations of the whole-sample loss (the best checkpoint is kept)

__all__ = ["DEFAULT_LR", "DEFAULT_ROWS", "DEFAULT_TOKENS", "cayley", "refine_rotations", "quantized_output_error"]


def cayley(a: torch.Tensor) -> torch.Tensor:
    """The Cayley transform (I - S)⁻¹ (I + S) of S = A - Aᵀ, batched over leading dims: orthogonal for any A,
    the identity at A = 0, differentiable."""
    s = a - a.transpose(-1, -2)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(s)
    return torch.linalg.solve(eye - s, eye + s)


def _round_ste(v: torch.Tensor) -> torch.Tensor:
    return v + (torch.round(v) - v).detach()


def _fake_quant_rows(x: torch.Tensor, bits: int, symmetric: bool, clip: float, symmetric_range: bool
                     ) -> torch.Tensor:
    """Per-row (last dim) quantize-dequantize with the formulas of ``duquant.quantizers`` (its forward values are
    the same), differentiable: the rounding passes gradients straight through, scale and zero follow min / max.
    symmetric_range: activations use ±(2^(b-1) - 1), weights -2^(b-1)..2^(b-1) - 1."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax if symmetric_range else -qmax - 1
        scale = (x.abs().amax(-1, keepdim=True) * clip / qmax).clamp(SCALE_MIN, SCALE_MAX)
        return torch.clamp(_round_ste(x / scale), qmin, qmax) * scale
    qmax = 2 ** bits - 1
    lo, hi = x.amin(-1, keepdim=True) * clip, x.amax(-1, keepdim=True) * clip
    scale = ((hi - lo) / qmax).clamp(SCALE_MIN, SCALE_MAX)
    zero = _round_ste(-lo / scale)
    return (torch.clamp(_round_ste(x / scale) + zero, 0, qmax) - zero) * scale


class _Blocks:
    """The learnable form of one [nb, bs, bs] rotation: R0 times cayley(A) for the shared full-block matrix (or
    each full block's), and for a narrower last block its r x r corner."""

    def __init__(self, rot: torch.Tensor, in_features: int, block_size: int, shared: bool):
        self.rot, self.c, self.bs = rot, in_features, block_size
        self.full, self.r = in_features // block_size, in_features % block_size
        self.shared = shared
        n_full = (1 if shared else self.full) if self.full else 0
        self.r0_full = rot[:n_full].double() if n_full else None
        self.r0_last = rot[-1, :self.r, :self.r].double() if self.r >= 2 else None
        self.a_full = torch.zeros(n_full, block_size, block_size, dtype=torch.float32, requires_grad=True) \
            if n_full else None
        self.a_last = torch.zeros(1, self.r, self.r, dtype=torch.float32, requires_grad=True) \
            if self.r0_last is not None else None

    def params(self) -> list[torch.Tensor]:
        return [p for p in (self.a_full, self.a_last) if p is not None]

    def matrices(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(full-block matrices [1 or full, bs, bs], last-block corner [r, r]) of R0 @ cayley(A), in `dtype`."""
        full = last = None
        if self.a_full is not None:
            full = self.r0_full.to(dtype) @ cayley(self.a_full.to(dtype))
        if self.a_last is not None:
            last = (self.r0_last.to(dtype) @ cayley(self.a_last.to(dtype)))[0]
        return full, last

    def apply(self, x: torch.Tensor, mats: tuple[torch.Tensor | None, torch.Tensor | None]) -> torch.Tensor:
        """x [rows, C] times the block-diagonal rotation (rows of x are tokens, or the rows of W)."""
        full, last = mats
        bs, nf = self.bs, self.full
        parts = []
        if nf:
            head = x[:, : nf * bs]
            if full.shape[0] == 1:
                y = head.reshape(-1, bs) @ full[0]
            else:
                y = torch.einsum("mnb,nbc->mnc", head.reshape(-1, nf, bs), full)
            parts.append(y.reshape(x.shape[0], nf * bs))
        if self.r:
            tail = x[:, nf * bs:]
            parts.append(tail @ last if last is not None else tail @ self.rot[-1, :self.r, :self.r].to(x.dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def final(self) -> torch.Tensor:
        """The refined [nb, bs, bs] float32 rotation (computed in float64): every full block of a shared rotation
        holds the same matrix (bit-identical), the last block keeps its identity padding."""
        with torch.no_grad():
            full, last = self.matrices(torch.float64)
            out = self.rot.clone().double()
            if full is not None:
                out[: self.full] = full.expand(self.full, -1, -1) if full.shape[0] == 1 else full
            if last is not None:
                out[-1, : self.r, : self.r] = last
            return out.float()


def quantized_output_error(transform: LayerTransform, weight: torch.Tensor, sample: torch.Tensor, *, wbits: int,
                           abits: int, act_clip: float, w_clip: float, w_symmetric: bool = False,
                           act_symmetric: bool = False) -> float:
    """The refinement's objective for a finished transform: ‖Q_a(x_t) Q_w(W_t)ᵀ − x Wᵀ‖² / ‖x Wᵀ‖² on `sample`
    (round-to-nearest weights; abits 0 / 16: float activations)."""
    with torch.no_grad():
        x = sample.detach().float()
        x = x[torch.isfinite(x).all(dim=1)]
        w = weight.detach().float()
        y = x @ w.T
        x_t = transform.apply(x).float()
        w_t = transform.fold_into_weight(w).float()
        if abits not in (0, 16):
            x_t = _fake_quant_rows(x_t, abits, act_symmetric, act_clip, True)
        w_q = _fake_quant_rows(w_t, wbits, w_symmetric, w_clip, False)
        return float((x_t @ w_q.T - y).pow(2).sum() / y.pow(2).sum().clamp(min=1e-30))


def refine_rotations(transform: LayerTransform, weight: torch.Tensor, sample: torch.Tensor | None, *, steps: int,
                     wbits: int, abits: int, act_clip: float, w_clip: float, w_symmetric: bool = False,
                     act_symmetric: bool = False, lr: float | None = None, tokens: int | None = None,
                     rows: int | None = None, seed: int = 0, eval_every: int = EVAL_EVERY,
                     names: tuple[str, ...] = ("rot1", "rot2"), log: list | None = None,
                     learn_smooth: bool = False) -> LayerTransform:
    """`transform` with its block rotations `names` refined by `steps` Adam steps (module docstring).

    weight: the group's weights concatenated on dim 0, [out, C], in the original basis; sample: its calibration
    inputs [T, C] (non-finite tokens are dropped). steps 0, no sample, or no rotation to refine: `transform`
    itself. Deterministic for a given seed (the token and row batches). `log`, when given, receives
    (step, whole-sample loss) at every evaluation. Runs on the CPU in float32 (the result in float32, like the
    greedy rotations); gradients are enabled inside even under ``torch.no_grad()``. learn_smooth: also learn the
    smoothing vector (module docstring; no effect when the transform has none)."""
    present = [n for n in names if getattr(transform, n) is not None]
    if steps <= 0 or sample is None or not present or transform.in_features < 2:
        return transform
    lr = DEFAULT_LR if lr is None else float(lr)
    tokens = DEFAULT_TOKENS if tokens is None else int(tokens)
    rows = DEFAULT_ROWS if rows is None else int(rows)
    c, bs = transform.in_features, transform.block_size
    x = sample.detach().float().cpu()
    x = x[torch.isfinite(x).all(dim=1)]
    if x.shape[0] == 0:
        return transform
    w = weight.detach().float().cpu()
    quant_act = abits not in (0, 16)
    smooth = transform.smooth.float().cpu() if transform.smooth is not None else None
    perm = transform.perm.cpu() if transform.perm is not None else None
    blocks = {n: _Blocks(getattr(transform, n).float().cpu(), c, bs, transform._shared(n, getattr(transform, n)))
              for n in present}
    learn_smooth = bool(learn_smooth) and smooth is not None
    # the learned smoothing as log s (float32 Adam parameter, starting at the greedy s)
    log_s = torch.log(smooth).clone().requires_grad_(True) if learn_smooth else None
    prefix = ["rot1", "perm"] if "rot1" not in blocks else []

    def fixed(xb: torch.Tensor, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for step in prefix:
            if step == "rot1" and transform.rot1 is not None:
                xb, wb = transform._rotate(xb, "rot1"), transform._rotate(wb, "rot1")
            if step == "perm" and perm is not None:
                xb, wb = xb[:, perm], wb[:, perm]
        return xb, wb

    # Fixed parts: the smoothing (and, when only rot2 is refined, rot1 and the permutation) act once, up front;
    # a learned smoothing acts in `forward`, followed there by those fixed parts.
    with torch.no_grad():
        if learn_smooth:
            x0, w0 = x, w
        else:
            x0 = x / smooth if smooth is not None else x
            w0 = w * smooth if smooth is not None else w
            x0, w0 = fixed(x0, w0)
        y = x @ w.T
    y_norm = y.pow(2).sum().clamp(min=1e-30)

    def forward(xb: torch.Tensor, wb: torch.Tensor, mats: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if learn_smooth:
            s = torch.exp(log_s)
            xb, wb = fixed(xb / s, wb * s)
        for n in ("rot1", "perm", "rot2"):
            if n == "perm":
                if "rot1" in blocks and perm is not None:
                    xb, wb = xb[:, perm], wb[:, perm]
            elif n in blocks:
                xb, wb = blocks[n].apply(xb, mats[n]), blocks[n].apply(wb, mats[n])
            elif n == "rot2" and transform.rot2 is not None:  # not refined: applied as it is
                xb, wb = transform._rotate(xb, "rot2"), transform._rotate(wb, "rot2")
        if quant_act:
            xb = _fake_quant_rows(xb, abits, act_symmetric, act_clip, True)
        return xb, _fake_quant_rows(wb, wbits, w_symmetric, w_clip, False)

    def full_loss() -> float:
        with torch.no_grad():
            mats = {n: b.matrices() for n, b in blocks.items()}
            err = 0.0
            for start in range(0, x0.shape[0], 2048):
                xq, wq = forward(x0[start:start + 2048], w0, mats)
                err += float((xq @ wq.T - y[start:start + 2048]).pow(2).sum())
            return err / float(y_norm)

    params = [p for b in blocks.values() for p in b.params()] + ([log_s] if learn_smooth else [])
    init = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(int(seed))
    t = x0.shape[0]
    best_loss = full_loss()
    best = [p.detach().clone() for p in params]
    if log is not None:
        log.append((0, best_loss))
    with torch.enable_grad():
        for i in range(1, steps + 1):
            idx = torch.randperm(t, generator=gen)[:tokens] if t > tokens else slice(None)
            odx = torch.randperm(w0.shape[0], generator=gen)[:rows] if w0.shape[0] > rows else slice(None)
            xb, yb = x0[idx], y[idx][:, odx]
            mats = {n: b.matrices() for n, b in blocks.items()}
            xq, wq = forward(xb, w0[odx], mats)
            loss = (xq @ wq.T - yb).pow(2).sum() / yb.pow(2).sum().clamp(min=1e-30)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i % max(1, eval_every) == 0 or i == steps:
                cur = full_loss()
                if log is not None:
                    log.append((i, cur))
                if cur < best_loss:
                    best_loss, best = cur, [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, b in zip(params, best, strict=True):
            p.copy_(b)
    if all(torch.equal(p, q) for p, q in zip(params, init, strict=True)):  # no checkpoint beat the greedy
        return transform  # transform: keep it as it is
    new = {n: b.final() for n, b in blocks.items()}
    new_smooth = transform.smooth
    if learn_smooth:
        with torch.no_grad():
            new_smooth = torch.exp(log_s.double()).float().to(transform.smooth.device)
    return LayerTransform(c, bs, smooth=new_smooth, rot1=new.get("rot1", transform.rot1), perm=transform.perm,
                          rot2=new.get("rot2", transform.rot2), kind=transform.kind,
                          permutation=transform.permutation)
