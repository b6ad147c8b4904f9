"""IHE IOCM rejection note: a Key Object Selection that withdraws result objects a newer analysis replaced.

When late instances or a new model version give a series a new SR, the PACS would otherwise keep showing the
old GSPS and SEG (and list the old SR) next to the new ones. The rejection note - document title (113001, DCM,
"Rejected for Quality Reasons") - references every object of the earlier analysis that the new one does not
re-issue; an IOCM-aware PACS (dcm4chee, most VNAs) hides or deletes them, and every other archive at least
holds the standard record of what was withdrawn and by which result. It goes out after the new results, so the
PACS is never left without a current result.
"""

from __future__ import annotations

from collections.abc import Sequence

from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from gateway.results.common import MANUFACTURER, SOFTWARE_VERSION, SeriesAnalysis

KOS_SERIES_NUMBER = 9904


def build_rejection_note(
    analysis: SeriesAnalysis, withdrawn: Sequence[Dataset]
) -> KeyObjectSelectionDocument | None:
    """The rejection note withdrawing ``withdrawn`` (headers of the replaced objects), or None when empty."""
    if not withdrawn:
        return None
    replacement = analysis.result_uid("sr")
    note = KeyObjectSelectionDocument(
        evidence=list(withdrawn),
        content=KeyObjectSelection(
            document_title=codes.DCM.RejectedForQualityReasons,
            referenced_objects=list(withdrawn),
            description=f"AI results of {analysis.pipeline_name} superseded by SR {replacement}"[:1024],
        ),
        series_instance_uid=analysis.result_uid("kos-series"),
        series_number=KOS_SERIES_NUMBER,
        sop_instance_uid=analysis.result_uid("kos"),
        instance_number=1,
        manufacturer=MANUFACTURER,
    )
    note.SeriesDescription = f"AI results withdrawn: {analysis.pipeline_name}"[:64]
    note.SoftwareVersions = SOFTWARE_VERSION
    return note
