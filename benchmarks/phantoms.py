"""Synthetic head CT phantoms with known ground truth, written as real DICOM files.

An elliptical skull (cortical bone), brain parenchyma with Gaussian noise, lateral ventricles (CSF) and,
optionally, spherical hyperdense lesions (acute-blood HU) at known positions. Used by the tests and the
benchmarks; the identifiers are fixed, recognisable test values (for log-leak checks), never real ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

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
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    paths, sops = [], []
    for k in range(slices):
        hu = head_slice(rows, cols, k / max(1, slices - 1), rng, noise_hu=noise_hu)
        z = k * slice_mm
        yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
        for lesion in lesions:
            dz = (k - lesion.slice) * slice_mm
            radius2 = lesion.radius_mm**2 - dz**2
            if radius2 <= 0:
                continue
            d2 = ((yy - lesion.y) * pixel_mm) ** 2 + ((xx - lesion.x) * pixel_mm) ** 2
            hu[d2 <= radius2] = lesion.hu + rng.normal(0.0, 3.0, size=int((d2 <= radius2).sum()))
        stored = np.clip(np.round(hu + 1024.0), 0, 4095).astype(np.uint16)
        sop = generate_uid()
        ds = _ct_dataset(
            study_uid, series_uid, frame_uid, sop, stored, z, pixel_mm, slice_mm, priority, calling_name
        )
        ds.InstanceNumber = slices - k if reverse_instance_numbers else k + 1
        path = out_dir / f"slice_{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        sops.append(sop)
    return PhantomSeries(
        paths=tuple(paths), study_uid=study_uid, series_uid=series_uid, sop_uids=tuple(sops), lesions=lesions
    )


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
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
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
    ds.StudyDescription = "CT HEAD WO CONTRAST"
    ds.SeriesDescription = "Axial 5mm phantom"
    ds.Modality = "CT"
    ds.BodyPartExamined = "HEAD"
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
    ds.WindowCenter = 40
    ds.WindowWidth = 80
    ds.PixelData = stored.tobytes()
    return ds
