"""Final reports against the AI (issue 14, item 2) on a real gateway: the RIS sends signed reports as HL7
ORU^R01 over MLLP (stored before the ACK), each is linked to its study by accession number, read for every
finding type of every pipeline that analysed it, and a discordant case of a shown result becomes a QA item with
its evidence; the AI-assisted flag says whether the AI's results were delivered and viewed before sign-off."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from gateway.app import Gateway
from gateway.config.settings import load_settings
from gateway.database import schema as t
from gateway.demo.phantoms import Lesion, write_head_ct
from gateway.inference.server import free_port
from gateway.ops.http_api import hash_token
from tests.integration.test_order_feed import MllpClient, msa
from tests.support.servers import Orthanc, http_json, storescu, wait_for
from tests.unit.test_final_report_message import obr

pytestmark = pytest.mark.integration

DR, QA = "radiologist-token", "qa-token"
PIPELINE = (
    '[[pipelines]]\nname = "{name}"\nmodel = "ct_head_hyperdensity"\nalgorithm_version = "0.1.0"\n'
    'mode = "{mode}"\nreport_threshold = 0.5\nstat_threshold = 0.7\nmodalities = ["CT"]\n'
    'input_size = [256, 256]\n[pipelines.labels]\n0 = "hemorrhage"\n'
)


def _hl7_now(offset_s: float = 0.0) -> str:
    """An HL7 TS of now (UTC, with its zone): a report is signed when it is sent (a fixed date here went stale)."""
    return time.strftime("%Y%m%d%H%M%S+0000", time.gmtime(time.time() + offset_s))


def oru(accession: str, text: list[str], *, control: str, status: str = "F", signed_in_s: float = 1.0) -> str:
    """An ORU^R01 final report, signed ``signed_in_s`` from now (HL7 times have whole seconds: a report sent just
    after the AI was viewed is signed a second later)."""
    obx = "\r".join(
        f"OBX|{i}|TX|18782-3^Study observation^LN||{line}||||||F" for i, line in enumerate(text, 1)
    )
    return (
        f"MSH|^~\\&|RIS|HOSP|AI_GATEWAY|HOSP|{_hl7_now()}||ORU^R01|{control}|P|2.5\r"
        "PID|1||MRN-1^^^HOSP||DOE^JANE\r"
        + obr(
            f3=accession,
            f4="70450^CT head",
            f7=_hl7_now(-3600),
            f18=accession,
            f22=_hl7_now(signed_in_s),
            f24="CT",
            f25=status,
            f32="RAD1^Reader^Ruth",
        )
        + "\r"
        f"{obx}"
    )


def _study(
    tmp_path: Path, name: str, accession: str, lesions: tuple[Lesion, ...], seed: int
) -> tuple[str, list[Path]]:
    series = write_head_ct(
        tmp_path / name, slices=8, rows=256, cols=256, pixel_mm=1.0, lesions=lesions, seed=seed
    )
    for path in series.paths:
        ds = pydicom.dcmread(path)
        ds.AccessionNumber = accession
        ds.save_as(path)
    return series.study_uid, list(series.paths)


def test_final_reports_are_compared_with_the_ai_and_discrepancies_become_qa_items(
    tmp_path: Path, triton: str
) -> None:
    positive, paths_a = _study(
        tmp_path, "a", "ACC-A", (Lesion(x=130.0, y=120.0, slice=4, radius_mm=8.0, hu=70.0),), 5
    )
    negative, paths_b = _study(tmp_path, "b", "ACC-B", (), 6)
    http, port = free_port(), free_port()
    orthanc = Orthanc(tmp_path / "orthanc", modalities={"gateway": ["AI_GATEWAY", "127.0.0.1", port]}).start()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 0.5\nworkers = 1\n[receiver]\nport = {port}\n'
        f"[http]\nport = {http}\n"
        f'[[http.tokens]]\nname = "dr-1"\nrole = "radiologist"\nsha256 = "{hash_token(DR)}"\n'
        f'[[http.tokens]]\nname = "qa-lead"\nrole = "qa"\nsha256 = "{hash_token(QA)}"\n'
        f"[orders]\nenabled = true\nport = 0\n[review]\nreport_match_interval_s = 1.0\n"
        f'[triton]\nurl = "{triton}"\n'
        f'[[peers]]\nae_title = "STORESCU"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
        + PIPELINE.format(name="ct_hyperdensity", mode="triage")
        + PIPELINE.format(name="ct_hyperdensity_pilot", mode="silent")
    )
    gateway = Gateway(load_settings(config)).start()
    try:
        base = f"http://127.0.0.1:{http}"
        for paths in (paths_a, paths_b):
            assert storescu(paths, port=port, calling_ae="STORESCU").returncode == 0

        def reported(study: str) -> int:
            return sum(
                e["event"] == "findings_reported" and e["study"] == study for e in gateway.audit.read()
            )

        for study in (positive, negative):
            wait_for(lambda s=study: reported(s) == 2, timeout_s=120, what="both pipelines' results")
        wait_for(
            lambda: orthanc.instance_uids(positive), timeout_s=60, what="the results delivered to the PACS"
        )
        # The analyses are in the system of record (its writer commits in groups, after the audit line).
        wait_for(
            lambda: (
                http_json(f"{base}/studies/{negative}", token=DR)[1].get("study", {}).get("state")
                in ("results_stored", "delivered")
            ),
            timeout_s=30,
            what="the AI-negative study recorded",
        )
        findings = wait_for(
            lambda: (lambda r: r[1] if r[0] == 200 and len({f["pipeline"] for f in r[1]}) == 2 else None)(
                http_json(f"{base}/studies/{positive}/findings", token=DR)  # the radiologist opens them
            ),
            timeout_s=20,
            what="the AI findings",
        )
        assert {f["accession_number"] for f in findings} == {"ACC-A"}
        assert http_json(f"{base}/studies/{negative}/findings", token=QA)[1] == []  # the AI found nothing

        listener = gateway.orders_listener
        assert listener is not None
        client = MllpClient(listener.port)
        try:
            # The reader disagrees with the AI on both studies; a corrected report is compared again.
            ack = client.exchange(
                oru(
                    "ACC-A",
                    ["FINDINGS: Ventricles normal.", "IMPRESSION: No acute intracranial hemorrhage."],
                    control="R1",
                )
            )
            assert msa(ack)[1] == "AA"
            ack = client.exchange(
                oru(
                    "ACC-B",
                    ["IMPRESSION: Small acute subdural hematoma along the left convexity."],
                    control="R2",
                )
            )
            assert msa(ack)[1] == "AA"
            ack = client.exchange(oru("ACC-UNKNOWN", ["IMPRESSION: Normal."], control="R3"))
            assert msa(ack)[1] == "AA"  # kept; compared once a study with the accession is known
            bad = oru("", ["IMPRESSION: Normal."], control="R4")
            answer = client.exchange(bad)
            assert msa(answer)[1] == "AE" and "no accession number" in str(answer)  # the reason, in ERR
        finally:
            client.close()

        # Stored before the ACK: no waiting needed.
        with gateway.database.connect() as connection:
            reports = {r.accession_number: r for r in connection.execute(t.final_reports.select())}
        assert set(reports) == {"ACC-A", "ACC-B", "ACC-UNKNOWN"}
        assert reports["ACC-A"].study_uid == positive and reports["ACC-UNKNOWN"].study_uid == ""
        assert reports["ACC-A"].ai_viewed_before and reports["ACC-A"].ai_delivered_before
        assert reports["ACC-A"].ai_assisted
        assert not reports["ACC-B"].ai_viewed_before and not reports["ACC-B"].ai_assisted

        status, compared = http_json(f"{base}/studies/{positive}/comparisons", token=QA)
        assert status == 200
        by_pipeline = {c["pipeline"]: c for c in compared}
        shown, silent = by_pipeline["ct_hyperdensity"], by_pipeline["ct_hyperdensity_pilot"]
        assert (
            shown["outcome"] == "ai_only"
            and shown["report_label"] == "negative"
            and shown["qa_state"] == "open"
        )
        assert (
            shown["evidence"] == "No acute intracranial hemorrhage" and shown["finding_type"] == "hemorrhage"
        )
        assert silent["outcome"] == "ai_only" and silent["qa_state"] == "none"  # monitoring only: never shown

        assert http_json(f"{base}/qa/discrepancies", token=DR)[0] == 403  # QA's worklist
        status, items = http_json(f"{base}/qa/discrepancies?state=open", token=QA)
        assert status == 200
        assert {(i["accession_number"], i["outcome"]) for i in items} == {
            ("ACC-A", "ai_only"),
            ("ACC-B", "report_only"),
        }
        item = next(i for i in items if i["accession_number"] == "ACC-B")
        assert "subdural hematoma" in item["evidence"] and item["ai_positive"] is False
        status, assigned = http_json(
            f"{base}/qa/discrepancies/{item['id']}/assign", method="POST", token=QA, body={"to": "u-peer-9"}
        )
        assert status == 200 and assigned["qa_state"] == "assigned" and assigned["assigned_to"] == "u-peer-9"
        status, closed = http_json(
            f"{base}/qa/discrepancies/{item['id']}/close",
            method="POST",
            token=QA,
            body={"note": "AI miss confirmed"},
        )
        assert status == 200 and closed["qa_state"] == "closed"
        assert (
            http_json(f"{base}/qa/discrepancies/{item['id']}/close", method="POST", token=QA, body={})[0]
            == 404
        )

        # A corrected report replaces the comparison: now concordant, no longer on the QA worklist.
        client = MllpClient(listener.port)
        try:
            ack = client.exchange(
                oru(
                    "ACC-A",
                    ["IMPRESSION: Acute intraparenchymal hemorrhage, right frontal lobe."],
                    control="R5",
                    status="C",
                )
            )
            assert msa(ack)[1] == "AA"
        finally:
            client.close()
        compared = http_json(f"{base}/studies/{positive}/comparisons", token=QA)[1]
        assert {c["outcome"] for c in compared} == {"concordant"}
        open_items = http_json(f"{base}/qa/discrepancies?state=open", token=QA)[1]
        assert [i["accession_number"] for i in open_items] == []

        # A report that comes before its study: stored, then compared once the study's analysis is recorded.
        late, paths_c = _study(
            tmp_path, "c", "ACC-C", (Lesion(x=120.0, y=130.0, slice=4, radius_mm=8.0, hu=70.0),), 7
        )
        client = MllpClient(listener.port)
        try:
            early = oru(
                "ACC-C",
                ["IMPRESSION: Acute intraparenchymal hemorrhage, left frontal lobe."],
                control="R6",
                signed_in_s=0.0,  # signed now, before its study is even sent
            )
            assert msa(client.exchange(early))[1] == "AA"
        finally:
            client.close()
        assert http_json(f"{base}/studies/{late}/comparisons", token=QA)[1] == []
        assert storescu(paths_c, port=port, calling_ae="STORESCU").returncode == 0
        compared = wait_for(
            lambda: (lambda r: r[1] if len(r[1]) == 2 else None)(
                http_json(f"{base}/studies/{late}/comparisons", token=QA)
            ),
            timeout_s=120,
            what="the early report compared once the analysis is recorded",
        )
        assert {c["outcome"] for c in compared} == {"concordant"} and {
            c["accession_number"] for c in compared
        } == {"ACC-C"}
        with gateway.database.connect() as connection:
            [row] = [r for r in connection.execute(t.final_reports.select()) if r.accession_number == "ACC-C"]
        assert row.study_uid == late and not row.ai_assisted  # signed before the AI had anything to show
    finally:
        gateway.stop()
        orthanc.stop()
