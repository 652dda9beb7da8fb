"""Calibration: forward hooks that collect what the transforms need from real forward passes.

For every selected layer we keep, over all calibration calls, the per-input-channel absmax (smoothing, zigzag)
and a bounded sample of input tokens (greedy rotations, clip search, static scales). Memory is bounded by
``max_tokens`` rows per layer (fewer for wide inputs), never the raw activations of the whole run. The sample keeps
the tokens that hold the largest value of the top channels (massive activations sit on few tokens, and a random
subsample would miss them), filled up with a seeded random subset of the rest.

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

MAX_SAMPLE_ELEMENTS = 16 * 1024 * 1024  # per layer: 64 MiB of float32


@dataclass
class LayerStats:
    in_features: int
    max_tokens: int
    absmax: torch.Tensor | None = None  # [C] float32, on the model's device
    sample: torch.Tensor | None = None  # [<=max_tokens, C] float32, on the model's device
    hessian: torch.Tensor | None = None  # [C, C] float32 sum of x^T x over every token (only when asked for)
    keep_hessian: bool = False
    tokens_seen: int = 0
    calls: int = 0
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    def update(self, x: torch.Tensor) -> None:
        # Statistics stay on the model's device: the transform search runs there too (no host round trip).
        x = x.detach().reshape(-1, self.in_features).float()
        if x.shape[0] == 0:
            return
        x = x[torch.isfinite(x).all(dim=1)]
        if x.shape[0] == 0:
            return
        amax = x.abs().amax(dim=0)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        self.tokens_seen += x.shape[0]
        self.calls += 1
        if self.keep_hessian:
            h = x.T @ x
            self.hessian = h if self.hessian is None else self.hessian.add_(h)
        self._add_sample(x)

    def _add_sample(self, x: torch.Tensor) -> None:
        keep = max(1, self.max_tokens // 8)  # per call: spread the sample over calls
        top_channels = x.abs().amax(dim=0).topk(min(8, x.shape[1])).indices
        outlier_rows = x[:, top_channels].abs().argmax(dim=0).unique()
        rest = torch.randperm(x.shape[0], generator=self.generator)[:keep].to(x.device)
        rows = torch.cat([outlier_rows, rest]).unique()
        new = x[rows]
        self.sample = new if self.sample is None else torch.cat([self.sample, new])
        if self.sample.shape[0] > self.max_tokens:
            # Keep the rows with the largest absmax first (outlier carriers), then random ones.
            row_max = self.sample.abs().amax(dim=1)
            n_top = self.max_tokens // 4
            top = row_max.topk(n_top).indices
            mask = torch.ones(self.sample.shape[0], dtype=torch.bool, device=self.sample.device)
            mask[top] = False
            others = mask.nonzero().squeeze(1)
            pick = torch.randperm(others.numel(), generator=self.generator)[: self.max_tokens - n_top]
            others = others[pick.to(others.device)]
            self.sample = self.sample[torch.cat([top, others]).sort().values]


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
                          generator=torch.Generator().manual_seed(seed + i), keep_hessian=hessian)
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
