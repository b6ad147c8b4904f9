"""MLLP (HL7 v2 over TCP) client: send a message, wait for its ACK, retry on NAK or timeout."""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass

from gateway.core.errors import DeliveryError
from gateway.core.retry import Backoff

logger = logging.getLogger(__name__)

START, END = b"\x0b", b"\x1c\x0d"


def frame(message: str) -> bytes:
    return START + message.encode("utf-8") + END


def read_frame(sock: socket.socket, limit: int = 1 << 20) -> str:
    data = b""
    while END not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before a complete MLLP frame")
        data += chunk
        if len(data) > limit:
            raise ConnectionError("MLLP frame too large")
    body = data[data.index(START) + 1 : data.index(END)] if START in data else data[: data.index(END)]
    return body.decode("utf-8", errors="replace")


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


def send_mllp(
    host: str, port: int, message: str, *, timeout_s: float = 10.0, attempts: int = 3, backoff_s: float = 1.0
) -> MllpResult:
    """Deliver one message; positive ACK (AA/CA) ends it, NAK (AE/AR/CE/CR) or no answer retries."""
    last = ""
    for attempt in range(1, attempts + 1):
        try:
            with socket.create_connection((host, port), timeout=timeout_s) as sock:
                sock.settimeout(timeout_s)
                sock.sendall(frame(message))
                ack = read_frame(sock)
            code = ack_code(ack)
            if code in ("AA", "CA"):
                return MllpResult(attempts=attempt, ack=ack)
            last = f"negative acknowledgement {code or '(no MSA)'}"
        except (OSError, ConnectionError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if attempt < attempts:
            delay = Backoff(backoff_s).delay(attempt)
            logger.warning(
                "HL7 to %s:%d failed (try %d/%d): %s; retrying in %.1fs",
                host,
                port,
                attempt,
                attempts,
                last,
                delay,
            )
            time.sleep(delay)
    raise DeliveryError(f"HL7 to {host}:{port} failed after {attempts} tries: {last}")
