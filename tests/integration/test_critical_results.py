"""Critical results with acknowledgement (issue 13, item 5) against real peers: an SMTP server (aiosmtpd), a
webhook receiver and an MLLP listener. A STAT finding notifies level 1 once its SR is stored; a gateway restarted
before anyone acknowledged escalates to level 2 and never re-sends level 1; the signed link in the e-mail
acknowledges (a GET only shows the button, a tampered link is refused); after that no restart sends anything.
An undeliverable level escalates at once, and a ladder that runs out is recorded as unanswered, once."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from clients.http_post import HttpPoster
from gateway.app import Gateway
from gateway.config.settings import load_settings
from gateway.database import migrate
from gateway.database.connect import engine_for
from gateway.demo.phantoms import PATIENT_NAME, Lesion, write_head_ct
from gateway.inference.server import free_port
from gateway.ops.http_api import hash_token
from gateway.reporting.critical_alerts import CriticalAlerts, CriticalFinding
from gateway.workflow.critical_results import CriticalLedger, LinkSigner
from tests.support.servers import MllpListener, SmtpSink, WebhookReceiver, http_json, storescu, wait_for

pytestmark = pytest.mark.integration

TOKEN = "radiologist-token-for-tests"
ACK_TIMEOUT_S = 8.0


def _config(tmp_path: Path, triton: str, *, smtp: int, webhook: str, mllp: int, http: int, port: int) -> Path:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 0.5\nworkers = 1\n[receiver]\nport = {port}\n'
        f'[http]\nport = {http}\n[[http.tokens]]\nname = "dr-7f3a"\nrole = "read-only"\n'
        f'sha256 = "{hash_token(TOKEN)}"\n[triton]\nurl = "{triton}"\n'
        f"[critical_results]\nenabled = true\nack_timeout_s = {ACK_TIMEOUT_S}\npoll_s = 0.2\n"
        f'public_url = "http://127.0.0.1:{http}"\n'
        f'[critical_results.smtp]\nport = {smtp}\nsender = "ai-gateway@test.example"\n'
        '[[critical_results.contacts]]\nlevel = 1\nname = "on-call neuroradiologist"\n'
        f'email = "oncall@test.example"\nwebhook_url = "{webhook}"\n'
        '[[critical_results.contacts]]\nlevel = 2\nname = "duty consultant"\n'
        f'email = "consultant@test.example"\nhl7 = "127.0.0.1:{mllp}"\n'
        '[[pipelines]]\nname = "ct_hyperdensity"\nmodel = "ct_head_hyperdensity"\nalgorithm_version = "0.1.0"\n'
        'mode = "triage"\nreport_threshold = 0.5\nstat_threshold = 0.7\nmodalities = ["CT"]\n'
        'input_size = [256, 256]\n[pipelines.labels]\n0 = "hemorrhage"\n'
    )
    return config


def _link(message: object) -> str:
    body = message.get_content()  # type: ignore[attr-defined]
    match = re.search(r"Acknowledge: (http://\S+)", body)
    assert match, body
    return match.group(1)


def _post(url: str) -> tuple[int, str]:
    request = urllib.request.Request(url, method="POST", data=b"")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_stat_finding_is_notified_escalated_once_per_level_and_acknowledged_by_its_link(
    tmp_path: Path, triton: str
) -> None:
    lesion = Lesion(x=130.0, y=120.0, slice=5, radius_mm=8.0, hu=70.0)
    series = write_head_ct(
        tmp_path / "ct", slices=10, rows=256, cols=256, pixel_mm=1.0, lesions=(lesion,), seed=5
    )
    http_port, port = free_port(), free_port()
    with SmtpSink() as smtp, WebhookReceiver() as webhook, MllpListener() as mllp:
        config = _config(
            tmp_path, triton, smtp=smtp.port, webhook=webhook.url, mllp=mllp.port, http=http_port, port=port
        )
        gateway = Gateway(load_settings(config)).start()
        try:
            assert storescu(list(series.paths), port=port, calling_ae="STORESCU").returncode == 0
            [first] = wait_for(
                lambda: smtp.to("oncall@test.example"), timeout_s=120, what="the level-1 e-mail"
            )
            [event] = wait_for(lambda: webhook.events, timeout_s=10, what="the level-1 webhook")
            notified = 'gateway_critical_result_seconds_count{step="notify"} 1.0'
            wait_for(  # observed once both channels answered and the ledger says so
                lambda: notified in gateway.render_metrics().decode(), timeout_s=10, what="the histogram"
            )
        finally:
            gateway.stop()  # before anyone acknowledged, well inside the acknowledgement time
        body = first.get_content()
        assert series.study_uid in body and "ACC-PHANTOM-1" in body and "preliminary" in body
        # No patient name in a message that travels by e-mail (its last part: the accession also says PHANTOM).
        assert PATIENT_NAME.split("^")[-1] not in body and PATIENT_NAME not in body
        assert event["level"] == 1 and event["study_instance_uid"] == series.study_uid
        assert event["acknowledge_url"] == _link(first)

        gateway = Gateway(
            load_settings(config)
        ).start()  # restarted: level 2 is due, level 1 is not sent again
        try:
            [second] = wait_for(
                lambda: smtp.to("consultant@test.example"), timeout_s=ACK_TIMEOUT_S + 20, what="level 2"
            )
            [page] = wait_for(lambda: mllp.received, timeout_s=10, what="the level-2 HL7 alert")
            assert "ORU^R01" in page and "AA" in page and series.study_uid in page
            link = _link(second)
            with urllib.request.urlopen(
                link, timeout=10
            ) as response:  # a GET shows the button, changes nothing
                page_html = response.read().decode()
                assert response.status == 200 and "<button" in page_html
                assert 'action="/critical-results/acknowledge/confirm?' in page_html
            tampered = re.sub(r"sig=([0-9a-f])", lambda m: "sig=" + ("0" if m.group(1) != "0" else "1"), link)
            confirm = link.replace("/acknowledge?", "/acknowledge/confirm?")
            status, text = _post(tampered.replace("/acknowledge?", "/acknowledge/confirm?"))
            assert status == 403 and "not valid" in text
            status, text = _post(confirm)
            assert status == 200 and "Acknowledged" in text
            status, again = http_json(
                f"http://127.0.0.1:{http_port}/critical-results/{series.study_uid}/acknowledge",
                method="POST",
                token=TOKEN,
            )
            assert status == 200 and again["first"] is False and again["by"] == "link:duty consultant"
            status, ladder = http_json(
                f"http://127.0.0.1:{http_port}/critical-results/{series.study_uid}", token=TOKEN
            )
            assert [(r["level"], r["state"]) for r in ladder] == [(1, "notified"), (2, "acknowledged")]

            def timeline() -> list[
                str
            ]:  # the system of record's timeline has the ladder (written in batches)
                _, found = http_json(f"http://127.0.0.1:{http_port}/studies/{series.study_uid}", token=TOKEN)
                stages = [step["stage"] for step in found["steps"]]
                return stages if "critical_result_acknowledged" in stages else []

            stages = wait_for(timeline, timeout_s=10, what="the timeline")
            assert stages.count("critical_result_notified") == 2
        finally:
            gateway.stop()

        gateway = Gateway(load_settings(config)).start()  # acknowledged: nothing more, whatever the restarts
        try:
            time.sleep(ACK_TIMEOUT_S + 2)
        finally:
            gateway.stop()
        assert len(smtp.to("oncall@test.example")) == 1 and len(smtp.to("consultant@test.example")) == 1
        assert len(webhook.events) == 1 and len(mllp.received) == 1
    audit = [
        e
        for e in gateway.audit.read()
        if e["event"].startswith("critical_result") and e["study"] == series.study_uid
    ]
    notified = [e for e in audit if e["event"] == "critical_result_notified"]
    assert [e["level"] for e in notified] == [1, 2]
    [acknowledged] = [e for e in audit if e["event"] == "critical_result_acknowledged"]
    assert acknowledged["level"] == 2 and acknowledged["by"] == "link:duty consultant"
    print(
        f"\ncritical result: level 1 notified {notified[0]['seconds_from_sr']:.2f} s after the SR was stored; "
        f"acknowledged {acknowledged['seconds_from_sr']:.1f} s after it (level 2, after a restart)"
    )


def test_an_undeliverable_level_escalates_at_once_and_a_ladder_that_runs_out_is_unanswered(
    tmp_path: Path, database_url: str
) -> None:
    """Level 1's mail relay refuses connections: level 2 (a webhook) is told at once, not after the acknowledgement
    time; nobody acknowledges: the study is recorded as unanswered, once, however long the loop runs."""
    dead_relay = free_port()
    with WebhookReceiver() as webhook:
        config = tmp_path / "gateway.toml"
        config.write_text(
            f'data_dir = "{tmp_path}"\n[critical_results]\nenabled = true\nack_timeout_s = 6.0\npoll_s = 0.1\n'
            f"[critical_results.smtp]\nport = {dead_relay}\ntimeout_s = 1.0\n"
            '[[critical_results.contacts]]\nlevel = 1\nname = "rota"\nemail = "rota@test.example"\n'
            f'[[critical_results.contacts]]\nlevel = 2\nname = "pager"\nwebhook_url = "{webhook.url}"\n'
        )
        settings = load_settings(config)
        engine = engine_for(database_url)
        migrate.upgrade(engine)
        events: list[tuple[str, dict]] = []
        observed: list[tuple[str, float]] = []

        async def scenario() -> list[str]:
            http = HttpPoster()
            alerts = CriticalAlerts(
                settings.critical_results,
                CriticalLedger(engine, "node-a"),
                LinkSigner(b"k" * 32),
                executor=ThreadPoolExecutor(2),
                http=http,
                on_event=lambda name, **fields: events.append((name, fields)),
                observe=lambda step, seconds: observed.append((step, seconds)),
            )
            stopping = asyncio.Event()
            loop_task = asyncio.create_task(alerts.run(stopping))
            raised_at = time.time()
            alerts.raised(
                CriticalFinding(
                    study_instance_uid="1.2.826.0.1.3680043.10.1",
                    calling_ae="PACS_A",
                    accession_number="ACC-9",
                    sr_sop_instance_uid="1.2.826.0.1.3680043.10.2",
                    stored_at=raised_at,
                    pipeline="ct_head",
                    algorithm="Reference 0.1.0",
                    model="ct_head version 1",
                    findings=1,
                    max_confidence=0.93,
                )
            )
            await asyncio.to_thread(wait_for, lambda: webhook.events, timeout_s=15, what="level 2")
            told_after = time.time() - raised_at
            await asyncio.to_thread(
                wait_for,
                lambda: [n for n, _ in events if n == "critical_result_unanswered"],
                timeout_s=15,
                what="the ladder to run out",
            )
            await asyncio.sleep(1.0)  # ten more polls: nothing more
            stopping.set()
            await loop_task
            await http.aclose()
            alerts.close()
            return [f"{told_after:.2f}"]

        [told_after] = asyncio.run(scenario())
        engine.dispose()
    assert float(told_after) < 6.0, "escalated at once, not after waiting for an acknowledgement"
    names = [name for name, _ in events]
    assert names.count("critical_result_failed") == 1 and names.count("critical_result_notified") == 1
    assert names.count("critical_result_unanswered") == 1
    assert len(webhook.events) == 1 and webhook.events[0]["level"] == 2
    [(step, seconds)] = observed  # the first notification that reached anyone: level 2's
    assert step == "notify" and seconds == pytest.approx(float(told_after), abs=0.5)
