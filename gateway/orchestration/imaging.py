"""Which imaging code runs here: the array backend (numpy / CuPy), the DALI pipeline and the image decoder,
chosen once at start-up from the settings and what this machine has, and said in the log."""

from __future__ import annotations

import logging

from gateway.config.settings import Settings
from gateway.core.errors import ConfigError
from preprocessing.backend import ArrayBackend, select_backend
from preprocessing.codec import NvImageDecoder, select_decoder
from preprocessing.dali_pipeline import DaliPreprocessor
from preprocessing.dali_pipeline import available as dali_available
from preprocessing.decode import decoder_availability

logger = logging.getLogger(__name__)


def select_imaging(
    settings: Settings,
) -> tuple[ArrayBackend, DaliPreprocessor | None, NvImageDecoder | None, str]:
    """The array backend, the DALI pipeline (when configured) and the image decoder, with its start-up line."""
    backend = select_backend(force_cpu=settings.force_cpu)
    dali = None
    if settings.preprocess_backend == "dali":
        usable, reason = dali_available()
        if not usable:
            raise ConfigError(f"preprocess_backend = 'dali' but {reason}; install nvidia-dali or use 'auto'")
        dali = DaliPreprocessor(device_id=0 if backend.name == "cupy" else None)
    try:
        decoder, decoder_reason = select_decoder(settings.decode_backend, gpu=backend.name == "cupy")
    except RuntimeError as exc:
        raise ConfigError(f"{exc}; install nvidia-nvimgcodec-cu12 or use decode_backend = 'auto'") from exc
    return backend, dali, decoder, decoder_reason


def log_capabilities(
    backend: ArrayBackend, dali: DaliPreprocessor | None, decoder_reason: str, *, pipelines: int
) -> None:
    logger.info("array backend: %s (%s)", backend.name, backend.reason)
    logger.info("image decode: %s", decoder_reason)
    if dali is not None:
        logger.info("preprocessing through the DALI pipeline (%s)", dali.name)
    missing = [name for name, ok in decoder_availability().items() if not ok]
    if missing:
        logger.warning(
            "no decoder installed for: %s; such studies will be kept but not analysed", ", ".join(missing)
        )
    if not pipelines:
        logger.warning("no pipelines configured: studies are stored but never analysed")
