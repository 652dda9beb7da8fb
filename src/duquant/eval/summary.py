"""The tables of a run: per task and per suite, successes / episodes with a 95% Wilson interval; with two
policies, their paired difference (Newcombe's hybrid score interval, McNemar's exact p). Columns follow the
command line: --policy first, --compare second."""

from __future__ import annotations

from duquant.eval.stats import paired_difference, wilson


def _rate(recs: list[dict]) -> dict:
    n, s = len(recs), sum(bool(r["success"]) for r in recs)
    lo, hi = wilson(s, n)
    return {"episodes": n, "successes": s, "rate": s / n if n else 0.0, "ci95": [lo, hi],
            "errors": sum(1 for r in recs if r.get("error"))}


def summarize(records: list[dict], compare: tuple[str, str] | None = None, order: tuple[str, ...] = ()) -> dict:
    """Per suite, per policy: overall and per-task success rates (Wilson 95% CI); with `compare` = (a, b)
    labels, the paired differences b - a. Policies come in `order` (then `compare`), then as first seen."""
    rank = {label: i for i, label in enumerate(dict.fromkeys((*order, *(compare or ()))))}
    suites: dict = {}
    for r in sorted(records, key=lambda r: rank.get(r["policy"], len(rank))):  # stable: records keep their order
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
                f"95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}] (Newcombe); only {c['a']} succeeded: {c['only_a']}, only "
                f"{c['b']}: {c['only_b']}; McNemar exact p = {c['mcnemar_p']:.3g}",
                "",
            ]
    return "\n".join(lines)


__all__ = ["summarize", "summary_markdown"]
