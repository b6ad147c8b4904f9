"""The one backoff rule: exponential, capped, jittered within its bounds (and every retry in the code uses it)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from gateway.core.retry import Backoff

ROOT = Path(__file__).resolve().parents[2]


def test_delays_double_up_to_the_cap() -> None:
    backoff = Backoff(1.0, max_s=10.0, jitter=0.0)
    assert [backoff.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_jitter_stays_within_its_fraction_and_spreads_callers() -> None:
    backoff = Backoff(2.0, max_s=60.0, jitter=0.2)
    rng = random.Random(1)
    delays = [backoff.delay(3, rng) for _ in range(2000)]
    assert min(delays) >= 8.0 * 0.8 and max(delays) <= 8.0 * 1.2
    assert max(delays) - min(delays) > 2.5  # callers that failed together do not retry together


@pytest.mark.parametrize(
    "bad", [dict(base_s=-1.0), dict(base_s=5.0, max_s=1.0), dict(base_s=1.0, jitter=1.0)]
)
def test_invalid_backoffs_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**bad)


def test_no_hand_rolled_exponential_backoff_is_left() -> None:
    """Every retry goes through Backoff: no other `* 2 **` delay formula in the gateway or its clients."""
    offenders = []
    for path in [*ROOT.glob("gateway/**/*.py"), *ROOT.glob("clients/*.py")]:
        if path.name == "retry.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\*\s*2(\.0)?\s*\*\*\s*\(?\s*[a-z_]|delay\s*\*\s*2\b", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
