"""Grayscale Softcopy Presentation State drawing each finding on the images it was found on.

One GSPS per analysed series with findings, with the pipeline's display window, on three layers a viewer can
toggle one by one:

- ``AI_FINDINGS``: a rectangle and a text label with class and confidence per finding, on its image;
- ``AI_HEATMAP``: where the model gives a mask, its outline at the report threshold on the images with findings
  (closed POLYLINE contours along the mask's pixel edges, the way commercial AI results draw a region);
- ``AI_SCORE``: the study-level score as a text in the top-left corner of every referenced image.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from highdicom import PresentationLUTShapeValues, PresentationLUTTransformation
from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicLayer,
    GraphicObject,
    GraphicTypeValues,
    GrayscaleSoftcopyPresentationState,
    SoftcopyVOILUTTransformation,
    TextObject,
)
from pydicom.dataset import Dataset
from pydicom.pixels import pack_bits

from gateway.core.domain import Finding
from gateway.results.common import MANUFACTURER, SOFTWARE_VERSION, SeriesAnalysis
from gateway.results.content import rectangle
from gateway.results.contours import outlines

GSPS_SERIES_NUMBER = 9902
# Defined terms of BodyPartExamined (PS3.16 CID 4031 / Annex L) that name no paired structure: Laterality is not
# required for them. Every other value - paired, unknown or non-standard - gets an empty Laterality.
UNPAIRED_BODY_PARTS = frozenset(
    {
        "HEAD",
        "SKULL",
        "BRAIN",
        "FACE",
        "NECK",
        "HEADNECK",
        "CHEST",
        "THORAX",
        "HEART",
        "MEDIASTINUM",
        "ABDOMEN",
        "PELVIS",
        "ABDOMENPELVIS",
        "CHESTABDOMEN",
        "CHESTABDPELVIS",
        "NECKCHEST",
        "NECKCHESTABDOMEN",
        "NECKCHESTABDPELV",
        "HEADNECKCHEST",
        "WHOLEBODY",
        "SPINE",
        "CSPINE",
        "TSPINE",
        "LSPINE",
        "SSPINE",
        "COCCYX",
        "SACRUM",
        "AORTA",
        "LIVER",
        "PANCREAS",
        "SPLEEN",
        "STOMACH",
        "BLADDER",
        "PROSTATE",
        "UTERUS",
        "ESOPHAGUS",
        "TRACHEA",
        "LARYNX",
        "PHARYNX",
        "RECTUM",
        "COLON",
        "DUODENUM",
        "SMALLINTESTINE",
        "ZYGOMA",
    }
)
LAYER_NAME = "AI_FINDINGS"
HEATMAP_LAYER = "AI_HEATMAP"
SCORE_LAYER = "AI_SCORE"


def mask_outlines(analysis: SeriesAnalysis, mask: np.ndarray | None) -> dict[str, list[np.ndarray]]:
    """SOP Instance UID -> the mask's outlines on that image, in its pixels (the mask is on the model grid)."""
    if mask is None or mask.ndim != 3 or mask.shape[0] != len(analysis.sources):
        return {}
    binary = mask >= analysis.report_threshold if np.issubdtype(mask.dtype, np.floating) else mask > 0
    out = {}
    for plane, source in zip(binary, analysis.sources, strict=True):
        if not plane.any():
            continue
        scale = np.asarray(
            [int(source.Columns) / plane.shape[1], int(source.Rows) / plane.shape[0]], dtype=np.float32
        )
        loops = [loop * scale for loop in outlines(plane)]
        if loops:
            out[str(source.SOPInstanceUID)] = loops
    return out


