"""What the flow tells the system of record about routing: a complete study and the series queued from it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class QueuedJob:
    """A series queued for analysis, as the jobs table records it."""

    job_id: str
    study_uid: str
    series_uid: str
    pipeline: str
    priority: str
    calling_ae: str
    cost: int
    deadline_s: float


@dataclass(frozen=True, kw_only=True)
class RoutedStudy:
    study_uid: str
    calling_ae: str
    priority: str
    instances: int
    series: int
    first_received_at: float
    last_received_at: float
    accession_number: str = ""


def job_id(study_uid: str, series_uid: str, pipeline: str) -> str:
    return f"{study_uid}/{series_uid}/{pipeline}"
