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


def _run(tmp: str, name: str, **kw) -> float:
    cfg = EvalConfig(policy="stub:", simulator="stub", progress=False, out=os.path.join(tmp, name), **kw)
    start = time.monotonic()
    with contextlib.redirect_stderr(io.StringIO()):
        from duquant.eval.libero import evaluate

        evaluate(cfg)
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,4,8", help="simulator counts to measure (default: %(default)s)")
    ap.add_argument("--step-s", type=float, default=0.02, help="seconds per stub step (default: %(default)s)")
    ap.add_argument("--max-steps", type=int, default=50, help="steps per episode after the 10 settling steps")
    ap.add_argument("--episodes-per-worker", type=int, default=4)
    ap.add_argument("--ray-cpus", type=int, default=8)
    ap.add_argument("--runners", default="local,ray")
    args = ap.parse_args(argv)
    workers = [int(x) for x in args.workers.split(",")]
    runners = args.runners.split(",")
    episode_s = (args.max_steps + 10) * args.step_s
    if "ray" in runners:
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    print(f"stub step {args.step_s * 1000:.0f} ms, {args.max_steps + 10} steps per episode "
          f"(ideal {episode_s:.2f} s), {os.cpu_count()} cores\n")
    print("| runner | simulators | episodes | wall s | episodes/s | ideal | efficiency |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    os.environ["DUQUANT_STUB_STEP_S"] = str(args.step_s)
    with tempfile.TemporaryDirectory() as tmp:
        for runner in runners:
            for w in workers:
                n = w * args.episodes_per_worker
                wall = _run(tmp, f"{runner}{w}", runner=runner, workers=w, tasks=tuple(range(w)),
                            trials=args.episodes_per_worker, max_steps=args.max_steps)
                ideal = w / episode_s
                print(f"| {runner} | {w} | {n} | {wall:.1f} | {n / wall:.2f} | {ideal:.2f} | "
                      f"{100 * n / wall / ideal:.0f}% |")
        os.environ["DUQUANT_STUB_STEP_S"] = "0"
        print("\n| runner | episodes (one unit each, 0-s steps) | wall s | overhead per episode ms |")
        print("|---|---:|---:|---:|")
        for runner in runners:
            n = 40
            wall = _run(tmp, f"{runner}-overhead", runner=runner, workers=1, tasks=tuple(range(10)), trials=4,
                        trials_per_unit=1, max_steps=args.max_steps)
            print(f"| {runner}, 1 simulator | {n} | {wall:.1f} | {1000 * wall / n:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
