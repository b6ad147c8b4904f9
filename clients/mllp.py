"""MLLP (HL7 v2 over TCP) client on asyncio: send a message, wait for its ACK, retry on NAK or timeout.

Every step has a timeout (connect, send, the ACK), and the waits between tries are ``asyncio.sleep``: a caller on
the gateway's event loop never blocks a thread on an unreachable or silent RIS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from gateway.core.errors import DeliveryError
from gateway.core.retry import Backoff

logger = logging.getLogger(__name__)

START, END = b"\x0b", b"\x1c\x0d"
MAX_FRAME_BYTES = 1 << 20


def frame(message: str) -> bytes:
    return START + message.encode("utf-8") + END


def unframe(data: bytes) -> str:
    """The message inside one MLLP frame (``data`` ends with the end block)."""
    body = data[data.index(START) + 1 : data.rindex(END)] if START in data else data[: data.rindex(END)]
    return body.decode("utf-8", errors="replace")


async def read_frame(reader: asyncio.StreamReader) -> str:
    try:
        data = await reader.readuntil(END)
    except asyncio.IncompleteReadError:
        raise ConnectionError("connection closed before a complete MLLP frame") from None
    except asyncio.LimitOverrunError:
        raise ConnectionError("MLLP frame too large") from None
    return unframe(data)


def ack_code(ack: str) -> str:
    """MSA-1 of an ACK (AA, AE, AR, CA, CE, CR), or '' when there is no MSA segment."""
    for segment in ack.replace("\n", "\r").split("\r"):
        if segment.startswith("MSA"):
            fields = segment.split("|")
            return fields[1] if len(fields) > 1 else ""
    return ""


@dataclass(frozen=True, kw_only=True)
class MllpResult:
    attempts: int
    ack: str


async def _exchange(host: str, port: int, message: str, timeout_s: float) -> str:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, limit=MAX_FRAME_BYTES), timeout_s
    )
    try:
        writer.write(frame(message))
        await asyncio.wait_for(writer.drain(), timeout_s)
        return await asyncio.wait_for(read_frame(reader), timeout_s)
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), timeout_s)


async def send_mllp(
    host: str, port: int, message: str, *, timeout_s: float = 10.0, attempts: int = 3, backoff_s: float = 1.0
) -> MllpResult:
    """Deliver one message; positive ACK (AA/CA) ends it, NAK (AE/AR/CE/CR) or no answer retries."""
    backoff = Backoff(backoff_s)
    last = ""
    for attempt in range(1, attempts + 1):
        try:
            ack = await _exchange(host, port, message, timeout_s)
            code = ack_code(ack)
            if code in ("AA", "CA"):
                return MllpResult(attempts=attempt, ack=ack)
            last = f"negative acknowledgement {code or '(no MSA)'}"
        except TimeoutError:
            last = f"no answer within {timeout_s:g} s"
        except (OSError, ConnectionError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if attempt < attempts:
            delay = backoff.delay(attempt)
            logger.warning(
                "HL7 to %s:%d failed (try %d/%d): %s; retrying in %.1fs",
                host,
                port,
                attempt,
                attempts,
                last,
                delay,
            )
            await asyncio.sleep(delay)
    raise DeliveryError(f"HL7 to {host}:{port} failed after {attempts} tries: {last}")
