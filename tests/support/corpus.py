"""The real-world corpus: every image of the shared real data and of the ``pydicom-data`` package, plus generated
variants of what real senders write (VR-violating values in every copied module, odd body parts, missing optional
modules, mixed sizes, duplicate positions, negative spacing, MONOCHROME1 with a VOI LUT).

Each case is written as its own study (fresh Study / Series / SOP Instance UIDs; the pixel data and every other
attribute as the source has them), so that one case's outcome never hides another's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from gateway.demo.phantoms import write_cxr, write_head_ct

IMAGE_MODALITIES = ("CT", "MR", "CR", "DX")


@dataclass(frozen=True, kw_only=True)
class CorpusCase:
    name: str
    study_uid: str
    paths: tuple[Path, ...]
    origin: str  # "shared real", "pydicom", "pydicom-data" or "generated"


def _restudy(sources: list[Dataset], folder: Path, name: str, origin: str) -> CorpusCase:
    """Write ``sources`` as one new study, one series per source series, new SOP Instance UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    series_map: dict[str, str] = {}
    paths = []
    for index, ds in enumerate(sources):
        ds = copy.deepcopy(ds)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series_map.setdefault(str(ds.get("SeriesInstanceUID", index)), generate_uid())
        ds.SOPInstanceUID = generate_uid()
        if hasattr(ds, "file_meta"):
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=False)
        paths.append(path)
    return CorpusCase(name=name, study_uid=study, paths=tuple(paths), origin=origin)


def _image_files(pattern_root: Path) -> list[Path]:
    found = []
    for path in sorted(pattern_root.rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, defer_size=256)
        except Exception:
            continue
        if str(ds.get("Modality", "")) in IMAGE_MODALITIES and "PixelData" in ds:
            found.append(path)
    return found


def package_roots() -> list[tuple[str, Path]]:
    """pydicom's own test files and, when installed, the ``pydicom-data`` package's (offline, no download)."""
    roots = [("pydicom", Path(pydicom.__file__).parent / "data" / "test_files")]
    try:
        import data_store  # the pydicom-data package

        roots.append(("pydicom-data", Path(data_store.__file__).parent / "data"))
    except ImportError:
        pass
    return [(origin, root) for origin, root in roots if root.is_dir()]


def build_corpus(folder: Path, real_data: Path) -> list[CorpusCase]:
    cases: list[CorpusCase] = []
    real = _image_files(real_data)
    by_series: dict[str, list[Dataset]] = {}
    for path in real:
        ds = pydicom.dcmread(path)
        key = f"{path.parent.name}/{ds.get('SeriesInstanceUID', path.name)}/{path.name if path.parent.name != 'ct-3slice' else ''}"
        by_series.setdefault(key, []).append(ds)
    for index, (key, datasets) in enumerate(sorted(by_series.items())):
        cases.append(_restudy(datasets, folder / f"real{index}", f"real: {key}", "shared real"))
    for origin, root in package_roots():
        for index, path in enumerate(_image_files(root)):
            try:
                ds = pydicom.dcmread(path)
            except Exception:
                continue
            cases.append(_restudy([ds], folder / f"{origin}{index}", f"{origin}: {path.name}", origin))
    cases.extend(_generated(folder / "generated"))
    return cases


def _head(folder: Path, seed: int, slices: int = 6) -> list[Dataset]:
    series = write_head_ct(folder, slices=slices, rows=128, cols=128, pixel_mm=2.0, seed=seed)
    return [pydicom.dcmread(p) for p in series.paths]


def _generated(folder: Path) -> list[CorpusCase]:
    cases = []

    def add(name: str, datasets: list[Dataset]) -> None:
        cases.append(_restudy(datasets, folder / name, f"generated: {name}", "generated"))

    digest = "a3f1" * 14
    violations = {
        "PatientBirthDate": digest,
        "StudyDate": "2021-02-30x",
        "StudyTime": "12:61:99",
        "SeriesDate": "2020.01.31",
        "AcquisitionDateTime": "yesterday",
        "AccessionNumber": digest,
        "StudyID": "S" * 30,
        "StudyDescription": "D" * 90,
        "InstitutionName": "General\x00Hospital\x1b[2J",
        "ReferringPhysicianName": "Dr\r\nWho\x1b]0;x\x07",
        "PatientName": "Doe^Jane\n^^^",
        "Manufacturer": "M" * 80,
        "FrameOfReferenceUID": "1.2.840.10008.99.",
    }
    heads = _head(folder / "src_violations", 1)
    for ds in heads:
        for keyword, value in violations.items():
            setattr(ds, keyword, value)
    add("vr_violations", heads)
    for label, body_part in (
        ("partialbody", "PARTIALBODY"),
        ("empty_body_part", ""),
        ("lower_body_part", "head"),
    ):
        heads = _head(folder / f"src_{label}", 2)
        for ds in heads:
            ds.BodyPartExamined = body_part
        add(label, heads)
    heads = _head(folder / "src_missing", 3)
    for ds in heads:
        for keyword in (
            "PatientSex",
            "StudyID",
            "ReferringPhysicianName",
            "BodyPartExamined",
            "FrameOfReferenceUID",
            "PatientBirthDate",
            "AccessionNumber",
            "Manufacturer",
            "StudyTime",
        ):
            if keyword in ds:
                delattr(ds, keyword)
    add("missing_optional", heads)
    big = _head(folder / "src_big", 4)
    odd = [
        pydicom.dcmread(p)
        for p in write_head_ct(folder / "src_odd", slices=2, rows=64, cols=64, seed=6).paths
    ]
    for ds in odd:
        ds.SeriesInstanceUID = big[0].SeriesInstanceUID
    add("mixed_sizes", big + odd)
    heads = _head(folder / "src_dup", 7)
    duplicate = copy.deepcopy(heads[2])
    add("duplicate_position", [*heads, duplicate])
    heads = _head(folder / "src_negative", 8)
    for k, ds in enumerate(heads):
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], -5.0 * k]
        ds.SpacingBetweenSlices = -5.0
    add("negative_spacing", heads)
    cxr = write_cxr(folder / "src_cxr", size=512, pixel_mm=0.7, monochrome1=True, seed=9)
    ds = pydicom.dcmread(cxr.paths[0])
    voi = Dataset()
    voi.LUTDescriptor = [256, 0, 16]
    voi.LUTExplanation = "SOFT"
    voi.add_new(0x00283006, "US", [int(i * 16) for i in range(256)])  # LUT Data, 16-bit entries
    ds.VOILUTSequence = Sequence([voi])
    add("monochrome1_voi_lut", [ds])
    return cases
