"""The DuQuant transform as pure math (Lin et al., "DuQuant: Distributing Outliers via Dual Transformation Makes
Stronger Quantized LLMs", NeurIPS 2024, arXiv 2406.01721), plus the baselines' transforms.

For a linear layer y = x W^T with C input channels the activation side is transformed online and the inverse is
folded into the weight offline, so before rounding the layer computes the same function:

    x_t = rot2( perm( rot1( x / s ) ) )          W_t = rot2( perm( rot1( W * s ) ) )   (applied to W's rows)
    x_t W_t^T = x W^T                             (rot1, rot2 block-orthogonal, perm a permutation)

- s: SmoothQuant-style smoothing, s = a^alpha / w^(1-alpha) from the per-channel activation and weight maxima.
- rot1: block-diagonal rotation built greedily: at each step the channel holding the largest |value| is mixed
  into every channel of its block by an orthogonal matrix whose first row is uniform (1/sqrt(bs)); the prefix of
  steps with the smallest max |x| is kept. One matrix is shared by every full block (paper, Remark 2); a narrower
  last block (C % bs != 0) gets its own.
- perm: zigzag permutation that deals the channels, largest first, over the blocks in snake order, so every block
  gets a similar share of the remaining outliers.
- rot2: a second greedy rotation on the permuted activations.

Rotations are stored as [nb, bs, bs] float32; the last block of width r < bs uses the top-left r x r corner of
its matrix, padded with identity. See docs/algorithm.md for the choices made where the paper and the official code
differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

MAX_GREEDY_ROWS = 1024  # rows of the [tokens*blocks, bs] view the greedy search works on (largest norms first)


# ---- building blocks ----------------------------------------------------------------------------------------------

def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = a^alpha / w^(1-alpha), clamped as the official code does (s >= 0.01)."""
    a = act_absmax.float().clamp(min=1e-5)
    w = weight_absmax.float().clamp(min=1e-5)
    s = (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)
    return torch.where(s < 1e-2, torch.full_like(s, 1e-2), s)


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def uniform_first_row_rotation(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Orthogonal B (float64) whose row 0 is 1/sqrt(n) everywhere, randomised on the other rows:
    B = H diag(1, Q') with H the Householder reflection that maps e0 to the uniform unit vector."""
    u = torch.full((n,), 1.0 / math.sqrt(n), dtype=torch.float64)
    v = -u
    v[0] += 1.0
    norm = v.dot(v)
    h = torch.eye(n, dtype=torch.float64)
    if norm > 1e-12:
        h = h - 2.0 * torch.outer(v, v) / norm
    q = torch.eye(n, dtype=torch.float64)
    if n > 1:
        q[1:, 1:] = random_orthogonal(n - 1, generator)
    return h @ q


def _greedy(y: torch.Tensor, steps: int, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy rotation of the rows of y [rows, n]; returns an n x n float64 orthogonal matrix."""
    n = y.shape[1]
    if n < 2 or steps == 0 or y.numel() == 0:
        return torch.eye(n, dtype=torch.float64)
    y = y.double()
    y = y[torch.isfinite(y).all(dim=1)]
    if y.shape[0] == 0:
        return torch.eye(n, dtype=torch.float64)
    # Rotations keep row norms, and max|Y| >= max row norm / sqrt(n): rows below that bound can never hold the
    # maximum, so they do not influence the greedy choice. Keep the largest-norm rows only.
    norms = y.norm(dim=1)
    keep = norms >= norms.max() / math.sqrt(n)
    y = y[keep]
    if y.shape[0] > MAX_GREEDY_ROWS:
        y = y[y.norm(dim=1).topk(MAX_GREEDY_ROWS).indices]
    base = uniform_first_row_rotation(n, generator)
    rot = torch.eye(n, dtype=torch.float64)
    best, best_rot = float(y.abs().max()), rot.clone()
    idx = torch.arange(n)
    for _ in range(steps):
        channel = int(y.abs().amax(dim=0).argmax())
        perm = idx.clone()
        perm[0], perm[channel] = channel, 0
        step = base[perm][:, perm]  # exchange rows/columns 0 and `channel`: mixes that channel into all
        y = y @ step
        rot = rot @ step
        m = float(y.abs().max())
        if m < best:
            best, best_rot = m, rot.clone()
    return best_rot


def greedy_block_rotation(x: torch.Tensor, block_size: int, steps: int = 256,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Block rotation [nb, bs, bs] from activations x [T, C]: shared matrix for full blocks, own for the rest."""
    t, c = x.shape
    nb, full, r = -(-c // block_size), c // block_size, c % block_size
    out = torch.eye(block_size, dtype=torch.float64).repeat(nb, 1, 1)
    if full:
        shared = _greedy(x[:, : full * block_size].reshape(-1, block_size), steps, generator)
        out[:full] = shared
    if r >= 2:
        out[-1, :r, :r] = _greedy(x[:, full * block_size:], steps, generator)
    return out.float()


def zigzag_permutation(channel_absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """Deal channels, largest first, over the blocks in snake order (0..K-1, K-1..0, ...); a full block is skipped.
    Each block's channels are then sorted largest first. Returns perm with x_new = x[..., perm]."""
    c = channel_absmax.numel()
    sizes = [block_size] * (c // block_size) + ([c % block_size] if c % block_size else [])
    k = len(sizes)
    blocks: list[list[int]] = [[] for _ in range(k)]
    order = torch.argsort(channel_absmax.float(), descending=True, stable=True).tolist()
    cur, direction = 0, 1
    for ch in order:
        while len(blocks[cur]) >= sizes[cur]:
            cur, direction = _snake_next(cur, direction, k)
        blocks[cur].append(ch)
        cur, direction = _snake_next(cur, direction, k)
    return torch.tensor([ch for b in blocks for ch in b], dtype=torch.long)


def _snake_next(cur: int, direction: int, k: int) -> tuple[int, int]:
    if k == 1:
        return 0, 1
    nxt = cur + direction
    if nxt == k:
        return k - 1, -1
    if nxt == -1:
        return 0, 1
    return nxt, direction


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def hadamard_block_rotation(c: int, block_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """QuaRot-style block Hadamard [nb, bs, bs] (normalised Sylvester). A block whose width is not a power of two
    (a narrow last block, or a non-power-of-two block size) gets a seeded random orthogonal matrix instead."""
    nb, r = -(-c // block_size), c % block_size
    out = torch.eye(block_size, dtype=torch.float64).repeat(nb, 1, 1)

    def block(n: int) -> torch.Tensor:
        return _sylvester(n) if n & (n - 1) == 0 else random_orthogonal(n, generator)

    full = c // block_size
    if full:
        out[:full] = block(block_size)
    if r:
        out[-1, :r, :r] = block(r) if r > 1 else torch.ones(1, 1, dtype=torch.float64)
    return out.float()


# ---- the transform ------------------------------------------------------------------------------------------------

@dataclass
class LayerTransform:
    in_features: int
    block_size: int
    smooth: torch.Tensor | None = None  # [C]
    rot1: torch.Tensor | None = None  # [nb, bs, bs]
    perm: torch.Tensor | None = None  # [C] int64
    rot2: torch.Tensor | None = None  # [nb, bs, bs]
    kind: str = "identity"

    @property
    def is_identity(self) -> bool:
        return self.smooth is None and self.rot1 is None and self.perm is None and self.rot2 is None

    def _rotate(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        nb, bs, _ = rot.shape
        c = x.shape[-1]
        pad = nb * bs - c
        xp = F.pad(x, (0, pad)) if pad else x
        y = torch.einsum("...nb,nbc->...nc", xp.reshape(*x.shape[:-1], nb, bs), rot.to(x.dtype))
        y = y.reshape(*x.shape[:-1], nb * bs)
        return y[..., :c] if pad else y

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Online activation transform on the last dim (computed in x's dtype)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"transform expects {self.in_features} input channels, got shape {tuple(x.shape)}")
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        if self.rot1 is not None:
            x = self._rotate(x, self.rot1)
        if self.perm is not None:
            x = x[..., self.perm]
        if self.rot2 is not None:
            x = self._rotate(x, self.rot2)
        return x

    def fold_into_weight(self, w: torch.Tensor) -> torch.Tensor:
        """Offline: the same ops on W's rows, with the smoothing multiplied in (float64 inside)."""
        out_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        w = w.double()
        if self.smooth is not None:
            w = w * self.smooth.double()
        if self.rot1 is not None:
            w = self._rotate(w, self.rot1.double())
        if self.perm is not None:
            w = w[:, self.perm]
        if self.rot2 is not None:
            w = self._rotate(w, self.rot2.double())
        return w.to(out_dtype)

    def to(self, device: torch.device | str) -> LayerTransform:
        """A copy on `device` (self when already there, so layers sharing a transform keep sharing it)."""
        tensors = [t for t in (self.smooth, self.rot1, self.perm, self.rot2) if t is not None]
        if all(t.device == torch.device(device) for t in tensors):
            return self

        def move(t):
            return None if t is None else t.to(device)

        return replace(self, smooth=move(self.smooth), rot1=move(self.rot1), perm=move(self.perm),
                       rot2=move(self.rot2))

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {}
        for name in ("smooth", "rot1", "perm", "rot2"):
            t = getattr(self, name)
            if t is not None:
                out[prefix + name] = t.detach().contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, *, in_features: int, block_size: int,
                     kind: str) -> LayerTransform:
        t = cls(in_features, block_size, kind=kind, **{k: tensors.get(prefix + k) for k in
                                                        ("smooth", "rot1", "perm", "rot2")})
        t.validate()
        return t

    def validate(self) -> None:
        c, bs = self.in_features, self.block_size
        nb = -(-c // bs)
        if self.smooth is not None and tuple(self.smooth.shape) != (c,):
            raise ValueError(f"smoothing vector has shape {tuple(self.smooth.shape)}, expected ({c},)")
        if self.perm is not None and tuple(self.perm.shape) != (c,):
            raise ValueError(f"permutation has shape {tuple(self.perm.shape)}, expected ({c},)")
        for name in ("rot1", "rot2"):
            r = getattr(self, name)
            if r is not None and tuple(r.shape) != (nb, bs, bs):
                raise ValueError(f"{name} has shape {tuple(r.shape)}, expected {(nb, bs, bs)}")

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_tensors().values())


def build_transform(method: str, *, weight: torch.Tensor, act_absmax: torch.Tensor | None,
                    act_sample: torch.Tensor | None, block_size: int = 128, alpha: float = 0.6, steps: int = 256,
                    permute: bool = True, seed: int = 0) -> LayerTransform:
    """The transform of one layer (or of layers sharing one input: pass their weights concatenated on dim 0).

    method: rtn (identity) | smoothquant (smoothing) | hadamard (block Hadamard) | duquant (smoothing, greedy
    rotation, zigzag permutation, second greedy rotation). Without calibration data duquant falls back to
    statistics of the weight (kind "duquant-weight-only")."""
    c = weight.shape[1]
    generator = torch.Generator().manual_seed(seed)
    if method == "rtn":
        return LayerTransform(c, block_size, kind="rtn")
    if method == "hadamard":
        return LayerTransform(c, block_size, rot1=hadamard_block_rotation(c, block_size, generator), kind="hadamard")
    w_absmax = weight.detach().float().abs().amax(dim=0)
    if method == "smoothquant":
        if act_absmax is None:
            raise ValueError("smoothquant needs the activations' per-channel absmax (calibration data)")
        return LayerTransform(c, block_size, smooth=smoothing_scales(act_absmax, w_absmax, alpha),
                              kind="smoothquant")
    if method != "duquant":
        raise ValueError(f"unknown method {method!r}; use rtn, smoothquant, hadamard or duquant")

    if act_sample is None or act_absmax is None:
        # Weight-only fallback: the weight's rows stand in for activation tokens, no smoothing.
        x, smooth, kind = weight.detach().float(), None, "duquant-weight-only"
    else:
        smooth = smoothing_scales(act_absmax, w_absmax, alpha) if alpha > 0 else None
        x = act_sample.float() / smooth if smooth is not None else act_sample.float()
        kind = "duquant"
    rot1 = greedy_block_rotation(x, block_size, steps, generator)
    t = LayerTransform(c, block_size, smooth=smooth, rot1=rot1, kind=kind)
    if not permute:
        return t
    x1 = t._rotate(x, rot1)
    perm = zigzag_permutation(x1.abs().amax(dim=0), block_size)
    rot2 = greedy_block_rotation(x1[:, perm], block_size, steps, generator)
    return LayerTransform(c, block_size, smooth=smooth, rot1=rot1, perm=perm, rot2=rot2, kind=kind)
