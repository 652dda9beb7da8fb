"""The Ray runner (`--runner ray`, extra `duquant[cluster]`): each unit of work is a Ray task that owns its
simulator (`cpus_per_episode` CPUs) and streams its events back to the driver, which alone writes the run
directory. So the records, summaries and resume rules are the local runner's.

Policies: servers (`ws://...`, several comma-separated) are connected to from each task, spread over the
units. An in-process policy (`local:` / `local+duquant:` / `stub:`) lives in `policy_actors` Ray actors (one
GPU each when the cluster has GPUs) that gather the requests of concurrent episodes arriving within
`batch_window_ms` into one batch; an actor that dies is restarted by Ray and its pending calls retried.

Faults: a task whose worker or node dies (`WorkerCrashedError`, `NodeDiedError`, ...) has its unrecorded
episodes submitted again; the episode that was running is charged one attempt, and after `max_retries` it is
recorded as an error (`duquant.eval.runners.retries`). An exception of the task itself (the policy server is
gone, bad settings) stops the run, as it does locally.

Seeding: each task seeds numpy with the run's seed and builds a fresh env seeded like openpi's, exactly as a
local worker does for its first unit.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os

import numpy as np

try:
    import ray
except ModuleNotFoundError as err:  # the CLI turns this into one line naming the extra
    raise ModuleNotFoundError(f'--runner ray needs Ray: pip install "duquant[cluster]" ({err})',
                              name="ray") from err

from duquant.eval.config import EvalConfig, PolicyUnavailable
from duquant.eval.policies import close_policies, is_in_process, make_policy
from duquant.eval.runners.retries import Retries
from duquant.eval.sim import simulator
from duquant.eval.work import Unit, iter_unit

# Variables a worker must see as the driver does: quantization settings for local+duquant:, the tokenizer,
# the stub's timings, and how MuJoCo renders.
FORWARDED_ENV_PREFIXES = ("OPENPI_DUQUANT_", "DUQUANT_", "MUJOCO_GL", "PYOPENGL_PLATFORM")
ACTOR_RESTARTS = 3


def forwarded_env() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


def _config(cfg_dict: dict) -> EvalConfig:
    return EvalConfig(**{**cfg_dict, "labels": tuple(cfg_dict["labels"]),
                         "tasks": None if cfg_dict["tasks"] is None else tuple(cfg_dict["tasks"])})


class PolicyActor:
    """Holds one in-process policy; requests of concurrent episodes arriving within the window run as one
    batch (one forward pass on the GPU)."""

    def __init__(self, spec: str, connect_timeout: float, window_ms: float, max_batch: int):
        self.policy = make_policy(spec, connect_timeout)
        self.window_s, self.max_batch = window_ms / 1000.0, max_batch
        self.pending: list = []
        self.timer = None
        self.lock = asyncio.Lock()
        self.counts = {"requests": 0, "batches": 0, "max_batch_seen": 0}

    async def metadata(self) -> dict:
        return getattr(self.policy, "metadata", None) or {}

    async def stats(self) -> dict:
        return dict(self.counts)

    async def infer(self, element: dict) -> dict:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.pending.append((element, fut))
        if len(self.pending) >= self.max_batch:
            self._flush()
        elif self.timer is None:
            self.timer = loop.call_later(self.window_s, self._flush)
        return await fut

    def _flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        batch, self.pending = self.pending, []
        if batch:
            self.counts["requests"] += len(batch)
            self.counts["batches"] += 1
            self.counts["max_batch_seen"] = max(self.counts["max_batch_seen"], len(batch))
            asyncio.ensure_future(self._run(batch))

    async def _run(self, batch: list) -> None:
        loop = asyncio.get_running_loop()
        async with self.lock:  # one batch on the device at a time; the next one gathers meanwhile
            try:
                outs = await loop.run_in_executor(None, self.policy.infer_batch, [e for e, _ in batch])
            except Exception:  # noqa: BLE001 - one bad request must not fail the others: run them alone
                outs = []
                for element, _ in batch:
                    try:
                        outs.append(await loop.run_in_executor(None, self.policy.infer, element))
                    except Exception as one:  # noqa: BLE001 - handed to that request's episode
                        outs.append(one)
        for (_, fut), out in zip(batch, outs):
            if isinstance(out, Exception):
                fut.set_exception(out)
            else:
                fut.set_result(out)


class ActorPolicy:
    """The episode's side of a `PolicyActor`."""

    def __init__(self, actor):
        self.actor = actor
        self.metadata = self._call(actor.metadata)

    def _call(self, method, *args):
        try:
            return ray.get(method.remote(*args))
        except ray.exceptions.RayActorError as err:  # restarts exhausted: stop the run, record nothing
            raise PolicyUnavailable(f"the policy actor died and was not restarted: {err}") from err

    def infer(self, element: dict) -> dict:
        return self._call(self.actor.infer, element)


