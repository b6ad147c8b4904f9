"""Logging set-up for the entry points. Library modules only call ``logging.getLogger(__name__)``."""

from __future__ import annotations

import logging
import sys
import warnings

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure_logging(level: str = "INFO") -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
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
