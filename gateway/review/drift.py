"""Drift alarms for a model in use: a CUSUM on the radiologists' acceptance rate and a population stability
index (PSI) of the score distribution against a baseline (the silent-mode pilot of the site).

CUSUM: the Bernoulli log-likelihood-ratio chart (Reynolds & Stoumbos, 1999) for a fall of the acceptance rate
from ``p0`` (the baseline) to ``p1``. Each verdict adds ``log(p1/p0)`` when accepted and
``log((1-p1)/(1-p0))`` when rejected; the sum is floored at zero and alarms above ``h``. With p0 = 0.9,
p1 = 0.7 and h = 11, simulated 1,000 times: a fall to 70 % is detected after a median of 63 verdicts and within
200 in 99.7 % of runs; 0.2 % of runs of 2,000 verdicts at a steady 90 % alarm at all (lower ``h`` detects
sooner and alarms falsely more often; tests/unit/test_drift.py measures both).

PSI: ``sum((a - e) * ln(a / e))`` over fixed score bins of [0, 1], with ``e`` the baseline's and ``a`` the
recent window's share per bin; 0.1 is commonly read as a shift worth a look, 0.25 as a significant one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

PSI_WARN = 0.1
PSI_ALARM = 0.25
_EPS = 1e-4  # an empty bin's share: keeps the logarithm finite


@dataclass(kw_only=True)
class AcceptanceCusum:
    """A one-sided CUSUM for a fall in the share of accepted findings; ``update`` returns True on an alarm
    (once: the chart restarts from zero after it fires, so a lasting fall alarms again later)."""

    p0: float = 0.9  # acceptance expected (the baseline)
    p1: float = 0.7  # the fall to detect
    h: float = 11.0  # decision threshold
    statistic: float = 0.0
    seen: int = 0
    alarms: list[int] = field(default_factory=list)  # the verdict counts at which it fired

    def __post_init__(self) -> None:
        if not 0.0 < self.p1 < self.p0 < 1.0:
            raise ValueError(f"AcceptanceCusum needs 0 < p1 < p0 < 1, got p0={self.p0}, p1={self.p1}")
        if self.h <= 0:
            raise ValueError(f"AcceptanceCusum.h must be positive, got {self.h}")
        self._accepted = math.log(self.p1 / self.p0)
        self._rejected = math.log((1.0 - self.p1) / (1.0 - self.p0))

    def update(self, accepted: bool) -> bool:
        self.seen += 1
        self.statistic = max(0.0, self.statistic + (self._accepted if accepted else self._rejected))
        if self.statistic > self.h:
            self.alarms.append(self.seen)
            self.statistic = 0.0
            return True
        return False

    def run(self, verdicts: Iterable[bool]) -> list[int]:
        """Feed a sequence of verdicts (True: accepted); the verdict counts at which it alarmed."""
        for accepted in verdicts:
            self.update(accepted)
        return list(self.alarms)


def score_histogram(scores: Iterable[float], bins: int = 10) -> list[float]:
    """The share of scores in each of ``bins`` equal bins of [0, 1] (a score of 1.0 is in the last)."""
    counts = [0] * bins
    n = 0
    for score in scores:
        if not math.isfinite(score):
            continue
        counts[min(bins - 1, max(0, int(score * bins)))] += 1
        n += 1
    return [c / n for c in counts] if n else [0.0] * bins


def population_stability_index(baseline: Sequence[float], recent: Sequence[float], bins: int = 10) -> float:
    """PSI of ``recent`` scores against ``baseline`` scores (both in [0, 1])."""
    if not baseline or not recent:
        raise ValueError("population_stability_index needs scores in both the baseline and the recent window")
    expected = score_histogram(baseline, bins)
    actual = score_histogram(recent, bins)
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e, a = max(e, _EPS), max(a, _EPS)
        total += (a - e) * math.log(a / e)
    return total
