"""A stand-in for LIBERO and for a policy, to measure the harness itself (scheduling, records, transport) and
to test its fault handling without the simulator: `duquant eval libero --simulator stub --policy stub:`.

The scene has 10 tasks of 50 initial states in every suite and renders blank 256x256 cameras. A step sleeps
`DUQUANT_STUB_STEP_S` seconds (default 0), a policy call `DUQUANT_STUB_INFER_S` (default 0). Trial `t` of
task `k` succeeds after `3 + t % 4` actions when `(k + t) % 3 != 0` and otherwise runs to the step limit, so
every runner must produce the same records; `DUQUANT_STUB_SUCCESS=0` makes every episode run to its limit.
`DUQUANT_STUB_CRASH=TASK,TRIAL,STEP[,MARKER]` kills the process (SIGKILL) at that env step of that episode,
once if a MARKER file path is given (it is created first), else every time: a worker dying mid-episode.
"""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

import numpy as np

N_TASKS = 10
N_INIT_STATES = 50


def _float_env(name: str) -> float:
    value = os.environ.get(name, "0") or "0"
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number of seconds") from None


class StubSuite:
    n_tasks = N_TASKS

    def get_task(self, i: int):
        return SimpleNamespace(task_id=i, language=f"stub task {i}", problem_folder="stub", bddl_file="stub")

    def get_task_init_states(self, i: int):
        return np.arange(float(N_INIT_STATES))[:, None]  # the init state is the trial index


class StubEnv:
    def __init__(self, task, resolution: int):
        self.task_id = task.task_id
        self.step_s = _float_env("DUQUANT_STUB_STEP_S")
        self.crash = os.environ.get("DUQUANT_STUB_CRASH")
        self.can_succeed = os.environ.get("DUQUANT_STUB_SUCCESS", "1") != "0"
        self.image = np.zeros((resolution, resolution, 3), dtype=np.uint8)
        self.t = self.trial = self.actions = 0

    def seed(self, seed: int) -> None:
        pass

    def reset(self) -> None:
        self.t = self.actions = 0

    def set_init_state(self, state):
        self.trial = int(np.asarray(state).ravel()[0])
        return self._obs()

    def _obs(self) -> dict:
        return {"agentview_image": self.image, "robot0_eye_in_hand_image": self.image,
                "robot0_eef_pos": np.zeros(3), "robot0_eef_quat": np.array([0.0, 0.0, 0.0, 1.0]),
                "robot0_gripper_qpos": np.zeros(2)}

    def _maybe_crash(self) -> None:
        parts = self.crash.split(",")
        task, trial, step = (int(x) for x in parts[:3])
        if (task, trial, step) != (self.task_id, self.trial, self.t):
            return
        if len(parts) > 3:
            if os.path.exists(parts[3]):
                return
            open(parts[3], "w").close()
        os.kill(os.getpid(), signal.SIGKILL)

    def step(self, action):
        if self.step_s:
            time.sleep(self.step_s)
        self.t += 1
        if self.crash:
            self._maybe_crash()
        if list(action) != [0.0] * 6 + [-1.0]:  # not the settling steps' dummy action (StubPolicy opens)
            self.actions += 1
        wins = self.can_succeed and (self.task_id + self.trial) % 3 != 0
        return self._obs(), 0.0, wins and self.actions >= 3 + self.trial % 4, {}

    def close(self) -> None:
        pass


class StubPolicy:
    metadata = {"stub": True}

    def __init__(self):
        self.infer_s = _float_env("DUQUANT_STUB_INFER_S")

    def infer(self, element: dict) -> dict:
        return self.infer_batch([element])[0]

    def infer_batch(self, batch: list[dict]) -> list[dict]:
        if self.infer_s:
            time.sleep(self.infer_s)
        actions = np.zeros((10, 7))
        actions[:, 6] = 1.0
        return [{"actions": actions} for _ in batch]

    def close(self) -> None:
        pass


def load_suite(name: str) -> StubSuite:
    return StubSuite()


def make_env(task, resolution: int = 256, seed: int = 7) -> StubEnv:
    return StubEnv(task, resolution)


def simulator_versions() -> dict:
    return {"simulator": "stub"}
