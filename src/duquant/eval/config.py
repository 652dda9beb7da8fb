"""What an evaluation run is: the suite, the policies, openpi's loop parameters and where the episodes run.
Imports nothing beyond the standard library, so the CLI can build its parser without the optional extras."""

from __future__ import annotations

from dataclasses import dataclass

from duquant.eval.suites import SUITE_MAX_STEPS, SUITES

ENV_RESOLUTION = 256  # resolution the training data was rendered at
SIMULATORS = ("libero", "stub")  # stub: a fake scene that sleeps like a simulator step (measuring the harness)
RUNNER_NAMES = ("local", "ray")  # the implementations live in duquant.eval.runners


class PolicyUnavailable(RuntimeError):
    """The policy could not be reached (connection refused or lost): the run stops, the episode is not
    recorded."""


class RunMismatch(ValueError):
    """The output directory holds a run with other settings."""


class ServerError(RuntimeError):
    """The server answered a request with an error (openpi: a traceback text frame, then close 1011)."""


class WorkerLost(RuntimeError):
    """A simulator worker died in the middle of a unit of work (the local runner stops; a rerun resumes)."""


@dataclass
class EvalConfig:
    suite: str = "libero_spatial"
    policy: str = "ws://localhost:8000"  # several servers: comma-separated, spread over the units of work
    compare: str | None = None
    labels: tuple[str, str] = ("float", "quantized")  # names of `policy` and `compare` in the records
    trials: int = 50
    tasks: tuple[int, ...] | None = None  # None: every task of the suite
    seed: int = 7
    num_steps_wait: int = 10
    replan_steps: int = 5
    max_steps: int | None = None  # None: the suite's limit
    resize: int = 224
    resolution: int = ENV_RESOLUTION
    workers: int | None = None  # None: 1 process locally, every CPU slot of the cluster with ray
    trials_per_unit: int | None = None  # None: a whole task per unit unless workers > tasks
    out: str = "runs/libero"
    videos: bool = False
    connect_timeout: float = 300.0
    progress: bool = True
    simulator: str = "libero"
    # where the episodes run (duquant.eval.runners)
    runner: str = "local"
    address: str | None = None  # ray: "auto", "HOST:PORT" or "ray://HOST:10001"; None starts a local Ray
    max_retries: int = 2  # ray: reruns of an episode whose worker died; then it is recorded as an error
    cpus_per_episode: float = 1.0  # ray: CPUs a simulator task reserves
    policy_actors: int = 1  # ray, local:/local+duquant: policies: GPU actors holding the model
    gpus_per_actor: float | None = None  # ray: None = 1 when the cluster has GPUs, else 0
    batch_window_ms: float = 5.0  # ray policy actor: requests arriving within this window run as one batch
    max_batch: int = 8

    def __post_init__(self) -> None:
        if self.suite not in SUITE_MAX_STEPS:
            raise ValueError(f"unknown suite {self.suite!r}; choose one of {list(SUITES)}")
        if self.trials < 1 or self.replan_steps < 1 or self.num_steps_wait < 0:
            raise ValueError("trials and replan_steps must be >= 1, num_steps_wait >= 0")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be >= 1 (got {self.workers})")
        if self.compare is not None and self.labels[0] == self.labels[1]:
            raise ValueError("the two policies need different labels")
        if self.simulator not in SIMULATORS:
            raise ValueError(f"unknown simulator {self.simulator!r}; choose one of {list(SIMULATORS)}")
        if self.runner not in RUNNER_NAMES:
            raise ValueError(f"unknown runner {self.runner!r}; choose one of {list(RUNNER_NAMES)}")
        if self.max_retries < 0 or self.policy_actors < 1 or self.max_batch < 1:
            raise ValueError("max_retries must be >= 0, policy_actors and max_batch >= 1")

    @property
    def episode_steps(self) -> int:
        return self.max_steps if self.max_steps is not None else SUITE_MAX_STEPS[self.suite]

    @property
    def policies(self) -> dict[str, str]:
        """label -> policy spec, in command-line order."""
        return {self.labels[0]: self.policy, **({self.labels[1]: self.compare} if self.compare else {})}

    def settings(self) -> dict:
        """What decides an episode's outcome besides the policy: a resumed run must use the same. (Where the
        episodes run does not: local and ray runs of the same settings share one directory.)"""
        out = {"seed": self.seed, "num_steps_wait": self.num_steps_wait, "replan_steps": self.replan_steps,
               "max_steps": self.max_steps, "resize": self.resize, "resolution": self.resolution}
        if self.simulator != "libero":  # absent for LIBERO, so run.json files of earlier versions still match
            out["simulator"] = self.simulator
        return out
