"""The local runner: the episodes run on this machine, in the driving process (`--workers 1`) or in N spawned
simulator processes pulling units from a queue. A worker that dies mid-episode is replaced and its unit's
unrecorded trials queued again (bounded by `max_retries`, then recorded as an error)."""

from __future__ import annotations

import dataclasses
import itertools
import queue
import signal
import time

import numpy as np

from duquant.eval.config import EvalConfig, PolicyUnavailable
from duquant.eval.policies import close_policies
from duquant.eval.runners.retries import Retries
from duquant.eval.sim import simulator
from duquant.eval.work import Unit, iter_unit


class LocalRunner:
    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg

    def slots(self) -> int:
        return self.cfg.workers or 1

    def close(self) -> None:
        pass

    def run(self, units: list[Unit], sink) -> None:
        if self.slots() == 1 or len(units) == 1:
            self._run_here(units, sink)
        else:
            self._run_processes(units, sink)

    def _run_here(self, units: list[Unit], sink) -> None:
        np.random.seed(self.cfg.seed)
        sim = simulator(self.cfg.simulator)
        suite, versions, policies = sim.load_suite(self.cfg.suite), sim.simulator_versions(), {}
        try:
            for unit in units:
                for kind, payload in iter_unit(unit, self.cfg, policies, versions, suite):
                    sink.event(kind, payload)
        finally:
            close_policies(policies)

    def _run_processes(self, units: list[Unit], sink) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # a fresh interpreter per simulator (EGL contexts do not survive fork)
        tasks, results = ctx.Queue(), ctx.Queue()
        for i, u in enumerate(units):
            tasks.put((i, dataclasses.asdict(u)))
        n = min(self.slots(), len(units))
        cfg_dict = dataclasses.asdict(self.cfg)
        units = list(units)

        def start(wid: int):
            p = ctx.Process(target=_worker_main, args=(wid, cfg_dict, tasks, results), daemon=True)
            p.start()
            return p

        procs = {wid: start(wid) for wid in range(n)}
        ids, respawns = itertools.count(n), itertools.count(1)
        current: dict[int, int] = {}  # worker -> unit index it runs
        running: dict[int, tuple] = {}  # worker -> episode it runs
        texts: dict[int, str] = {}  # unit index -> task text
        retries = Retries(self.cfg, sink)
        remaining = len(units)

        def handle(wid: int, kind: str, payload) -> None:
            nonlocal remaining
            if kind == "unit":
                current[wid] = payload
            elif kind == "done":
                current.pop(wid, None)
                running.pop(wid, None)
                remaining -= 1
            elif kind == "fatal":
                raise PolicyUnavailable(f"a LIBERO worker stopped: {payload}")
            else:
                if kind == "start":
                    running[wid] = tuple(payload["key"])
                    texts[current[wid]] = payload["task"]
                elif kind == "record":
                    running.pop(wid, None)
                sink.event(kind, payload)

        def replace_dead() -> None:
            nonlocal remaining
            dead = [wid for wid, p in procs.items() if not p.is_alive() and p.exitcode != 0]
            if not dead:
                return
            while True:  # what the dead sent before dying comes first
                try:
                    handle(*results.get_nowait())
                except queue.Empty:
                    break
            for wid in dead:
                code = procs.pop(wid).exitcode
                if wid in current:
                    idx = current.pop(wid)
                    rest = retries.after_death(units[idx], running.pop(wid, None), texts.get(idx, ""),
                                               f"process exit code {code}")
                    if rest is None:
                        remaining -= 1
                    else:
                        units[idx] = rest
                        tasks.put((idx, dataclasses.asdict(rest)))
                if next(respawns) > len(units) * (self.cfg.max_retries + 1):
                    raise RuntimeError(f"LIBERO workers keep dying (last exit code {code}); see their output")
                new = next(ids)  # a new id: late messages of the dead one stay apart
                procs[new] = start(new)

        try:
            last_check = time.monotonic()
            while remaining:
                try:
                    handle(*results.get(timeout=1.0))
                except queue.Empty:
                    pass
                if time.monotonic() - last_check >= 1.0:
                    last_check = time.monotonic()
                    replace_dead()
                    if remaining and not any(p.is_alive() for p in procs.values()):
                        raise RuntimeError("every LIBERO worker exited before the run finished (see above)")
            for _ in procs:  # no sentinels before: a unit queued again after a death must come before them
                tasks.put(None)
        finally:
            for p in procs.values():
                if p.is_alive():
                    p.terminate()
                p.join(timeout=10)


def _worker_main(wid: int, cfg_dict: dict, tasks, results) -> None:
    """A worker process: one simulator at a time, units from `tasks` until None; every event to `results`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle; it terminates us
    cfg = EvalConfig(**{**cfg_dict, "labels": tuple(cfg_dict["labels"]),
                        "tasks": None if cfg_dict["tasks"] is None else tuple(cfg_dict["tasks"])})
    np.random.seed(cfg.seed)
    policies: dict = {}
    try:
        sim = simulator(cfg.simulator)
        versions, suite = sim.simulator_versions(), sim.load_suite(cfg.suite)
        while True:
            item = tasks.get()
            if item is None:
                break
            idx, unit = item
            results.put((wid, "unit", idx))
            for kind, payload in iter_unit(Unit(**unit), cfg, policies, versions, suite):
                results.put((wid, kind, payload))
            results.put((wid, "done", idx))
    except BaseException as err:  # noqa: BLE001 - reported to the driver, which stops the run
        import traceback

        results.put((wid, "fatal", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
    finally:
        close_policies(policies)


__all__ = ["LocalRunner"]