def _unit_task(cfg_dict: dict, unit_dict: dict, actor):
    """A Ray task: one unit of work on its own simulator, streaming `duquant.eval.work` events."""
    cfg = _config(cfg_dict)
    np.random.seed(cfg.seed)
    policies: dict = {}
    if actor is not None:
        policies[unit_dict["label"]] = ActorPolicy(actor)
    try:
        yield from iter_unit(Unit(**unit_dict), cfg, policies, simulator(cfg.simulator).simulator_versions())
    finally:
        close_policies(policies)


class RayRunner:
    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self.started = not ray.is_initialized()
        if self.started:  # else: the caller's ray.init (a test, a notebook) is used as it is
            ray.init(address=cfg.address, log_to_driver=True, include_dashboard=False)
        self.env = forwarded_env()

    def slots(self) -> int:
        if self.cfg.workers:
            return self.cfg.workers
        cpus = ray.cluster_resources().get("CPU", 1.0)
        return max(1, int(cpus // self.cfg.cpus_per_episode))

    def close(self) -> None:
        if self.started:
            ray.shutdown()

    def _options(self) -> dict:
        return {"runtime_env": {"env_vars": self.env}} if self.env else {}

    def _policy_actors(self) -> dict[str, list]:
        gpus = self.cfg.gpus_per_actor
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        # num_cpus=0: an actor must not take the CPU slot a simulator needs (2 policies on a 2-CPU machine
        # would otherwise leave no room for any episode); its GPU is what places it
        actor_cls = ray.remote(PolicyActor).options(
            num_cpus=0, num_gpus=gpus, max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS,
            max_concurrency=1000, **self._options())
        return {label: [actor_cls.remote(spec, self.cfg.connect_timeout, self.cfg.batch_window_ms,
                                         self.cfg.max_batch) for _ in range(self.cfg.policy_actors)]
                for label, spec in self.cfg.policies.items() if is_in_process(spec) or spec.startswith("stub:")}

    def run(self, units: list[Unit], sink) -> None:
        cfg_dict = dataclasses.asdict(self.cfg)
        actors = self._policy_actors()
        task = ray.remote(_unit_task).options(num_cpus=self.cfg.cpus_per_episode, max_retries=0,
                                              **self._options())
        pending: dict = {}  # generator -> {"unit", "index", "running", "text"}
        retries = Retries(self.cfg, sink)

        def submit(unit: Unit, index: int) -> None:
            pool = actors.get(unit.label)
            gen = task.remote(cfg_dict, dataclasses.asdict(unit), pool[index % len(pool)] if pool else None)
            pending[gen] = {"unit": unit, "index": index, "running": None, "text": ""}

        backlog = collections.deque((unit, i) for i, unit in enumerate(units))
        limit = self.slots()  # at most this many simulators at once (--workers, else the cluster's CPUs)
        try:
            while pending or backlog:
                while backlog and len(pending) < limit:
                    submit(*backlog.popleft())
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                if ready:  # then everything else that is ready: one wait per event would cost O(tasks) each
                    ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
                for gen in ready:
                    st = pending[gen]
                    try:
                        kind, payload = ray.get(next(gen))
                    except StopIteration:
                        del pending[gen]
                        continue
                    except ray.exceptions.RayTaskError as err:  # the unit itself raised: stop, as locally
                        cause = getattr(err, "cause", None)
                        if isinstance(cause, PolicyUnavailable) or isinstance(err, PolicyUnavailable):
                            raise PolicyUnavailable(str(cause or err)) from None
                        raise RuntimeError(f"a LIBERO task failed: {cause or err}") from None
                    except ray.exceptions.RayError as err:  # its worker or node died: run the rest again
                        del pending[gen]
                        rest = retries.after_death(st["unit"], st["running"], st["text"], type(err).__name__)
                        if rest is not None:
                            backlog.appendleft((rest, st["index"]))
                        continue
                    if kind == "start":
                        st["running"], st["text"] = tuple(payload["key"]), payload["task"]
                    elif kind == "record":
                        st["running"] = None
                    sink.event(kind, payload)
        finally:
            for gen in pending:
                try:
                    ray.cancel(gen, force=True)
                except Exception:  # noqa: BLE001 - already finished or gone
                    pass
            for pool in actors.values():
                for actor in pool:
                    ray.kill(actor)


__all__ = ["RayRunner", "PolicyActor", "ActorPolicy", "FORWARDED_ENV_PREFIXES"]
