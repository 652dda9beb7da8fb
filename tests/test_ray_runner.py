"""`--runner ray` on a local Ray instance (`ray.init(num_cpus=2)`), with the stub simulator: the same records
as the local runner, a worker killed mid-episode retried and recorded once, retries bounded, a policy actor
batching concurrent episodes. The real-LIBERO comparison of the two runners is in test_libero.py."""

import collections
import os

import pytest

from duquant.eval import libero as L

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'duquant[cluster]')")

COMPARED = ("policy", "suite", "task_id", "task", "trial", "seed", "success", "steps", "env_steps", "queries",
            "max_steps", "error")


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local instance: no token file
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _cfg(tmp_path, name, **kw):
    base = dict(policy="stub:", compare="stub:", labels=("float", "quantized"), simulator="stub", tasks=(0, 1),
                trials=3, max_steps=10, progress=False, out=str(tmp_path / name))
    return L.EvalConfig(**{**base, **kw})


def _table(out):
    recs = L.read_records(os.path.join(out, "episodes.jsonl"))
    keys = collections.Counter((r["policy"], r["task_id"], r["trial"]) for r in recs)
    assert max(keys.values()) == 1, keys  # every episode exactly once
    return sorted(tuple(r[k] for k in COMPARED) for r in recs)


def test_ray_runner_gives_the_local_runners_records(local_ray, tmp_path):
    local = _cfg(tmp_path, "local", workers=1)
    remote = _cfg(tmp_path, "ray", runner="ray", workers=2)
    s_local, s_ray = L.evaluate(local), L.evaluate(remote)
    assert len(_table(local.out)) == 12 and _table(local.out) == _table(remote.out)
    assert s_local == s_ray  # same summaries, CIs included
    server = L.read_records(os.path.join(remote.out, "episodes.jsonl"))[0]["server"]
    assert server == {"stub": True}  # the in-process policy answered from its actor


def test_ray_worker_killed_mid_episode_is_retried_and_recorded_once(local_ray, tmp_path, monkeypatch):
    marker = tmp_path / "crashed"
    # forwarded to the Ray workers (DUQUANT_* variables travel in the runtime env)
    monkeypatch.setenv("DUQUANT_STUB_CRASH", f"1,2,13,{marker}")
    cfg = _cfg(tmp_path, "run", compare=None, labels=("policy", "quantized"), runner="ray", workers=2)
    L.evaluate(cfg)
    assert marker.exists()  # the worker really died mid-episode
    table = _table(cfg.out)
    assert len(table) == 6 and all(row[-1] is None for row in table)
    assert {(row[2], row[4]): row[6] for row in table} == {(k, t): (k + t) % 3 != 0 for k in (0, 1) for t in
                                                           range(3)}


def test_ray_retries_are_bounded_then_recorded_as_error(local_ray, tmp_path, monkeypatch):
    monkeypatch.setenv("DUQUANT_STUB_CRASH", "0,1,12")  # every attempt dies
    cfg = _cfg(tmp_path, "run", compare=None, labels=("policy", "quantized"), runner="ray", workers=2,
               trials=2, max_retries=1)
    L.evaluate(cfg)
    recs = L.read_records(os.path.join(cfg.out, "episodes.jsonl"))
    assert len(recs) == 4
    lost = [r for r in recs if r["error"]]
    assert [(r["task_id"], r["trial"]) for r in lost] == [(0, 1)] and "2 attempts" in lost[0]["error"]
    # a rerun does not retry what is recorded
    assert "0 episode(s) to run" in _rerun(cfg)


def _rerun(cfg):
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        L.evaluate(cfg)
    return err.getvalue()


def test_policy_actor_batches_concurrent_requests(local_ray):
    from duquant.eval.runners.ray import PolicyActor

    actor = ray.remote(PolicyActor).options(max_concurrency=100).remote("stub:", 10.0, 200.0, 4)
    refs = [actor.infer.remote({"i": i}) for i in range(4)]
    outs = ray.get(refs, timeout=60)
    assert all(o["actions"].shape == (10, 7) for o in outs)
    assert ray.get(actor.metadata.remote()) == {"stub": True}
    stats = ray.get(actor.stats.remote())
    assert stats["requests"] == 4 and stats["max_batch_seen"] > 1  # gathered within the 200 ms window
    ray.kill(actor)
