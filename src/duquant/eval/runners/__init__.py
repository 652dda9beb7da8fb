"""Where the episodes of an evaluation run: one registry, one interface.

    local   this machine: in the driving process (1 worker) or N spawned simulator processes
    ray     a Ray cluster (`duquant[cluster]`): each unit of work is a Ray task owning its simulator; in-process
            policies live in GPU actors that batch the requests of concurrent episodes

A runner is built from the `EvalConfig`, says how many simulators it runs at once (`slots`, which decides how
finely the work is split), and runs units, handing every event of `duquant.eval.work` to a `Sink`. Records
are written only by the driving process, so every runner leaves the same files and resumes the same way.
"""

from __future__ import annotations

import importlib
from typing import Protocol

from duquant.eval.config import EvalConfig

RUNNERS = {"local": "duquant.eval.runners.local:LocalRunner", "ray": "duquant.eval.runners.ray:RayRunner"}


class Sink(Protocol):
    def event(self, kind: str, payload) -> None:
        """A `duquant.eval.work` event from a unit."""

    def retry(self, key) -> None:
        """The episode `key` was interrupted (its worker died) and will run again."""

    def lost(self, record: dict) -> None:
        """The episode gave up after its retries: record it as an error."""

    def is_done(self, key) -> bool:
        """Whether the episode is already recorded."""


class Runner(Protocol):
    def slots(self) -> int:
        """Simulators it runs at once."""

    def run(self, units: list, sink: Sink) -> None:
        """Run every unit; return when all are recorded, raise when the run must stop."""

    def close(self) -> None: ...


def runner_class(name: str):
    """The class registered as `name`; importing it fails here, before any work, when its extra is missing."""
    if name not in RUNNERS:
        raise ValueError(f"unknown runner {name!r}; choose one of {list(RUNNERS)}")
    module, cls = RUNNERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_runner(cfg: EvalConfig) -> Runner:
    return runner_class(cfg.runner)(cfg)


__all__ = ["RUNNERS", "Runner", "Sink", "make_runner", "runner_class"]
