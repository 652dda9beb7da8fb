"""Confidence intervals for success rates (pure Python).

- One rate: Wilson's score interval.
- A paired difference (both policies on the same task, init state and seed): Newcombe's hybrid score
  interval for the difference of paired proportions (Newcombe 1998, Stat Med 17:2635, method 10; the
  "square-and-add" interval of Fagerland, Lydersen & Laake 2014/2017). It combines the two Wilson intervals
  with a correction for the correlation of the pairs, stays inside [-1, 1] and does not collapse to a point
  when every pair agrees (the Wald interval it replaces printed [+0.0, +0.0] for 4 concordant pairs; this
  one gives +-0.49, and +-0.07 for 50). McNemar's exact test gives the p-value.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # standard normal quantile 0.975


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def newcombe_paired(both: int, only_a: int, only_b: int, neither: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's hybrid score interval for p_b - p_a over paired outcomes: `both` pairs where both succeeded,
    `only_a` / `only_b` where one did, `neither` where neither did."""
    n = both + only_a + only_b + neither
    if n == 0:
        return (-1.0, 1.0)
    pa, pb = (both + only_a) / n, (both + only_b) / n
    la, ua = wilson(both + only_a, n, z)
    lb, ub = wilson(both + only_b, n, z)
    # phi: the correlation of the two outcomes, with Newcombe's continuity correction of the cross product
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = 0.0
    if margins:
        cross = both * neither - only_a * only_b
        corrected = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)
        phi = corrected / math.sqrt(margins)
    diff = pb - pa
    down = math.sqrt(max(0.0, (pb - lb) ** 2 - 2 * phi * (pb - lb) * (ua - pa) + (ua - pa) ** 2))
    up = math.sqrt(max(0.0, (ub - pb) ** 2 - 2 * phi * (ub - pb) * (pa - la) + (pa - la) ** 2))
    return (max(-1.0, diff - down), min(1.0, diff + up))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact p-value of McNemar's test (binomial on the discordant pairs)."""
    k, m = min(only_a, only_b), only_a + only_b
    if m == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2**m)


def paired_difference(pairs: list[tuple[bool, bool]], z: float = Z95) -> dict:
    """Success-rate difference b - a over paired episodes (same task, init state and seed), with Newcombe's
    hybrid score interval and McNemar's exact two-sided p-value."""
    n = len(pairs)
    if n == 0:
        return {"pairs": 0}
    both = sum(1 for a, b in pairs if a and b)
    only_a = sum(1 for a, b in pairs if a and not b)
    only_b = sum(1 for a, b in pairs if b and not a)
    lo, hi = newcombe_paired(both, only_a, only_b, n - both - only_a - only_b, z)
    return {"pairs": n, "rate_a": (both + only_a) / n, "rate_b": (both + only_b) / n,
            "diff": (only_b - only_a) / n, "ci95": [lo, hi], "ci_method": "Newcombe hybrid score (paired)",
            "only_a": only_a, "only_b": only_b, "mcnemar_p": mcnemar_exact(only_a, only_b)}


__all__ = ["wilson", "newcombe_paired", "mcnemar_exact", "paired_difference"]
