"""The local runner's fault handling and the CLI's interrupt/resume, on the stub simulator (no LIBERO, no
policy server): a worker killed mid-episode is retried and recorded once; a worker that always dies is
recorded as an error after its retries; Ctrl-C prints one line and the rerun does only the rest."""

import collections
import json
import os
import signal
import subprocess
import sys
import time

from duquant.eval import libero as L

KEY_FIELDS = ("policy", "suite", "task_id", "task", "trial", "seed", "success", "steps", "env_steps", "queries",
              "max_steps", "error")


def _stub_cfg(tmp_path, **kw):
    base = dict(policy="stub:", simulator="stub", tasks=(0, 1), trials=3, max_steps=10, progress=False,
                out=str(tmp_path / "run"), labels=("policy", "quantized"))
    return L.EvalConfig(**{**base, **kw})


def _keys(records):
    return [(r["policy"], r["suite"], r["task_id"], r["trial"]) for r in records]


def test_killed_worker_is_replaced_and_its_episode_recorded_once(tmp_path, monkeypatch):
    marker = tmp_path / "crashed"
    monkeypatch.setenv("DUQUANT_STUB_CRASH", f"0,1,12,{marker}")  # task 0, trial 1, env step 12: mid-episode
    L.evaluate(_stub_cfg(tmp_path, workers=2, trials_per_unit=2))
    recs = L.read_records(tmp_path / "run" / "episodes.jsonl")
    assert marker.exists()  # the worker really died
    assert sorted(_keys(recs)) == [("policy", "libero_spatial", t, i) for t in (0, 1) for i in range(3)]
    assert all(r["error"] is None for r in recs)
    # the stub's rule: trial t of task k succeeds when (k + t) % 3 != 0
    assert {(r["task_id"], r["trial"]): r["success"] for r in recs} == {
        (k, t): (k + t) % 3 != 0 for k in (0, 1) for t in range(3)}


def test_worker_dying_on_every_attempt_is_recorded_as_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DUQUANT_STUB_CRASH", "1,0,12")  # no marker: every attempt dies
    L.evaluate(_stub_cfg(tmp_path, workers=2, trials=2, max_retries=1))
    recs = L.read_records(tmp_path / "run" / "episodes.jsonl")
    assert len(recs) == 4 and len(set(_keys(recs))) == 4
    lost = [r for r in recs if r["error"]]
    assert [(r["task_id"], r["trial"]) for r in lost] == [(1, 0)]
    assert "WorkerLost" in lost[0]["error"] and "2 attempts" in lost[0]["error"] and not lost[0]["success"]


def test_ctrl_c_prints_one_line_and_the_rerun_does_only_the_rest(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "duquant.cli", "eval", "libero", "--simulator", "stub", "--policy", "stub:",
           "--tasks", "0,1", "--trials", "3", "--max-steps", "10", "--out", str(out), "--no-progress"]
    env = {**os.environ, "DUQUANT_STUB_STEP_S": "0.05"}  # 20 steps: about 1 s per episode
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "episodes.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "interrupted" in last and "rerun the same command to resume" in last
    k = len(L.read_records(log))
    assert 2 <= k < 6

    r = subprocess.run(cmd, env={**os.environ}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{6 - k} episode(s) to run, {k} already" in r.stderr
    recs = L.read_records(log)
    assert len(recs) == 6 and max(collections.Counter(_keys(recs)).values()) == 1
    assert json.loads((out / "summary.json").read_text())["suites"]["libero_spatial"]["policies"]["policy"][
        "episodes"] == 6


def test_progress_line_counts_steps_running_retried_failed_and_rates():
    from duquant.eval.progress import Progress

    p = Progress(total=3, desc="t", enabled=False)
    key = ("float", "libero_spatial", 0, 0)
    p.started(key)
    p.stepped(40)
    p.started(("float", "libero_spatial", 0, 1))
    p.retry(("float", "libero_spatial", 0, 1))
    p.recorded({"policy": "float", "suite": "libero_spatial", "task_id": 0, "trial": 0, "success": True,
                "error": None})
    p.recorded({"policy": "float", "suite": "libero_spatial", "task_id": 0, "trial": 1, "success": False,
                "error": "WorkerLost: ..."})
    assert p.line() == "steps 40  running 0  retried 1  failed 1  float 1/2 (50%)"
    p.close()


def test_runner_ray_without_ray_is_one_line_naming_the_extra(tmp_path):
    code = ("import sys; sys.modules['ray'] = None\n"  # as if Ray were not installed
            "from duquant.cli import main\n"
            f"sys.exit(main(['eval', 'libero', '--simulator', 'stub', '--policy', 'stub:', '--runner', 'ray', "
            f"'--out', {str(tmp_path / 'run')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cluster extra" in lines[0] and 'pip install "duquant[cluster]"' in lines[0], lines
    assert not (tmp_path / "run").exists()  # refused before the run directory is touched
