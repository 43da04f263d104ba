"""Confidence intervals for success rates: Wilson over episodes, Student t over seeds.

Pure Python and NumPy (no torch, no scipy), so the figure script can use them without the training stack.

| function                | interval of                         | why this one                               |
|-------------------------|-------------------------------------|--------------------------------------------|
| ``wilson_interval``     | one seed's success rate (k of n)    | stays inside [0, 1] and is sane at 0/n, n/n |
| ``seed_mean_interval``  | the mean success rate over seeds    | few seeds: a t quantile, not z             |
| ``success_summary``     | eval results of one config (1+ seeds) | t over seeds (never narrower than Wilson |
|                         |                                     | over all episodes), or the one seed's Wilson |

A number over seeds describes one training budget, so ``common_step_count`` is the one rule every summary asks
first (``aggregate``, the investigation figure, and the sweep through ``aggregate``): results of different step
counts are refused, naming each with its steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

Z_975 = 1.959964
"""Standard normal quantile for a two-sided 95% interval."""

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042}
"""Two-sided 95% Student-t quantiles t(0.975, df), from the standard table."""


def wilson_interval(successes: int, n: int, z: float = Z_975) -> tuple[float, float]:
    """95% Wilson score interval for a success rate (well-behaved at 0/n and n/n, unlike p +/- z*se)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def t_quantile_975(df: int) -> float:
    """t(0.975, df): tabulated up to 30 degrees of freedom, a Cornish-Fisher expansion beyond."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom (2 seeds), got df={df}.")
    if df in T_975:
        return T_975[df]
    if df < 30:  # between tabulated values: the next smaller df is the conservative (larger) one
        return T_975[max(k for k in T_975 if k <= df)]
    return Z_975 + (Z_975**3 + Z_975) / (4 * df)


def seed_mean_interval(rates: Sequence[float]) -> tuple[float, float, tuple[float, float]]:
    """Mean, sample standard deviation and 95% t interval (clipped to [0, 1]) of per-seed success rates.

    Needs two or more seeds; one seed has no spread to estimate (use its Wilson interval instead).
    """
    n = len(rates)
    if n < 2:
        raise ValueError(f"a t interval over seeds needs at least 2 seeds, got {n}.")
    mean = sum(rates) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rates) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return mean, std, (max(0.0, mean - half), min(1.0, mean + half))


def success_summary(rates: Sequence[float], episodes: Sequence[int]
                    ) -> tuple[float, float, tuple[float, float], str]:
    """Mean, std, 95% interval and how it was computed, for the success rates of one or more seeds, each
    measured over ``episodes`` evaluation episodes.

    One seed has no spread over seeds: its Wilson interval over episodes. Several: the Student t interval over
    seeds, widened to the Wilson interval over all their episodes where that one is wider. Seeds that agree
    (three at 1.0) have no spread, yet each is measured on a sample of episodes: the t interval alone would be
    [1, 1].
    """
    pooled = wilson_interval(sum(round(rate * n) for rate, n in zip(rates, episodes)), sum(episodes))
    if len(rates) == 1:
        return float(rates[0]), 0.0, pooled, "Wilson over the single seed's episodes, 95%"
    mean, std, (low, high) = seed_mean_interval(rates)
    method = f"Student t over seeds, 95%, df={len(rates) - 1}"
    if pooled[0] < low or pooled[1] > high:
        low, high = min(low, pooled[0]), max(high, pooled[1])
        method += f", widened to the Wilson interval over all {sum(episodes)} episodes"
    return mean, std, (low, high), method


class MixedStepCounts(ValueError):
    """Results evaluated at different training steps were about to be summarised as one number."""


def common_step_count(steps_by_name: Mapping[str, int], fix: str) -> int:
    """The step count every result shares; ``MixedStepCounts`` (one sentence naming each result's steps, then
    ``fix``) when they differ: a mean of a seed at one budget and a seed at another describes no run."""
    counts = set(steps_by_name.values())
    if len(counts) == 1:
        return counts.pop()
    if not counts:
        raise ValueError("common_step_count needs at least one result.")
    listing = ", ".join(f"{name} at {steps:,} steps"
                        for name, steps in sorted(steps_by_name.items(), key=lambda item: (item[1], item[0])))
    raise MixedStepCounts(f"The results were evaluated at {len(counts)} different step counts ({listing}), and a "
                          f"number over seeds needs one; {fix}.")
