"""FHIR R4 bundle and HL7 v2 messages: validated by their libraries, parsed back field by field, and HL7
delivered over MLLP to a real listener that acknowledges, refuses and stays silent."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle
from hl7apy.parser import parse_message

from clients.mllp import ack_code, send_mllp
from gateway.core.errors import DeliveryError
from gateway.demo.phantoms import PATIENT_ID, write_head_ct
from gateway.reporting.fhir import build_bundle
from gateway.reporting.hl7 import build_oru, build_priority_update
from gateway.results.content import SeriesReport, reported_findings
from preprocessing.series import load_series
from tests.support.analysis import make_analysis, make_finding
from tests.support.servers import MllpListener


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> list[SeriesReport]:
    loaded = load_series(write_head_ct(tmp_path_factory.mktemp("ct"), slices=4, rows=128, cols=128).paths)
    findings = tuple(
        make_finding(loaded, i, conf, long_axis_mm=10.0, area_mm2=100.0, mean_hu=70.5)
        for i, conf in ((1, 0.91), (2, 0.55))
    )
    analysis = make_analysis(loaded, findings, stat=True, study_score=0.91)
    return [
        SeriesReport(
            analysis=analysis, findings=tuple(reported_findings(analysis)), sr_sop_instance_uid="1.2.3.4.5"
        )
    ]


def test_fhir_bundle_validates_and_carries_findings(reports: list[SeriesReport]) -> None:
    bundle = build_bundle(reports, stat=True)
    again = Bundle.model_validate_json(bundle.model_dump_json())  # round trip through the model library
    resources = [e.resource for e in again.entry]
    kinds = [r.get_resource_type() for r in resources]
    assert (
        kinds.count("Observation") == 2
        and kinds.count("DiagnosticReport") == 1
        and kinds.count("Device") == 1
    )
    report = next(r for r in resources if r.get_resource_type() == "DiagnosticReport")
    study_uid = str(reports[0].header.StudyInstanceUID)
    assert report.status == "preliminary"
    assert report.imagingStudy[0].identifier.value == f"urn:oid:{study_uid}"
    assert len(report.result) == 2 and "STAT" in report.conclusion
    assert report.conclusionCode[0].coding[0].code == "50960005"
    observations = [r for r in resources if r.get_resource_type() == "Observation"]
    first = observations[0]
    assert first.code.coding[0].system == "http://snomed.info/sct" and first.code.coding[0].code == "50960005"
    assert first.bodySite.coding[0].code == "69536005"
    assert (
        float(first.valueQuantity.value) == pytest.approx(0.91)
        and first.valueQuantity.system == "http://unitsofmeasure.org"
    )
    components = {
        c.code.coding[0].code: (float(c.valueQuantity.value), c.valueQuantity.code) for c in first.component
    }
    assert components == {
        "103339001": (10.0, "mm"),
        "42798000": (100.0, "mm2"),
        "373098007": (70.5, "[hnsf'U]"),
    }
    assert first.derivedFrom[0].identifier.value == f"urn:oid:{study_uid}"
    device = next(r for r in resources if r.get_resource_type() == "Device")
    assert first.device.reference == next(e.fullUrl for e in again.entry if e.resource is device)
    assert {v.value for v in device.version} == {"0.1.0", "ct_head_hyperdensity v1"}
    assert [i.coding[0].code for o in observations for i in o.interpretation] == ["AA", "A"]


def test_fhir_bundle_for_a_negative_study_has_a_report_and_no_observations(
    reports: list[SeriesReport],
) -> None:
    negative = [dataclasses.replace(reports[0], findings=())]
    bundle = json.loads(build_bundle(negative, stat=False).model_dump_json())
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds == ["Device", "DiagnosticReport"]
    assert "0 finding(s)" in bundle["entry"][-1]["resource"]["conclusion"]


def test_oru_parses_back_field_by_field(reports: list[SeriesReport]) -> None:
    text = build_oru(reports, stat=True, control_id="CTRL1").to_er7()
    message = parse_message(text, find_groups=True)
    assert message.validate()
    assert message.msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and message.msh.msh_10.value == "CTRL1"
    result = message.oru_r01_patient_result
    assert result.oru_r01_patient.pid.pid_3.to_er7().split("^")[0] == PATIENT_ID
    order = result.oru_r01_order_observation
    assert order.obr.obr_25.value == "P" and order.obr.obr_27.to_er7() == "^^^^^S"
    obx = [g.obx for g in order.oru_r01_observation]
    assert obx[0].obx_5.value == str(reports[0].header.StudyInstanceUID)
    findings = [o for o in obx if o.obx_3.to_er7().startswith("50960005^")]
    assert [f.obx_5.value for f in findings] == ["0.91", "0.55"]
    assert [f.obx_8.value for f in findings] == ["AA", "A"]
    assert findings[0].obx_6.to_er7() == "1^no units^UCUM"
    long_axis = [o for o in obx if o.obx_3.to_er7().startswith("103339001^")]
    assert long_axis[0].obx_5.value == "10" and long_axis[0].obx_4.value == findings[0].obx_4.value
    assert all(o.obx_11.value == "P" for o in obx)


def test_priority_update_requests_stat(reports: list[SeriesReport]) -> None:
    message = parse_message(build_priority_update(reports, control_id="CTRL2").to_er7(), find_groups=True)
    assert message.validate()
    assert message.msh.msh_9.to_er7() == "OMI^O23^OMI_O23"
    order = message.omi_o23_order
    assert order.orc.orc_1.value == "XO"
    assert order.omi_o23_timing.tq1.tq1_9.value == "S"
    assert order.ipc.ipc_3.value == str(reports[0].header.StudyInstanceUID)


def test_mllp_delivery_acks_then_retries_on_nak_and_silence(reports: list[SeriesReport]) -> None:
    text = build_oru(reports, stat=False, control_id="CTRL3").to_er7()
    with MllpListener(["ACK"]) as listener:
        result = asyncio.run(send_mllp("127.0.0.1", listener.port, text, timeout_s=1.0, backoff_s=0.05))
        assert result.attempts == 1 and ack_code(result.ack) == "AA"
        assert listener.received == [text]
    with MllpListener(["NAK", "SILENT", "ACK"]) as listener:
        result = asyncio.run(
            send_mllp("127.0.0.1", listener.port, text, timeout_s=1.0, attempts=3, backoff_s=0.05)
        )
        assert result.attempts == 3
        assert listener.received == [text, text, text]
    with (
        MllpListener(["NAK", "NAK", "NAK"]) as listener,
        pytest.raises(DeliveryError, match="after 3 tries: negative acknowledgement AE"),
    ):
        asyncio.run(send_mllp("127.0.0.1", listener.port, text, timeout_s=1.0, attempts=3, backoff_s=0.05))


def test_unreachable_mllp_endpoint_is_a_delivery_error(tmp_path: Path) -> None:
    from gateway.inference.server import free_port

    with pytest.raises(DeliveryError, match="after 2 tries"):
        asyncio.run(
            send_mllp("127.0.0.1", free_port(), "MSH|^~\\&|x", timeout_s=0.5, attempts=2, backoff_s=0.01)
        )


def test_the_ups_workitem_names_the_study_its_priority_inputs_and_outputs(
    reports: list[SeriesReport],
) -> None:
    from gateway.reporting.ups import (
        StoredObject,
        build_completion,
        build_workitem,
        transaction_uid,
        workitem_uid,
    )

    header = reports[0].header
    study_uid = str(header.StudyInstanceUID)
    created = build_workitem(reports, stat=True, retrieve_ae="PACS1")
    assert created.ProcedureStepState == "SCHEDULED" and created.ScheduledProcedureStepPriority == "HIGH"
    assert created.PatientID == header.PatientID and created.AccessionNumber == header.AccessionNumber
    [source] = created.InputInformationSequence
    assert source.SeriesInstanceUID == header.SeriesInstanceUID and len(source.ReferencedSOPSequence) == 4
    assert source.DICOMRetrievalSequence[0].RetrieveAETitle == "PACS1"
    assert build_workitem(reports, stat=False).ScheduledProcedureStepPriority == "MEDIUM"
    outputs = [
        StoredObject(
            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
            sop_instance_uid="1.2.3.4.5",
            series_instance_uid="9.1",
        ),
        StoredObject(
            sop_class_uid="1.2.840.10008.5.1.4.1.1.11.1",
            sop_instance_uid="1.2.3.4.6",
            series_instance_uid="9.2",
        ),
    ]
    final = build_completion(reports, outputs, stat=True)
    [performed] = final.UnifiedProcedureStepPerformedProcedureSequence
    listed = {
        r.ReferencedSOPInstanceUID
        for i in performed.OutputInformationSequence
        for r in i.ReferencedSOPSequence
    }
    assert listed == {"1.2.3.4.5", "1.2.3.4.6"} and len(performed.OutputInformationSequence) == 2
    words = final.ProcedureStepProgressInformationSequence[0].ProcedureStepProgressDescription
    assert words.startswith("STAT - critical AI finding") and len(words) <= 64  # LO
    assert "2 finding(s)" in performed.CommentsOnThePerformedProcedureStep
    # The same objects, the same workitem (a retry updates it); other objects, another workitem.
    assert workitem_uid(study_uid, outputs) == workitem_uid(study_uid, list(reversed(outputs)))
    assert workitem_uid(study_uid, outputs[:1]) != workitem_uid(study_uid, outputs)
    assert transaction_uid(workitem_uid(study_uid, outputs)) != workitem_uid(study_uid, outputs)


def test_the_critical_alert_names_the_case_by_accession_and_carries_no_demographics() -> None:
    from gateway.reporting.hl7 import build_critical_alert

    message = build_critical_alert(
        study_uid="1.2.3",
        accession_number="ACC|7",
        text="Head CT: 1 finding",
        acknowledge_url="http://x/a?b=1&c=2",
    )
    assert message.validate()
    text = message.to_er7()
    parsed = parse_message(text, find_groups=True)
    assert parsed.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    pid = text.split("\r")[1]
    assert pid == 'PID|1||ACC\\F\\7^^^^AN||""'  # the case, not the patient
    assert "OBX|3|ST|ACKURL^Acknowledge at^99AIG||http://x/a?b=1\\T\\c=2|||AA|||P" in text
