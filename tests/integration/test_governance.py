"""Model monitoring, drift alarms and the governance report (issue 14, items 4 and 5) on a seeded history in the
system of record (both backends): 520 studies of one model at one site, a silent pilot's findings as the score
baseline, 500 radiologists' verdicts whose acceptance falls from 90 % to 70 % after the 300th, and 120 signed
reports. The CUSUM alarm fires within 200 verdicts of the fall, the score PSI alarm fires against the silent
baseline, each alarm is posted to the webhook once, and ``gateway report`` prints and writes the numbers."""

from __future__ import annotations

import asyncio
import csv
import io
import random
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from pydicom.uid import generate_uid

from clients.http_post import HttpPoster
from gateway.app import Gateway
from gateway.cli import main
from gateway.config.settings import load_settings
from gateway.core.retry import Backoff
from gateway.database import migrate
from gateway.database.connect import engine_for
from gateway.database.jobs import RoutedStudy
from gateway.database.writes import EventWrites, StudyWrites
from gateway.inference.server import free_port
from gateway.ops.metrics import Metrics
from gateway.review.monitoring import DriftWatch, publish_metrics
from gateway.review.reports import FinalReports
from gateway.review.verdicts import VerdictKind, VerdictRequest, Verdicts
from gateway.workflow.final_reports import FinalReport
from tests.support.servers import WebhookReceiver, wait_for

pytestmark = pytest.mark.integration

MODEL, SITE = "ct_head_hyperdensity", "PACS_A"
HEMORRHAGE = ["50960005", "SCT", "Hemorrhage"]
PIPELINES = (
    '[[pipelines]]\nname = "{name}"\nmodel = "ct_head_hyperdensity"\nalgorithm_version = "0.1.0"\n'
    'mode = "{mode}"\nreport_threshold = 0.5\nstat_threshold = 0.7\nmodalities = ["CT"]\n'
    'input_size = [256, 256]\n[pipelines.labels]\n0 = "hemorrhage"\n'
)


def _seed(engine: object, rng: random.Random) -> dict[str, list[tuple[str, str, str]]]:
    """Studies, analyses and findings as the gateway records them (its own audit events)."""
    writes = EventWrites(StudyWrites("seed"))
    start = time.time() - 20 * 86400
    shown, silent, negative = [], [], []
    with engine.begin() as connection:  # type: ignore[attr-defined]
        # The model itself is in the system of record already: the gateway's start fingerprinted it.
        for n in range(520):
            at = start + n * 60
            study, series = str(generate_uid()), str(generate_uid())
            writes.studies.routed(
                connection,
                RoutedStudy(
                    study_uid=study,
                    calling_ae=SITE,
                    priority="ROUTINE",
                    instances=10,
                    series=1,
                    first_received_at=at,
                    last_received_at=at,
                    accession_number=f"ACC-{n}",
                ),
                [],
                0,
                at,
            )
            runs = [("ct_hyperdensity", "triage")] + (
                [("ct_hyperdensity_pilot", "silent")] if n < 250 else []
            )
            for pipeline, mode in runs:
                positive = n < 500
                sr, tracking = str(generate_uid()), str(generate_uid())
                score = rng.betavariate(2, 5) if mode == "silent" else rng.betavariate(5, 2)
                common = {
                    "study": study,
                    "series": series,
                    "pipeline": pipeline,
                    "model": MODEL,
                    "model_version": "1",
                    "model_sha256": "ab" * 32,
                    "algorithm_version": "0.1.0",
                }
                writes.event(
                    connection,
                    {
                        "event": "series_analysed",
                        "time": at,
                        **common,
                        "findings": int(positive),
                        "results": [sr],
                    },
                )
                reported = (
                    [
                        {
                            "tracking_uid": tracking,
                            "code": HEMORRHAGE,
                            "confidence": round(score, 4),
                            "image": str(generate_uid()),
                            "box": [1, 1, 9, 9],
                            "stat": False,
                        }
                    ]
                    if positive
                    else []
                )
                writes.event(
                    connection,
                    {
                        "event": "findings_reported",
                        "time": at,
                        **common,
                        "mode": mode,
                        "calling_ae": SITE,
                        "accession_number": f"ACC-{n}",
                        "sr": sr,
                        "supersedes": [],
                        "reported": reported,
                    },
                )
                if not positive:
                    negative.append((study, f"ACC-{n}", ""))
                elif mode == "silent":
                    silent.append((study, sr, tracking))
                else:
                    shown.append((study, sr, tracking))
            # The study's every series done: the state a final report is compared in.
            writes.event(
                connection,
                {"event": "study_done", "time": at, "study": study, "series": 1, "findings": int(n < 500)},
            )
    return {"shown": shown, "silent": silent, "negative": negative}


