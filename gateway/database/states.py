"""The study state machine. A study moves forward through these states; each move is a row in
``study_transitions`` with its time and node, so a study's timeline is a query.

    receiving -> complete -> queued -> analysing -> results_stored -> delivered
                          \\-> skipped (no pipeline applies)      \\-> failed (every routed series failed,
                                                                    or a delivery was dead-lettered)

A study that receives more instances after it was complete goes back to ``receiving`` from any state (a late
series, a re-send: it is analysed again as it stands in the spool).
"""

from __future__ import annotations

import enum


class StudyState(enum.Enum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    QUEUED = "queued"
    ANALYSING = "analysing"
    RESULTS_STORED = "results_stored"
    DELIVERED = "delivered"
    FAILED = "failed"
    SKIPPED = "skipped"


S = StudyState
ALLOWED: dict[StudyState, frozenset[StudyState]] = {
    S.RECEIVING: frozenset({S.COMPLETE}),
    S.COMPLETE: frozenset({S.QUEUED, S.SKIPPED, S.RESULTS_STORED, S.FAILED}),
    S.QUEUED: frozenset({S.ANALYSING, S.RESULTS_STORED, S.FAILED}),
    S.ANALYSING: frozenset({S.RESULTS_STORED, S.FAILED}),
    S.RESULTS_STORED: frozenset({S.DELIVERED, S.FAILED}),
    S.DELIVERED: frozenset(),
    S.FAILED: frozenset(),
    S.SKIPPED: frozenset(),
}


def allowed(current: StudyState | None, new: StudyState) -> bool:
    """May a study in ``current`` (None: not known yet) move to ``new``? Re-opening is always allowed."""
    if new is S.RECEIVING:
        return current is not S.RECEIVING
    if current is None:
        return False
    return new in ALLOWED[current]
