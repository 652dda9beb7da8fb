"""`duquant eval libero` and `duquant record libero` (client side: no torch unless a `local:` policy is
used)."""

from __future__ import annotations

import os
import sys

# Only the standard library at start-up: the harness needs the serve extra (and ray the cluster extra),
# imported when a command runs; a missing one becomes a one-line message naming the extra (duquant.cli).
from duquant.eval.config import RUNNER_NAMES, SIMULATORS
from duquant.eval.suites import SUITES


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.replace(" ", "").split(",") if x)


def _add_sim_args(p, trials_default: int) -> None:
    p.add_argument("--suite", choices=SUITES, default="libero_spatial", help="(default: %(default)s)")
    p.add_argument(
        "--tasks", type=_int_list, help="task ids, comma-separated (default: every task of the suite)"
    )
    p.add_argument("--trials", type=int, default=trials_default,
                   help="initial states per task (default: %(default)s)")
    p.add_argument("--seed", type=int, default=7, help="env seed (openpi: 7)")
    p.add_argument(
        "--num-steps-wait", type=int, default=10, help="dummy steps while objects settle (openpi: 10)"
    )
    p.add_argument("--replan-steps", type=int, default=5, help="actions executed per policy call (openpi: 5)")
    p.add_argument("--resize", type=int, default=224, help="image size sent to the policy (openpi: 224)")
    p.add_argument(
        "--connect-timeout", type=float, default=300.0,
        help="seconds to wait for the policy server (default: %(default)s)"
    )
    p.add_argument("--no-progress", action="store_true")


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a policy in a simulator (LIBERO)")
    sub = p.add_subparsers(dest="eval_target", required=True)
    e = sub.add_parser(
        "libero",
        help="openpi's LIBERO loop against an openpi-compatible server or in-process",
        description="openpi's LIBERO loop (see docs/serving.md) on this machine or a Ray cluster "
        "(docs/cluster.md); resumable, one JSONL record per episode.",
    )
    _add_sim_args(e, trials_default=50)
    e.add_argument(
        "--policy",
        default="ws://localhost:8000",
        help="ws://HOST:PORT (any openpi-compatible server; several comma-separated share the episodes), "
        "local:CONFIG_OR_DIR (in-process float), local+duquant:CONFIG_OR_DIR (in-process, quantized by "
        "OPENPI_DUQUANT_*) or stub: (for --simulator stub) (default: %(default)s)",
    )
    e.add_argument(
        "--compare",
        help="a second policy (same forms) run on the same init states and seeds; the "
        "summary reports its success-rate difference with a 95%% CI",
    )
    e.add_argument(
        "--label", help="name of --policy in the records (default: 'policy', or 'float' with --compare)"
    )
    e.add_argument("--compare-label", default="quantized",
                   help="name of --compare in the records (default: %(default)s)")
    e.add_argument(
        "--max-steps",
        type=int,
        help="steps per episode after the wait (default: openpi's per suite "
        "limit: spatial 220, object 280, goal 300, 10 520, 90 400)",
    )
    e.add_argument("--workers", type=int,
                   help="simulators at once (default: 1 with --runner local, every CPU slot of the cluster "
                   "with --runner ray)")
    e.add_argument("--trials-per-unit", type=int,
                   help="trials per env instance (default: a whole task, split only when workers > tasks)")
    e.add_argument("--out", help="run directory (default runs/libero/<suite>); a rerun resumes it")
    e.add_argument("--videos", action="store_true", help="write an mp4 per episode under <out>/videos")
    e.add_argument("--simulator", choices=SIMULATORS, default="libero",
                   help="stub: a fake scene sleeping DUQUANT_STUB_STEP_S per step, to measure the harness "
                   "(default: %(default)s)")
    c = e.add_argument_group("where the episodes run (docs/cluster.md)")
    c.add_argument("--runner", choices=RUNNER_NAMES, default="local",
                   help="local: this machine; ray: a Ray cluster, needs duquant[cluster] (default: %(default)s)")
    c.add_argument("--address",
                   help="ray: the cluster to join: auto, HOST:PORT or ray://HOST:10001 (default: RAY_ADDRESS, "
                   "else a Ray started for this run on this machine)")
    c.add_argument("--max-retries", type=int, default=2,
                   help="reruns of an episode whose worker died before it is recorded as an error "
                   "(default: %(default)s)")
    c.add_argument("--cpus-per-episode", type=float, default=1.0,
                   help="ray: CPUs each simulator reserves (default: %(default)s)")
    c.add_argument("--policy-actors", type=int, default=1,
                   help="ray: actors holding an in-process policy, one GPU each when the cluster has "
                   "GPUs (default: %(default)s)")
    c.add_argument("--gpus-per-actor", type=float,
                   help="ray: GPUs per policy actor (default: 1 if the cluster has GPUs, else 0)")
    c.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="ray: a policy actor batches requests arriving within this window (default: %(default)s)")
    c.add_argument("--max-batch", type=int, default=8, help="ray: largest such batch (default: %(default)s)")
    e.set_defaults(func=cmd_eval_libero)

    r = subparsers.add_parser("record", help="record real simulator observations for calibration (LIBERO)")
    rsub = r.add_subparsers(dest="record_target", required=True)
    rl = rsub.add_parser(
        "libero",
        help="settled initial states (or a policy's requests) of LIBERO tasks, written "
        "in the calibration-file format",
        description="settled initial states (or a policy's requests) of LIBERO tasks, in the calibration-file "
        "format.",
    )
    _add_sim_args(rl, trials_default=5)
    rl.add_argument("--out", required=True, help="observation file to write (.safetensors or .npz)")
    rl.add_argument("--raw", help="also keep the raw requests (uint8 images, state, prompt) as .npz")
    rl.add_argument(
        "--policy",
        help="roll episodes out with this policy (ws://... or local:...) and record its "
        "requests instead of the settled initial states",
    )
    rl.add_argument("--queries", type=int, default=4,
                    help="requests recorded per episode with --policy (default: %(default)s)")
    m = rl.add_argument_group("model whose inputs are written (norm stats, tokenizer, action dim)")
    m.add_argument("--config", default=None, help="built-in config (default pi0-tiny)")
    m.add_argument("--checkpoint", help="openpi or LeRobot checkpoint directory")
    m.add_argument("--norm-stats", help="norm_stats.json (default: from the checkpoint)")
    m.add_argument("--asset-id")
    m.add_argument("--norm", choices=("auto", "zscore", "quantile", "none"), default="auto")
    m.add_argument("--tokenizer", help="paligemma_tokenizer.model ('fallback' for tiny models)")
    rl.set_defaults(func=cmd_record_libero)


