"""Logging set-up for the entry points. Library modules only call ``logging.getLogger(__name__)``."""

from __future__ import annotations

import logging
import re
import sys
import warnings
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
CONTINUATION = "    | "  # prefix of a record's further lines (traceback): never mistaken for a new record

# C0 controls, DEL, C1 controls and the Unicode line / paragraph separators: a newline forges a log line, ESC
# drives the operator's terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def neutralise(text: str) -> str:
    """``text`` with every control character shown escaped (``\\n``, ``\\x1b``): safe to write on one line."""
    return _CONTROL.sub(
        lambda m: _NAMED.get(
            m.group(), f"\\u{ord(m.group()):04x}" if ord(m.group()) > 0xFF else f"\\x{ord(m.group()):02x}"
        ),
        text,
    )


class SafeFormatter(logging.Formatter):
    """A formatter whose every record is one line: header text that reaches a message (a body part with a
    newline, an ANSI escape in a description) is shown escaped, and a traceback's lines carry a prefix."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = neutralise(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: object) -> str:
        text = super().formatException(ei)  # type: ignore[arg-type]
        return CONTINUATION + f"\n{CONTINUATION}".join(neutralise(line) for line in text.split("\n"))

    def formatStack(self, stack_info: str) -> str:
        return CONTINUATION + f"\n{CONTINUATION}".join(neutralise(line) for line in stack_info.split("\n"))


def handler_for(stream: TextIO) -> logging.Handler:
    """A stream handler with the gateway's one-line-per-record format."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(SafeFormatter(FORMAT))
    return handler


def configure_logging(level: str = "INFO") -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    handler = handler_for(sys.stderr)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    silence_identifier_warnings()
    logging.captureWarnings(True)
    # Third-party chatter; pynetdicom at DEBUG would print dataset contents.
    for noisy in ("pynetdicom", "highdicom", "urllib3", "grpc"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))


def silence_identifier_warnings() -> None:
    """Drop library warnings that quote attribute values (patient names among them) before they reach a log.

    highdicom warns with the full Patient's Name when it is not in PN component form; pydicom warns with the
    value when an element does not match its VR. Both are data-quality notes about the sender's data.
    """
    warnings.filterwarnings("ignore", message=r".*unlikely to represent the intended person name.*")
    warnings.filterwarnings("ignore", message=r".*(?:Invalid value|is not valid) for VR.*")
    warnings.filterwarnings("ignore", message=r".*value length .* exceeds the maximum length.*")
    # pydicom also *logs* these notes (warn_and_log), quoting values that, in a corrupt dataset, can run into
    # the neighbouring Patient's Name or ID. Its warnings carry no operational information the gateway needs.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
