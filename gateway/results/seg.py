"""DICOM Segmentation for pipelines whose model returns a mask: the region itself, not only its box.

One binary segment per analysed series (the pipeline's finding type), on the source images' geometry; frames
without any segmented pixel are omitted.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from gateway.results import codes as gw
from gateway.results.common import MANUFACTURER, SOFTWARE_VERSION, SeriesAnalysis

SEG_SERIES_NUMBER = 9903


def resize_mask_nearest(mask: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """[N, h, w] -> [N, rows, cols] by nearest neighbour (pixel centres aligned)."""
    _, h, w = mask.shape
    ys = np.minimum(((np.arange(rows) + 0.5) * h / rows).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(cols) + 0.5) * w / cols).astype(np.int64), w - 1)
    return np.asarray(mask[:, ys][:, :, xs] > 0)


def build_seg(analysis: SeriesAnalysis, mask: np.ndarray) -> hd.seg.Segmentation | None:
    """A SEG for the mask (model input geometry, one plane per analysed slice), or None when it is empty."""
    if not analysis.findings or mask.ndim != 3 or mask.shape[0] != len(analysis.sources) or not mask.any():
        return None
    first = analysis.sources[0]
    full = resize_mask_nearest(mask, int(first.Rows), int(first.Columns))
    label = analysis.findings[0].label
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label.meaning[:64],
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=gw.to_highdicom(label),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=analysis.algorithm_name[:64],
            family=codes.cid7162.ArtificialIntelligence,
            version=analysis.algorithm_version[:64],
        ),
        tracking_uid=analysis.result_uid("seg-segment-1"),
        tracking_id=f"{analysis.pipeline_name} mask",
    )
    seg = hd.seg.Segmentation(
        source_images=list(analysis.sources),
        pixel_array=full.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=analysis.result_uid("seg-series"),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=analysis.result_uid("seg"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=analysis.algorithm_name[:64],
        software_versions=SOFTWARE_VERSION,
        device_serial_number=analysis.model_version[:64] or "unknown",
        content_label="AI_MASK",
        content_description=f"{analysis.algorithm_name} {analysis.algorithm_version}"[:64],
    )
    seg.SeriesDescription = f"AI mask: {analysis.pipeline_name} (preliminary)"[:64]
    return seg
