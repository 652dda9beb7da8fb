"""Units of work, shared by every runner: planning them from what is still to do, and running one as a stream
of events.

A unit is one policy on one task for a list of trials, run on one fresh env seeded like openpi's. Running it
yields `(kind, payload)` events, which a runner carries to the process that owns the records:
  ("start",  {"key": EpisodeKey, "task": text})   an episode began
  ("steps",  n)                                   n more env steps were taken
  ("video",  {"path": relative path, "data": mp4 bytes})
  ("record", record dict)                         an episode finished (one JSON line of episodes.jsonl)
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from duquant.eval.config import EvalConfig
from duquant.eval.policies import make_policy, server_list
from duquant.eval.sim import episode, simulator

EpisodeKey = tuple  # (policy label, suite, task id, trial): one line of episodes.jsonl, exactly once


def episode_key(rec: dict) -> EpisodeKey:
    return (rec["policy"], rec["suite"], rec["task_id"], rec["trial"])


@dataclass
class Unit:
    label: str
    spec: str
    task_id: int
    trials: list[int]


def plan_units(cfg: EvalConfig, n_tasks: int, done: set, slots: int | None = None) -> list[Unit]:
    """Every (policy, task, trial) not in `done`, in units: a whole task each, split into chunks of trials
    when there are more `slots` (parallel simulators) than task x policy pairs, or as `trials_per_unit` says.
    A policy given as several servers has its units spread over them in turn."""
    task_ids = list(cfg.tasks) if cfg.tasks is not None else list(range(n_tasks))
    bad = [t for t in task_ids if not 0 <= t < n_tasks]
    if bad:
        raise ValueError(f"{cfg.suite} has tasks 0..{n_tasks - 1}; got {bad}")
    slots = slots or cfg.workers or 1
    chunk = cfg.trials_per_unit
    if chunk is None:
        per_task = max(1, math.ceil(slots / max(1, len(task_ids) * len(cfg.policies))))
        chunk = math.ceil(cfg.trials / per_task)
    units = []
    for task_id in task_ids:
        for label, spec in cfg.policies.items():
            todo = [i for i in range(cfg.trials) if (label, cfg.suite, task_id, i) not in done]
            units += [Unit(label, spec, task_id, todo[i:i + chunk]) for i in range(0, len(todo), chunk)]
    counters: dict[str, int] = {}
    for u in units:
        servers = server_list(u.spec)
        u.spec = servers[counters.get(u.label, 0) % len(servers)]
        counters[u.label] = counters.get(u.label, 0) + 1
    return units


def iter_unit(unit: Unit, cfg: EvalConfig, policies: dict, versions: dict, suite=None):
    """Run one unit's episodes on a fresh env, yielding the events above. `policies` caches label -> policy
    (built from `unit.spec` when missing)."""
    sim = simulator(cfg.simulator)
    suite = suite or sim.load_suite(cfg.suite)
    task = suite.get_task(unit.task_id)
    init_states = suite.get_task_init_states(unit.task_id)
    if max(unit.trials) >= len(init_states):
        raise ValueError(f"task {unit.task_id} of {cfg.suite} has {len(init_states)} initial states; "
                         f"--trials {cfg.trials} is too many")
    if unit.label not in policies:
        policies[unit.label] = make_policy(unit.spec, cfg.connect_timeout)
    policy = policies[unit.label]
    env = sim.make_env(task, cfg.resolution, cfg.seed)
    try:
        for trial in unit.trials:
            yield "start", {"key": (unit.label, cfg.suite, unit.task_id, trial), "task": task.language}
            gen = episode(env, policy, init_states[trial], task.language, cfg, keep_frames=cfg.videos)
            reported = 0
            while True:
                try:
                    steps = next(gen)
                except StopIteration as stop:
                    result = stop.value
                    break
                yield "steps", steps - reported
                reported = steps
            yield "steps", result.env_steps - reported
            video = None
            if cfg.videos and result.frames:
                rel = video_path(cfg, unit, task.language, trial, result.success)
                yield "video", {"path": rel, "data": encode_video(result.frames)}
                video = str(Path(cfg.out) / rel)
            yield "record", make_record(cfg, unit, task.language, trial, result, versions, policy, video)
    finally:
        try:
            env.close()
        except Exception:  # noqa: BLE001 - a broken env on the way out
            pass


def make_record(cfg: EvalConfig, unit: Unit, language: str, trial: int, r, versions: dict, policy,
                video: str | None) -> dict:
    return {"policy": unit.label, "policy_spec": unit.spec, "suite": cfg.suite, "task_id": unit.task_id,
            "task": language, "trial": trial, "seed": cfg.seed, "success": r.success, "steps": r.steps,
            "env_steps": r.env_steps, "queries": r.queries, "max_steps": cfg.episode_steps,
            "wall_s": round(r.wall_s, 3), "error": r.error, "video": video, "versions": versions,
            "server": getattr(policy, "metadata", None) or {},
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def lost_record(cfg: EvalConfig, unit: Unit, language: str, trial: int, error: str) -> dict:
    """The record of an episode given up on (its worker died on every attempt): a failure with the reason."""
    return {"policy": unit.label, "policy_spec": unit.spec, "suite": cfg.suite, "task_id": unit.task_id,
            "task": language, "trial": trial, "seed": cfg.seed, "success": False, "steps": 0, "env_steps": 0,
            "queries": 0, "max_steps": cfg.episode_steps, "wall_s": 0.0, "error": error, "video": None,
            "versions": {}, "server": {}, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def video_path(cfg: EvalConfig, unit: Unit, language: str, trial: int, success: bool) -> str:
    """Relative to the run directory (the process that owns the records writes the file)."""
    segment = language.replace(" ", "_")[:120]
    return str(Path("videos") / unit.label / cfg.suite /
               f"task{unit.task_id:02d}_{segment}_trial{trial:02d}_{'success' if success else 'failure'}.mp4")


def encode_video(frames: list) -> bytes:
    """mp4 (10 fps) bytes, so that a video made on another machine travels back with its record."""
    import imageio

    fd, tmp = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        imageio.mimwrite(tmp, [np.asarray(x) for x in frames], fps=10)
        return Path(tmp).read_bytes()
    finally:
        os.unlink(tmp)


__all__ = ["Unit", "EpisodeKey", "episode_key", "plan_units", "iter_unit", "make_record", "lost_record",
           "video_path", "encode_video"]
