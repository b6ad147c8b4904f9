"""The one backoff rule every retry in the gateway uses: exponential from ``base_s``, capped at ``max_s``, with
random jitter so that many callers that failed together (every destination after a network blip, every worker
after a Triton restart) do not retry in lockstep.

    delay(attempt) = min(max_s, base_s * 2 ** (attempt - 1)) * uniform(1 - jitter, 1 + jitter)

``attempt`` counts retries from 1 (the wait before the first retry is about ``base_s``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    base_s: float
    max_s: float = float("inf")
    jitter: float = 0.2  # +/- this fraction of the delay

    def __post_init__(self) -> None:
        if self.base_s < 0 or self.max_s < self.base_s or not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"invalid backoff {self}: need 0 <= base_s <= max_s and 0 <= jitter < 1")

    def nominal(self, attempt: int) -> float:
        """The delay before retry ``attempt`` without jitter."""
        return min(self.max_s, self.base_s * 2.0 ** max(0, attempt - 1))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        spread = (rng or _RNG).uniform(1.0 - self.jitter, 1.0 + self.jitter)
        return self.nominal(attempt) * spread


_RNG = random.Random()
