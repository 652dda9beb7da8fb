"""LIBERO evaluation with openpi's loop (examples/libero/main.py), against any openpi-compatible policy server
or an in-process policy; resumable, parallel, one JSONL record per episode.

The loop, as openpi runs it: one `OffScreenRenderEnv` (256x256 cameras) per task, seeded once (`env.seed(7)`);
per episode `env.reset()`, `set_init_state(init_states[trial])`, 10 steps of the dummy action [0]*6+[-1] while
objects settle, then every step: both camera images rotated 180 degrees, resized with padding to 224 (PIL
bilinear) as uint8; when the action plan is empty the policy gets {"observation/image",
"observation/wrist_image", "observation/state" = eef pos + axis-angle + gripper qpos (8), "prompt"} and its
first 5 actions are queued; success is the env's `done` flag; the episode ends at `max_steps` (+ the wait
steps) per suite: spatial 220, object 280, goal 300, libero_10 520, libero_90 400. An exception inside an
episode ends it as a failure (openpi), recorded with its message; losing the policy connection stops the run
instead (the episode is not recorded, so a rerun retries it).

Episodes run where `--runner` says: `local` (this machine: in-process or N simulator processes) or `ray`
(a Ray cluster); a unit of work is a task (or a chunk of its trials, when there are more simulators than
tasks) on a fresh env seeded like openpi's. Records go to `<out>/episodes.jsonl`, written by this process
only, each episode exactly once; a rerun skips every (policy, suite, task, trial) already there. `--compare`
runs a second policy on the same init states and seeds and reports the paired success-rate difference with a
95% confidence interval (Newcombe's hybrid score interval).

Layout: `config` (EvalConfig), `sim` (env + episode loop), `policies` (clients), `work` (units and their
events), `runners/` (local, ray), `records` (run directory), `stats` + `summary` (tables), `progress`. This
module runs an evaluation and re-exports their public names. No torch is imported (an in-process `local:`
policy imports it where it is built).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from duquant.eval.config import (
    SUITE_MAX_STEPS,
    SUITES,
    EvalConfig,
    PolicyUnavailable,
    RunMismatch,
    ServerError,
    WorkerLost,
)
from duquant.eval.policies import WebsocketClient, make_policy
from duquant.eval.progress import Progress
from duquant.eval.records import RecordLog, check_run_file, read_records, write_atomic
from duquant.eval.sim import (
    DUMMY_ACTION,
    EpisodeResult,
    libero_element,
    load_suite,
    make_env,
    quat2axisangle,
    run_episode,
    simulator,
    simulator_versions,
)
from duquant.eval.stats import newcombe_paired, paired_difference, wilson
from duquant.eval.summary import summarize, summary_markdown
from duquant.eval.work import Unit, episode_key, plan_units


class _RunSink:
    """Where the runner's events land: the record log (the only writer of the run directory) and the
    progress display."""

    def __init__(self, log: RecordLog, progress: Progress):
        self.log, self.progress = log, progress

    def event(self, kind: str, payload) -> None:
        if kind == "start":
            self.progress.started(payload["key"])
        elif kind == "steps":
            self.progress.stepped(payload)
        elif kind == "video":
            self.log.add_video(payload["path"], payload["data"])
        elif kind == "record":
            if self.log.add(payload):
                self.progress.recorded(payload)
            else:  # a replay of an episode already recorded (a retried unit): written once, counted once
                self.progress.running.discard(episode_key(payload))

    def retry(self, key) -> None:
        self.progress.retry(key)

    def lost(self, record: dict) -> None:
        if self.log.add(record):
            self.progress.recorded(record)

    def is_done(self, key) -> bool:
        return tuple(key) in self.log.done


def evaluate(cfg: EvalConfig) -> dict:
    """Run (or resume) the evaluation; returns the summary (also written to <out>/summary.{json,md})."""
    from duquant.eval.runners import make_runner, runner_class

    runner_class(cfg.runner)  # a missing extra (ray) fails here, before the run directory is touched
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    check_run_file(cfg)
    log = RecordLog(out)
    n_tasks = simulator(cfg.simulator).load_suite(cfg.suite).n_tasks
    total = sum(len(u.trials) for u in plan_units(cfg, n_tasks, log.done, slots=1))
    print(f"[duquant eval] {cfg.suite}: {total} episode(s) to run, {len(log.records)} already in {log.path}",
          file=sys.stderr)
    try:
        if total:
            runner = make_runner(cfg)
            progress = Progress(total, f"LIBERO {cfg.suite}", enabled=cfg.progress)
            try:
                runner.run(plan_units(cfg, n_tasks, log.done, slots=runner.slots()), _RunSink(log, progress))
            finally:
                progress.close()
                runner.close()
    finally:
        log.close()
    summary = summarize(read_records(log.path), cfg.labels if cfg.compare else None, order=cfg.labels)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2).encode())
    write_atomic(out / "summary.md", summary_markdown(summary).encode())
    return summary


__all__ = [
    "EvalConfig",
    "evaluate",
    "run_episode",
    "libero_element",
    "quat2axisangle",
    "make_env",
    "load_suite",
    "make_policy",
    "WebsocketClient",
    "summarize",
    "summary_markdown",
    "paired_difference",
    "newcombe_paired",
    "wilson",
    "read_records",
    "plan_units",
    "simulator_versions",
    "Unit",
    "EpisodeResult",
    "DUMMY_ACTION",
    "SUITE_MAX_STEPS",
    "SUITES",
    "PolicyUnavailable",
    "RunMismatch",
    "ServerError",
    "WorkerLost",
]
