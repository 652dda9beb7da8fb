"""Bounded retries of episodes whose worker died (a killed process, a lost node): shared by the runners.

The episode that was running is charged one attempt and the unit's unrecorded trials run again; after
`max_retries` reruns the episode is recorded as an error (a failure, with the reason), never dropped.
"""

from __future__ import annotations

from dataclasses import replace

from duquant.eval.config import EvalConfig
from duquant.eval.work import Unit, lost_record


class Retries:
    def __init__(self, cfg: EvalConfig, sink):
        self.cfg, self.sink = cfg, sink
        self.attempts: dict[tuple, int] = {}

    def key(self, unit: Unit, trial: int) -> tuple:
        return (unit.label, self.cfg.suite, unit.task_id, trial)

    def after_death(self, unit: Unit, running: tuple | None, task_text: str, reason: str) -> Unit | None:
        """`unit`'s worker died while running episode `running` (None: between episodes, which charges the
        next one). Returns the unit of what is left to run, or None."""
        remaining = [t for t in unit.trials if not self.sink.is_done(self.key(unit, t))]
        if not remaining:
            return None
        key = tuple(running) if running is not None else self.key(unit, remaining[0])
        trial = key[3]
        self.attempts[key] = self.attempts.get(key, 0) + 1
        if self.attempts[key] > self.cfg.max_retries:
            error = f"WorkerLost: the simulator worker died on {self.attempts[key]} attempts (last: {reason})"
            self.sink.lost(lost_record(self.cfg, unit, task_text, trial, error))
            remaining = [t for t in remaining if t != trial]
        else:
            self.sink.retry(key)
        return replace(unit, trials=remaining) if remaining else None


__all__ = ["Retries"]
