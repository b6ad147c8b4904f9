"""The dashboard's triage worklist in a real browser (issue 16, items 1 and 2): Playwright drives Debian's
Chromium headless against the real gateway; the user signs in with OpenID Connect (authorization code with PKCE
against the local provider), a STAT study appears live (server-sent events, no reload), a user without a role
is refused, and screenshots are kept under build/test-artifacts/."""

from __future__ import annotations

import io
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gateway.app import Gateway
from gateway.config.settings import load_settings
from gateway.demo.phantoms import PATIENT_NAME, Lesion, write_head_ct
from gateway.inference.server import free_port
from tests.integration.test_final_reports import oru
from tests.integration.test_order_feed import MllpClient, msa
from tests.support.oidc import Provider
from tests.support.servers import http_json, require_tool, storescu

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts"


def test_the_worklist_shows_a_stat_study_live_and_refuses_a_user_without_a_role(
    tmp_path: Path, triton: str
) -> None:
    chromium = require_tool("chromium")
    from playwright.sync_api import sync_playwright

    series = write_head_ct(
        tmp_path / "ct",
        slices=10,
        rows=256,
        cols=256,
        pixel_mm=1.0,
        seed=5,
        lesions=(Lesion(x=130.0, y=120.0, slice=4, radius_mm=8.0, hu=70.0),),
    )
    http, port = free_port(), free_port()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with Provider() as idp:
        config = tmp_path / "gateway.toml"
        config.write_text(
            f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 0.5\nworkers = 1\n[receiver]\nport = {port}\n'
            f"[http]\nport = {http}\n{idp.config()}[orders]\nenabled = true\nport = 0\n"
            f'[triton]\nurl = "{triton}"\n'
            '[[pipelines]]\nname = "ct_hyperdensity"\nmodel = "ct_head_hyperdensity"\nalgorithm_version = "0.1.0"\n'
            'mode = "triage"\nreport_threshold = 0.5\nstat_threshold = 0.7\nmodalities = ["CT"]\n'
            'input_size = [256, 256]\nsegmentation = true\n[pipelines.labels]\n0 = "hemorrhage"\n'
        )
        gateway = Gateway(load_settings(config)).start()
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1920, "height": 1080})  # a reading-room monitor
                page.goto(f"http://127.0.0.1:{http}/ui/")
                page.get_by_role("button", name="Sign in with your hospital account").click()
                page.locator("#worklist:not([hidden])").wait_for(timeout=20_000)
                assert "signed in as u-4711 (radiologist)" in page.locator("#who").inner_text()
                assert page.locator("#live").inner_text() == "live"

                assert storescu(list(series.paths), port=port, calling_ae="STORESCU").returncode == 0
                uid = series.study_uid
                page.locator(f'tr[data-study-uid="{uid}"][data-stat="true"]').wait_for(timeout=120_000)
                shown_at = page.evaluate(f"window.gatewayDashboard.stat['{uid}']") / 1000.0
                [stored] = [
                    e["time"]
                    for e in gateway.audit.read()
                    if e["event"] == "series_analysed" and e["study"] == uid
                ]  # the SR is stored before this event is recorded
                latency = shown_at - stored
                print(
                    f"\nSTAT study on the worklist {latency:.2f} s after its SR was stored (live, no reload)"
                )
                assert 0 < latency < 30, "the STAT row came through the live feed"
                row = page.locator(f'tr[data-study-uid="{uid}"]')
                assert row.locator(".badge").inner_text() == "STAT"
                # the pipeline that analysed it and its rollout mode
                pipeline = row.locator('.pipeline[data-pipeline="ct_hyperdensity"]')
                pipeline.wait_for(timeout=10_000)
                assert pipeline.get_attribute("data-mode") == "triage"
                assert pipeline.inner_text() == "ct_hyperdensity (triage)"
                assert (
                    page.locator("#studies tbody tr").first.get_attribute("data-study-uid") == uid
                )  # STAT first
                assert (
                    "STAT study from STORESCU" in page.locator("#announce").inner_text()
                )  # said to screen readers
                assert page.locator("#studies caption").is_visible()
                assert PATIENT_NAME not in page.content() and "PHANTOM" not in page.content()
                page.screenshot(path=str(ARTIFACTS / "worklist.png"), full_page=True)

                # The study view: the key image with the AI's boxes drawn where the findings are, the findings,
                # the timeline, and a verdict recorded from the page.
                row.click()
                page.locator("figure.key svg rect").first.wait_for(timeout=20_000)
                token = idp.token("u-4711", ["radiologist"])
                findings = http_json(f"http://127.0.0.1:{http}/studies/{uid}/findings", token=token)[1]
                figure = page.locator("figure.key").first
                image_uid = figure.get_attribute("data-image-uid")
                expected = {f["tracking_uid"]: f["box"] for f in findings if f["image_uid"] == image_uid}
                drawn = figure.locator("svg rect")
                assert drawn.count() == len(expected) > 0
                for i in range(drawn.count()):
                    rect = drawn.nth(i)
                    x0, _, x1, _ = expected[rect.get_attribute("data-tracking-uid")]
                    assert float(rect.get_attribute("x")) == pytest.approx(x0)
                    assert float(rect.get_attribute("width")) == pytest.approx(x1 - x0)
                assert (
                    figure.locator("img:not(.heatmap)").evaluate("img => img.naturalWidth") == 256
                )  # the rendered image
                assert page.locator("#findings tbody tr").count() == len(findings)
                # each finding's measurements as its SR states them (long axis, area, mean HU)
                top = page.locator("#findings tbody tr").first
                measured = {
                    m["name"]: m["value"]
                    for f in findings
                    if f["tracking_uid"] == top.get_attribute("data-tracking-uid")
                    for m in f["measurements"]
                }
                assert {"Long axis", "Mean"} <= set(measured)
                assert f"Long axis {measured['Long axis']:.1f} mm" in top.inner_text()
                assert f"Mean {measured['Mean']:.1f} HU" in top.inner_text()
                assert "results stored" in page.locator("#timeline").inner_text()
                page.get_by_label("Show the AI overlay").uncheck()
                assert figure.locator("svg").is_hidden()
                page.get_by_label("Show the AI overlay").check()
                # The SEG as a heat map over the image: drawn on the finding, and toggled like the boxes.
                figure.locator("img.heatmap").wait_for(timeout=10_000)
                heat = urllib.request.Request(
                    f"http://127.0.0.1:{http}/studies/{uid}/images/{image_uid}/heatmap",
                    headers={"Authorization": f"Bearer {token}"},
                )
                with urllib.request.urlopen(heat, timeout=30) as response:
                    alpha = np.asarray(Image.open(io.BytesIO(response.read())))[..., 3]
                ys, xs = np.nonzero(alpha)
                x0, y0, x1, y1 = next(iter(expected.values()))
                assert alpha.shape == (256, 256) and ys.size > 0
                assert x0 - 2 <= xs.mean() <= x1 + 2 and y0 - 2 <= ys.mean() <= y1 + 2  # on the finding
                page.get_by_label("Show the AI heat map").uncheck()
                assert figure.locator("img.heatmap").is_hidden()
                page.get_by_label("Show the AI heat map").check()
                page.screenshot(path=str(ARTIFACTS / "study.png"), full_page=True)
                first = page.locator("#findings tbody tr").first
                tracking = first.get_attribute("data-tracking-uid")
                first.get_by_role("button", name="Accept").click()
                page.locator("#announce", has_text="Verdict recorded: accept").wait_for(timeout=10_000)
                recorded = http_json(f"http://127.0.0.1:{http}/studies/{uid}/verdicts", token=token)[1]
                assert [(v["tracking_uid"], v["kind"], v["reviewer"]) for v in recorded] == [
                    (tracking, "accept", "u-4711")
                ]
                assert "accept" in page.locator(f'#findings tr[data-tracking-uid="{tracking}"]').inner_text()
                # Modify: the second finding's box corrected in the page, kept with the verdict.
                second = page.locator("#findings tbody tr").nth(1)
                corrected = second.get_attribute("data-tracking-uid")
                box = next(f["box"] for f in findings if f["tracking_uid"] == corrected)
                second.locator("summary", has_text="Modify").click()
                second.get_by_label("left x").fill(str(round(box[0]) - 3))
                second.get_by_role("button", name="Save the corrected box").click()
                page.locator("#announce", has_text="Verdict recorded: modify").wait_for(timeout=10_000)
                recorded = http_json(f"http://127.0.0.1:{http}/studies/{uid}/verdicts", token=token)[1]
                [modified] = [v for v in recorded if v["tracking_uid"] == corrected]
                assert modified["kind"] == "modify"
                assert modified["correction"]["box"] == [round(box[0]) - 3, *(round(v) for v in box[1:])]

                # The signed report disagrees with the AI: QA sees the case, assigns it; the model's numbers;
                # the operations page.
                assert gateway.orders_listener is not None
                client = MllpClient(gateway.orders_listener.port)
                try:
                    report = oru("ACC-PHANTOM-1", ["IMPRESSION: No intracranial hemorrhage."], control="D1")
                    assert msa(client.exchange(report))[1] == "AA"
                finally:
                    client.close()
                idp.user = ("u-qa", ["qa"], [])
                qa = browser.new_page(viewport={"width": 1920, "height": 1080})
                qa.goto(f"http://127.0.0.1:{http}/ui/")
                qa.get_by_role("button", name="Sign in with your hospital account").click()
                qa.locator("#worklist:not([hidden])").wait_for(timeout=20_000)  # QA sees the worklist too
                qa.get_by_role("link", name="QA").click()
                case = qa.locator("#discrepancies tbody tr", has_text="ACC-PHANTOM-1")
                case.wait_for(timeout=20_000)
                assert "AI only" in case.inner_text() and "No intracranial hemorrhage" in case.inner_text()
                qa.screenshot(path=str(ARTIFACTS / "qa.png"), full_page=True)
                case.get_by_label("Peer reviewer's user id").fill("u-peer-3")
                case.get_by_role("button", name="Assign").click()
                qa.locator("#announce", has_text="Assigned for peer review").wait_for(timeout=10_000)
                qa.get_by_label("Cases").select_option("assigned")
                qa.locator("#discrepancies tbody tr", has_text="assigned (u-peer-3)").wait_for(timeout=10_000)
                qa.get_by_role("link", name="Models").click()
                model = qa.locator('#model-stats tbody tr[data-model="ct_head_hyperdensity"]')
                model.wait_for(timeout=20_000)
                assert "100.0 % of 2" in model.inner_text()  # the two verdicts: accept and modify both accept
                assert model.locator("svg.histogram:not(.baseline) rect").count() == 10
                # the scores the drift check compares against: here the model's first findings (no silent pilot)
                assert model.locator("svg.histogram.baseline rect").count() == 10
                assert "first findings" in model.locator(".baseline").first.inner_text()
                qa.screenshot(path=str(ARTIFACTS / "models.png"), full_page=True)
                qa.get_by_role("link", name="Operations").click()
                qa.locator("#ops-status", has_text="Triton ready").wait_for(timeout=20_000)
                # the study's time to result, as a histogram of the gateway's own metric, by the priority it
                # arrived with (it became STAT with the AI's finding)
                slo = qa.locator('#slo tr[data-priority="ROUTINE"]')
                slo.wait_for(timeout=10_000)
                assert slo.locator("td").nth(1).inner_text() == "1"
                assert slo.locator("svg.histogram rect").count() == 15  # 14 bounds and "longer"
                assert qa.locator("#queues tbody tr").count() >= 3  # STAT, URGENT, ROUTINE at least
                qa.screenshot(path=str(ARTIFACTS / "operations.png"), full_page=True)

                idp.user = ("u-9", [], [])  # signed in, but no gateway role
                other = browser.new_page(viewport={"width": 1920, "height": 1080})
                other.goto(f"http://127.0.0.1:{http}/ui/")
                other.get_by_role("button", name="Sign in with your hospital account").click()
                other.locator("#message:not([hidden])").wait_for(timeout=20_000)
                assert "read-only is needed" in other.locator("#message").inner_text()
                assert other.locator("#worklist").is_hidden()
                other.screenshot(path=str(ARTIFACTS / "worklist-refused.png"))
                browser.close()
        finally:
            gateway.stop()
