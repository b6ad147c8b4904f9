"""The drift alarms: CUSUM on the acceptance rate (the issue's simulation) and PSI of the score distribution."""

from __future__ import annotations

import random
import statistics

import pytest

from gateway.review.drift import PSI_ALARM, PSI_WARN, AcceptanceCusum, population_stability_index

RUNS = 400


def test_a_fall_from_90_to_70_percent_is_detected_within_200_verdicts_and_a_steady_90_percent_is_quiet() -> (
    None
):
    detected, false_alarms = [], 0
    for seed in range(RUNS):
        rng = random.Random(seed)
        baseline = AcceptanceCusum()
        # A steady 90 % first, then the fall: the chart must catch it from wherever it stands.
        baseline.run(rng.random() < 0.9 for _ in range(300))
        before = len(baseline.alarms)
        after = baseline.run(rng.random() < 0.7 for _ in range(200))
        detected.append(after[before] - 300 if len(after) > before else None)
        steady = AcceptanceCusum()
        false_alarms += bool(steady.run(rng.random() < 0.9 for _ in range(2000)))
    found = [d for d in detected if d is not None]
    print(
        f"\nCUSUM (p0 0.9, p1 0.7, h 11), {RUNS} simulated runs: detected within 200 verdicts in "
        f"{len(found) / RUNS:.1%} (median {statistics.median(found):.0f} verdicts, max {max(found)}); "
        f"runs of 2,000 steady verdicts with a false alarm: {false_alarms / RUNS:.1%}"
    )
    assert len(found) / RUNS >= 0.99
    assert false_alarms / RUNS <= 0.01


def test_the_issue_scenario_with_a_fixed_seed() -> None:
    rng = random.Random(2026)
    assert AcceptanceCusum().run(rng.random() < 0.9 for _ in range(2000)) == []
    alarms = AcceptanceCusum().run(rng.random() < 0.7 for _ in range(200))
    assert alarms and alarms[0] <= 200


def test_the_cusum_refuses_a_meaningless_configuration() -> None:
    with pytest.raises(ValueError, match="p1 < p0"):
        AcceptanceCusum(p0=0.7, p1=0.9)


def test_psi_is_small_for_the_same_distribution_and_large_for_a_shift() -> None:
    rng = random.Random(7)
    baseline = [rng.betavariate(2, 5) for _ in range(5000)]
    same = [rng.betavariate(2, 5) for _ in range(2000)]
    shifted = [rng.betavariate(5, 2) for _ in range(2000)]
    assert population_stability_index(baseline, same) < PSI_WARN
    assert population_stability_index(baseline, shifted) > PSI_ALARM
    with pytest.raises(ValueError):
        population_stability_index([], same)
