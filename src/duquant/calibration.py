"""Calibration: forward hooks that collect what the transforms need from real forward passes.

For every selected layer we keep, over all calibration calls, the per-input-channel absmax (smoothing, zigzag)
and a bounded sample of input tokens (greedy rotations, clip search, static scales). Memory is bounded by
``max_tokens`` rows per layer (fewer for wide inputs), never the raw activations of the whole run. The sample keeps
the tokens that hold the largest value of the top channels (massive activations sit on few tokens, and a random
subsample would miss them), filled up with a seeded random subset of the rest (`duquant.token_sample`).

Everything stays on the model's device and the hooks never read a device value on the host: a calibration run
makes ~50,000 hook calls on the full pi0 (1548 per observation batch, ten denoising steps of the action expert),
so a sync or a host round trip per call would cost more than the forward passes themselves.

Layers fed the very same tensor in the same call (q/k/v, gate/up) are recorded as one group, so they can share
one transform, and the GPU path quantizes that input once.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from duquant.token_sample import TokenReservoir

MAX_SAMPLE_ELEMENTS = 16 * 1024 * 1024  # per layer: 64 MiB of float32
STAGE_BYTES = 4 * 1024 * 1024  # per layer: small calls are gathered up to this size before they are processed
OUTLIER_CHANNELS = 8  # per call, the rows holding the largest value of this many top channels join the sample


class LayerStats:
    """One layer's statistics, accumulated on the model's device without a device->host sync per call.

    `absmax`, `sample`, `hessian` and `tokens_seen` are read after the calibration (reading them settles what is
    pending: at most two syncs per layer). Calls of fewer than a quarter of `STAGE_BYTES` (the action expert's
    ~100 tokens, ten denoising steps per observation) are copied into a staging buffer and processed together:
    one copy per call instead of a dozen kernels. Non-finite tokens are left out of every statistic."""

    def __init__(self, in_features: int, max_tokens: int, keep_hessian: bool = False, seed: int = 0):
        self.in_features = in_features
        self.max_tokens = max_tokens
        self.keep_hessian = keep_hessian
        self.seed = seed
        self.calls = 0
        self._rows_seen = 0  # every row offered, finite or not: the stream position of the next row
        self._absmax: torch.Tensor | None = None  # [C] float32, max |x| over finite rows
        self._finite: torch.Tensor | None = None  # int64 scalar on the device: finite rows seen
        self._hessian: torch.Tensor | None = None  # [C, C] float32, sum of x^T x over finite rows
        self._reservoir: TokenReservoir | None = None
        self._generator: torch.Generator | None = None
        self._stage: torch.Tensor | None = None
        self._staged_rows = 0
        self._staged_calls = 0
        self._settled: tuple | None = None  # (absmax, sample, tokens_seen), cached until the next update

    # ---- recording ---------------------------------------------------------------------------------------------
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.in_features)
        n = x.shape[0]
        if n == 0:
            return
        self.calls += 1
        self._settled = None
        stage_rows = STAGE_BYTES // (self.in_features * x.element_size())
        if 4 * n > stage_rows:  # large enough to process on its own
            self._flush()
            self._consume(x, calls=1)
            return
        stage = self._stage
        if stage is None or stage.dtype != x.dtype or stage.device != x.device or self._staged_rows + n > stage_rows:
            self._flush()
            if stage is None or stage.dtype != x.dtype or stage.device != x.device:
                self._stage = stage = x.new_empty(stage_rows, self.in_features)
        stage[self._staged_rows:self._staged_rows + n].copy_(x)
        self._staged_rows += n
        self._staged_calls += 1

    def _flush(self) -> None:
        if self._staged_rows:
            self._consume(self._stage[: self._staged_rows], calls=self._staged_calls)
            self._staged_rows = self._staged_calls = 0

    def _consume(self, x: torch.Tensor, calls: int) -> None:
        """Fold rows x [m, C] (from `calls` calls) into the statistics: fixed-size kernels only."""
        m, c = x.shape
        if self._reservoir is None:
            if x.device.type != "meta":  # the meta device (tests' stand-in for a GPU) has no generator
                self._generator = torch.Generator(device=x.device).manual_seed(self.seed)
            self._reservoir = TokenReservoir(self.max_tokens, c, self._generator)
            self._finite = torch.zeros((), dtype=torch.long, device=x.device)
        a = x.abs()  # in x's dtype: max |x| is exact in bf16 too, and half the bytes of a float32 copy
        row_max = a.amax(dim=1)
        finite = torch.isfinite(row_max)  # a NaN or inf anywhere in a row makes its max non-finite
        a.masked_fill_(~finite.unsqueeze(1), 0)
        col_max = a.amax(dim=0).float()
        self._absmax = col_max if self._absmax is None else torch.maximum(self._absmax, col_max, out=self._absmax)
        self._finite += finite.sum()
        if self.keep_hessian:
            xf = x.masked_fill(~finite.unsqueeze(1), 0).float()
            if self._hessian is None:
                self._hessian = torch.zeros(c, c, device=x.device)
            self._hessian.addmm_(xf.T, xf)
        # Candidates: the rows holding the largest value of the top channels, then random rows; as many per call
        # as before the gathering (max_tokens // 8), so the sample is spread over the calls.
        top_channels = col_max.topk(min(OUTLIER_CHANNELS, c)).indices
        outlier_rows = a.index_select(1, top_channels).argmax(dim=0)
        k = min(m, max(1, self.max_tokens // 8) * calls + top_channels.numel())
        score = torch.rand(m, generator=self._generator, device=x.device)
        score.index_fill_(0, outlier_rows, 2.0).masked_fill_(~finite, -1.0)
        pick = score.topk(k, sorted=False).indices
        self._reservoir.offer(x.index_select(0, pick), finite.index_select(0, pick), row_max.index_select(0, pick),
                              pick + self._rows_seen)
        self._rows_seen += m

    # ---- results -----------------------------------------------------------------------------------------------
    def settle(self) -> None:
        """Process what is staged and read the counts back (the layer's only syncs); reading a result does it too."""
        self._settle()

    def _settle(self) -> tuple:
        if self._settled is None:
            self._flush()
            self._stage = None  # the staging buffer is not needed once the calls are over
            tokens = int(self._finite) if self._finite is not None else 0
            absmax = self._absmax if tokens else None
            sample = self._reservoir.rows() if tokens else None
            self._settled = (absmax, sample, tokens)
        return self._settled

    @property
    def absmax(self) -> torch.Tensor | None:
        """[C] float32 on the model's device; None when no finite token was seen."""
        return self._settle()[0]

    @property
    def sample(self) -> torch.Tensor | None:
        """[<= max_tokens, C] float32 on the model's device, in call order."""
        return self._settle()[1]

    @property
    def tokens_seen(self) -> int:
        """Finite tokens seen over all calls."""
        return self._settle()[2]

    @property
    def hessian(self) -> torch.Tensor | None:
        """[C, C] float32 sum of x^T x over every finite token (only with keep_hessian)."""
        return self._hessian if self._settle()[2] else None


@dataclass
class CalibrationResult:
    stats: dict[str, LayerStats]
    groups: list[list[str]]  # layers that saw the same input tensor; singletons included
    seconds: float = 0.0
    order: list[str] = field(default_factory=list)  # layers by their first call in the forward passes

    def group_of(self, name: str) -> list[str]:
        for g in self.groups:
            if name in g:
                return g
        return [name]


class ActivationRecorder(contextlib.AbstractContextManager):
    """Owns every hook it registers and removes them all on exit, even after an exception."""

    def __init__(self, modules: dict[str, nn.Linear], max_tokens: int = 2048, seed: int = 0,
                 hessian: bool = False):
        self.modules = modules
        self.stats = {
            n: LayerStats(m.in_features, max(16, min(max_tokens, MAX_SAMPLE_ELEMENTS // m.in_features)),
                          keep_hessian=hessian, seed=seed + i)
            for i, (n, m) in enumerate(modules.items())
        }
        self._handles: list = []
        self._call_log: list[tuple[str, tuple]] = []

    def __enter__(self) -> ActivationRecorder:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            self.stats[name].update(x)
            self._call_log.append((name, _tensor_key(x)))

        return hook

    def call_order(self) -> list[str]:
        return list(dict.fromkeys(n for n, _ in self._call_log))

    def groups(self) -> list[list[str]]:
        """Consecutive calls on the identical tensor (same storage, shape, strides, version) in the same parent
        module form a group; a group must have been seen the same way on every call."""
        seen: dict[frozenset, int] = {}
        i = 0
        log = self._call_log
        while i < len(log):
            j = i + 1
            while j < len(log) and log[j][1] == log[i][1] and _parent(log[j][0]) == _parent(log[i][0]):
                j += 1
            key = frozenset(n for n, _ in log[i:j])
            seen[key] = seen.get(key, 0) + 1
            i = j
        # A layer belongs to its largest consistently observed group.
        membership: dict[str, frozenset] = {}
        for key in sorted(seen, key=len, reverse=True):
            if any(n in membership for n in key):
                continue
            for n in key:
                membership[n] = key
        order = list(self.modules)
        groups, done = [], set()
        for n in order:
            if n in done:
                continue
            g = [m for m in order if m in membership.get(n, frozenset([n]))]
            done.update(g)
            groups.append(g)
        return groups


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _tensor_key(x: torch.Tensor) -> tuple:
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x._version, x.device.type)


def calibrate(model: nn.Module, modules: dict[str, nn.Linear], run: Callable[[nn.Module], None], *,
              max_tokens: int = 2048, seed: int = 0, hessian: bool = False) -> CalibrationResult:
    """Run `run(model)` (the user's forward passes) with recording hooks on `modules`. `hessian=True` also sums
    x^T x over every token (GPTQ), a [C, C] matrix per layer."""
    import time

    start = time.perf_counter()
    with ActivationRecorder(modules, max_tokens=max_tokens, seed=seed, hessian=hessian) as rec, torch.no_grad():
        run(model)
    for s in rec.stats.values():
        s.settle()  # inside the timing: it waits for the queued statistics work of the run
    missing = [n for n, s in rec.stats.items() if s.calls == 0]
    if missing:
        raise RuntimeError(f"calibration never called {len(missing)} selected layer(s), e.g. {missing[:3]}; the "
                           "calibration function must run forward passes that reach every selected layer")
    return CalibrationResult(rec.stats, rec.groups(), time.perf_counter() - start, rec.call_order())


def block_of(name: str) -> str:
    """The transformer block a layer belongs to: its name up to the first numeric component
    ("...layers.3.mlp.up_proj" -> "...layers.3"); a layer outside numbered blocks is its own parent's block."""
    m = re.match(r"^(.*?\.\d+)(?:\.|$)", name)
    return m.group(1) if m else name.rsplit(".", 1)[0]


def sequential_stages(order: list[str]) -> list[list[str]]:
    """Layers in forward order, cut into blocks (see `block_of`), blocks ordered by their first call: the stages
    of sequential calibration (the official code's layer-by-layer loop)."""
    stages: dict[str, list[str]] = {}
    for name in order:
        stages.setdefault(block_of(name), []).append(name)
    return list(stages.values())
