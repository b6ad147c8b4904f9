"""A corpus of hostile and broken DICOM input, generated from one good synthetic CT slice.

Every case is its own study (fresh UIDs) so its outcome can be read from the gateway's audit trail.
``expected`` is the defined outcome: ("refused", status) - the C-STORE is answered with that status and nothing
is kept; ("skipped", reason) / ("failed", reason) - stored, kept, not analysed, with that reason in the audit
trail; ("analysed", "") - stored and analysed; ("context", "") - the transfer syntax is refused at association.
"""

from __future__ import annotations

import copy
import struct
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from gateway.demo.phantoms import write_head_ct


@dataclass(frozen=True)
class Case:
    name: str
    files: list[Path]
    study_uid: str
    expected: tuple[str, str]


def _fresh(ds: Dataset, study_uid: str | None = None, series_uid: str | None = None) -> Dataset:
    ds = copy.deepcopy(ds)
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _raw(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def build_corpus(folder: Path) -> list[Case]:
    folder.mkdir(parents=True, exist_ok=True)
    base_series = write_head_ct(folder / "base", slices=3, rows=128, cols=128, seed=99)
    base = pydicom.dcmread(base_series.paths[1])
    cases: list[Case] = []

    def add(name: str, expected: tuple[str, str], make: Callable[[Path, Dataset], list[Path]]) -> None:
        ds = _fresh(base)
        target = folder / name
        target.mkdir()
        cases.append(Case(name, make(target, ds), str(ds.StudyInstanceUID), expected))

    def single(mutate: Callable[[Dataset], object]) -> Callable[[Path, Dataset], list[Path]]:
        def make(target: Path, ds: Dataset) -> list[Path]:
            mutate(ds)
            return [_save(ds, target / "x.dcm")]

        return make

    def raw_bytes(transform: Callable[[bytes, Dataset], bytes]) -> Callable[[Path, Dataset], list[Path]]:
        def make(target: Path, ds: Dataset) -> list[Path]:
            path = target / "x.dcm"
            path.write_bytes(transform(_raw(ds), ds))
            return [path]

        return make

    def pixel_offset(raw: bytes) -> int:
        return raw.rindex(b"\xe0\x7f\x10\x00")

    # -- malformed encodings -------------------------------------------------------------------------------
    add(
        "truncated_in_pixel_data",
        ("failed", "could not be decoded"),
        raw_bytes(lambda r, d: r[: len(r) - 9000]),
    )
    add(
        "truncated_in_header",
        ("skipped", "no image instances"),
        raw_bytes(lambda r, d: r[: pixel_offset(r) - 40]),
    )
    add(
        "value_length_past_end",
        ("failed", "could not be decoded"),
        raw_bytes(
            lambda r, d: (
                r[: pixel_offset(r) + 8]
                + struct.pack("<I", 0x7FFFFFF0)
                + r[pixel_offset(r) + 12 : pixel_offset(r) + 100]
            )
        ),
    )

    def invalid_vr(raw: bytes, ds: Dataset) -> bytes:
        at = raw.index(b"\x08\x00\x60\x00CS")  # Modality, explicit VR "CS"
        return raw[: at + 4] + b"ZZ" + raw[at + 6 :]

    add("invalid_vr", ("refused", "0xC000"), raw_bytes(invalid_vr))
    add(
        "odd_value_length",
        ("refused", "0xC000"),
        raw_bytes(
            lambda r, d: r.replace(b"\x08\x00\x60\x00CS\x02\x00CT", b"\x08\x00\x60\x00CS\xff\xffCT", 1)
        ),
    )

    # -- pixel data problems -------------------------------------------------------------------------------
    add("missing_pixel_data", ("skipped", "no image instances"), single(lambda d: delattr(d, "PixelData")))
    add(
        "empty_pixel_data", ("failed", "could not be decoded"), single(lambda d: setattr(d, "PixelData", b""))
    )
    add(
        "pixel_data_too_short",
        ("failed", "could not be decoded"),
        single(lambda d: setattr(d, "PixelData", d.PixelData[:1000])),
    )
    add(
        "pixel_data_too_long",
        ("analysed", ""),
        single(lambda d: setattr(d, "PixelData", d.PixelData + b"\x00" * 4096)),
    )
    add(
        "huge_declared_size",
        ("failed", "exceeds the per-instance limit"),
        single(lambda d: (setattr(d, "Rows", 65535), setattr(d, "Columns", 65535))),
    )
    add("zero_rows", ("failed", "bad image size"), single(lambda d: setattr(d, "Rows", 0)))
    add(
        "bits_allocated_13",
        ("failed", "could not be decoded"),
        single(lambda d: setattr(d, "BitsAllocated", 13)),
    )
    add(
        "colour_image",
        ("failed", "colour images"),
        single(
            lambda d: (
                setattr(d, "SamplesPerPixel", 3),
                setattr(d, "PhotometricInterpretation", "RGB"),
                setattr(d, "PlanarConfiguration", 0),
                setattr(d, "BitsAllocated", 8),
                setattr(d, "BitsStored", 8),
                setattr(d, "HighBit", 7),
                setattr(d, "PixelData", bytes(128 * 128 * 3)),
            )
        ),
    )
    add(
        "multi_frame",
        ("failed", "multi-frame"),
        single(lambda d: (setattr(d, "NumberOfFrames", 2), setattr(d, "PixelData", d.PixelData * 2))),
    )
    add(
        "non_numeric_rescale",
        ("failed", "bad rescale slope"),
        raw_bytes(
            lambda r, d: r.replace(b"\x28\x00\x53\x10DS\x04\x001.0 ", b"\x28\x00\x53\x10DS\x04\x00abc ", 1)
        ),
    )
    add("nan_position", ("analysed", ""), single(lambda d: d.add_new(0x00200032, "DS", ["nan", "0", "0"])))

    def encapsulated(syntax: str, frame: bytes) -> Callable[[Dataset], object]:
        def mutate(d: Dataset) -> None:
            d.file_meta.TransferSyntaxUID = syntax
            d.PixelData = encapsulate([frame])
            d["PixelData"].VR = "OB"
            d["PixelData"].is_undefined_length = True

        return mutate

    add(
        "corrupt_jpeg_baseline",
        ("failed", "could not be decoded"),
        single(encapsulated(JPEGBaseline8Bit, b"\xff\xd8\xff\xe0" + bytes(64))),
    )
    add(
        "corrupt_jpeg2000",
        ("failed", "could not be decoded"),
        single(encapsulated(JPEG2000Lossless, b"\xff\x4f\xff\x51" + bytes(64))),
    )
    add(
        "corrupt_jpeg_ls",
        ("failed", "could not be decoded"),
        single(encapsulated(JPEGLSLossless, bytes(8) + b"\xff\xf7" + bytes(64))),
    )
    add(
        "corrupt_rle",
        ("failed", "could not be decoded"),
        single(encapsulated(RLELossless, struct.pack("<16I", 99, *([64] * 15)))),
    )
    add(
        "private_transfer_syntax",
        ("context", ""),
        single(lambda d: setattr(d.file_meta, "TransferSyntaxUID", "1.2.3.4.5.6.7.8")),
    )

    # -- identifiers ---------------------------------------------------------------------------------------
    add("empty_study_uid", ("refused", "0xC000"), single(lambda d: setattr(d, "StudyInstanceUID", "")))
    add(
        "letters_in_uid",
        ("refused", "0xC000"),
        single(lambda d: setattr(d, "SeriesInstanceUID", "1.2.abc.4")),
    )
    add(
        "uid_like_a_path",
        ("refused", "0xC000"),
        single(lambda d: setattr(d, "StudyInstanceUID", "../../../etc/cron.d")),
    )
    add(
        "uid_too_long",
        ("refused", "0xC000"),
        single(lambda d: setattr(d, "SeriesInstanceUID", "1." + "2" * 80)),
    )
    add(
        "missing_modality",
        ("skipped", "no pipeline for modality ?"),
        single(lambda d: delattr(d, "Modality")),
    )

    def deep_nesting(d: Dataset) -> None:
        inner = Dataset()
        inner.CodeValue = "1"
        for _ in range(60):
            outer = Dataset()
            outer.ContentSequence = [inner]
            inner = outer
        d.ContentSequence = [inner]

    add("deeply_nested_sequences", ("analysed", ""), single(deep_nesting))
    add(
        "large_private_junk",
        ("analysed", ""),
        single(
            lambda d: (
                d.add_new(0x00990010, "LO", "JUNK"),
                d.add_new(0x00991000, "OB", bytes(range(256)) * 8192),
            )
        ),
    )

    # -- series-level problems -----------------------------------------------------------------------------
    def series_of(mutate_second: Callable[[Dataset], object]) -> Callable[[Path, Dataset], list[Path]]:
        def make(target: Path, ds: Dataset) -> list[Path]:
            paths = []
            for i, src in enumerate(base_series.paths):
                member = _fresh(pydicom.dcmread(src), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
                if i == 1:
                    mutate_second(member)
                paths.append(_save(member, target / f"{i}.dcm"))
            return paths

        return make

    add(
        "mixed_orientation",
        ("failed", "orientations"),
        series_of(lambda d: setattr(d, "ImageOrientationPatient", [0, 1, 0, 0, 0, -1])),
    )
    add(
        "mixed_sizes",
        ("failed", "mixes image sizes"),
        series_of(
            lambda d: (
                setattr(d, "Rows", 64),
                setattr(d, "Columns", 64),
                setattr(d, "PixelData", bytes(64 * 64 * 2)),
            )
        ),
    )

    def duplicate_uid(target: Path, ds: Dataset) -> list[Path]:
        first = _save(ds, target / "a.dcm")
        changed = copy.deepcopy(ds)
        changed.PixelData = (np.frombuffer(ds.PixelData, np.uint16) // 2).astype(np.uint16).tobytes()
        return [first, _save(changed, target / "b.dcm")]

    add("duplicate_sop_uid_different_content", ("analysed", ""), duplicate_uid)

    # -- non-image objects -----------------------------------------------------------------------------------
    def non_image(sop_class: str, modality: str) -> Callable[[Path, Dataset], list[Path]]:
        def make(target: Path, ds: Dataset) -> list[Path]:
            obj = Dataset()
            obj.file_meta = FileMetaDataset()
            obj.file_meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
            obj.file_meta.MediaStorageSOPClassUID = sop_class
            obj.SOPClassUID = sop_class
            obj.SOPInstanceUID = obj.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            obj.StudyInstanceUID, obj.SeriesInstanceUID = ds.StudyInstanceUID, generate_uid()
            obj.Modality = modality
            obj.PatientID, obj.PatientName = ds.PatientID, ds.PatientName
            return [_save(obj, target / "x.dcm")]

        return make

    add(
        "structured_report",
        ("skipped", "no image instances"),
        non_image("1.2.840.10008.5.1.4.1.1.88.34", "SR"),
    )
    add(
        "presentation_state",
        ("skipped", "no image instances"),
        non_image("1.2.840.10008.5.1.4.1.1.11.1", "PR"),
    )
    add(
        "key_object_selection",
        ("skipped", "no image instances"),
        non_image("1.2.840.10008.5.1.4.1.1.88.59", "KO"),
    )
    return cases
