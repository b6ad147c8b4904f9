"""Critical results with acknowledgement: a STAT finding, once its SR is stored, notifies the site's level-1
contact (e-mail, webhook, HL7 - whichever the contact has); unacknowledged after ``ack_timeout_s``, or failed on
every channel, the next level is notified; when the ladder runs out the study is recorded as unanswered and
logged as an error. The recipient acknowledges by an authenticated API call or the signed link in the message.

One message per study per level, also across restarts and nodes (the ledger's unique row is claimed before the
send). Time from SR stored to the first notification and to the acknowledgement is audited per study
(``critical_result_notified`` / ``critical_result_acknowledged``) and observed as histograms.

Runs on the event loop; the ledger and SMTP calls run on the executor it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Engine

from clients.http_post import HttpPoster
from clients.mllp import send_mllp
from clients.smtp import send_mail
from gateway.config.settings import CriticalContact, CriticalResultsSettings, Settings
from gateway.core.errors import DeliveryError
from gateway.core.retry import Backoff
from gateway.reporting.hl7 import Hl7Parties, build_critical_alert
from gateway.workflow.critical_results import CriticalLedger, CriticalRow, LinkSigner

logger = logging.getLogger("gateway.critical")
CHANNEL_ATTEMPTS = 3
CHANNEL_BACKOFF = Backoff(0.5)
RAISE_ATTEMPTS = 60  # with RAISE_BACKOFF: about half an hour of database outage
RAISE_BACKOFF = Backoff(1.0, 30.0)


@dataclass(frozen=True, kw_only=True)
class CriticalFinding:
    """A series with a STAT finding whose SR is stored (no patient data: UIDs, accession, the algorithm)."""

    study_instance_uid: str
    calling_ae: str
    accession_number: str
    sr_sop_instance_uid: str
    stored_at: float
    pipeline: str
    algorithm: str
    model: str
    findings: int
    max_confidence: float


def message_text(summary: dict[str, Any], ack_timeout_s: float) -> str:
    return (
        f"The AI reported a critical finding in a study from {summary['calling_ae']}.\n"
        f"Accession number: {summary['accession_number'] or '(none)'}\n"
        f"Study Instance UID: {summary['study_instance_uid']}\n"
        f"Finding: {summary['pipeline']} - {summary['findings']} finding(s), highest confidence "
        f"{summary['max_confidence']:.2f} ({summary['algorithm']}; model {summary['model']})\n"
        f"Structured report: {summary['sr_sop_instance_uid']}\n"
        "This is a preliminary, unverified AI result, not a diagnosis: please review the study.\n"
        f"Not acknowledged within {ack_timeout_s / 60:g} min, it goes to the next contact.\n"
    )


class CriticalAlerts:
    def __init__(
        self,
        settings: CriticalResultsSettings,
        ledger: CriticalLedger,
        signer: LinkSigner,
        *,
        executor: Executor,
        http: HttpPoster,
        on_event: Callable[..., None],
        observe: Callable[[str, float], None],
        parties: Hl7Parties | None = None,
        smtp_password: str = "",
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.signer = signer
        self.executor = executor
        self.http = http
        self.on_event = on_event
        self.observe = observe  # ("notify" | "acknowledge", seconds from SR stored)
        self.parties = parties or Hl7Parties()
        self.smtp_password = smtp_password
        self._in_flight: set[asyncio.Task[None]] = set()
        self._escalating: set[str] = set()  # studies whose next level is being told now

    @classmethod
    def for_settings(
        cls,
        settings: Settings,
        engine: Engine,
        *,
        http: HttpPoster,
        on_event: Callable[..., None],
        observe: Callable[[str, float], None],
    ) -> CriticalAlerts | None:
        """The loop ``[critical_results]`` asks for, or None when it is off."""
        critical = settings.critical_results
        if not critical.enabled:
            return None
        key_file = critical.link_secret_file or settings.data_dir / "critical-link.key"
        smtp = critical.smtp
        password = smtp.password_file.read_text().strip() if smtp.password_file is not None else ""
        return cls(
            critical,
            CriticalLedger(engine, settings.node_id),
            LinkSigner.from_file(key_file),
            executor=ThreadPoolExecutor(max_workers=2, thread_name_prefix="gateway-critical"),
            http=http,
            on_event=on_event,
            observe=observe,
            parties=Hl7Parties(sending_facility=settings.hl7.sending_facility),
            smtp_password=password,
        )

    # -- raising and escalating (on the event loop) ------------------------------------------------------------

    def raised(self, finding: CriticalFinding) -> None:
        """A STAT SR is stored: notify level 1 in the background (a study's second STAT series sends nothing)."""
        summary = asdict(finding)
        ladder = self.settings.ladder(finding.calling_ae)
        if not ladder:
            logger.error(
                "critical finding of study %s: no contact for site %s",
                finding.study_instance_uid,
                finding.calling_ae,
            )
            return
        self._spawn(self._raise(summary, ladder[0]), f"critical-{finding.study_instance_uid}")

    async def _raise(self, summary: dict[str, Any], contact: CriticalContact) -> None:
        """Level 1, retried while the ledger cannot be written (a database outage): until its row is claimed the
        escalation loop does not know of the study."""
        for attempt in range(1, RAISE_ATTEMPTS + 1):
            try:
                await self._notify_level(summary, contact)
                return
            except Exception as exc:
                logger.error(
                    "critical result of study %s not raised yet (try %d): %s",
                    summary["study_instance_uid"],
                    attempt,
                    type(exc).__name__,
                )
                await asyncio.sleep(RAISE_BACKOFF.delay(attempt))

    async def run(self, stopping: asyncio.Event) -> None:
        """Escalate what is due, every ``poll_s``, until ``stopping`` is set."""
        while not stopping.is_set():
            try:
                due = await self._blocking(self.ledger.due, self.settings.ack_timeout_s)
            except Exception as exc:  # the database is away: try again at the next poll
                logger.warning("critical results: escalations not read now (%s)", type(exc).__name__)
                due = []
            for row in due:  # each in its own task: a slow mail relay for one study never delays another
                if row.study_uid not in self._escalating:
                    self._escalating.add(row.study_uid)
                    self._spawn(self._escalate(row), f"critical-escalate-{row.study_uid}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.settings.poll_s)

    async def _escalate(self, row: CriticalRow) -> None:
        try:
            await self._escalate_once(row)
        finally:
            self._escalating.discard(row.study_uid)

    async def _escalate_once(self, row: CriticalRow) -> None:
        higher = [c for c in self.settings.ladder(row.calling_ae) if c.level > row.level]
        if higher:
            logger.warning(
                "critical result of study %s not acknowledged at level %d (%s): escalating to level %d",
                row.study_uid,
                row.level,
                row.state,
                higher[0].level,
            )
            await self._notify_level(row.summary, higher[0])
            return
        claimed = await self._blocking(
            self.ledger.open_level,
            row.study_uid,
            row.level + 1,
            contact="",
            channels="",
            calling_ae=row.calling_ae,
            sr_uid=row.sr_uid,
            results_stored_at=row.results_stored_at,
            summary=row.summary,
            state="unanswered",
        )
        if claimed:
            logger.error(
                "critical result of study %s: nobody acknowledged it, every level was told", row.study_uid
            )
            self.on_event("critical_result_unanswered", study=row.study_uid, levels=row.level)

    async def _notify_level(self, summary: dict[str, Any], contact: CriticalContact) -> None:
        study_uid = summary["study_instance_uid"]
        channels = [name for name in ("email", "webhook", "hl7") if getattr(contact, _FIELD[name])]
        claimed = await self._blocking(
            self.ledger.open_level,
            study_uid,
            contact.level,
            contact=contact.name,
            channels=",".join(channels),
            calling_ae=summary["calling_ae"],
            sr_uid=summary["sr_sop_instance_uid"],
            results_stored_at=summary["stored_at"],
            summary=summary,
        )
        if not claimed:
            return  # told before (another series, another node, before a restart)
        link = self.link(study_uid, contact.level)
        sends = {
            "email": self._email,
            "webhook": self._webhook,
            "hl7": self._hl7,
        }
        outcomes = await asyncio.gather(
            *(sends[name](summary, contact, link) for name in channels), return_exceptions=True
        )
        failures = [f"{name}: {o}" for name, o in zip(channels, outcomes, strict=True) if o is not None]
        ok = len(failures) < len(channels)
        at = time.time()
        await self._blocking(
            self.ledger.sent, study_uid, contact.level, ok=ok, detail="; ".join(failures), at=at
        )
        if not ok:
            logger.error(
                "critical result of study %s: level %d not notified: %s",
                study_uid,
                contact.level,
                "; ".join(failures),
            )
            self.on_event(
                "critical_result_failed",
                study=study_uid,
                level=contact.level,
                reason="; ".join(failures)[:300],
            )
            return
        seconds = at - float(summary["stored_at"])
        logger.warning(
            "critical result of study %s: level %d (%s) notified by %s",
            study_uid,
            contact.level,
            contact.name,
            ",".join(c for c, o in zip(channels, outcomes, strict=True) if o is None),
        )
        self.on_event(
            "critical_result_notified",
            study=study_uid,
            level=contact.level,
            contact=contact.name,
            channels=channels,
            failed_channels=failures,
            seconds_from_sr=round(seconds, 3),
        )
        rows = await self._blocking(self.ledger.rows, study_uid)
        if not any(r.notified_at is not None and r.level < contact.level for r in rows):
            self.observe("notify", seconds)  # the study's first notification that reached anyone

    async def _email(self, summary: dict[str, Any], contact: CriticalContact, link: str) -> None:
        smtp = self.settings.smtp
        body = message_text(summary, self.settings.ack_timeout_s) + f"\nAcknowledge: {link}\n"
        subject = f"CRITICAL AI finding - please acknowledge (level {contact.level})"
        for attempt in range(1, CHANNEL_ATTEMPTS + 1):
            try:
                await self._blocking(
                    lambda: send_mail(
                        host=smtp.host,
                        port=smtp.port,
                        sender=smtp.sender,
                        to=contact.email,
                        subject=subject,
                        body=body,
                        timeout_s=smtp.timeout_s,
                        starttls=smtp.starttls,
                        username=smtp.username,
                        password=self.smtp_password,
                    )
                )
                return
            except DeliveryError:
                if attempt == CHANNEL_ATTEMPTS:
                    raise
                await asyncio.sleep(CHANNEL_BACKOFF.delay(attempt))

    async def _webhook(self, summary: dict[str, Any], contact: CriticalContact, link: str) -> None:
        event = {
            "event": "critical_result",
            "level": contact.level,
            "contact": contact.name,
            **summary,
            "acknowledge_url": link,
            "acknowledge_api": f"/critical-results/{summary['study_instance_uid']}/acknowledge",
        }
        await self.http.post(
            contact.webhook_url,
            json.dumps(event, sort_keys=True).encode(),
            content_type="application/json",
            timeout_s=10.0,
            attempts=CHANNEL_ATTEMPTS,
            backoff=CHANNEL_BACKOFF,
            what="critical-result webhook",
        )

    async def _hl7(self, summary: dict[str, Any], contact: CriticalContact, link: str) -> None:
        host, _, port = contact.hl7.rpartition(":")
        message = build_critical_alert(
            study_uid=summary["study_instance_uid"],
            accession_number=summary["accession_number"],
            text=message_text(summary, self.settings.ack_timeout_s).replace("\n", " "),
            acknowledge_url=link,
            parties=self.parties,
        )
        await send_mllp(
            host,
            int(port),
            message.to_er7(),
            timeout_s=10.0,
            attempts=CHANNEL_ATTEMPTS,
            backoff_s=CHANNEL_BACKOFF.base_s,
        )

    # -- acknowledging (blocking: from the HTTP server's worker threads) ---------------------------------------

    def link(self, study_uid: str, level: int) -> str:
        expires = int(time.time() + self.settings.link_valid_s)
        query = urllib.parse.urlencode(
            {
                "study": study_uid,
                "level": level,
                "expires": expires,
                "sig": self.signer.signature(study_uid, level, expires),
            }
        )
        return f"{self.settings.public_url.rstrip('/')}/critical-results/acknowledge?{query}"

    def acknowledge(self, study_uid: str, by: str) -> dict[str, Any] | None:
        """Record the acknowledgement of ``by`` (a token's name, or ``link:<contact>``); None: no critical result."""
        ack = self.ledger.acknowledge(study_uid, by)
        if ack is None:
            return None
        row = ack.row
        assert row.acknowledged_at is not None
        seconds = row.acknowledged_at - row.results_stored_at
        if ack.first:
            logger.warning("critical result of study %s acknowledged at level %d", study_uid, row.level)
            self.on_event(
                "critical_result_acknowledged",
                study=study_uid,
                level=row.level,
                by=row.acknowledged_by,
                seconds_from_sr=round(seconds, 3),
            )
            self.observe("acknowledge", seconds)
        return {
            "study": study_uid,
            "acknowledged": True,
            "first": ack.first,
            "level": row.level,
            "by": row.acknowledged_by,
            "acknowledged_at": row.acknowledged_at,
            "seconds_from_sr": round(seconds, 3),
        }

    def acknowledge_link(self, study_uid: str, level: int, expires: int, signature: str) -> dict[str, Any]:
        """An acknowledgement by a signed link: ``{"error": ...}`` when the link is not good."""
        problem = self.signer.valid(study_uid, level, expires, signature)
        if problem:
            return {"error": problem}
        contact = next((r.contact for r in self.ledger.rows(study_uid) if r.level == level), "")
        found = self.acknowledge(study_uid, f"link:{contact or level}")
        return found if found is not None else {"error": "no critical result for this study"}

    def status(self, study_uid: str) -> list[dict[str, Any]]:
        return [row.as_json() for row in self.ledger.rows(study_uid)]

    # -- plumbing ----------------------------------------------------------------------------------------------

    async def _blocking(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: fn(*args, **kwargs))

    def _spawn(self, coroutine: Any, name: str) -> None:
        task = asyncio.create_task(self._guarded(coroutine), name=name)
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _guarded(self, coroutine: Any) -> None:
        try:
            await coroutine
        except Exception as exc:  # the ledger is away: the escalation loop retries what is due
            logger.error("critical result: a notification step failed: %s: %s", type(exc).__name__, exc)

    async def drain(self, timeout_s: float) -> None:
        """Wait (bounded) for notifications in flight; what is unsent is escalated after the restart."""
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout_s)

    def close(self) -> None:
        if isinstance(self.executor, ThreadPoolExecutor):
            self.executor.shutdown(wait=True, cancel_futures=True)


_FIELD = {"email": "email", "webhook": "webhook_url", "hl7": "hl7"}
