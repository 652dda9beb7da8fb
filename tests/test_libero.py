"""The LIBERO harness: openpi's loop on a fake simulator (fast), resume and tables, and a smoke test with the
real simulator against the served tiny policy (skipped, with the reason, where the LIBERO stack is absent)."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from duquant.eval import libero as L
from duquant.eval import work


class FakeEnv:
    def __init__(self, success_at=None, fail_at=None):
        self.success_at, self.fail_at = success_at, fail_at
        self.t, self.actions, self.resets = 0, [], 0

    def seed(self, s):
        self.seed_value = s

    def reset(self):
        self.t, self.resets = 0, self.resets + 1

    def set_init_state(self, s):
        self.init = s
        return self._obs()

    def _obs(self):
        img = np.zeros((256, 256, 3), dtype=np.uint8)
        img[0, 0] = self.t % 256  # top-left corner: after the 180 degree rotation it is the bottom-right
        return {
            "agentview_image": img,
            "robot0_eye_in_hand_image": img,
            "robot0_eef_pos": np.array([0.1, 0.2, 0.3]),
            "robot0_eef_quat": np.array([0.0, 0.0, 0.0, 1.0]),
            "robot0_gripper_qpos": np.array([0.04, -0.04]),
        }

    def step(self, action):
        self.t += 1
        self.actions.append(list(action))
        if self.fail_at is not None and self.t >= self.fail_at:
            raise RuntimeError("simulator exploded")
        return self._obs(), 0.0, self.success_at is not None and self.t >= self.success_at, {}

    def close(self):
        pass


class FakePolicy:
    def __init__(self, horizon=10):
        self.calls, self.horizon, self.metadata = [], horizon, {"fake": True}

    def infer(self, element):
        self.calls.append(element)
        return {"actions": np.tile(np.arange(self.horizon, dtype=np.float64)[:, None], (1, 7))}


def test_quat2axisangle_matches_robosuite_formula():
    np.testing.assert_allclose(L.quat2axisangle([0, 0, 0, 1]), np.zeros(3))
    q = np.array([0.0, 0.0, np.sin(np.pi / 4), np.cos(np.pi / 4)])  # 90 degrees about z
    np.testing.assert_allclose(L.quat2axisangle(q), [0, 0, np.pi / 2], atol=1e-12)
    q = np.array([1.0, 0.0, 0.0, 0.0])  # 180 degrees about x (LIBERO's start: state [.., 3.14, ..])
    np.testing.assert_allclose(L.quat2axisangle(q), [np.pi, 0, 0])


def test_libero_element_rotates_resizes_and_builds_state():
    env = FakeEnv()
    env.t = 7
    el = L.libero_element(env._obs(), "do it", 224)
    assert set(el) == {"observation/image", "observation/wrist_image", "observation/state", "prompt"}
    assert el["observation/image"].shape == (224, 224, 3) and el["observation/image"].dtype == np.uint8
    assert el["observation/image"][-1, -1].any() and not el["observation/image"][0, 0].any()  # rotated 180
    np.testing.assert_allclose(el["observation/state"], [0.1, 0.2, 0.3, 0, 0, 0, 0.04, -0.04])


def test_episode_loop_is_openpis():
    cfg = L.EvalConfig(max_steps=23)
    env, pol = FakeEnv(), FakePolicy()
    r = L.run_episode(env, pol, np.zeros(3), "task", cfg)
    assert not r.success and r.error is None
    assert env.actions[:10] == [L.DUMMY_ACTION] * 10  # settle first
    assert r.steps == 23 and r.env_steps == 33 and r.queries == 5  # replan every 5 actions: ceil(23 / 5)
    assert [a[0] for a in env.actions[10:20]] == [0, 1, 2, 3, 4] * 2  # the first 5 actions of each chunk
    assert pol.calls[0]["prompt"] == "task"

    env = FakeEnv(success_at=15)
    r = L.run_episode(env, FakePolicy(), np.zeros(3), "task", cfg)
    assert r.success and r.steps == 5 and r.env_steps == 15

    env = FakeEnv(fail_at=12)  # openpi: an exception ends the episode as a failure
    r = L.run_episode(env, FakePolicy(), np.zeros(3), "task", cfg)
    assert not r.success and "simulator exploded" in r.error

    r = L.run_episode(FakeEnv(), FakePolicy(horizon=3), np.zeros(3), "task", cfg)
    assert "replan every 5" in r.error

    class Gone:
        def infer(self, el):
            raise L.PolicyUnavailable("server gone")

    with pytest.raises(L.PolicyUnavailable):  # not recorded: a rerun retries the episode
        L.run_episode(FakeEnv(), Gone(), np.zeros(3), "task", cfg)


def test_suite_limits_and_units():
    assert L.SUITE_MAX_STEPS == {
        "libero_spatial": 220,
        "libero_object": 280,
        "libero_goal": 300,
        "libero_10": 520,
        "libero_90": 400,
    }
    cfg = L.EvalConfig()
    assert (cfg.trials, cfg.seed, cfg.num_steps_wait, cfg.replan_steps, cfg.resize) == (50, 7, 10, 5, 224)
    units = L.plan_units(L.EvalConfig(trials=4, workers=1), 3, done=set())
    assert [(u.task_id, u.trials) for u in units] == [(0, [0, 1, 2, 3]), (1, [0, 1, 2, 3]), (2, [0, 1, 2, 3])]
    units = L.plan_units(L.EvalConfig(trials=4, workers=4, tasks=(1,)), 3, done=set())
    assert [u.trials for u in units] == [[0], [1], [2], [3]]  # split so 4 workers have work ...
    units = L.plan_units(L.EvalConfig(trials=4, workers=4, tasks=(1,), labels=("float", "q")), 3,
                         done={("float", "libero_spatial", 1, 0)})
    assert [u.trials for u in units] == [[1], [2], [3]]  # ... and finished episodes are skipped
    units = L.plan_units(L.EvalConfig(trials=4, workers=2, tasks=(1,), compare="x", labels=("float", "q")), 3,
                         done=set())
    assert [(u.label, u.trials) for u in units] == [("float", [0, 1, 2, 3]), ("q", [0, 1, 2, 3])]
    with pytest.raises(ValueError, match="tasks 0..2"):
        L.plan_units(L.EvalConfig(tasks=(5,)), 3, set())


def test_statistics():
    lo, hi = L.wilson(0, 1)
    assert lo == 0 and 0.79 < hi < 0.8
    d = L.paired_difference([(True, True)] * 40 + [(True, False)] * 8 + [(False, True)] * 2)
    assert d["pairs"] == 50 and abs(d["diff"] + 0.12) < 1e-12 and d["ci95"][0] < -0.12 < d["ci95"][1]
    assert d["only_a"] == 8 and d["only_b"] == 2 and abs(d["mcnemar_p"] - 0.109375) < 1e-9
    assert d["ci95"][1] > 0  # p = 0.11: the interval must include no difference (the Wald one did not)


@pytest.fixture
def fake_policies(monkeypatch):
    """The stub scene (trial t of task k succeeds when (k + t) % 3 != 0 and the policy moves) with counting
    policies: "f" moves, "q" only ever sends the dummy action, so it never succeeds."""
    policies = {}

    class Still(FakePolicy):
        def infer(self, element):
            self.calls.append(element)
            return {"actions": np.tile(np.array(L.DUMMY_ACTION), (10, 1))}

    def make_policy(spec, timeout=0):
        return policies.setdefault(spec, FakePolicy() if spec == "f" else Still())

    monkeypatch.setattr(work, "make_policy", make_policy)
    return policies


def test_evaluate_records_resumes_and_compares(fake_policies, tmp_path):
    cfg = L.EvalConfig(policy="f", compare="q", labels=("float", "quantized"), trials=4, tasks=(0, 2),
                       out=str(tmp_path / "run"), progress=False, simulator="stub", max_steps=20)
    summary = L.evaluate(cfg)
    recs = L.read_records(tmp_path / "run" / "episodes.jsonl")
    assert len(recs) == 16 and len(fake_policies["f"].calls) > 8 and len(fake_policies["q"].calls) == 8 * 4
    r = recs[0]
    for key in ("suite", "task", "task_id", "trial", "seed", "success", "steps", "queries", "wall_s", "versions",
                "policy"):
        assert key in r
    s = summary["suites"]["libero_spatial"]
    # float: task 0 trials 1, 2 and task 2 trials 0, 2, 3 succeed ((k + t) % 3 != 0); quantized never does
    assert s["policies"]["float"]["successes"] == 5 and s["policies"]["quantized"]["successes"] == 0
    assert s["compare"]["pairs"] == 8 and s["compare"]["diff"] == -5 / 8 and s["compare"]["only_a"] == 5
    assert s["compare"]["ci_method"].startswith("Newcombe")
    md = (tmp_path / "run" / "summary.md").read_text()
    assert "| 0: stub task 0 | 2/4 (50.0%) | 0/4 (0.0%) |" in md and "quantized - float" in md
    assert list(s["policies"]) == ["float", "quantized"]  # columns in command-line order

    # a rerun runs nothing; a cut last line is tolerated; a bigger --trials runs only the new episodes
    calls = len(fake_policies["q"].calls)
    with open(tmp_path / "run" / "episodes.jsonl", "a") as f:
        f.write('{"policy": "float", "suite"')
    L.evaluate(cfg)
    assert len(fake_policies["q"].calls) == calls
    L.evaluate(L.EvalConfig(**{**cfg.__dict__, "trials": 5}))
    assert len(fake_policies["q"].calls) == calls + 2 * 4  # trial 4 of tasks 0 and 2, 4 queries each
    assert len(L.read_records(tmp_path / "run" / "episodes.jsonl")) == 20
    with pytest.raises(L.RunMismatch):
        L.evaluate(L.EvalConfig(**{**cfg.__dict__, "seed": 8}))


def test_compare_columns_follow_the_command_line(tmp_path):
    recs = [{"policy": p, "suite": "libero_spatial", "task_id": 0, "task": "t", "trial": 0, "success": s}
            for p, s in (("quantized", False), ("float", True))]  # the second policy finished first
    summary = L.summarize(recs, ("float", "quantized"), order=("float", "quantized"))
    assert list(summary["suites"]["libero_spatial"]["policies"]) == ["float", "quantized"]
    assert "| task | float | quantized |" in L.summary_markdown(summary)


# ---- the real simulator ------------------------------------------------------------------------------------

def _libero_skip_reason() -> str | None:
    for mod in ("libero", "robosuite", "mujoco"):
        if importlib.util.find_spec(mod) is None:
            return (f"LIBERO stack not installed ({mod} missing): run `bash .ci/install_libero.sh` "
                    "(pip install 'duquant[libero]')")
    probe = ("import mujoco; ctx = mujoco.GLContext(32, 32); ctx.make_current(); ctx.free()")
    env = {**os.environ, "MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl"}
    r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        return ("MuJoCo cannot render with MUJOCO_GL=egl here (Debian: apt-get install libegl1 libegl-mesa0 "
                "libopengl0): " + (r.stderr.strip().splitlines() or ["?"])[-1])
    return None


@pytest.fixture(scope="module")
def libero_ready():
    reason = _libero_skip_reason()
    if reason:
        pytest.skip(reason)


def _eval_cmd(port, out, *extra):
    return [
        sys.executable,
        "-m",
        "duquant.cli",
        "eval",
        "libero",
        "--policy",
        f"ws://127.0.0.1:{port}",
        "--suite",
        "libero_spatial",
        "--tasks",
        "0",
        "--trials",
        "1",
        "--max-steps",
        "20",
        "--out",
        str(out),
        "--no-progress",
        "--connect-timeout",
        "30",
        *extra,
    ]


@pytest.mark.libero
def test_libero_smoke_against_served_tiny_policy(libero_ready, tmp_path):
    from test_serve import ServedPolicy

    env = {**os.environ, "MUJOCO_GL": "egl"}
    server = ServedPolicy("--config", "pi0-tiny", "--noise-seed", "0")
    try:
        start = time.monotonic()
        r = subprocess.run(_eval_cmd(server.port, tmp_path / "run"), env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        recs = [json.loads(x) for x in (tmp_path / "run" / "episodes.jsonl").read_text().splitlines()]
        assert len(recs) == 1
        rec = recs[0]
        assert (rec["suite"], rec["task_id"], rec["trial"], rec["seed"]) == ("libero_spatial", 0, 0, 7)
        assert rec["error"] is None and rec["queries"] >= 4 and rec["env_steps"] == 10 + rec["steps"]
        assert rec["versions"]["robosuite"].startswith("1.4") and "mujoco" in rec["versions"]
        assert rec["server"]["duquant"]["model"] == "pi0-tiny"
        assert "| **all** (95% Wilson CI) |" in r.stdout
        first = time.monotonic() - start

        r2 = subprocess.run(_eval_cmd(server.port, tmp_path / "run"), env=env, capture_output=True, text=True,
                            timeout=600)
        assert r2.returncode == 0, r2.stderr
        assert "0 episode(s) to run, 1 already" in r2.stderr
        assert len((tmp_path / "run" / "episodes.jsonl").read_text().splitlines()) == 1
        print(f"LIBERO smoke: first run {first:.1f} s")

        if importlib.util.find_spec("ray") is not None:  # --runner ray on a local Ray: the same record
            start = time.monotonic()
            r3 = subprocess.run(_eval_cmd(server.port, tmp_path / "ray", "--runner", "ray"),
                                env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True,
                                timeout=600)
            assert r3.returncode == 0, r3.stdout + r3.stderr
            ray_rec = json.loads((tmp_path / "ray" / "episodes.jsonl").read_text())
            same = ("policy", "suite", "task_id", "task", "trial", "seed", "success", "steps", "env_steps",
                    "queries", "max_steps", "error", "versions", "server")
            assert {k: ray_rec[k] for k in same} == {k: rec[k] for k in same}
            print(f"LIBERO smoke: --runner ray {time.monotonic() - start:.1f} s")
    finally:
        server.stop()


@pytest.mark.libero
def test_record_libero_writes_calibration_file(libero_ready, tmp_path):
    from duquant.models import load_observations

    out = tmp_path / "calib.safetensors"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "duquant.cli",
            "record",
            "libero",
            "--suite",
            "libero_spatial",
            "--tasks",
            "0",
            "--trials",
            "2",
            "--out",
            str(out),
            "--no-progress",
            "--config",
            "pi0-tiny",
        ],
        env={**os.environ, "MUJOCO_GL": "egl"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    obs = load_observations(out)
    assert obs.batch_size == 2 and obs.images["base_0_rgb"].shape == (2, 3, 224, 224)
    assert obs.images["base_0_rgb"].min() >= -1 and obs.images["base_0_rgb"].std() > 0.05  # a real scene
    assert not obs.image_masks["right_wrist_0_rgb"].any() and obs.state.shape == (2, 32)
    index = json.loads((tmp_path / "calib.safetensors.json").read_text())
    assert index["count"] == 2 and index["entries"][0]["prompt"].startswith("pick up the black bowl")
