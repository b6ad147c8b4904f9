"""Synthetic head CT phantoms with known ground truth, written as real DICOM files.

An elliptical skull (cortical bone), brain parenchyma with Gaussian noise, lateral ventricles (CSF) and,
optionally, spherical hyperdense lesions (acute-blood HU) at known positions. Used by the tests and the
benchmarks; the identifiers are fixed, recognisable test values (for log-leak checks), never real ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

PATIENT_NAME = "PHANTOM^HEAD^TESTONLY"
PATIENT_ID = "PHANTOM-ID-0042"
PATIENT_BIRTH_DATE = "19010101"


@dataclass(frozen=True, kw_only=True)
class Lesion:
    x: float  # column of the centre, source pixels
    y: float  # row of the centre, source pixels
    slice: int  # slice index of the centre, in geometric (ascending z) order
    radius_mm: float = 8.0
    hu: float = 70.0


@dataclass(frozen=True, kw_only=True)
class PhantomSeries:
    paths: tuple[Path, ...]
    study_uid: str
    series_uid: str
    sop_uids: tuple[str, ...]  # in geometric (ascending z) order
    lesions: tuple[Lesion, ...] = field(default_factory=tuple)


def head_slice(
    rows: int, cols: int, z_frac: float, rng: np.random.Generator, *, noise_hu: float = 4.0
) -> np.ndarray:
    """One axial slice in HU. ``z_frac`` in [0, 1] shrinks the head towards the vertex."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = rows / 2.0, cols / 2.0
    scale = 0.75 + 0.25 * np.sqrt(max(0.0, 1.0 - (2 * z_frac - 1) ** 2))
    ay, ax = 0.42 * rows * scale, 0.36 * cols * scale
    r = np.sqrt(((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2)
    image = np.full((rows, cols), -1000.0, dtype=np.float32)
    image[r <= 1.0] = 1200.0  # skull
    inner = r <= 1.0 - 14.0 / min(ay, ax)
    image[inner] = 32.0  # brain
    for side in (-1, 1):  # lateral ventricles
        v = ((yy - cy + 0.05 * rows) / (0.10 * rows)) ** 2 + (
            (xx - cx - side * 0.06 * cols) / (0.03 * cols)
        ) ** 2
        image[(v <= 1.0) & inner] = 8.0
    image[image > -1000] += rng.normal(0.0, noise_hu, size=int((image > -1000).sum())).astype(np.float32)
    return image


def write_head_ct(
    out_dir: Path,
    *,
    slices: int = 24,
    rows: int = 512,
    cols: int = 512,
    pixel_mm: float = 0.5,
    slice_mm: float = 5.0,
    lesions: tuple[Lesion, ...] = (),
    seed: int = 0,
    reverse_instance_numbers: bool = True,
    study_uid: str | None = None,
    priority: str = "",
    calling_name: str = PATIENT_NAME,
    noise_hu: float = 4.0,
) -> PhantomSeries:
    """Write one series; instance numbers run against the geometry by default (ordering must use positions)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)

    def hu_at(k: int) -> np.ndarray:
        hu = head_slice(rows, cols, k / max(1, slices - 1), rng, noise_hu=noise_hu)
        for lesion in lesions:
            radius2 = lesion.radius_mm**2 - ((k - lesion.slice) * slice_mm) ** 2
            if radius2 <= 0:
                continue
            d2 = ((yy - lesion.y) * pixel_mm) ** 2 + ((xx - lesion.x) * pixel_mm) ** 2
            hu[d2 <= radius2] = lesion.hu + rng.normal(0.0, 3.0, size=int((d2 <= radius2).sum()))
        return hu

    series = _write_ct_series(
        out_dir,
        hu_at,
        slices=slices,
        pixel_mm=pixel_mm,
        slice_mm=slice_mm,
        study_uid=study_uid,
        priority=priority,
        patient_name=calling_name,
        reverse_instance_numbers=reverse_instance_numbers,
    )
    return dataclasses.replace(series, lesions=lesions)


def _write_ct_series(
    out_dir: Path,
    hu_at: Callable[[int], np.ndarray],
    *,
    slices: int,
    pixel_mm: float,
    slice_mm: float,
    study_uid: str | None,
    priority: str = "",
    patient_name: str = PATIENT_NAME,
    reverse_instance_numbers: bool = True,
    study_description: str = "CT HEAD WO CONTRAST",
    body_part: str = "HEAD",
    series_description: str = "Axial 5mm phantom",
) -> PhantomSeries:
    """Write slices ``hu_at(0..slices-1)`` (HU, ascending z) as one CT series."""
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    paths, sops = [], []
    for k in range(slices):
        stored = np.clip(np.round(hu_at(k) + 1024.0), 0, 4095).astype(np.uint16)
        sop = generate_uid()
        ds = _ct_dataset(
            study_uid,
            series_uid,
            frame_uid,
            sop,
            stored,
            k * slice_mm,
            pixel_mm,
            slice_mm,
            priority,
            patient_name,
            study_description=study_description,
            body_part=body_part,
        )
        ds.SeriesDescription = series_description
        ds.InstanceNumber = slices - k if reverse_instance_numbers else k + 1
        path = out_dir / f"slice_{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        sops.append(sop)
    return PhantomSeries(paths=tuple(paths), study_uid=study_uid, series_uid=series_uid, sop_uids=tuple(sops))


def _ct_dataset(
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    sop_uid: str,
    stored: np.ndarray,
    z: float,
    pixel_mm: float,
    slice_mm: float,
    priority: str,
    patient_name: str,
    study_description: str = "CT HEAD WO CONTRAST",
    body_part: str = "HEAD",
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.PatientName = patient_name
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = PATIENT_BIRTH_DATE
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = "ACC-PHANTOM-1"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.StudyDescription = study_description
    ds.Modality = "CT"
    ds.BodyPartExamined = body_part
    ds.Manufacturer = "Phantom"
    ds.SeriesNumber = 2
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.KVP = "120"
    ds.AcquisitionNumber = 1
    if priority:
        ds.RequestedProcedurePriority = priority
    ds.ImagePositionPatient = [-stored.shape[1] * pixel_mm / 2, -stored.shape[0] * pixel_mm / 2, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [pixel_mm, pixel_mm]
    ds.SliceThickness = slice_mm
    ds.SliceLocation = z
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = (40, 80) if body_part == "HEAD" else (-600, 1500)
    ds.PixelData = stored.tobytes()
    return ds


# -- chest CT ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Nodule:
    x_mm: float  # centre, patient x (column direction) relative to the image centre
    y_mm: float  # centre, patient y (row direction) relative to the image centre
    z_mm: float  # centre along the scan, from the first slice
    diameter_mm: float
    hu: float = 20.0

    @property
    def volume_mm3(self) -> float:
        return float(np.pi / 6.0 * self.diameter_mm**3)


@dataclass(frozen=True, kw_only=True)
class Vessel:
    x_mm: float
    y_mm: float
    dx_per_mm: float  # drift of the centre per mm along z (vessels run obliquely through the slices)
    dy_per_mm: float
    diameter_mm: float


def chest_slice(
    rows: int,
    cols: int,
    pixel_mm: float,
    z_mm: float,
    rng: np.random.Generator,
    *,
    nodules: tuple[Nodule, ...] = (),
    vessels: tuple[Vessel, ...] = (),
    noise_hu: float = 20.0,
) -> np.ndarray:
    """One axial chest slice in HU: body wall, two lungs, mediastinum, spine, vessels and spherical nodules."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    ymm, xmm = (yy - rows / 2.0) * pixel_mm, (xx - cols / 2.0) * pixel_mm
    image = np.full((rows, cols), -1000.0, dtype=np.float32)
    body = (xmm / 165.0) ** 2 + (ymm / 115.0) ** 2 <= 1.0
    image[body] = -90.0  # subcutaneous fat
    image[(xmm / 155.0) ** 2 + (ymm / 105.0) ** 2 <= 1.0] = 45.0  # muscle / chest wall
    lungs = np.zeros_like(body)
    for side in (-1, 1):
        lungs |= ((xmm - side * 70.0) / 58.0) ** 2 + ((ymm + 5.0) / 82.0) ** 2 <= 1.0
    image[lungs] = -860.0
    image[(xmm / 30.0) ** 2 + ((ymm - 10.0) / 45.0) ** 2 <= 1.0] = 40.0  # mediastinum
    image[(xmm / 16.0) ** 2 + ((ymm - 88.0) / 16.0) ** 2 <= 1.0] = 700.0  # vertebral body
    for vessel in vessels:
        cx, cy = vessel.x_mm + vessel.dx_per_mm * z_mm, vessel.y_mm + vessel.dy_per_mm * z_mm
        tube = (xmm - cx) ** 2 + (ymm - cy) ** 2 <= (vessel.diameter_mm / 2.0) ** 2
        image[tube & lungs] = 40.0
    for nodule in nodules:
        r2 = (nodule.diameter_mm / 2.0) ** 2 - (z_mm - nodule.z_mm) ** 2
        if r2 > 0:
            image[(xmm - nodule.x_mm) ** 2 + (ymm - nodule.y_mm) ** 2 <= r2] = nodule.hu
    inside = image > -1000
    image[inside] += rng.normal(0.0, noise_hu, size=int(inside.sum())).astype(np.float32)
    return image


def random_vessels(rng: np.random.Generator, count: int = 14) -> tuple[Vessel, ...]:
    vessels = []
    for _ in range(count):
        side = 1 if rng.random() < 0.5 else -1
        vessels.append(
            Vessel(
                x_mm=side * 70.0 + float(rng.uniform(-35, 35)),
                y_mm=float(rng.uniform(-55, 45)),
                dx_per_mm=float(rng.uniform(-0.3, 0.3)),
                dy_per_mm=float(rng.uniform(-0.3, 0.3)),
                diameter_mm=float(rng.uniform(1.5, 5.0)),
            )
        )
    return tuple(vessels)


def write_chest_ct(
    out_dir: Path,
    *,
    slices: int = 32,
    rows: int = 512,
    cols: int = 512,
    pixel_mm: float = 0.7,
    slice_mm: float = 2.5,
    nodules: tuple[Nodule, ...] = (),
    vessels: tuple[Vessel, ...] | None = None,
    seed: int = 0,
    noise_hu: float = 20.0,
    study_uid: str | None = None,
) -> PhantomSeries:
    """Write one chest CT series (ascending z, instance numbers reversed like the head phantom)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vessels = random_vessels(rng) if vessels is None else vessels
    return _write_ct_series(
        out_dir,
        lambda k: chest_slice(
            rows, cols, pixel_mm, k * slice_mm, rng, nodules=nodules, vessels=vessels, noise_hu=noise_hu
        ),
        slices=slices,
        pixel_mm=pixel_mm,
        slice_mm=slice_mm,
        study_uid=study_uid,
        study_description="CT CHEST WO CONTRAST",
        body_part="CHEST",
        series_description="Axial lung 2.5mm phantom",
    )


# -- chest radiograph ----------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Opacity:
    x_mm: float  # centre relative to the image centre
    y_mm: float
    diameter_mm: float
    density: float = 0.15  # added attenuation, in units of the phantom's [0, 1] density scale


def cxr_density(
    size: int,
    pixel_mm: float,
    rng: np.random.Generator,
    *,
    opacities: tuple[Opacity, ...] = (),
    noise: float = 0.015,
) -> np.ndarray:
    """A PA chest radiograph as attenuation in [0, 1] (1 = dense, shown white in MONOCHROME2)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ymm, xmm = (yy - size / 2.0) * pixel_mm, (xx - size / 2.0) * pixel_mm
    image = np.full((size, size), 0.04, dtype=np.float32)
    body = (xmm / 170.0) ** 2 + ((ymm - 10.0) / 200.0) ** 2 <= 1.0
    image[body] = 0.50
    lungs = np.zeros_like(body)
    for side in (-1, 1):
        lungs |= ((xmm - side * 75.0) / 62.0) ** 2 + ((ymm + 15.0) / 120.0) ** 2 <= 1.0
    image[lungs] = 0.24 + 0.05 * np.clip((ymm[lungs] + 135.0) / 240.0, 0, 1)  # denser towards the bases
    heart = ((xmm + 15.0) / 60.0) ** 2 + ((ymm - 45.0) / 55.0) ** 2 <= 1.0
    image[heart] = 0.62
    image[np.abs(xmm) <= 18.0] = np.maximum(image[np.abs(xmm) <= 18.0], 0.68)  # spine and mediastinum
    for k in range(9):  # posterior ribs: gentle arcs across each lung
        centre = -115.0 + k * 26.0
        arc = centre + 0.004 * (np.abs(xmm) - 40.0) ** 2
        rib = (np.abs(ymm - arc) <= 5.0) & body & (np.abs(xmm) > 18.0)
        image[rib] += 0.05
    for opacity in opacities:
        sigma = opacity.diameter_mm / 2.355
        blob = np.exp(-((xmm - opacity.x_mm) ** 2 + (ymm - opacity.y_mm) ** 2) / (2.0 * sigma**2))
        image += opacity.density * blob.astype(np.float32)
    image += rng.normal(0.0, noise, size=image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0)


def write_cxr(
    out_dir: Path,
    *,
    size: int = 1536,
    pixel_mm: float = 0.25,
    opacities: tuple[Opacity, ...] = (),
    seed: int = 0,
    noise: float = 0.015,
    monochrome1: bool = False,
    study_uid: str | None = None,
) -> PhantomSeries:
    """Write one CR image; MONOCHROME1 stores the same image inverted (as many CR/DX modalities do)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    density = cxr_density(size, pixel_mm, rng, opacities=opacities, noise=noise)
    stored = np.round(200.0 + density * 3600.0).astype(np.uint16)
    if monochrome1:
        stored = (4095 - stored).astype(np.uint16)
    study_uid = study_uid or generate_uid()
    series_uid, sop = generate_uid(), generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
        PATIENT_NAME,
        PATIENT_ID,
        PATIENT_BIRTH_DATE,
        "O",
    )
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = "ACC-PHANTOM-2"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.StudyDescription = "XR CHEST PA"
    ds.SeriesDescription = "PA phantom"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Manufacturer = "Phantom"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ["L", "F"]
    ds.ImageLaterality = "U"
    ds.PixelSpacing = [pixel_mm, pixel_mm]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = stored.tobytes()
    path = out_dir / "cxr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return PhantomSeries(paths=(path,), study_uid=study_uid, series_uid=series_uid, sop_uids=(sop,))
