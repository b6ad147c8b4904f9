"""What a modality's MPPS or an archive's IAN lists, built from the files of a study (for the tests and the
completion benchmark)."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset


def series_items(paths: list[Path]) -> list[Dataset]:
    """A Performed Series Sequence (MPPS) or Referenced Series Sequence (IAN) listing these files' instances."""
    by_series: dict[str, list[Dataset]] = {}
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        by_series.setdefault(ds.SeriesInstanceUID, []).append(ref)
    items = []
    for series_uid, refs in by_series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.ReferencedImageSequence = refs
        item.ReferencedSOPSequence = refs
        items.append(item)
    return items
