"""Wall time per phase of a quantization run (calibration, transform search, rounding, pack writes, ...).

GPU kernels run asynchronously: a phase that only queues work would look free and the next phase that reads a
result would be billed for it. So the timer drains the device's queue at each phase boundary (a few syncs per
layer group, never inside a phase's own loops).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


class PhaseTimer:
    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else None
        self.seconds: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Time the body as phase `name` (times of a phase entered several times add up)."""
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.add(name, time.perf_counter() - start)

    def mark(self) -> float:
        """The start of a phase timed with `since` (for bodies too long to indent under a `with`)."""
        self._sync()
        return time.perf_counter()

    def since(self, name: str, start: float) -> None:
        self._sync()
        self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def rounded(self, digits: int = 3) -> dict[str, float]:
        return {k: round(v, digits) for k, v in self.seconds.items()}


def null_timer() -> PhaseTimer:
    """A timer for callers that do not report phases (no device: never syncs)."""
    return PhaseTimer()