def _presentation_lut_shape(image: Dataset) -> PresentationLUTShapeValues:
    """INVERSE for MONOCHROME1 images (PS3.3 C.11.6.1: a presentation state's output is P-values, white high), so
    that a radiograph stored as MONOCHROME1 shows bone white with the presentation state applied, as without it."""
    if str(image.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        return PresentationLUTShapeValues.INVERSE
    return PresentationLUTShapeValues.IDENTITY


def build_gsps(
    analysis: SeriesAnalysis, mask: np.ndarray | None = None
) -> GrayscaleSoftcopyPresentationState | None:
    """The presentation state for a series, or ``None`` when there is nothing to draw."""
    if not analysis.findings:
        return None
    by_uid = {str(ds.SOPInstanceUID): ds for ds in analysis.sources}
    per_image: dict[str, list[Finding]] = defaultdict(list)
    for finding in analysis.findings:
        per_image[finding.sop_instance_uid].append(finding)
    # Outlines on the images the findings are on: the presentation state (and its box overlay, for viewers that
    # only render overlays) applies to exactly those.
    contours = {uid: loops for uid, loops in mask_outlines(analysis, mask).items() if uid in per_image}
    images = [by_uid[uid] for uid in by_uid if uid in per_image]
    layer = GraphicLayer(
        layer_name=LAYER_NAME, order=1, description=f"AI findings: {analysis.algorithm_name}"
    )
    heatmap = GraphicLayer(
        layer_name=HEATMAP_LAYER,
        order=2,
        description=f"AI heat map outline at {analysis.report_threshold:g}",
    )
    score = GraphicLayer(layer_name=SCORE_LAYER, order=3, description="AI study-level score")
    annotations = []
    for image in images:
        uid = str(image.SOPInstanceUID)
        if uid in contours:
            annotations.append(
                GraphicAnnotation(
                    referenced_images=[image],
                    graphic_layer=heatmap,
                    graphic_objects=[
                        GraphicObject(
                            graphic_type=GraphicTypeValues.POLYLINE,
                            graphic_data=loop,
                            units=AnnotationUnitsValues.PIXEL,
                        )
                        for loop in contours[uid]
                    ],
                )
            )
        annotations.append(
            GraphicAnnotation(
                referenced_images=[image],
                graphic_layer=score,
                text_objects=[
                    TextObject(
                        text_value=f"{analysis.algorithm_name[:40]}: score {analysis.study_score:.0%}"[:64],
                        units=AnnotationUnitsValues.PIXEL,
                        anchor_point=(8.0, 8.0),
                        anchor_point_visible=False,
                    )
                ],
            )
        )
        graphics, texts = [], []
        image_level = 0
        for finding in per_image[str(image.SOPInstanceUID)]:
            if finding.bbox is None:  # a classification: a label in the image's top-left corner
                image_level += 1
                anchor = (8.0, 8.0 + 16.0 * image_level)
            else:
                graphics.append(
                    GraphicObject(
                        graphic_type=GraphicTypeValues.POLYLINE,
                        graphic_data=rectangle(finding),
                        units=AnnotationUnitsValues.PIXEL,
                    )
                )
                x0, y0, _, _ = finding.bbox
                anchor = (float(x0), float(max(y0 - 4.0, 0.0)))
            texts.append(
                TextObject(
                    text_value=f"{finding.label.meaning} {finding.confidence:.0%}"[:64],
                    units=AnnotationUnitsValues.PIXEL,
                    anchor_point=anchor,
                    anchor_point_visible=False,
                )
            )
        annotations.append(
            GraphicAnnotation(
                referenced_images=[image],
                graphic_layer=layer,
                graphic_objects=graphics or None,
                text_objects=texts,
            )
        )
    center, width = analysis.display_window
    gsps = GrayscaleSoftcopyPresentationState(
        referenced_images=images,
        series_instance_uid=analysis.result_uid("gsps-series"),
        series_number=GSPS_SERIES_NUMBER,
        sop_instance_uid=analysis.result_uid("gsps"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=analysis.algorithm_name[:64],
        software_versions=SOFTWARE_VERSION,
        device_serial_number=analysis.model_version[:64] or "unknown",
        content_label="AI_FINDINGS",
        content_description=f"{analysis.algorithm_name} {analysis.algorithm_version}"[:64],
        graphic_annotations=annotations,
        graphic_layers=[layer, heatmap, score],
        voi_lut_transformations=[SoftcopyVOILUTTransformation(window_center=center, window_width=width)],
        presentation_lut_transformation=PresentationLUTTransformation(
            presentation_lut_shape=_presentation_lut_shape(images[0])
        ),
    )
    _copy_from_source(gsps, images[0])
    _add_box_overlay(gsps, images, per_image)
    return gsps


def box_outline(
    rows: int, cols: int, boxes: list[tuple[float, float, float, float]], width: int = 2
) -> np.ndarray:
    """A [rows, cols] bitmap with the outline of every (x0, y0, x1, y1) box, ``width`` pixels thick."""
    bitmap = np.zeros((rows, cols), dtype=np.uint8)
    for x0, y0, x1, y1 in boxes:
        c0, r0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
        c1, r1 = min(int(np.ceil(x1)), cols - 1), min(int(np.ceil(y1)), rows - 1)
        bitmap[r0 : r0 + width, c0 : c1 + 1] = 1
        bitmap[max(r1 - width + 1, 0) : r1 + 1, c0 : c1 + 1] = 1
        bitmap[r0 : r1 + 1, c0 : c0 + width] = 1
        bitmap[r0 : r1 + 1, max(c1 - width + 1, 0) : c1 + 1] = 1
    return bitmap


def _add_box_overlay(gsps: Dataset, images: list[Dataset], per_image: dict[str, list[Finding]]) -> None:
    """Also burn the boxes into a bitmap overlay on the AI layer, for viewers that only render overlays.

    An overlay stored in a presentation state applies to every image it references, so it is added only when
    it is right for all of them: the referenced images share one size and carry the same boxes (in particular
    when the findings are on a single image). Otherwise the vector graphics alone carry the findings.
    """
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in images}
    box_sets = {
        tuple(sorted(f.bbox for f in per_image[str(ds.SOPInstanceUID)] if f.bbox is not None))
        for ds in images
    }
    if len(shapes) != 1 or len(box_sets) != 1:
        return
    (rows, cols), boxes = shapes.pop(), list(box_sets.pop())
    if not boxes:
        return
    bitmap = box_outline(rows, cols, boxes)
    gsps.add_new(0x60000010, "US", rows)
    gsps.add_new(0x60000011, "US", cols)
    gsps.add_new(0x60000022, "LO", "AI finding outlines")
    gsps.add_new(0x60000040, "CS", "G")
    gsps.add_new(0x60000050, "SS", [1, 1])
    gsps.add_new(0x60000100, "US", 1)
    gsps.add_new(0x60000102, "US", 0)
    gsps.add_new(0x60001001, "CS", LAYER_NAME)
    gsps.add_new(0x60001500, "LO", "AI_FINDINGS")
    gsps.add_new(0x60003000, "OW", pack_bits(bitmap.ravel()))


def _copy_from_source(gsps: Dataset, source: Dataset) -> None:
    """Attributes validators expect on a presentation state that highdicom does not carry over."""
    for keyword in ("BodyPartExamined", "Laterality", "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        if keyword in source and keyword not in gsps:
            setattr(gsps, keyword, source.data_element(keyword).value)  # type: ignore[union-attr]
    if "Laterality" not in gsps:
        laterality = str(source.get("ImageLaterality", "") or "").strip().upper()
        if laterality in ("R", "L"):
            gsps.Laterality = laterality  # the image's own laterality, as the series' (Laterality is R or L)
        elif str(gsps.get("BodyPartExamined", "") or "").strip().upper() not in UNPAIRED_BODY_PARTS:
            # General Series Laterality is Type 2C, required for a paired structure: for a paired, non-standard
            # (PARTIALBODY, a protocol name), lower-case or absent body part it is present and empty (unknown).
            gsps.Laterality = ""