def test_drift_alarms_and_the_governance_report_on_a_seeded_history(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with WebhookReceiver() as webhook:
        config = tmp_path / "gateway.toml"
        config.write_text(
            f'data_dir = "{tmp_path / "data"}"\n[database]\nurl = "{database_url}"\n'
            f'[review]\nalarm_webhook_url = "{webhook.url}"\n'
            + PIPELINES.format(name="ct_hyperdensity", mode="triage")
            + PIPELINES.format(name="ct_hyperdensity_pilot", mode="silent")
        )
        # The committee's history: the pipeline ran silent first, then the site switched it to triage with a
        # higher STAT threshold (two starts of a gateway, the settings file edited in between).
        final = config.read_text()
        pilot = final.replace(
            'mode = "triage"\nreport_threshold = 0.5\nstat_threshold = 0.7',
            'mode = "silent"\nreport_threshold = 0.5\nstat_threshold = 0.6',
            1,
        )
        assert pilot != final
        for text in (pilot, final):
            config.write_text(
                text
                + f'[receiver]\nport = {free_port()}\n[http]\nenabled = false\n[triton]\nurl = "127.0.0.1:1"\n'
            )
            Gateway(load_settings(config)).start().stop()
        config.write_text(final)
        settings = load_settings(config)
        engine = engine_for(settings.database_url)
        migrate.upgrade(engine)
        rng = random.Random(14)
        seeded = _seed(engine, rng)

        verdicts = Verdicts(engine, settings.review, "seed")
        accepted = []
        for n, (study, sr, tracking) in enumerate(seeded["shown"]):
            ok = rng.random() < (0.9 if n < 300 else 0.7)
            accepted.append(ok)
            kind = VerdictKind.ACCEPT if ok else VerdictKind.REJECT
            verdicts.store(
                VerdictRequest(
                    study_uid=study,
                    kind=kind,
                    sr_uid=sr,
                    tracking_uid=tracking,
                    reason="" if ok else "false positive",
                ),
                f"u-{n % 7}",
            )
        reports = FinalReports(engine, settings, "seed")
        for n in range(100):
            text = (
                "IMPRESSION: Acute subdural hematoma."
                if n < 80
                else "IMPRESSION: No intracranial hemorrhage."
            )
            reports.receive(
                FinalReport(
                    accession_number=f"ACC-{n}",  # the n-th study is the n-th shown finding's
                    study_uid="",
                    status="F",
                    signed_at=time.time(),
                    text=text,
                    control_id=f"R{n}",
                )
            )
        for n, (_, accession, _) in enumerate(seeded["negative"]):
            text = (
                "IMPRESSION: Small acute hemorrhage." if n < 5 else "IMPRESSION: Normal study. No hemorrhage."
            )
            reports.receive(
                FinalReport(
                    accession_number=accession,
                    study_uid="",
                    status="F",
                    signed_at=time.time(),
                    text=text,
                    control_id=f"N{n}",
                )
            )

        # The drift watch: gauges, and each new alarm posted once.
        metrics = Metrics()
        poster = HttpPoster()

        async def post(url: str, body: bytes) -> int:
            return await poster.post(
                url,
                body,
                content_type="application/json",
                timeout_s=5,
                attempts=2,
                backoff=Backoff(base_s=0.1),
                what="drift alarm",
            )

        events: list[dict] = []
        watch = DriftWatch(
            engine,
            settings.review,
            publish=lambda s: publish_metrics(metrics, s),
            post=post,
            record_event=lambda name, **f: events.append({"event": name, **f}),
        )
        [stats] = asyncio.run(watch.check())
        new = [a for a in stats.alarms if a.new]
        posted = wait_for(
            lambda: webhook.events if len(webhook.events) >= len(new) else None, timeout_s=10, what="alarms"
        )
        [again] = asyncio.run(watch.check())
        assert again.alarms and not any(a.new for a in again.alarms)  # known: not posted twice
        assert len(webhook.events) == len(posted)
        kinds = {a.kind for a in stats.alarms}
        fired = min(a.at_count for a in stats.alarms if a.kind == "acceptance")
        print(
            f"\nacceptance CUSUM fired at verdict {fired} (the fall began after verdict 300); "
            f"score PSI {stats.psi:.3f}; acceptance {stats.acceptance_rate:.3f}"
        )
        assert 300 < fired <= 500, "the alarm fires within 200 verdicts of the fall, not before it"
        assert all(a.at_count > 300 for a in stats.alarms if a.kind == "acceptance")
        assert stats.psi is not None and stats.psi > settings.review.psi_alarm and "scores" in kinds
        # The baseline the PSI compares against is the silent pilot's scores (drawn low), the shown ones high.
        assert stats.baseline_source == "silent mode"
        assert sum(stats.baseline_histogram[:5]) > 0.7
        assert sum(stats.score_histogram[5:]) > sum(stats.baseline_histogram[5:])
        assert {e["kind"] for e in posted} == {"acceptance", "scores"} and all(
            e["event"] == "drift_alarm" for e in posted
        )
        assert [e["event"] for e in events] == ["drift_alarm"] * len(stats.alarms)
        text = generate_latest(metrics.registry).decode()
        assert (
            f'gateway_model_drift_alarms{{kind="acceptance",model="{MODEL}",site="{SITE}",version="1"}}'
            in text
        )
        assert stats.studies == 520 and stats.positive_studies == 500 and stats.verdicts == 500
        assert stats.accepted == sum(accepted)
        assert (stats.true_positive, stats.false_positive, stats.false_negative, stats.true_negative) == (
            80,
            20,
            5,
            15,
        )
        assert stats.silent_findings == 250

        out = tmp_path / "governance"
        assert (
            main(["report", "--model", MODEL, "--since", "60d", "--config", str(config), "--out", str(out)])
            == 0
        )
        printed = capsys.readouterr().out
        print(printed)
        assert f"# Governance report: {MODEL}" in printed
        assert (
            "**ct_hyperdensity_pilot**: mode **silent**" in printed
            and "**ct_hyperdensity**: mode **triage**" in printed
        )
        assert f"| 1 | {SITE} | 520 | 96.2 % | 750 (250) | 500 |" in printed
        assert "| 80 / 20 / 5 / 15 | 94.1 % | 80.0 % |" in printed
        assert "**ct_hyperdensity** changed: mode silent -> triage, stat_threshold 0.6 -> 0.7" in printed
        assert "**ct_hyperdensity_pilot** added: model ct_head_hyperdensity" in printed
        assert "acceptance fell to" in printed and "score distribution moved from its baseline" in printed
        [row] = list(csv.DictReader(io.StringIO((out / f"governance-{MODEL}.csv").read_text())))
        assert (
            row["studies"] == "520" and row["verdicts"] == "500" and float(row["ppv"]) == pytest.approx(0.8)
        )
        assert (out / f"governance-{MODEL}.md").read_text() in printed
        engine.dispose()
