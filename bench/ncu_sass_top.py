"""Aggregate an Nsight Compute source page (``ncu -i REP --page source --csv --print-source sass``) into the SASS
instructions with the most warp-stall samples, and the stall reasons behind them: where a latency-bound kernel
waits, instruction by instruction.

    ncu --set full -k regex:_shuffle_act -c 1 -s 2 -o rep python3 bench/act_ncu.py --kernel fold --permute shuffle
    ncu -i rep.ncu-rep --page source --csv --print-source sass > src.csv
    python3 bench/ncu_sass_top.py src.csv [--top 40]
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv")
    p.add_argument("--top", type=int, default=40)
    a = p.parse_args()
    with open(a.csv, newline="") as f:
        rows = [r for r in csv.reader(f)]
    head_i = next(i for i, r in enumerate(rows) if any("Source" == c.strip() for c in r))
    head = [c.strip() for c in rows[head_i]]
    body = [dict(zip(head, r)) for r in rows[head_i + 1:] if len(r) == len(head)]
    for i, r in enumerate(body):  # the SASS line number, printed with each instruction
        r["#"] = i
    samp_col = next((c for c in head if c.startswith("Warp Stall Sampling (All")), None)
    if samp_col is None:
        print("columns:", head, file=sys.stderr)
        return 2

    def num(v):
        try:
            return float(str(v).replace(",", ""))
        except ValueError:
            return 0.0

    total = sum(num(r[samp_col]) for r in body) or 1.0
    print(f"{len(body)} SASS lines, {total:.0f} stall samples ({samp_col})")
    reasons = [c for c in head if c.startswith("stall_") or c.startswith("Stall")]
    by_op: Counter = Counter()
    for r in body:
        op = r.get("Source", "").split()[0:1]
        by_op[op[0].split(".")[0] if op else "?"] += num(r[samp_col])
    print("by opcode:", ", ".join(f"{k} {v / total:.1%}" for k, v in by_op.most_common(15)))
    top = sorted(body, key=lambda r: -num(r[samp_col]))[: a.top]
    for r in top:
        why = sorted(((num(r[c]), c) for c in reasons), reverse=True)[:2]
        why_s = ", ".join(f"{c} {v:.0f}" for v, c in why if v)
        print(f"{num(r[samp_col]) / total:6.1%}  #{r['#']:<5} {r.get('Source', '')[:70]:70}  {why_s}")
    # where the excess traffic is (bank conflicts, uncoalesced sectors): the instructions behind ncu's rules
    for col in [c for c in head if "Excessive" in c]:
        tot = sum(num(r[col]) for r in body)
        if not tot:
            continue
        print(f"\n{col}: {tot:.0f} in all")
        for r in sorted(body, key=lambda r: -num(r[col]))[:8]:
            if num(r[col]):
                print(f"{num(r[col]) / tot:6.1%}  #{r['#']:<5} {r.get('Source', '')[:70]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
