"""Radiologists' verdicts over HTTP (issue 14, item 1 and 3) on a real gateway with a real Triton: people sign in
with OpenID Connect (JWT checked against a JWKS served on loopback), machines with service tokens; every verdict
is tied to a current AI finding of the system of record - unknown, superseded and silent results are refused
and nothing is stored; a second verdict amends the first; the FHIR export parses back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle

from gateway.app import Gateway
from gateway.config.settings import load_settings
from gateway.demo.phantoms import Lesion, write_head_ct
from gateway.inference.server import free_port
from gateway.ops.http_api import hash_token
from gateway.results.content import read_measurement_report
from tests.support.oidc import Provider
from tests.support.servers import http_json, storescu, wait_for

pytestmark = pytest.mark.integration

PACS_TOKEN = "pacs-integration-token"  # a viewer integration that records verdicts as a service
WALL = "wall-display-token"  # read-only
OPS = "operator-token"
PIPELINES = (
    '[[pipelines]]\nname = "{name}"\nmodel = "ct_head_hyperdensity"\nalgorithm_version = "0.1.0"\n'
    'mode = "{mode}"\nreport_threshold = 0.5\nstat_threshold = 0.7\nmodalities = ["CT"]\n'
    'input_size = [256, 256]\n{extra}[pipelines.labels]\n0 = "hemorrhage"\n'
)


def _config(tmp_path: Path, triton: str, provider: Provider, *, port: int, http: int) -> Path:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 0.5\nworkers = 1\n[receiver]\nport = {port}\n'
        f"[http]\nport = {http}\n"
        f'[[http.tokens]]\nname = "pacs-viewer"\nrole = "radiologist"\nsha256 = "{hash_token(PACS_TOKEN)}"\n'
        f'[[http.tokens]]\nname = "wall"\nrole = "read-only"\nsha256 = "{hash_token(WALL)}"\n'
        f'[[http.tokens]]\nname = "ops"\nrole = "operator"\nsha256 = "{hash_token(OPS)}"\n'
        f"{provider.config()}"
        f'[triton]\nurl = "{triton}"\n'
        + PIPELINES.format(name="ct_hyperdensity", mode="triage", extra="")
        + PIPELINES.format(name="ct_hyperdensity_pilot", mode="silent", extra="")
        # Pilots: shown only to the neuro pilot group; triage only for another PACS (silent for this one).
        + PIPELINES.format(name="ct_neuro_pilot", mode="assist", extra='pilot_groups = ["neuro-pilot"]\n')
        + PIPELINES.format(name="ct_other_site", mode="triage", extra='pilot_sites = ["OTHER_PACS"]\n')
    )
    return config


def _reported(gateway: Gateway, study_uid: str) -> list[dict[str, Any]]:
    return [
        e for e in gateway.audit.read() if e["event"] == "findings_reported" and e.get("study") == study_uid
    ]


def test_verdicts_over_http_with_openid_connect_and_roles(tmp_path: Path, triton: str) -> None:
    lesion = Lesion(x=130.0, y=120.0, slice=4, radius_mm=8.0, hu=70.0)
    series = write_head_ct(
        tmp_path / "ct", slices=10, rows=256, cols=256, pixel_mm=1.0, lesions=(lesion,), seed=5
    )
    first = [p for p in series.paths if pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber != 10]
    last = [p for p in series.paths if p not in first]
    http, port = free_port(), free_port()
    with Provider() as idp:
        gateway = Gateway(load_settings(_config(tmp_path, triton, idp, port=port, http=http))).start()
        try:
            base = f"http://127.0.0.1:{http}"
            study = series.study_uid
            url = f"{base}/studies/{study}"
            dr = idp.token("u-4711", ["radiologist"])

            assert storescu(first, port=port, calling_ae="STORESCU").returncode == 0
            wait_for(
                lambda: len(_reported(gateway, study)) == 4, timeout_s=120, what="every pipeline's findings"
            )
            everyone = {"ct_hyperdensity", "ct_hyperdensity_pilot", "ct_other_site"}  # not the group's pilot
            findings = wait_for(
                lambda: (
                    lambda r: r[1] if r[0] == 200 and {f["pipeline"] for f in r[1]} == everyone else None
                )(http_json(f"{url}/findings", token=dr)),
                timeout_s=20,
                what="the findings in the system of record",
            )
            shown = [f for f in findings if f["mode"] == "triage"]
            silent = [f for f in findings if f["pipeline"] == "ct_hyperdensity_pilot"]
            assert shown and silent and all(f["verdict"] is None for f in findings)
            # A pilot outside its sites is silent; a pilot for a group is seen by that group (and QA) only.
            assert {f["mode"] for f in findings if f["pipeline"] == "ct_other_site"} == {"silent"}
            neuro = idp.token("u-77", ["radiologist"], groups=["neuro-pilot"])
            for token, sees in ((neuro, True), (idp.token("u-qa", ["qa"]), True), (dr, False)):
                listed = {f["pipeline"] for f in http_json(f"{url}/findings", token=token)[1]}
                assert ("ct_neuro_pilot" in listed) is sees, listed
            piloted = next(
                f for f in http_json(f"{url}/findings", token=neuro)[1] if f["pipeline"] == "ct_neuro_pilot"
            )
            hidden = {"kind": "accept", "sr_uid": piloted["sr_uid"], "tracking_uid": piloted["tracking_uid"]}
            assert http_json(f"{url}/verdicts", method="POST", token=dr, body=hidden)[0] == 409  # never shown
            # The findings are the SR's: same Tracking UIDs, same SR, the model's identity with them.
            [sr] = {f["sr_uid"] for f in shown}
            sr_path = next((tmp_path / "data" / "results" / study).glob("SR_*.dcm"))
            on_disk = {
                str(ds.SOPInstanceUID): {f.tracking_uid for f in read_measurement_report(ds)}
                for ds in (
                    pydicom.dcmread(p) for p in (tmp_path / "data" / "results" / study).glob("SR_*.dcm")
                )
            }
            assert on_disk[sr] == {f["tracking_uid"] for f in shown}, sr_path
            assert all(f["model_name"] == "ct_head_hyperdensity" and f["model_hash"] for f in shown)
            target = shown[0]

            # Who may see and say what.
            assert http_json(f"{url}/findings")[0] == 401
            assert http_json(f"{url}/findings", token=WALL)[0] == 403  # read-only sees no AI results
            assert http_json(f"{url}/findings", token=idp.token("u-1", ["read-only"]))[0] == 403
            for bad in (
                idp.token("u-4711", ["radiologist"], lifetime_s=-120),  # expired (beyond the leeway)
                idp.token("u-4711", ["radiologist"], audience="another-app"),
                idp.token("u-4711", ["radiologist"], issuer="https://idp.elsewhere.test"),
                idp.token("u-4711", ["radiologist"], stranger=True),  # not signed by the provider
            ):
                status, body = http_json(f"{url}/findings", token=bad)
                assert status == 401, body
            accept = {"kind": "accept", "sr_uid": sr, "tracking_uid": target["tracking_uid"]}
            assert http_json(f"{url}/verdicts", method="POST", token=OPS, body=accept)[0] == 403
            qa = idp.token("u-qa", ["qa"])
            assert http_json(f"{url}/verdicts", method="POST", token=qa, body=accept)[0] == 403
            assert http_json(f"{url}/findings", token=qa)[0] == 200  # QA reads, does not record

            # Refused verdicts store nothing: unknown result, unknown finding, silent result, malformed.
            refused = [
                ({**accept, "sr_uid": "1.2.3.999"}, 404),
                ({**accept, "tracking_uid": "1.2.3.998"}, 404),
                ({**accept, "sr_uid": silent[0]["sr_uid"], "tracking_uid": silent[0]["tracking_uid"]}, 409),
                ({**accept, "kind": "reject"}, 422),  # no reason
                ({**accept, "kind": "reject", "reason": "looks odd"}, 422),  # not on the list
                ({**accept, "kind": "modify"}, 422),  # no correction
                ({"kind": "accept"}, 422),
            ]
            for body, expected in refused:
                status, answer = http_json(f"{url}/verdicts", method="POST", token=dr, body=body)
                assert status == expected, (body, answer)
                assert "error" in answer
            other_study = f"{base}/studies/1.2.3.4/verdicts"
            assert http_json(other_study, method="POST", token=dr, body=accept)[0] == 404
            assert http_json(f"{url}/verdicts", token=dr) == (200, [])

            status, first_verdict = http_json(f"{url}/verdicts", method="POST", token=dr, body=accept)
            assert status == 201, first_verdict
            assert first_verdict["reviewer"] == "u-4711" and first_verdict["via"] == "http"
            assert first_verdict["model_version"] and first_verdict["model_hash"] == target["model_hash"]
            assert first_verdict["seconds_to_verdict"] is not None and first_verdict["current"]
            status, amended = http_json(
                f"{url}/verdicts",
                method="POST",
                token=PACS_TOKEN,
                body={**accept, "kind": "reject", "reason": "False positive"},
            )
            assert (
                status == 201
                and amended["reason"] == "false positive"
                and amended["reviewer"] == "pacs-viewer"
            )
            status, history = http_json(f"{url}/verdicts", token=qa)
            assert [v["kind"] for v in history] == ["accept", "reject"]
            assert (
                not history[0]["current"]
                and history[0]["amended_by"] == history[1]["id"]
                and history[1]["current"]
            )
            now = {f["tracking_uid"]: f["verdict"] for f in http_json(f"{url}/findings", token=dr)[1]}
            assert now[target["tracking_uid"]]["kind"] == "reject"
            box = {"box": [100.0, 100.0, 140.0, 130.0], "long_axis_mm": 12.5}
            modify = {**accept, "kind": "modify", "correction": box}
            assert http_json(f"{url}/verdicts", method="POST", token=dr, body=modify)[0] == 201
            image = target["image_uid"]
            missed = {
                "kind": "missed",
                "correction": {"finding_type": "hemorrhage", "image_uid": image, "box": [10, 10, 20, 20]},
            }
            status, added = http_json(f"{url}/verdicts", method="POST", token=dr, body=missed)
            assert status == 201 and added["sr_uid"] == "" and added["tracking_uid"] != target["tracking_uid"]

            # FHIR export, parsed back: every verdict derived from its AI finding, the reviewer pseudonymous.
            status, exported = http_json(f"{url}/verdicts/fhir", token=qa)
            assert status == 200
            bundle = Bundle.model_validate(exported)
            observations = [e.resource for e in bundle.entry]
            assert len(observations) == 4
            assert [o.status for o in observations] == ["amended", "amended", "final", "final"]
            on_finding = observations[2]
            refs = {r.identifier.value for r in on_finding.derivedFrom}
            assert f"urn:oid:{target['tracking_uid']}" in refs and f"urn:oid:{sr}" in refs
            assert on_finding.performer[0].identifier.value == "u-4711"
            assert "never recorded" not in str(exported)  # the token's name claim goes nowhere

            # A newer analysis supersedes the result: verdicts on the old one are refused, the new one reviewable.
            assert storescu(last, port=port, calling_ae="STORESCU").returncode == 0
            newer = wait_for(
                lambda: [
                    e
                    for e in _reported(gateway, study)
                    if e["pipeline"] == "ct_hyperdensity" and e["sr"] != sr and e["supersedes"] == [sr]
                ],
                timeout_s=120,
                what="the re-analysis that supersedes the first SR",
            )[0]
            stale = {**accept, "tracking_uid": shown[-1]["tracking_uid"]}
            wait_for(
                lambda: http_json(f"{url}/verdicts", method="POST", token=dr, body=stale)[0] == 409,
                timeout_s=20,
                what="the old result to be marked superseded",
            )
            fresh = {
                "kind": "accept",
                "sr_uid": newer["sr"],
                "tracking_uid": newer["reported"][0]["tracking_uid"],
            }
            assert http_json(f"{url}/verdicts", method="POST", token=dr, body=fresh)[0] == 201
            assert idp.fetches >= 1  # the keys came from the provider's JWKS endpoint
            # What the committee governs, and its audited history (the first start added every pipeline).
            assert http_json(f"{base}/admin/pipelines", token=dr)[0] == 403
            status, governed = http_json(f"{base}/admin/pipelines", token=idp.token("u-admin", ["admin"]))
            assert status == 200 and governed["pipelines"]["ct_other_site"]["pilot_sites"] == ["OTHER_PACS"]
            assert {c["pipeline"] for c in governed["changes"] if c["before"] is None} == set(
                governed["pipelines"]
            )
        finally:
            gateway.stop()
