"""The DuQuant transform as pure math (Lin et al., "DuQuant: Distributing Outliers via Dual Transformation
Makes Stronger Quantized LLMs", NeurIPS 2024, arXiv 2406.01721), plus the baselines' transforms.

For a linear layer y = x W^T with C input channels the activation side is transformed online and the inverse
is folded into the weight offline, so before rounding the layer computes the same function:

    x_t = rot2( perm( rot1( x / s ) ) )          W_t = rot2( perm( rot1( W * s ) ) )   (applied to W's rows)
    x_t W_t^T = x W^T                             (rot1, rot2 block-orthogonal, perm a permutation)

- s: SmoothQuant-style smoothing, s = a^alpha / w^(1-alpha) from the per-channel activation and weight maxima.
- rot1: block-diagonal rotation built greedily (paper, Sec. 3.1 / Eq. 2): at each step the channel holding the
  largest |value| is swapped into position 0 and mixed into every channel of the block by an orthogonal matrix
  whose first row is uniform (1/sqrt(bs)); the prefix of steps with the smallest max |x| is kept. One matrix
  is shared by every full block (paper, Remark 2); a narrower last block (C % bs != 0) gets its own.
- perm: zigzag permutation that deals the channels, largest first, over the blocks in snake order, so every
  block gets a similar share of the remaining outliers; or (``permute="shuffle"``) a fixed transpose-like
  permutation that takes an equal chunk of every block into every block, with R1's columns reordered so each
  chunk holds a balanced share of the large positions (``shuffle_plan``). The choice is registered in
  ``duquant.registry`` (PERMUTATIONS).
- rot2: a second greedy rotation on the permuted activations.

Rotations are stored as [nb, bs, bs] float32; the last block of width r < bs uses the top-left r x r corner of
its matrix, padded with identity. See docs/algorithm.md for the choices made where the paper and the official
code differ. This module imports only torch and the standard library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

# Rows of the [tokens * blocks, bs] view that one greedy search works on (largest row norms first; see
# _greedy).
MAX_GREEDY_ROWS = 1024
GREEDY_WINDOW_ELEMENTS = 1 << 24  # float32 running products one greedy search keeps at once (64 MiB)
SMOOTH_MIN = 1e-2  # the official code's truncation: smoothing scales below 0.01 become 0.01

__all__ = [
    "LayerTransform",
    "build_transform",
    "greedy_block_rotation",
    "greedy_blocks",
    "hadamard_block_rotation",
    "is_shuffle_permutation",
    "PermutationPlan",
    "random_orthogonal",
    "shuffle_permutation",
    "shuffle_plan",
    "shuffle_unsupported",
    "smoothing_scales",
    "uniform_first_row_rotation",
    "zigzag_permutation",
    "zigzag_plan",
]


# ---- building blocks ---------------------------------------------------------------------------------------

def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-channel smoothing s = a^alpha / w^(1-alpha) (paper Sec. 2 / SmoothQuant), float32 [C].

    a and w are clamped to >= 1e-5 and the result to >= 0.01, as the official code does. The formula is
    applied literally for every alpha: alpha = 1 gives s = a (activations flattened completely), alpha = 0
    gives s = 1/w (all difficulty moved onto the activations), which is NOT "no smoothing"; `build_transform`
    treats alpha <= 0 as smoothing off (s = 1, no vector stored)."""
    if act_absmax.shape != weight_absmax.shape:
        raise ValueError(f"act_absmax {tuple(act_absmax.shape)} and weight_absmax "
                         f"{tuple(weight_absmax.shape)} must both be [C]")
    a = act_absmax.detach().float().clamp(min=1e-5)
    w = weight_absmax.detach().float().to(a.device).clamp(min=1e-5)
    s = (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=1e-5)
    s = torch.where(s < SMOOTH_MIN, torch.full_like(s, SMOOTH_MIN), s)
    # A non-finite statistic (inf/nan from a broken calibration batch) must not poison the transform.
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Haar-random orthogonal n x n matrix (float64): QR of a Gaussian matrix with the signs fixed."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def _uniform_reflection(n: int) -> torch.Tensor:
    """Householder reflection H (float64, symmetric, orthogonal) with H e0 = u = (1/sqrt(n), ..., 1/sqrt(n)),
    so row 0 and column 0 of H are uniform. Plays the role of the paper's R~ (the official code builds its
    R~ from a chain of Givens rotations; any orthogonal matrix with a uniform first row serves)."""
    u = torch.full((n,), 1.0 / math.sqrt(n), dtype=torch.float64)
    v = -u
    v[0] += 1.0
    h = torch.eye(n, dtype=torch.float64)
    norm = v.dot(v)
    if norm > 1e-12:
        h = h - 2.0 * torch.outer(v, v) / norm
    return h


