"""The intervals of the evaluation tables, against published values and by exact coverage."""

import math

import pytest

from duquant.eval.stats import mcnemar_exact, newcombe_paired, paired_difference, wilson


def test_wilson_published():
    # Newcombe 1998 (Stat Med 17:857), Table I: 81/263 -> 0.2553-0.3662; 15/148 -> 0.0624-0.1605
    assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert wilson(15, 148) == pytest.approx((0.0624, 0.1605), abs=5e-5)


def test_newcombe_paired_published_example():
    # Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables (2017), ch. 8, Cavo et al. 2012:
    # pairs 59 both, 6 only first, 16 only second, 80 neither -> first - second = -0.0621, 95% CI -0.1186 to
    # -0.0046 (R package contingencytables, Newcombe_square_and_add_CI_paired_2x2)
    lo, hi = newcombe_paired(both=59, only_a=16, only_b=6, neither=80)  # b - a = first - second
    assert (lo, hi) == pytest.approx((-0.1186, -0.0046), abs=5e-5)


def test_concordant_pairs_do_not_collapse():
    for n, half in ((4, 0.49), (50, 0.0713)):
        for outcome in (True, False):
            d = paired_difference([(outcome, outcome)] * n)
            assert d["diff"] == 0 and d["ci95"] == pytest.approx([-half, half], abs=5e-4)
    d = paired_difference([(True, False)] * 10)  # every pair discordant, one way
    assert d["diff"] == -1 and d["ci95"][0] == -1 and -1 < d["ci95"][1] < -0.6
    assert d["mcnemar_p"] == pytest.approx(2 / 2**10)
    assert mcnemar_exact(0, 0) == 1.0


def _coverage(n, probs, interval):
    """Exact coverage of `interval(both, only_a, only_b, neither)` for multinomial(n, probs)."""
    both_p, a_p, b_p, neither_p = probs
    true = b_p - a_p
    total = 0.0
    for both in range(n + 1):
        for only_a in range(n + 1 - both):
            for only_b in range(n + 1 - both - only_a):
                neither = n - both - only_a - only_b
                lo, hi = interval(both, only_a, only_b, neither)
                if lo - 1e-12 <= true <= hi + 1e-12:
                    total += (math.factorial(n) / (math.factorial(both) * math.factorial(only_a)
                              * math.factorial(only_b) * math.factorial(neither))
                              * both_p**both * a_p**only_a * b_p**only_b * neither_p**neither)
    return total


def _wald(both, only_a, only_b, neither, z=1.959964):
    n = both + only_a + only_b + neither
    d = (only_b - only_a) / n
    half = z * math.sqrt(max(0.0, (only_a + only_b) / n - d * d) / n)
    return d - half, d + half


@pytest.mark.parametrize("probs", [(0.8, 0.05, 0.05, 0.1), (0.6, 0.15, 0.05, 0.2), (0.45, 0.02, 0.03, 0.5)])
def test_newcombe_coverage_is_near_nominal_where_wald_fails(probs):
    n = 20  # a small evaluation: 20 paired episodes
    newcombe = _coverage(n, probs, newcombe_paired)
    assert newcombe > 0.93, newcombe
    assert _coverage(n, probs, _wald) < newcombe