def _eval_config(args, **extra):
    from duquant.eval.config import EvalConfig

    return EvalConfig(suite=args.suite, trials=args.trials, tasks=args.tasks, seed=args.seed,
                      num_steps_wait=args.num_steps_wait, replan_steps=args.replan_steps, resize=args.resize,
                      connect_timeout=args.connect_timeout, progress=not args.no_progress, **extra)


def _interrupted(out: str) -> None:
    """Ctrl-C: one line, then leave without the interpreter's teardown (the simulator's EGL contexts print
    errors from their destructors). Every finished episode is already fsynced."""
    from duquant.eval.records import read_records

    n = len(read_records(os.path.join(out, "episodes.jsonl")))
    print(f"\nduquant eval: interrupted; {n} episode(s) recorded in {out}/episodes.jsonl; rerun the same "
          "command to resume", file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(130)


def cmd_eval_libero(args) -> int:
    from duquant.eval.config import PolicyUnavailable, RunMismatch

    label = args.label or ("float" if args.compare else "policy")
    cfg = _eval_config(args, policy=args.policy, compare=args.compare, labels=(label, args.compare_label),
                       max_steps=args.max_steps, workers=args.workers, trials_per_unit=args.trials_per_unit,
                       out=args.out or f"runs/libero/{args.suite}", videos=args.videos, simulator=args.simulator,
                       runner=args.runner, address=args.address, max_retries=args.max_retries,
                       cpus_per_episode=args.cpus_per_episode, policy_actors=args.policy_actors,
                       gpus_per_actor=args.gpus_per_actor, batch_window_ms=args.batch_window_ms,
                       max_batch=args.max_batch)
    try:
        from duquant.eval.libero import evaluate, summary_markdown

        summary = evaluate(cfg)
    except KeyboardInterrupt:
        _interrupted(cfg.out)
    except PolicyUnavailable as err:
        print(f"duquant eval: {err}\nfinished episodes are kept in {cfg.out}/episodes.jsonl; rerun to resume",
              file=sys.stderr)
        return 3
    except RunMismatch as err:
        print(f"duquant eval: {err}", file=sys.stderr)
        return 2
    print(summary_markdown(summary))
    print(f"records: {cfg.out}/episodes.jsonl; tables: {cfg.out}/summary.md, {cfg.out}/summary.json")
    return 0


def cmd_record_libero(args) -> int:
    from duquant.eval.record import record_libero
    from duquant.serve.policy import PolicySpec

    cfg = _eval_config(args)
    spec = PolicySpec(config=args.config, checkpoint=args.checkpoint, norm_stats=args.norm_stats,
                      asset_id=args.asset_id, norm=args.norm, tokenizer=args.tokenizer)
    record_libero(cfg, args.out, spec, policy_spec=args.policy, queries=args.queries, raw=args.raw)
    return 0
