"""The critical-results ledger on both backends (one message per study and level, escalation when due,
acknowledgement once), its signed links, and the contact ladder of the settings."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from sqlalchemy import Engine

from gateway.config.settings import load_settings
from gateway.core.errors import ConfigError
from gateway.workflow.critical_results import CriticalLedger, LinkSigner

SUMMARY = {"study_instance_uid": "1.2.3", "pipeline": "ct_head"}


def _open(ledger: CriticalLedger, level: int, now: float, study: str = "1.2.3", **kw: object) -> bool:
    return ledger.open_level(
        study, level, contact=f"level {level}", channels="email", calling_ae="PACS_A", sr_uid="1.2.3.9",
        results_stored_at=99.0, summary=SUMMARY, now=now, **kw,
    )  # fmt: skip


def test_one_message_per_study_and_level_and_escalation_when_due(engine: Engine) -> None:
    ledger, other = CriticalLedger(engine, "node-a"), CriticalLedger(engine, "node-b")
    assert _open(ledger, 1, now=100.0)
    assert not _open(other, 1, now=100.5)  # another node, or after a restart: nothing is sent twice
    assert ledger.due(60.0, now=150.0) == []  # still sending, not yet due
    ledger.sent("1.2.3", 1, ok=True, detail="", at=100.2)
    [due] = ledger.due(60.0, now=161.0)  # not acknowledged a minute after its message: level 2 is due
    assert (due.level, due.state, due.notified_at) == (1, "notified", 100.2)
    assert _open(ledger, 2, now=161.0)
    ledger.sent("1.2.3", 2, ok=False, detail="email: refused", at=161.5)
    [due] = ledger.due(60.0, now=162.0)  # failed on every channel: due at once
    assert (due.level, due.state, due.detail) == (2, "failed", "email: refused")
    assert _open(ledger, 3, now=162.0, state="unanswered")  # the ladder ran out, once
    assert not _open(other, 3, now=163.0, state="unanswered")
    assert ledger.due(60.0, now=10_000.0) == []


def test_a_lost_send_is_escalated_never_repeated(engine: Engine) -> None:
    ledger = CriticalLedger(engine, "node-a")
    assert _open(ledger, 1, now=100.0)  # the node died before sending: the row stays "sending"
    [due] = ledger.due(60.0, now=160.0)
    assert (due.level, due.state) == (1, "sending")


def test_acknowledgement_stops_the_ladder_and_counts_once(engine: Engine) -> None:
    ledger = CriticalLedger(engine, "node-a")
    assert ledger.acknowledge("1.2.3", "dr-a") is None  # no critical result
    _open(ledger, 1, now=100.0)
    ledger.sent("1.2.3", 1, ok=True, detail="", at=100.1)
    _open(ledger, 2, now=200.0)
    ledger.sent("1.2.3", 2, ok=True, detail="", at=200.1)
    first = ledger.acknowledge("1.2.3", "dr-a", at=230.0)
    assert first is not None and first.first and first.row.level == 2 and first.row.acknowledged_by == "dr-a"
    again = ledger.acknowledge("1.2.3", "dr-b", at=240.0)
    assert again is not None and not again.first and again.row.acknowledged_by == "dr-a"
    assert again.row.acknowledged_at == 230.0
    assert ledger.due(60.0, now=10_000.0) == []
    assert [r.state for r in ledger.rows("1.2.3")] == ["notified", "acknowledged"]


def test_signed_links_acknowledge_one_study_until_they_expire(tmp_path: Path) -> None:
    key = tmp_path / "critical-link.key"
    signer = LinkSigner.from_file(key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert LinkSigner.from_file(key).key == signer.key  # kept, not made again
    sig = signer.signature("1.2.3", 1, 1000)
    assert signer.valid("1.2.3", 1, 1000, sig, now=999.0) == ""
    assert signer.valid("1.2.3", 1, 1000, sig, now=1001.0) == "the link has expired"
    assert signer.valid("1.2.4", 1, 1000, sig, now=999.0) == "the link is not valid"
    assert signer.valid("1.2.3", 2, 1000, sig, now=999.0) == "the link is not valid"
    assert signer.valid("1.2.3", 1, 2000, sig, now=999.0) == "the link is not valid"
    with pytest.raises(ValueError):
        LinkSigner(b"short")


def _settings(tmp_path: Path, contacts: str, enabled: bool = True) -> object:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path}"\n[critical_results]\nenabled = {str(enabled).lower()}\n{contacts}'
    )
    return load_settings(config)


def test_the_ladder_per_site_and_what_the_settings_refuse(tmp_path: Path) -> None:
    contacts = (
        '[[critical_results.contacts]]\nlevel = 1\nname = "any site"\nemail = "a@h.example"\n'
        '[[critical_results.contacts]]\nlevel = 1\nname = "site B"\nsites = ["PACS_B"]\nwebhook_url = "http://127.0.0.1:9/x"\n'
        '[[critical_results.contacts]]\nlevel = 2\nname = "consultant"\nhl7 = "127.0.0.1:2576"\n'
    )
    critical = _settings(tmp_path, contacts).critical_results  # type: ignore[attr-defined]
    assert [c.name for c in critical.ladder("PACS_A")] == ["any site", "consultant"]
    assert [c.name for c in critical.ladder("PACS_B")] == ["site B", "consultant"]
    for bad, message in (
        ("", "needs at least one"),
        ('[[critical_results.contacts]]\nlevel = 1\nname = "x"\n', "at least one of email"),
        ('[[critical_results.contacts]]\nlevel = 1\nname = "x"\nemail = "nobody"\n', "not an e-mail"),
        (
            contacts + '[[critical_results.contacts]]\nlevel = 2\nname = "y"\nemail = "y@h.example"\n',
            "two contacts",
        ),
    ):
        with pytest.raises(ConfigError, match=message):
            _settings(tmp_path, bad)
