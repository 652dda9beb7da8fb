"""`duquant record libero`: real LIBERO scenes as calibration / evaluation observations.

For each task and each of its first `--trials` initial states, the simulator is reset to that state and left
to settle for the 10 dummy steps openpi waits, and the observation a policy would get is recorded (openpi's
request: both cameras rotated and resized to 224, eef state, the task's prompt). With `--policy`, the episode
is rolled out by that policy instead and every request it receives is recorded (up to `--queries` per
episode), which covers the states a policy actually visits. The requests are turned into model inputs with the
same transforms the server applies (norm stats, tokenizer, padding of the model given by --config /
--checkpoint) and written in the calibration-file format (`duquant.models.observation.save_observations`),
ready for `duquant quantize --calib`, `duquant report --calib` and `duquant serve --calib`. `--raw FILE.npz`
also keeps the raw requests.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from duquant.eval.config import EvalConfig
from duquant.eval.policies import make_policy
from duquant.eval.sim import DUMMY_ACTION, libero_element, load_suite, make_env, run_episode


def record_requests(cfg: EvalConfig, policy_spec: str | None = None, queries: int = 1, progress: bool = True
                    ) -> list[dict]:
    """openpi LIBERO requests from the real simulator: one per settled initial state, or with a policy, the
    first `queries` requests of each rolled-out episode. Each gets `task_id`, `trial` and `suite` keys
    added."""
    from tqdm.auto import tqdm

    suite = load_suite(cfg.suite)
    task_ids = list(cfg.tasks) if cfg.tasks is not None else list(range(suite.n_tasks))
    policy = make_policy(policy_spec, cfg.connect_timeout) if policy_spec else None
    rollout_cfg = replace(cfg, max_steps=queries * cfg.replan_steps)
    out: list[dict] = []
    bar = tqdm(total=len(task_ids) * cfg.trials, desc=f"record {cfg.suite}", disable=not progress)
    try:
        for task_id in task_ids:
            task = suite.get_task(task_id)
            init_states = suite.get_task_init_states(task_id)
            if cfg.trials > len(init_states):
                raise ValueError(
                    f"task {task_id} has {len(init_states)} initial states; --trials {cfg.trials}"
                )
            env = make_env(task, cfg.resolution, cfg.seed)
            try:
                for trial in range(cfg.trials):
                    tag = {"suite": cfg.suite, "task_id": task_id, "trial": trial}
                    if policy is None:
                        env.reset()
                        obs = env.set_init_state(init_states[trial])
                        for _ in range(cfg.num_steps_wait):
                            obs, _, _, _ = env.step(DUMMY_ACTION)
                        out.append({**libero_element(obs, task.language, cfg.resize), **tag})
                    else:
                        got: list[dict] = []
                        run_episode(env, policy, init_states[trial], task.language, rollout_cfg,
                                    on_query=lambda el, got=got: got.append(el))
                        out += [{**el, **tag, "query": i} for i, el in enumerate(got[:queries])]
                    bar.update(1)
            finally:
                env.close()
    finally:
        bar.close()
        if policy is not None and hasattr(policy, "close"):
            policy.close()
    return out


def save_raw(path: str | Path, requests: list[dict]) -> None:
    """The raw requests as .npz (images uint8, states float64, prompts str), torch-free."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        image=np.stack([r["observation/image"] for r in requests]),
        wrist_image=np.stack([r["observation/wrist_image"] for r in requests]),
        state=np.stack([r["observation/state"] for r in requests]),
        prompt=np.asarray([r["prompt"] for r in requests]),
        task_id=np.asarray([r["task_id"] for r in requests]),
        trial=np.asarray([r["trial"] for r in requests]),
    )


def to_observations(requests: list[dict], spec) -> object:
    """Requests -> one stacked model Observation, through the server's transforms for `spec` (a
    PolicySpec)."""
    from duquant.serve.policy import build_preprocessor, spec_config

    cfg, info = spec_config(spec)
    pre = build_preprocessor(spec, cfg, info)
    keys = ("observation/image", "observation/wrist_image", "observation/state", "prompt")
    prepared = [pre.prepare({k: r[k] for k in keys}) for r in requests]
    return pre.to_observation(prepared)


def record_libero(cfg: EvalConfig, out: str, spec, policy_spec: str | None = None, queries: int = 1,
                  raw: str | None = None) -> dict:
    from duquant.models.observation import save_observations

    requests = record_requests(cfg, policy_spec, queries, progress=cfg.progress)
    if not requests:
        raise RuntimeError("nothing was recorded (no tasks or trials selected)")
    if raw:
        save_raw(raw, requests)
    obs = to_observations(requests, spec)
    save_observations(out, obs)
    index = {"file": str(out), "suite": cfg.suite, "count": len(requests), "seed": cfg.seed,
             "policy": policy_spec, "model": spec.checkpoint or spec.config or "pi0-tiny",
             "entries": [{"task_id": r["task_id"], "trial": r["trial"], "prompt": r["prompt"],
                          **({"query": r["query"]} if "query" in r else {})} for r in requests]}
    Path(str(out) + ".json").write_text(json.dumps(index, indent=2))
    print(f"[duquant record] wrote {len(requests)} observations of {cfg.suite} to {out} (index: {out}.json)",
          file=sys.stderr)
    return index


__all__ = ["record_requests", "record_libero", "to_observations", "save_raw"]
