"""Critical results: time from a STAT study's SR stored to its first notification, on real components.

Starts Triton from the nvidia-pytriton wheel (through the gateway), the gateway with critical results on, and a
real SMTP server (aiosmtpd) and webhook receiver as the on-call contact's channels. Sends ``--reps`` head CTs with
a hyperdense lesion (each a new study, STAT by the reference model) back to back with DCMTK storescu, and reads per
study: the gateway's own figure (``critical_result_notified.seconds_from_sr``: SR stored -> every channel of
level 1 answered) and the mail server's (SR stored -> the e-mail accepted by the relay). Target (issue 13): p95
under 2 s on a 2-core machine.

    python -m benchmarks.critical_notify --reps 20 --slices 12
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import cli
from benchmarks.e2e_latency import fresh_copy
from gateway.app import Gateway
from gateway.config.settings import load_settings
from gateway.core.logs import configure_logging
from gateway.demo.phantoms import Lesion, write_head_ct
from gateway.inference.server import free_port
from tests.support.servers import SmtpSink, WebhookReceiver, storescu, wait_for

TARGET_P95_S = 2.0


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
    return {
        "n": len(ordered),
        "median_s": round(statistics.median(ordered), 3),
        "p95_s": round(p95, 3),
        "min_s": round(ordered[0], 3),
        "max_s": round(ordered[-1], 3),
    }


def measure(slices: int, reps: int) -> dict[str, Any]:
    configure_logging("WARNING")
    work = Path(tempfile.mkdtemp(prefix="gw-critical-"))
    port = free_port()
    series = write_head_ct(
        work / "ct", slices=slices, rows=256, cols=256, pixel_mm=1.0,
        lesions=(Lesion(x=130.0, y=120.0, slice=slices // 2, radius_mm=8.0, hu=70.0),), seed=5,
    )  # fmt: skip
    with SmtpSink() as smtp, WebhookReceiver() as webhook:
        config = work / "gateway.toml"
        config.write_text(
            f'data_dir = "{work / "data"}"\nquiet_period_s = 0.5\n[receiver]\nport = {port}\n[http]\nport = 0\n'
            "[critical_results]\nenabled = true\nack_timeout_s = 3600\n"
            f"[critical_results.smtp]\nport = {smtp.port}\n[[critical_results.contacts]]\nlevel = 1\n"
            f'name = "on-call"\nemail = "oncall@bench.example"\nwebhook_url = "{webhook.url}"\n'
            '[[pipelines]]\nname = "ct"\nmodel = "ct_head_hyperdensity"\nalgorithm_version = "0.1.0"\n'
            'mode = "triage"\nstat_threshold = 0.7\nmodalities = ["CT"]\ninput_size = [256, 256]\n'
            '[pipelines.labels]\n0 = "hemorrhage"\n'
        )
        gateway = Gateway(load_settings(config)).start()
        try:
            studies = []
            for rep in range(reps):
                copies, study_uid = fresh_copy(list(series.paths), work / f"rep{rep}")
                if storescu(copies, port=port, calling_ae="BENCH").returncode != 0:
                    raise SystemExit("storescu failed")
                studies.append(study_uid)
            wait_for(lambda: len(smtp.messages) >= reps, timeout_s=60 + 30 * reps, what="every e-mail")
            time.sleep(0.5)
            audit = [e for e in gateway.audit.read() if e["event"] == "critical_result_notified"]
        finally:
            gateway.stop()
        stored = {e["study_instance_uid"]: e["stored_at"] for e in webhook.events}
        mailed = []
        for message, at in zip(smtp.messages, smtp.received_at, strict=True):
            uid = next(u for u in studies if u in message.get_content())
            mailed.append(at - stored[uid])
    shutil.rmtree(work, ignore_errors=True)
    gateway_figure = [float(e["seconds_from_sr"]) for e in audit]
    report: dict[str, Any] = {
        "machine": cli.machine(),
        "studies": reps,
        "slices": slices,
        "sr_stored_to_level1_notified": _stats(gateway_figure),
        "sr_stored_to_email_at_relay": _stats(mailed),
        "target_p95_s": TARGET_P95_S,
    }
    report["met"] = report["sr_stored_to_level1_notified"]["p95_s"] < TARGET_P95_S
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Critical results, {report['studies']} STAT studies of {report['slices']} slices, sent back to back; "
        f"{report['machine']}",
        "",
        "| from the SR stored to | n | median s | p95 s | min-max s |",
        "|---|---|---|---|---|",
    ]
    for key, label in (
        ("sr_stored_to_level1_notified", "level 1 notified (every channel answered)"),
        ("sr_stored_to_email_at_relay", "the e-mail accepted by the SMTP server"),
    ):
        s = report[key]
        lines.append(f"| {label} | {s['n']} | {s['median_s']} | {s['p95_s']} | {s['min_s']}-{s['max_s']} |")
    verdict = "met" if report["met"] else "MISSED"
    lines.append(f"\nTarget: p95 under {report['target_p95_s']} s - {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return cli.run(argv, __doc__, measure, markdown, slices=12, reps=20)


if __name__ == "__main__":
    sys.exit(main())
