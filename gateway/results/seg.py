"""DICOM Segmentation for pipelines whose model returns a mask: the region itself, not only its box.

One binary segment per analysed series (the pipeline's finding type), on the source images' geometry; frames
without any segmented pixel are omitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from gateway.core import codes as gw
from gateway.results.common import MANUFACTURER, SOFTWARE_VERSION, SeriesAnalysis

SEG_SERIES_NUMBER = 9903


def resize_mask_nearest(mask: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """[N, h, w] -> [N, rows, cols] by nearest neighbour (pixel centres aligned)."""
    _, h, w = mask.shape
    ys = np.minimum(((np.arange(rows) + 0.5) * h / rows).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(cols) + 0.5) * w / cols).astype(np.int64), w - 1)
    return np.asarray(mask[:, ys][:, :, xs] > 0)


def _pixel_measures(analysis: SeriesAnalysis) -> hd.PixelMeasuresSequence | None:
    """The frames' pixel measures when the sources do not state a slice thickness (which the SEG's Pixel Measures
    need with a frame of reference): the distance between neighbouring slice positions, else Spacing Between
    Slices. None (highdicom copies the sources' own) when they state one or give no pixel spacing."""
    first = analysis.sources[0]
    stated = "SliceThickness" in first and first.SliceThickness not in (None, "")
    if stated or "PixelSpacing" not in first or "FrameOfReferenceUID" not in first:
        return None
    thickness = None
    z = [
        float(
            np.dot(
                np.cross(ds.ImageOrientationPatient[:3], ds.ImageOrientationPatient[3:]),
                ds.ImagePositionPatient,
            )
        )
        for ds in analysis.sources
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds
    ]
    if len(z) >= 2:
        thickness = float(np.median(np.abs(np.diff(sorted(z))))) or None
    if thickness is None and first.get("SpacingBetweenSlices") not in (None, ""):
        thickness = abs(float(first.SpacingBetweenSlices)) or None
    if thickness is None:
        raise ValueError(
            "the source images state no slice thickness and it cannot be derived from their positions"
        )
    return hd.PixelMeasuresSequence(
        pixel_spacing=[float(v) for v in first.PixelSpacing], slice_thickness=round(thickness, 6)
    )


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
        pixel_measures=_pixel_measures(analysis),
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


def mask_on_image(paths: Sequence[Path], sop_instance_uid: str) -> np.ndarray | None:
    """The segmented pixels (rows x columns, bool) of one source image in the SEGs at ``paths``; None when no SEG
    segments that image."""
    for path in paths:
        seg = hd.seg.segread(path)
        try:
            pixels = seg.get_pixels_by_source_instance(
                [sop_instance_uid], combine_segments=True, assert_missing_frames_are_empty=True
            )
        except (ValueError, KeyError):  # not a source image of this SEG
            continue
        return np.asarray(pixels[0] > 0)
    return None
