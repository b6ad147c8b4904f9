"""STOW-RS without a server: the multipart body split into DICOM parts, each part stored in a real spool with the
C-STORE rule, and the Store Instances Response Module the client gets back."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from gateway.core.domain import InstanceRecord
from gateway.core.errors import STATUS_CANNOT_UNDERSTAND, STATUS_DATASET_MISMATCH, STATUS_OUT_OF_RESOURCES
from gateway.demo.phantoms import write_head_ct
from gateway.ingest.spool import Spool
from gateway.ingest.stow import PartReader, StowRequestError, StowStore, dicom_parts

BOUNDARY = "0f3cf5c0-70e0-41ef-baef-c6f9f65ec3e1"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'


def multipart(parts: list[bytes], *, boundary: str = BOUNDARY, preamble: bytes = b"") -> bytes:
    body = preamble
    for part in parts:
        body += f"\r\n--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part
    return body + f"\r\n--{boundary}--\r\nepilogue".encode()


def test_parts_are_split_exactly_whatever_the_framing() -> None:
    one, two = b"\x00" * 128 + b"DICM first\r\n--not-a-boundary", b"second\r\n\r\nwith blank lines"
    assert dicom_parts(CONTENT_TYPE, multipart([one, two])) == [one, two]
    # No CRLF before the first delimiter, a preamble, an unquoted boundary, a part without a Content-Type.
    bare = f"--{BOUNDARY}\r\n\r\n".encode() + one + f"\r\n--{BOUNDARY}--".encode()
    assert dicom_parts(f"multipart/related; boundary={BOUNDARY}", bare) == [one]
    assert dicom_parts(CONTENT_TYPE, multipart([two], preamble=b"ignored preamble")) == [two]


@pytest.mark.parametrize(
    ("content_type", "body", "unsupported"),
    [
        ("application/dicom", b"DICM", True),
        ('multipart/related; type="application/dicom+json"; boundary=x', b"--x\r\n\r\n{}\r\n--x--", True),
        ("multipart/related; type=application/dicom", b"--x\r\n\r\nabc\r\n--x--", False),  # no boundary
        (CONTENT_TYPE, f"\r\n--{BOUNDARY}--\r\n".encode(), False),  # no part at all
        (CONTENT_TYPE, f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom".encode(), False),  # cut short
    ],
)
def test_a_request_that_is_not_stow_is_refused_as_a_whole(
    content_type: str, body: bytes, unsupported: bool
) -> None:
    with pytest.raises(StowRequestError) as refused:
        dicom_parts(content_type, body)
    assert refused.value.unsupported_media_type is unsupported


def test_each_part_is_stored_durably_or_refused_with_the_c_store_status(tmp_path: Path) -> None:
    series = write_head_ct(tmp_path / "in", slices=3, rows=32, cols=32)
    files = [p.read_bytes() for p in series.paths]
    stored: list[InstanceRecord] = []
    ended: list[tuple[set[str], str]] = []
    store = StowStore(Spool(tmp_path / "spool"), stored.append, lambda s, p: ended.append((s, p)))

    outcome = store.receive(CONTENT_TYPE, multipart(files), "VNA", None)
    assert outcome.http_status == 200 and not outcome.failed
    assert [r.sop_instance_uid for r in stored] == [uid for _, uid in outcome.stored]
    for record, raw in zip(stored, files, strict=True):  # on disk before the answer, byte for byte the same
        on_disk = pydicom.dcmread(record.path)
        assert on_disk.SOPInstanceUID == record.sop_instance_uid and record.calling_ae == "VNA"
        assert record.path.read_bytes()[-1000:] == raw[-1000:]
    assert ended == [({series.study_uid}, "")]

    # One good part and one that is not DICOM: 202, the failure with its reason, the study held as incomplete.
    mixed = store.receive(CONTENT_TYPE, multipart([files[0], b"not dicom at all"]), "VNA", None)
    assert mixed.http_status == 202 and mixed.failed == [("", "", STATUS_CANNOT_UNDERSTAND)]
    hollow = store.receive(CONTENT_TYPE, multipart([b"\x00" * 128 + b"DICM" + b"\x02\x00" * 8]), "VNA", None)
    assert hollow.failed == [("", "", STATUS_CANNOT_UNDERSTAND)]  # a preamble and nothing of a meta group
    assert ended[-1] == ({series.study_uid}, "instances refused")

    # The request's path names another study: refused, nothing stored.
    before = len(stored)
    other = store.receive(CONTENT_TYPE, multipart(files[:1]), "VNA", "1.2.3.4")
    assert other.http_status == 409 and other.failed[0][2] == STATUS_DATASET_MISMATCH
    assert len(stored) == before
    assert store.receive(CONTENT_TYPE, multipart(files[:1]), "VNA", series.study_uid).http_status == 200

    # The response module, parsed back as the client does.
    response = Dataset.from_json(mixed.response())
    assert [i.ReferencedSOPInstanceUID for i in response.ReferencedSOPSequence] == [
        stored[0].sop_instance_uid
    ]
    assert [int(i.FailureReason) for i in response.FailedSOPSequence] == [STATUS_CANNOT_UNDERSTAND]


def test_a_full_spool_refuses_every_part_out_of_resources(tmp_path: Path) -> None:
    series = write_head_ct(tmp_path / "in", slices=2, rows=32, cols=32)
    store = StowStore(Spool(tmp_path / "spool", min_free_bytes=1 << 60), lambda r: None)
    outcome = store.receive(CONTENT_TYPE, multipart([p.read_bytes() for p in series.paths]), "VNA", None)
    assert outcome.http_status == 409
    assert [reason for _, _, reason in outcome.failed] == [STATUS_OUT_OF_RESOURCES] * 2
    assert {uid for _, uid, _ in outcome.failed} == {pydicom.dcmread(p).SOPInstanceUID for p in series.paths}
    assert not list((tmp_path / "spool").rglob("*.dcm"))


@given(cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12))
@settings(max_examples=120, deadline=None)
def test_parts_split_as_the_body_streams_in_are_the_same_whatever_the_chunks(cuts: list[int]) -> None:
    """The body cut anywhere (inside a delimiter, a header, between CR and LF) gives the same parts, each as soon
    as the data that completes it has arrived."""
    parts = [b"\x00" * 128 + b"DICM one\r\n-", b"two\r\n\r\n--", b"three" * 300]
    body = multipart(parts, preamble=b"preamble")
    reader = PartReader(BOUNDARY.encode())
    got: list[tuple[str, bytes]] = []
    start = 0
    for cut in sorted(c % (len(body) + 1) for c in cuts):
        got += reader.feed(body[start:cut])
        start = max(start, cut)
    got += reader.feed(body[start:]) + reader.close()
    assert got == [("application/dicom", p) for p in parts]


def test_a_streamed_request_keeps_what_it_stored_before_the_body_broke(tmp_path: Path) -> None:
    series = write_head_ct(tmp_path / "in", slices=2, rows=32, cols=32)
    files = [p.read_bytes() for p in series.paths]
    stored: list[InstanceRecord] = []
    store = StowStore(Spool(tmp_path / "spool"), stored.append)
    request = store.open(CONTENT_TYPE, "VNA", None)
    body = multipart(files)
    request.feed(body[: len(body) // 2 + 200])  # the first part is complete: it is stored now
    assert len(stored) == 1 and stored[0].path.exists()
    request.feed(f"\r\n--{BOUNDARY}\r\nno header/body separator".encode())  # a broken framing
    outcome = request.finish()
    assert outcome.http_status == 202 and len(outcome.stored) == 1
    # The second instance, cut short by the broken part, and the rest that could not be split: both refused.
    assert [reason for *_, reason in outcome.failed] == [STATUS_CANNOT_UNDERSTAND] * 2
    # A part that is not DICOM is one failure, not the end of the request.
    other = store.open(CONTENT_TYPE, "VNA", None)
    other.feed(
        f"--{BOUNDARY}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n".encode()
        + f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + files[1]
        + f"\r\n--{BOUNDARY}--".encode()
    )
    mixed = other.finish()
    assert (
        mixed.http_status == 202 and len(mixed.stored) == 1 and mixed.failed[0][2] == STATUS_CANNOT_UNDERSTAND
    )


def test_a_request_that_will_not_finish_leaves_its_studies_waiting_as_an_aborted_association(
    tmp_path: Path,
) -> None:
    series = write_head_ct(tmp_path / "in", slices=2, rows=32, cols=32)
    files = [p.read_bytes() for p in series.paths]
    ended: list[tuple[set[str], str]] = []
    store = StowStore(Spool(tmp_path / "spool"), lambda r: None, lambda s, p: ended.append((s, p)))
    request = store.open(CONTENT_TYPE, "VNA", None)
    body = multipart(files)
    request.feed(body[: len(body) // 2 + 200])  # one instance stored, then the client goes away
    request.abandon("association aborted")
    assert ended == [({series.study_uid}, "association aborted")]
    assert len(list((tmp_path / "spool").rglob("*.dcm"))) == 1  # what was stored stays
