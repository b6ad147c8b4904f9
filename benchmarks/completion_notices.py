"""Deterministic completion: how soon after the last instance an MPPS lists is a study closed and queued for
analysis, with a 30 s quiet period that therefore plays no part.

Starts the gateway (no Triton needed: this measures completion and routing) and, per repetition, a two-series
study of fresh UIDs with a real MPPS over pynetdicom: N-CREATE IN PROGRESS, the first series by DCMTK storescu,
then either

* ``nset-last``: the second series, then N-SET COMPLETED listing both - measured from the N-SET's answer;
* ``nset-first``: N-SET COMPLETED listing both, then the second series - measured from the gateway's receipt of
  the last listed instance (its ``received_at`` in the system of record).

to the study's ``complete`` and ``queued`` transitions. Target (issue 13): analysis starts within 1 s (median).

    python -m benchmarks.completion_notices --reps 10
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]
from sqlalchemy import func, select

from benchmarks import cli
from gateway.app import Gateway
from gateway.config.settings import load_settings
from gateway.core.logs import configure_logging
from gateway.database import schema as t
from gateway.demo.phantoms import write_head_ct
from gateway.inference.server import free_port
from tests.support.notices import series_items
from tests.support.servers import storescu, wait_for

TARGET_S = 1.0


def _transition(gateway: Gateway, study_uid: str, state: str) -> float | None:
    with gateway.database.connect() as c:
        return c.execute(
            select(func.min(t.study_transitions.c.at)).where(
                t.study_transitions.c.study_uid == study_uid, t.study_transitions.c.state == state
            )
        ).scalar()


def _last_received(gateway: Gateway, study_uid: str) -> float:
    with gateway.database.connect() as c:
        return float(
            c.execute(
                select(func.max(t.instances.c.received_at)).where(t.instances.c.study_uid == study_uid)
            ).scalar()
        )


def _one(gateway: Gateway, port: int, work: Path, mode: str, rep: int) -> dict[str, float]:
    study_uid, step_uid = generate_uid(), generate_uid()
    first = write_head_ct(work / f"{mode}{rep}a", slices=4, rows=64, cols=64, seed=rep, study_uid=study_uid)
    second = write_head_ct(
        work / f"{mode}{rep}b", slices=4, rows=64, cols=64, seed=rep + 99, study_uid=study_uid
    )
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", port, ae_title="AI_GATEWAY")
    created = Dataset()
    created.PerformedProcedureStepStatus = "IN PROGRESS"
    scheduled = Dataset()
    scheduled.StudyInstanceUID = study_uid
    created.ScheduledStepAttributesSequence = [scheduled]
    assert assoc.send_n_create(created, ModalityPerformedProcedureStep, step_uid)[0].Status == 0
    completed = Dataset()
    completed.PerformedProcedureStepStatus = "COMPLETED"
    completed.PerformedSeriesSequence = series_items(list(first.paths) + list(second.paths))
    assert storescu(list(first.paths), port=port, calling_ae="MODALITY").returncode == 0
    if mode == "nset-last":
        assert storescu(list(second.paths), port=port, calling_ae="MODALITY").returncode == 0
        assert assoc.send_n_set(completed, ModalityPerformedProcedureStep, step_uid)[0].Status == 0
        start = time.time()
    else:
        assert assoc.send_n_set(completed, ModalityPerformedProcedureStep, step_uid)[0].Status == 0
        assert storescu(list(second.paths), port=port, calling_ae="MODALITY").returncode == 0
        start = 0.0
    assoc.release()
    queued = wait_for(lambda: _transition(gateway, study_uid, "queued"), timeout_s=20, interval_s=0.02)
    complete = _transition(gateway, study_uid, "complete")
    assert complete is not None
    start = start or _last_received(gateway, study_uid)
    return {"complete_s": complete - start, "queued_s": float(queued) - start}


def _summary(values: list[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(values), 3), "min_s": round(min(values), 3),
            "max_s": round(max(values), 3), "n": len(values)}  # fmt: skip


def measure(_slices: int, reps: int) -> dict[str, Any]:
    configure_logging("WARNING")
    work = Path(tempfile.mkdtemp(prefix="gw-notices-"))
    port = free_port()
    config = work / "gateway.toml"
    config.write_text(
        f'data_dir = "{work / "data"}"\nquiet_period_s = 30\nincomplete_guard_s = 30\n[receiver]\nport = {port}\n'
        '[http]\nenabled = false\n[triton]\nurl = "127.0.0.1:1"\n'
    )
    gateway = Gateway(load_settings(config)).start()
    results: dict[str, Any] = {"machine": cli.machine(), "quiet_period_s": 30, "target_s": TARGET_S}
    try:
        for mode in ("nset-last", "nset-first"):
            runs = [_one(gateway, port, work, mode, rep) for rep in range(reps)]
            results[mode] = {k: _summary([r[k] for r in runs]) for k in ("complete_s", "queued_s")}
    finally:
        gateway.stop()
    results["met"] = all(results[m]["queued_s"]["median_s"] < TARGET_S for m in ("nset-last", "nset-first"))
    return results


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"MPPS-driven completion, quiet period {report['quiet_period_s']} s; {report['machine']}",
        "",
        "| scenario | measured from | n | complete: median (min-max) s | queued: median (min-max) s |",
        "|---|---|---|---|---|",
    ]
    start = {"nset-last": "the N-SET COMPLETED answered", "nset-first": "the last listed instance received"}
    for mode in ("nset-last", "nset-first"):
        c, q = report[mode]["complete_s"], report[mode]["queued_s"]
        lines.append(
            f"| {mode} | {start[mode]} | {c['n']} | {c['median_s']} ({c['min_s']}-{c['max_s']}) | "
            f"{q['median_s']} ({q['min_s']}-{q['max_s']}) |"
        )
    lines.append(
        f"\nTarget: queued within {report['target_s']} s (median) - {'met' if report['met'] else 'MISSED'}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return cli.run(argv, __doc__, measure, markdown, slices=4, reps=10)


if __name__ == "__main__":
    sys.exit(main())