def uniform_first_row_rotation(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The greedy step's base matrix B (float64, n x n, orthogonal): B = diag(1, Q') H.

    Row 0 of B is exactly uniform (1/sqrt(n)), so `y @ B` spreads a spike sitting in channel 0 evenly over the
    block; the other channels are first mixed by the random Q' (QR of an (n-1)x(n-1) Gaussian) and then by H.
    (The paper writes R~ Q with Q = diag(1, Q') on the right, which keeps row 0 uniform only in norm; putting
    diag(1, Q') first keeps it exactly uniform, see docs/algorithm.md.)"""
    b = _uniform_reflection(n)
    if n > 2:
        q = torch.eye(n, dtype=torch.float64)
        q[1:, 1:] = random_orthogonal(n - 1, generator)
        b = q @ b
    return b


def _candidate_rows(x: torch.Tensor, width: int, max_rows: int) -> torch.Tensor:
    """Rows of the [T * nblocks, width] view of x [T, nblocks*width] that can hold the maximum during the
    greedy search, as float32 [R, width] on x's device.

    Orthogonal maps keep row norms, and max|Y| >= (largest row norm) / sqrt(width) at every step, so a row
    whose norm is below that bound can never hold the maximum and does not influence any greedy choice: such
    rows are dropped exactly. Of the rest at most `max_rows` (largest norms, i.e. the largest values any
    rotation can produce) are kept, an approximation that matters only when thousands of rows are nearly
    tied."""
    view = x.reshape(-1, width)
    norms = view.norm(dim=-1)
    norms = torch.where(torch.isfinite(norms), norms, torch.zeros_like(norms))
    if norms.numel() == 0:
        return x.new_zeros((0, width), dtype=torch.float32)
    top = norms.max()
    keep = torch.nonzero(norms >= top / math.sqrt(width) * (1 - 1e-6)).squeeze(1)
    if keep.numel() > max_rows:
        keep = keep[norms[keep].topk(max_rows).indices]
    if bool(top <= 0):
        return x.new_zeros((0, width), dtype=torch.float32)
    return view[keep].float()


def _step_matrices(base: torch.Tensor) -> torch.Tensor:
    """S[d] = E_d B E_d for every channel d ([n, n, n]): one greedy step targeting d is then `y @ S[d]`, a
    gather and a matmul with no Python-side index work (and no device sync on a GPU)."""
    n = base.shape[0]
    perms = torch.arange(n).repeat(n, 1)
    perms[torch.arange(n), 0] = torch.arange(n)
    perms[torch.arange(n), torch.arange(n)] = 0
    return base[perms.unsqueeze(2), perms.unsqueeze(1)]  # [d, i, j] = B[perm_d[i], perm_d[j]]


def _greedy(y: torch.Tensor, steps: int, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy rotation of the rows of y [rows, n] (any device); returns an n x n float64 CPU orthogonal matrix.

    Step i: d = the channel (column) holding the largest |value| (paper's rule); y <- y @ (E_d B E_d), E_d the
    exchange of channels 0 and d, B = `uniform_first_row_rotation` drawn once per search. The product of the
    first k steps with the smallest max |y| (k = 0 .. steps, k = 0 being the identity; the first such k on a
    tie) is returned. The search runs in float32 on y's device with no host sync per step; the kept product is
    made exactly orthogonal (polar factor, float64) at the end."""
    n = y.shape[1]
    if n < 2 or steps <= 0 or y.shape[0] == 0:
        return torch.eye(n, dtype=torch.float64)
    base = uniform_first_row_rotation(n, generator)
    step = _step_matrices(base.float()).to(y.device)
    dev = y.device
    cur, nxt = y.float().clone(), torch.empty_like(y, dtype=torch.float32)  # never write into the caller's y
    # Each step is five kernels writing into preallocated buffers: the gather of S[d] (indexing with the 0-d d would
    # read it on the host, a sync per step on a GPU), two matmuls, the column max |y| and its max/argmax. The
    # running products (float32, beside the rows: ~n/rows more work) of a window of steps are kept, and the best
    # of a window is compared with the best so far once per window; made exactly orthogonal at the end.
    window = max(1, min(steps, GREEDY_WINDOW_ELEMENTS // (n * n)))
    rots = torch.empty(window + 1, n, n, device=dev)  # rots[i]: product of the steps before window step i
    maxes = torch.empty(window + 1, device=dev)  # max |y| after those steps
    picks = torch.empty(window + 1, dtype=torch.long, device=dev)  # the channel holding it: the next step's d
    col = torch.empty(n, device=dev)
    rots[0].copy_(torch.eye(n, device=dev))
    torch.linalg.vector_norm(cur, ord=math.inf, dim=0, out=col)
    torch.max(col, 0, out=(maxes[0], picks[0]))
    best_m, best_rot = maxes[0].clone(), rots[0].clone()
    done = 0
    while done < steps:
        w = min(window, steps - done)
        for i in range(w):
            s = step.index_select(0, picks[i:i + 1])[0]
            torch.matmul(cur, s, out=nxt)
            torch.matmul(rots[i], s, out=rots[i + 1])
            cur, nxt = nxt, cur
            torch.linalg.vector_norm(cur, ord=math.inf, dim=0, out=col)
            torch.max(col, 0, out=(maxes[i + 1], picks[i + 1]))
        k = maxes[1:w + 1].argmin(dim=0, keepdim=True) + 1  # the window's first minimum
        m = maxes.index_select(0, k)[0]
        better = m < best_m  # strict: a later equal max does not replace the earlier, shorter prefix
        best_m = torch.where(better, m, best_m)
        best_rot = torch.where(better, rots.index_select(0, k)[0], best_rot)
        rots[0].copy_(rots[w])
        maxes[0].copy_(maxes[w])
        picks[0].copy_(picks[w])
        done += w
    # Polar factor (nearest orthogonal matrix) in float64 removes the float32 drift of up to `steps` products.
    u, _, vh = torch.linalg.svd(best_rot.double().cpu())
    return u @ vh


def greedy_block_rotation(x: torch.Tensor, block_size: int, steps: int = 256,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """DuQuant's greedy block rotation [nb, bs, bs] float32 (CPU) from activations x [T, C] (any device; the
    search runs there).

    One matrix, built from the statistics of all full blocks together (the [T * C//bs, bs] view, paper Remark
    2), is shared by every full block; a narrower last block of r = C % bs channels gets its own r x r matrix,
    stored in the top-left corner of rot[-1] padded with identity. Non-finite tokens are ignored."""
    if x.dim() != 2:
        raise ValueError(f"greedy_block_rotation expects x [T, C], got shape {tuple(x.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        x = x[finite]
    return greedy_blocks(x, block_size, steps, generator)


def greedy_blocks(x: torch.Tensor, block_size: int, steps: int, generator: torch.Generator | None
                  ) -> torch.Tensor:
    """greedy_block_rotation on a finite float32/float64 tensor (no checks)."""
    c = x.shape[1]
    nb, full, r = -(-c // block_size), c // block_size, c % block_size
    out = torch.eye(block_size, dtype=torch.float64).repeat(nb, 1, 1)
    if full:
        rows = _candidate_rows(x[:, : full * block_size].contiguous(), block_size, MAX_GREEDY_ROWS)
        out[:full] = _greedy(rows, steps, generator)
    if r >= 2:
        rows = _candidate_rows(x[:, full * block_size:].contiguous(), r, MAX_GREEDY_ROWS)
        out[-1, :r, :r] = _greedy(rows, steps, generator)
    return out.float()


def zigzag_permutation(channel_absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """Zigzag permutation (paper Sec. 3.2): channels sorted by max |x| (descending) are dealt over the blocks
    in snake order 0, 1, ..., K-1, K-1, ..., 0, 0, 1, ...; each block then lists its channels largest first.
    Returns perm (int64 [C]) with x_new = x[..., perm] (new position j holds old channel perm[j]).

    C % bs != 0: the block widths stay as in the layout (K-1 blocks of bs and a last block of C % bs); the
    deal runs over all K blocks and skips a block once it is full, so the narrow last block simply fills up
    first."""
    c = channel_absmax.numel()
    if c == 0:
        return torch.zeros(0, dtype=torch.long)
    if c % block_size == 0:  # equal blocks: the same deal, vectorized (the loop below handles a narrow last block)
        return _snake_chunks(channel_absmax.reshape(-1), c // block_size)
    sizes = [block_size] * (c // block_size) + ([c % block_size] if c % block_size else [])
    k = len(sizes)
    stat = channel_absmax.detach().float().cpu().reshape(-1)
    stat = torch.where(torch.isnan(stat), torch.full_like(stat, -1.0), stat)
    order = torch.argsort(stat, descending=True, stable=True).tolist()
    blocks: list[list[int]] = [[] for _ in range(k)]
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


def shuffle_unsupported(c: int, block_size: int) -> str | None:
    """Why the shuffle permutation cannot take C = c channels in blocks of block_size, or None when it can: every
    block must be full (c % bs == 0) and the nb = c // bs blocks must cut a block into nb equal chunks (nb divides
    bs). With bs = 128 that is c = 128 * 2^k up to 16384; SigLIP's 1152 and 4304 and Gemma-270M's 640 are not."""
    if c < block_size or c % block_size:
        return f"{c} channels are not whole {block_size}-wide blocks"
    nb = c // block_size
    if block_size % nb:
        return f"{c} channels are {nb} blocks of {block_size}, and {nb} does not divide {block_size}"
    return None


def shuffle_permutation(c: int, block_size: int) -> torch.Tensor:
    """The shuffle permutation (int64 [c], x_new = x[..., perm] as for ``zigzag_permutation``): with nb = c // bs
    blocks and chunks of g = bs // nb channels, new block j takes chunk j of every old block, old block b's chunk
    landing at chunk b: perm[n] = b*bs + j*g + e for n = j*bs + b*g + e. With g = 1 (c = bs^2) it is the
    transpose of the token seen as [bs blocks, bs]. Data-independent, so a kernel can hard-code it; ValueError
    for a width it cannot take (``shuffle_unsupported``)."""
    why = shuffle_unsupported(c, block_size)
    if why is not None:
        raise ValueError(f"no shuffle permutation: {why}; such layers use zigzag")
    g = block_size // (c // block_size)
    n = torch.arange(c, dtype=torch.long)
    j, b, e = n // block_size, (n % block_size) // g, n % g
    return b * block_size + j * g + e


def is_shuffle_permutation(t: LayerTransform) -> bool:
    """Whether t's permutation is exactly ``shuffle_permutation(t.in_features, t.block_size)`` (compares the
    tensor, so it holds for packs written before the permutation was recorded; syncs when perm is on a GPU)."""
    if t.perm is None or shuffle_unsupported(t.in_features, t.block_size) is not None:
        return False
    return torch.equal(t.perm.detach().cpu().long(), shuffle_permutation(t.in_features, t.block_size))


class PermutationPlan(NamedTuple):
    """What a permutation planner (registry.PermutationSpec.planner) returns."""

    rot1: torch.Tensor  # the first rotation, possibly with its columns reordered (float32 [nb, bs, bs])
    perm: torch.Tensor  # int64 [C] on the sample's device
    x2: torch.Tensor  # the sample in the new basis, permuted: what the second rotation is searched on
    name: str  # the permutation used (a fallback names the one it fell back to)


def zigzag_plan(x1: torch.Tensor, rot1: torch.Tensor, block_size: int) -> PermutationPlan:
    """Zigzag (``zigzag_permutation``) on x1 = the smoothed sample after rot1, [T, C]; rot1 unchanged."""
    perm = zigzag_permutation(x1.abs().amax(dim=0), block_size).to(x1.device)
    return PermutationPlan(rot1, perm, x1[:, perm], "zigzag")


def _snake_chunks(stat: torch.Tensor, chunks: int) -> torch.Tensor:
    """Positions sorted by `stat` (descending, stable) dealt over `chunks` equal chunks in snake order 0, 1, ...,
    k-1, k-1, ..., 0, 0, 1, ...; returns chunk 0's positions (largest first), then chunk 1's, ... (int64)."""
    stat = torch.nan_to_num(stat.detach().float().cpu(), nan=-1.0)
    order = torch.argsort(stat, descending=True, stable=True)
    i = torch.arange(order.numel())
    rnd, k = i // chunks, i % chunks
    chunk = torch.where(rnd % 2 == 0, k, chunks - 1 - k)
    # within a chunk, dealing order is rank order: sort by (chunk, rank)
    return order[torch.argsort(chunk * order.numel() + i)]


def shuffle_plan(x1: torch.Tensor, rot1: torch.Tensor, block_size: int) -> PermutationPlan:
    """The shuffle permutation, or zigzag for a width it cannot take (``shuffle_unsupported``; the summaries
    report those layers).

    R1 is shared by all blocks, so every block's position p carries the same part of the spectrum: m[p] = max
    over tokens and blocks of |x1[:, b*bs + p]|. The positions sorted by m are dealt over the nb chunks in snake
    order (sigma: chunk 0's positions largest first, then chunk 1's, ...), and sigma is folded into R1 as a column
    reorder (R1[b][:, sigma], free at run time). ``shuffle_permutation`` then gives every new block one chunk of
    every old block, i.e. an even share of the large positions, with a fixed pattern a kernel can hard-code."""
    c = x1.shape[1]
    if shuffle_unsupported(c, block_size) is not None:
        return zigzag_plan(x1, rot1, block_size)
    nb = c // block_size
    if x1.shape[0]:
        m = x1.abs().reshape(-1, nb, block_size).amax(dim=(0, 1))
    else:
        m = torch.zeros(block_size)
    sigma = _snake_chunks(m, nb)
    perm = shuffle_permutation(c, block_size)
    # column n of x2 is column perm[n] of x1 @ R1[:, sigma] blockwise, i.e. column (perm[n] // bs)*bs +
    # sigma[perm[n] % bs] of x1: an exact gather, no second rotation of the sample
    src = (perm // block_size) * block_size + sigma[perm % block_size]
    return PermutationPlan(rot1[:, :, sigma].contiguous(), perm.to(x1.device), x1[:, src.to(x1.device)], "shuffle")


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def hadamard_block_rotation(c: int, block_size: int, generator: torch.Generator | None = None
                            ) -> torch.Tensor:
    """QuaRot-style block Hadamard [nb, bs, bs] float32 (normalised Sylvester, H H^T = I).

    A block whose width is not a power of two (a narrow last block such as SigLIP's 4304 = 33*128 + 80, or a
    non-power-of-two block size) gets a seeded Haar-random orthogonal matrix instead (from `generator`)."""
    nb, full, r = -(-c // block_size), c // block_size, c % block_size
    out = torch.eye(block_size, dtype=torch.float64).repeat(nb, 1, 1)

    def block(n: int) -> torch.Tensor:
        return _sylvester(n) if n & (n - 1) == 0 else random_orthogonal(n, generator)

    if full:
        out[:full] = block(block_size)
    if r:
        out[-1, :r, :r] = block(r)
    return out.float()


# ---- the transform -----------------------------------------------------------------------------------------

@dataclass
class LayerTransform:
    """The input-side transform of one linear layer (or of layers sharing one input). See the module docstring
    and docs/architecture.md for the layout."""

    in_features: int
    block_size: int
    smooth: torch.Tensor | None = None  # float32 [C]
    rot1: torch.Tensor | None = None  # float32 [nb, bs, bs]
    perm: torch.Tensor | None = None  # int64 [C]
    rot2: torch.Tensor | None = None  # float32 [nb, bs, bs]
    kind: str = "identity"
    permutation: str = "none"  # the permutation perm is (registry.PERMUTATIONS): zigzag, shuffle or none
    _shared_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Decide block sharing now for CPU tensors (no device sync later, e.g. under CUDA graph capture).
        for name in ("rot1", "rot2"):
            rot = getattr(self, name)
            if rot is not None and rot.device.type == "cpu" and rot.dim() == 3:
                self._shared(name, rot)

    # ---- properties ----------------------------------------------------------------------------------------
    @property
    def is_identity(self) -> bool:
        return self.smooth is None and self.rot1 is None and self.perm is None and self.rot2 is None

    @property
    def num_blocks(self) -> int:
        return -(-self.in_features // self.block_size)

    def _shared(self, name: str, rot: torch.Tensor) -> bool:
        """Whether all full blocks of `rot` hold the same matrix (then one matmul does them all); cached."""
        hit = self._shared_cache.get(name)
        if hit is not None and hit[0] is rot:
            return hit[1]
        full = self.in_features // self.block_size
        shared = full <= 1 or bool(torch.equal(rot[1:full], rot[:1].expand(full - 1, -1, -1)))
        self._shared_cache[name] = (rot, shared)
        return shared

    def _rotate(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Blockwise x @ rot over the last dim for rot = self.<name>, in x's dtype (rot cast to it)."""
        rot = getattr(self, name)
        c, bs = x.shape[-1], self.block_size
        full, r = c // bs, c % bs
        shared = self._shared(name, rot)
        rot = rot.to(device=x.device, dtype=x.dtype)
        lead = x.shape[:-1]
        parts = []
        if full:
            head = x[..., : full * bs] if r else x
            if shared:
                y = head.reshape(-1, bs) @ rot[0]
            else:
                y = torch.einsum("mnb,nbc->mnc", head.reshape(-1, full, bs), rot[:full])
            parts.append(y.reshape(*lead, full * bs))
        if r:
            parts.append(x[..., full * bs:] @ rot[-1, :r, :r])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    # ---- online / offline ----------------------------------------------------------------------------------
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Online activation transform on the last dim (any leading dims): x / smooth -> rot1 -> x[..., perm]
        -> rot2. Computed in x's dtype (bf16 / fp16 / fp32 / fp64) with the smoothing and rotations cast to
        it."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"transform expects {self.in_features} input channels, "
                             f"got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            x = x.float()
        if self.smooth is not None:
            x = x / self.smooth.to(device=x.device, dtype=x.dtype)
        if self.rot1 is not None:
            x = self._rotate(x, "rot1")
        if self.perm is not None:
            x = x[..., self.perm.to(x.device)]
        if self.rot2 is not None:
            x = self._rotate(x, "rot2")
        return x

    def fold_into_weight(self, w: torch.Tensor) -> torch.Tensor:
        """Offline: the same ops on W's rows [out, C], with the smoothing multiplied in, computed in float64.
        Returns float64 for a float64 W, else float32. apply(x) @ fold_into_weight(W).T == x @ W.T."""
        if w.dim() != 2 or w.shape[1] != self.in_features:
            raise ValueError(f"fold_into_weight expects W [out, {self.in_features}], got {tuple(w.shape)}")
        out_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        w = w.detach().double()
        if self.smooth is not None:
            w = w * self.smooth.to(w.device).double()
        if self.rot1 is not None:
            w = self._rotate(w, "rot1")
        if self.perm is not None:
            w = w[:, self.perm.to(w.device)]
        if self.rot2 is not None:
            w = self._rotate(w, "rot2")
        return w.to(out_dtype)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The whole transform as one dense [C, C] matrix M with apply(x) == x @ M (small C; tests,
        debugging)."""
        return self.apply(torch.eye(self.in_features, dtype=dtype, device=self._device()))

    # ---- storage -------------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        for t in (self.smooth, self.rot1, self.perm, self.rot2):
            if t is not None:
                return t.device
        return torch.device("cpu")

    def to(self, device: torch.device | str) -> LayerTransform:
        """A copy on `device` (self when already there, so layers sharing a transform keep sharing it)."""
        device = torch.device(device)
        tensors = [t for t in (self.smooth, self.rot1, self.perm, self.rot2) if t is not None]
        if all(_same_device(t.device, device) for t in tensors):
            return self

        def move(t):
            return None if t is None else t.to(device)

        out = replace(self, smooth=move(self.smooth), rot1=move(self.rot1), perm=move(self.perm),
                      rot2=move(self.rot2))
        for name in ("rot1", "rot2"):  # sharing does not depend on the device: carry the decision over
            rot = getattr(self, name)
            if rot is not None:
                out._shared_cache[name] = (getattr(out, name), self._shared(name, rot))
        return out

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The stored tensors, keys `prefix + {smooth, rot1, perm, rot2}` (absent ones omitted)."""
        out = {}
        for name in ("smooth", "rot1", "perm", "rot2"):
            t = getattr(self, name)
            if t is not None:
                out[prefix + name] = t.detach().contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "", in_features: int | None = None,
                     block_size: int | None = None, kind: str = "identity", permutation: str | None = None
                     ) -> LayerTransform:
        """Inverse of `to_tensors`; validates shapes and dtypes (a ValueError names what is wrong). `permutation`
        None (packs written before it was recorded): read from perm, shuffle when it is the shuffle
        permutation, zigzag when it is another one, none without one."""
        if in_features is None or block_size is None:
            raise ValueError("from_tensors needs in_features and block_size")
        parts = {k: tensors.get(prefix + k) for k in ("smooth", "rot1", "perm", "rot2")}
        if parts["smooth"] is not None:
            parts["smooth"] = parts["smooth"].float()
        for k in ("rot1", "rot2"):
            if parts[k] is not None:
                parts[k] = parts[k].float()
        if parts["perm"] is not None:
            parts["perm"] = parts["perm"].long()
        t = cls(int(in_features), int(block_size), kind=kind, **parts)
        t.validate()
        if permutation is None:
            permutation = "none" if t.perm is None else "shuffle" if is_shuffle_permutation(t) else "zigzag"
        t.permutation = permutation
        return t

    def validate(self, check_values: bool = False) -> None:
        """Shapes (always) and, with check_values, orthogonality, permutation and positivity (slower)."""
        c, bs = self.in_features, self.block_size
        if c < 1 or bs < 1:
            raise ValueError(f"in_features and block_size must be >= 1, got {c}, {bs}")
        nb = -(-c // bs)
        if self.smooth is not None and tuple(self.smooth.shape) != (c,):
            raise ValueError(f"smoothing vector has shape {tuple(self.smooth.shape)}, expected ({c},)")
        if self.perm is not None and tuple(self.perm.shape) != (c,):
            raise ValueError(f"permutation has shape {tuple(self.perm.shape)}, expected ({c},)")
        for name in ("rot1", "rot2"):
            r = getattr(self, name)
            if r is not None and tuple(r.shape) != (nb, bs, bs):
                raise ValueError(f"{name} has shape {tuple(r.shape)}, expected {(nb, bs, bs)}")
        if not check_values:
            return
        if self.smooth is not None and not bool((torch.isfinite(self.smooth) & (self.smooth > 0)).all()):
            raise ValueError("smoothing vector must be finite and positive")
        if self.perm is not None and not torch.equal(torch.sort(self.perm.cpu()).values, torch.arange(c)):
            raise ValueError("perm is not a permutation of range(in_features)")
        for name in ("rot1", "rot2"):
            r = getattr(self, name)
            if r is None:
                continue
            r = r.double().cpu()
            err = (r @ r.transpose(1, 2) - torch.eye(bs, dtype=torch.float64)).abs().max()
            if float(err) > 1e-4:
                raise ValueError(f"{name} is not orthogonal (max |R R^T - I| = {float(err):.2e})")

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_tensors().values())


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


# ---- builders ----------------------------------------------------------------------------------------------

def build_transform(method: str, *, weight: torch.Tensor, act_absmax: torch.Tensor | None,
                    act_sample: torch.Tensor | None, block_size: int = 128, alpha: float = 0.6,
                    steps: int = 256, permute: str | bool = "zigzag", seed: int = 0) -> LayerTransform:
    """The input transform of one layer, or of layers sharing one input (pass their weights concatenated on
    dim 0: the smoothing's weight statistic is then the max over all of them; pass q's weight alone to mimic
    the official code, which uses q_proj's / up_proj's maxima for the whole q/k/v and gate/up groups).

    `method` is a name registered in ``duquant.registry`` (rtn, smoothquant, hadamard, duquant; see
    ``duquant/methods/``). The search runs on act_sample's device (the model's, when the calibration sample
    stays there); the result is on the CPU. Non-finite tokens of the sample are dropped; act_absmax defaults to
    the sample's.

    `permute` names a registered permutation (zigzag, shuffle, none; True / False mean zigzag / none); only
    methods registered with ``permutes`` use it.

    Deterministic for a given seed (the random Q' of the greedy steps and of non-power-of-two Hadamard
    blocks)."""
    from duquant import registry

    permute = registry.permutation(permute).name
    builder = registry.load(registry.method(method).builder)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out, C], got shape {tuple(weight.shape)}")
    c = weight.shape[1]
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    generator = torch.Generator().manual_seed(int(seed))
    sample = None
    if act_sample is not None:
        if act_sample.dim() != 2 or act_sample.shape[1] != c:
            raise ValueError(f"act_sample must be [T, {c}], got shape {tuple(act_sample.shape)}")
        sample = act_sample.detach().float()
        finite = torch.isfinite(sample).all(dim=1)
        if not bool(finite.all()):
            sample = sample[finite]
        if sample.shape[0] == 0:
            sample = None
    if act_absmax is None and sample is not None:
        act_absmax = sample.abs().amax(dim=0)
    if act_absmax is not None and tuple(act_absmax.shape) != (c,):
        raise ValueError(f"act_absmax must be [{c}], got shape {tuple(act_absmax.shape)}")
    device = sample.device if sample is not None else torch.device("cpu")
    w = weight.detach().to(device=device, dtype=torch.float32)
    if act_absmax is not None:
        act_absmax = act_absmax.detach().to(device=device, dtype=torch.float32)
    t = builder(w, act_absmax=act_absmax, act_sample=sample, block_size=block_size, alpha=alpha, steps=steps,
                permute=permute, generator=generator)
    return t.to("cpu")
