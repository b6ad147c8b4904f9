"""The real-world corpus through the real gateway: every image of the shared real data, pydicom's test files and
the pydicom-data package, plus generated variants of what real senders write. For every routed series a result
object arrives at the destination (an analysis, or a failure SR that says why); every result object passes
dciodvfy with 0 errors, every SR PixelMed's SR validator and every GSPS dcmpschk. (The session-end scan checks
that nothing patient-identifying reached a log.)"""

from __future__ import annotations

import collections
import time
from pathlib import Path

import pydicom
import pytest

from clients.dicom_scu import store_files
from gateway.app import Gateway
from gateway.config.settings import Peer, load_settings
from gateway.inference.server import free_port
from gateway.ops.audit import AuditLog
from tests.support.analysis import content_items
from tests.support.corpus import build_corpus
from tests.support.servers import (
    Orthanc,
    dciodvfy_errors,
    pixelmed_sr_validation,
    tool_output,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

CONFIG = """
data_dir = "{data}"
quiet_period_s = 1.0
incomplete_guard_s = 2.0
workers = 2
[receiver]
port = {port}
[http]
port = 0
[triton]
url = "{triton}"
[[peers]]
ae_title = "CORPUS"
host = "127.0.0.1"
port = {orthanc}

[[pipelines]]
name = "any_ct"
model = "ct_head_hyperdensity"
algorithm_version = "0.1.0"
mode = "assist"
modalities = ["CT"]
input_size = [256, 256]
segmentation = true
finding_anatomy = "body"
finding_size_mm = [2.0, 200.0]
[pipelines.labels]
0 = "hemorrhage"

[[pipelines]]
name = "any_mr"
model = "ct_head_hyperdensity"
algorithm_version = "0.1.0"
mode = "assist"
modalities = ["MR"]
input_size = [256, 256]
intensity = "percentile"
[pipelines.labels]
0 = "hemorrhage"

[[pipelines]]
name = "radiograph"
model = "cxr_opacity"
algorithm_version = "0.1.0"
mode = "assist"
modalities = ["CR", "DX"]
input_name = "IMAGE"
input_size = [256, 256]
intensity = "percentile"
display_window = [2048.0, 4096.0]
[pipelines.labels]
0 = "opacity"
"""


def test_every_routed_series_of_the_corpus_gets_a_valid_result(
    tmp_path: Path, triton: str, real_data: Path
) -> None:
    cases = build_corpus(tmp_path / "corpus", real_data)
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc").start()
    config = tmp_path / "gateway.toml"
    config.write_text(
        CONFIG.format(data=tmp_path / "data", port=port, triton=triton, orthanc=orthanc.dicom_port)
    )
    settings = load_settings(config)
    audit = AuditLog(settings.audit_log)
    gateway = Gateway(settings).start()
    try:
        report = store_files(
            [p for c in cases for p in c.paths],
            Peer.parse(f"AI_GATEWAY@127.0.0.1:{port}"),
            calling_ae="CORPUS",
        )
        accepted = [c for c in cases if (settings.spool_dir / c.study_uid).is_dir()]  # not all refused

        def finished() -> set[str]:
            return {e["study"] for e in audit.read() if e["event"] == "study_done"}

        deadline = time.monotonic() + 300
        while (
            missing := [c for c in accepted if c.study_uid not in finished()]
        ) and time.monotonic() < deadline:
            time.sleep(1.0)
        assert not missing, f"studies never finished: {[c.name for c in missing]}"
        events = audit.read()
        analysed = [e for e in events if e["event"] == "series_analysed"]
        failed = [e for e in events if e["event"] == "series_failed"]
        skipped = [e for e in events if e["event"] == "series_skipped"]
        without_result = [e["series"] for e in analysed + failed if not e["results"]]
        assert without_result == [], "routed series that ended without a result object"
        results = sorted(settings.results_dir.rglob("*.dcm"))
        wait_for(
            lambda: not any(settings.outbox_dir.glob("pending/*/*.json")), timeout_s=120, what="deliveries"
        )
        assert not list(settings.outbox_dir.glob("dead/*.json")), "a delivery went to the dead-letter area"
        in_pacs = wait_for(
            lambda: (n := orthanc.get("/statistics")["CountInstances"]) >= len(results) and n,
            timeout_s=60,
            what="every result object in Orthanc",
        )
    finally:
        gateway.stop()
        orthanc.stop()
    validator_errors: dict[str, list[str]] = collections.defaultdict(list)
    kinds = collections.Counter(path.name.split("_")[0] for path in results)
    for path in results:
        validator_errors["dciodvfy"] += [f"{path.name}: {e}" for e in dciodvfy_errors(path)]
        if path.name.startswith("PR_"):
            check = tool_output("dcmpschk", str(path))
            if check.returncode != 0 or "Test passed" not in check.stdout + check.stderr:
                validator_errors["dcmpschk"].append(path.name)
    # PixelMed takes about 10 s per SR here (a JVM each): one SR of every kind - pipeline, with or without
    # located findings, failure SR - rather than all of them.
    kinds_of_sr: dict[tuple[str, bool], Path] = {}
    for path in results:
        if path.name.startswith("SR_"):
            sr = pydicom.dcmread(path)
            located = any(item.ValueType in ("SCOORD", "SCOORD3D") for item in content_items(sr))
            kinds_of_sr.setdefault((str(sr.SeriesDescription), located), path)
    for path in kinds_of_sr.values():
        out = pixelmed_sr_validation(path)
        if "Found Root Template TID_1500" not in out:
            tail = " / ".join(out.strip().splitlines()[-3:])[:300]
            validator_errors["pixelmed"].append(f"{path.name}: TID 1500 root template not found: {tail}")
        for line in (line for line in out.splitlines() if line.startswith("Error")):
            validator_errors["pixelmed"].append(f"{path.name}: {line}")
    assert dict(validator_errors) == {k: [] for k in validator_errors}, {
        k: v[:5] for k, v in validator_errors.items()
    }
    repaired = sum(1 for e in analysed if e.get("header_repairs"))
    origins = collections.Counter(c.origin for c in cases)
    print(
        f"\nreal-world corpus: {len(cases)} studies, {sum(len(c.paths) for c in cases)} files "
        f"({', '.join(f'{n} {o}' for o, n in sorted(origins.items()))}); {len(report.failed)} file(s) refused at "
        f"C-STORE; series analysed {len(analysed)}, failed with a failure SR {len(failed)}, skipped {len(skipped)}; "
        f"{repaired} analysed series with header repairs; result objects {dict(kinds)}, {in_pacs} in Orthanc; "
        f"validator errors: dciodvfy 0 ({len(results)} objects), PixelMed 0 ({len(kinds_of_sr)} SR kinds), "
        f"dcmpschk 0 ({kinds.get('PR', 0)} GSPS)"
    )
    reasons = collections.Counter(e["reason_kind"] for e in failed)
    print(f"failure reasons: {dict(reasons)}")
