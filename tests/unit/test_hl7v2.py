"""HL7 v2 messages: tolerant parsing with escapes and any delimiters, orders read from ORM / OMI, and the
acknowledgement that MSH-15 asks for."""

from __future__ import annotations

import pytest

from gateway.workflow.hl7v2 import Er7Message, Hl7Error, Outcome, acknowledgement
from gateway.workflow.orders import OrderError, order_from_message, patient_key


def segment(name: str, **fields: str) -> str:
    """A segment with the given fields by number (``f18="ACC"``), the others empty."""
    numbered = {int(key[1:]): value for key, value in fields.items()}
    return "|".join([name, *(numbered.get(n, "") for n in range(1, max(numbered) + 1))])


ORM = (
    "\r".join(
        [
            "MSH|^~\\&|RIS|HOSP|AI_GATEWAY|HOSP|20261202101500||ORM^O01|MSG0001|P|2.3",
            "PID|1||PAT123^^^HOSP||DOE^JANE||19700101|F",
            segment("ORC", f1="NW", f2="PLC1", f3="FIL1", f7="^^^^^S"),
            segment(
                "OBR",
                f1="1",
                f2="PLC1",
                f3="FIL1",
                f4="CTHEAD^CT head without contrast^L",
                f18="ACC-0001",
                f31="^Sudden headache \\T\\ vomiting",
            ),
        ]
    )
    + "\r"
)
OMI = (
    "\r".join(
        [
            "MSH|^~\\&|RIS|HOSP|AI_GATEWAY|HOSP|20261202101500||OMI^O23^OMI_O23|MSG0002|P|2.5|||AL",
            "PID|1||PAT9^^^HOSP",
            "ORC|NW|P2|F2",
            segment("TQ1", f1="1", f9="A"),
            segment("OBR", f1="1", f2="P2", f3="F2", f4="CTCHEST^CT chest", f31="^Nodule follow-up"),
            "IPC|ACC-0002|RP2|1.2.826.0.1.3680043.10.7.1|SPS2",
        ]
    )
    + "\r"
)


def test_an_orm_gives_accession_priority_reason_procedure_and_no_patient_id() -> None:
    order = order_from_message(Er7Message(ORM))
    assert order.accession_number == "ACC-0001"  # OBR-18
    assert order.priority == "STAT"  # ORC-7.6 = S
    assert order.reason == "Sudden headache & vomiting"  # OBR-31.2, \T\ unescaped
    assert (order.procedure_code, order.procedure_text) == ("CTHEAD", "CT head without contrast")
    assert order.status == "active" and order.message_type == "ORM^O01" and order.control_id == "MSG0001"
    assert order.patient_key == patient_key("PAT123", "HOSP") and "PAT123" not in order.patient_key


def test_an_omi_gives_the_accession_and_study_from_ipc_and_priority_from_tq1() -> None:
    order = order_from_message(Er7Message(OMI))
    assert (order.accession_number, order.study_uid) == ("ACC-0002", "1.2.826.0.1.3680043.10.7.1")
    assert order.priority == "URGENT" and order.reason == "Nodule follow-up"


def test_a_cancel_and_other_delimiters_and_line_endings() -> None:
    text = ORM.replace("ORC|NW", "ORC|CA").replace("|", "#").replace("\r", "\n")
    text = text.replace("MSH#^~\\&", "MSH#^~\\&")
    message = Er7Message(text)
    assert message.field_sep == "#"
    assert order_from_message(message).status == "cancelled"


def test_an_order_without_accession_is_an_error() -> None:
    text = ORM.replace("ACC-0001", "").replace("|PLC1|FIL1|CTHEAD", "|PLC1||CTHEAD")
    with pytest.raises(OrderError, match="no accession number"):
        order_from_message(Er7Message(text))


@pytest.mark.parametrize(
    "text",
    ["", "hello", "PID|1||X", "MSH", "MSHabcd", "MSH|^^^^|x", "MSH|^~\\&|A\rP!D|1"],
)
def test_garbage_is_an_hl7_error_never_another_exception(text: str) -> None:
    with pytest.raises(Hl7Error):
        Er7Message(text)


def _msa(ack: str | None) -> list[str]:
    assert ack is not None
    segments = {s.split("|")[0]: s.split("|") for s in ack.split("\r") if s}
    return segments["MSA"]


def test_original_mode_answers_aa_ae_ar_with_the_reason_in_err() -> None:
    message = Er7Message(ORM)
    ok = acknowledgement(message, Outcome(status="accepted"), application="GW", facility="F")
    assert _msa(ok)[:3] == ["MSA", "AA", "MSG0001"]
    assert ok is not None and ok.startswith("MSH|^~\\&|AI_GATEWAY|HOSP|RIS|HOSP|") and "ERR" not in ok
    assert "|ACK^O01^ACK|" in ok
    bad = acknowledgement(
        message,
        Outcome(status="error", reason="no accession|number", error_code="101"),
        application="GW",
        facility="F",
    )
    assert _msa(bad)[1] == "AE"
    answer = Er7Message(bad or "")
    assert (
        answer.get("ERR", 3) == "101" and answer.get("ERR", 8) == "no accession|number"
    )  # escaped, read back
    assert (
        _msa(acknowledgement(None, Outcome(status="rejected", reason="x"), application="GW", facility="F"))[1]
        == "AR"
    )


@pytest.mark.parametrize(
    ("mode", "accepted", "rejected"),
    [("AL", "CA", "CR"), ("NE", None, None), ("ER", None, "CR"), ("SU", "CA", None)],
)
def test_enhanced_mode_follows_msh15(mode: str, accepted: str | None, rejected: str | None) -> None:
    message = Er7Message(OMI.replace("|2.5|||AL", f"|2.5|||{mode}"))

    def code(status: str) -> str | None:
        ack = acknowledgement(message, Outcome(status=status, reason="r"), application="GW", facility="F")
        return None if ack is None else _msa(ack)[1]

    assert code("accepted") == accepted
    assert code("rejected") == rejected


def test_the_expected_number_of_images_is_read_from_the_configured_field() -> None:
    with_count = ORM.replace("^Sudden headache \\T\\ vomiting", "^Sudden headache" + "|" * 6 + "240")
    assert order_from_message(Er7Message(with_count)).expected_images == 240  # OBR-37 by default
    assert order_from_message(Er7Message(with_count), "").expected_images is None  # not read
    assert order_from_message(Er7Message(ORM)).expected_images is None  # not sent
    not_a_count = with_count.replace("|240", "|two hundred")
    assert order_from_message(Er7Message(not_a_count)).expected_images is None
    z_segment = ORM.replace("\rPID", "\rZDS|1|96\rPID")
    assert order_from_message(Er7Message(z_segment), "ZDS-2").expected_images == 96
