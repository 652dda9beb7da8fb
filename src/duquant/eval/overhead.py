"""Measure the evaluation harness itself: `python -m duquant.eval.overhead [--workers 1,2,4,8] [--step-s 0.02]`.

Runs `duquant eval libero` on the stub simulator (`duquant.eval.stub`: a step sleeps `--step-s`, as a
rendered LIBERO step takes ~0.5 s on a CPU) and the stub policy, and prints a Markdown table:
- throughput against the number of simulators, local processes and Ray tasks, with the efficiency against
  the ideal `workers / (steps per episode x step time)`;
- the per-episode overhead (an episode of zero-time steps, one unit per episode: scheduling, a fresh env,
  records), which is what the harness adds to every episode however fast the simulator is.
Ray starts locally with `--ray-cpus` CPUs declared (sleeping steps need no core, so a small machine can
schedule more simulators than it has cores; the harness's own work then competes for the cores).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time

from duquant.eval.config import EvalConfig


def _run(tmp: str, name: str, **kw) -> tuple[float, int, int]:
    """(wall seconds, episodes, env steps) of one stub evaluation."""
    from duquant.eval.libero import evaluate, read_records

    cfg = EvalConfig(policy="stub:", simulator="stub", progress=False, out=os.path.join(tmp, name), **kw)
    start = time.monotonic()
    with contextlib.redirect_stderr(io.StringIO()):
        evaluate(cfg)
    wall = time.monotonic() - start
    recs = read_records(os.path.join(cfg.out, "episodes.jsonl"))
    return wall, len(recs), sum(r["env_steps"] for r in recs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,4,8", help="simulator counts to measure (default: %(default)s)")
    ap.add_argument("--step-s", type=float, default=0.02, help="seconds per stub step (default: %(default)s)")
    ap.add_argument("--max-steps", type=int, default=100, help="steps per episode after the 10 settling steps")
    ap.add_argument("--episodes-per-worker", type=int, default=3)
    ap.add_argument("--ray-cpus", type=int, default=8)
    ap.add_argument("--runners", default="local,ray")
    args = ap.parse_args(argv)
    workers = [int(x) for x in args.workers.split(",")]
    runners = args.runners.split(",")
    if "ray" in runners:
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    os.environ["DUQUANT_STUB_SUCCESS"] = "0"  # every episode runs to its limit: a known amount of simulation
    print(f"stub step {args.step_s * 1000:.0f} ms, {args.max_steps + 10} steps per episode, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}\n")
    print("| runner | simulators | episodes | env steps | wall s | episodes/s | efficiency |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:

        def warm_up() -> None:  # Ray starts worker processes per runtime env on first use: not a run's cost
            if "ray" in runners:
                _run(tmp, f"warmup{time.monotonic()}", runner="ray", workers=max(workers),
                     tasks=tuple(range(max(workers))), trials=1, max_steps=1)

        os.environ["DUQUANT_STUB_STEP_S"] = str(args.step_s)
        warm_up()
        for runner in runners:
            for w in workers:
                wall, n, steps = _run(tmp, f"{runner}{w}", runner=runner, workers=w, tasks=tuple(range(w)),
                                      trials=args.episodes_per_worker, max_steps=args.max_steps)
                # efficiency: the simulator's own time (steps x step time) over the simulators' wall time
                print(f"| {runner} | {w} | {n} | {steps} | {wall:.1f} | {n / wall:.2f} | "
                      f"{100 * steps * args.step_s / (wall * w):.0f}% |")
        os.environ["DUQUANT_STUB_STEP_S"] = "0"
        warm_up()
        print("\nZero-time steps, 1 simulator, one unit (a fresh env) per episode, 40 episodes: the harness alone")
        print("\n| runner | per episode, 0 policy steps (ms) | per policy step (ms) |")
        print("|---|---:|---:|")
        for runner in runners:
            kw = dict(runner=runner, workers=1, tasks=tuple(range(10)), trials=4, trials_per_unit=1)
            wall0, n, steps0 = _run(tmp, f"{runner}-fixed", max_steps=0, **kw)
            wall1, _, steps1 = _run(tmp, f"{runner}-steps", max_steps=args.max_steps, **kw)
            print(f"| {runner} | {1000 * wall0 / n:.0f} | {1000 * (wall1 - wall0) / (steps1 - steps0):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
