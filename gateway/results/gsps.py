"""Grayscale Softcopy Presentation State drawing each finding on the images it was found on.

One GSPS per analysed series with findings: a named graphic layer (``AI_FINDINGS``) holds a rectangle and a
text label with class and confidence per finding, on exactly the annotated images, with the pipeline's
display window.
"""

from __future__ import annotations

from collections import defaultdict

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
from pydicom.uid import generate_uid

from gateway.domain import Finding
from gateway.results.common import MANUFACTURER, SOFTWARE_VERSION, SeriesAnalysis
from gateway.results.content import rectangle

GSPS_SERIES_NUMBER = 9902
LAYER_NAME = "AI_FINDINGS"


def build_gsps(
    analysis: SeriesAnalysis, *, series_uid: str | None = None, sop_uid: str | None = None
) -> GrayscaleSoftcopyPresentationState | None:
    """The presentation state for a series, or ``None`` when there is nothing to draw."""
    if not analysis.findings:
        return None
    by_uid = {str(ds.SOPInstanceUID): ds for ds in analysis.sources}
    per_image: dict[str, list[Finding]] = defaultdict(list)
    for finding in analysis.findings:
        per_image[finding.sop_instance_uid].append(finding)
    images = [by_uid[uid] for uid in by_uid if uid in per_image]
    layer = GraphicLayer(
        layer_name=LAYER_NAME, order=1, description=f"AI findings: {analysis.algorithm_name}"
    )
    annotations = []
    for image in images:
        graphics, texts = [], []
        for finding in per_image[str(image.SOPInstanceUID)]:
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
                referenced_images=[image], graphic_layer=layer, graphic_objects=graphics, text_objects=texts
            )
        )
    center, width = analysis.display_window
    gsps = GrayscaleSoftcopyPresentationState(
        referenced_images=images,
        series_instance_uid=series_uid or generate_uid(),
        series_number=GSPS_SERIES_NUMBER,
        sop_instance_uid=sop_uid or generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=analysis.algorithm_name[:64],
        software_versions=SOFTWARE_VERSION,
        device_serial_number=analysis.model_version[:64] or "unknown",
        content_label="AI_FINDINGS",
        content_description=f"{analysis.algorithm_name} {analysis.algorithm_version}"[:64],
        graphic_annotations=annotations,
        graphic_layers=[layer],
        voi_lut_transformations=[SoftcopyVOILUTTransformation(window_center=center, window_width=width)],
    )
    _copy_from_source(gsps, images[0])
    return gsps


def _copy_from_source(gsps: Dataset, source: Dataset) -> None:
    """Attributes validators expect on a presentation state that highdicom does not carry over."""
    for keyword in ("BodyPartExamined", "Laterality", "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        if keyword in source and keyword not in gsps:
            setattr(gsps, keyword, source.data_element(keyword).value)  # type: ignore[union-attr]
    if "Laterality" not in gsps and "BodyPartExamined" not in gsps:
        gsps.Laterality = ""  # Type 2C with the body part unknown: present and empty
