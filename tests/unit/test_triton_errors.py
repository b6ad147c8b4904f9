"""Triton errors are classified by their gRPC status code: "not now" is retried, the server's answer is not."""

from __future__ import annotations

import pytest
from tritonclient.utils import InferenceServerException

from clients.triton import is_transient


@pytest.mark.parametrize(
    ("status", "transient"),
    [
        ("StatusCode.UNAVAILABLE", True),  # server down or restarting, model not ready
        ("StatusCode.DEADLINE_EXCEEDED", True),
        ("StatusCode.NOT_FOUND", True),  # model not loaded (yet)
        ("StatusCode.RESOURCE_EXHAUSTED", True),
        ("StatusCode.INVALID_ARGUMENT", False),  # wrong shape or datatype: the same request fails again
        ("StatusCode.INTERNAL", False),
        (None, False),
    ],
)
def test_status_code_decides(status: str | None, transient: bool) -> None:
    assert is_transient(InferenceServerException("some message", status=status)) is transient


def test_the_message_text_no_longer_decides() -> None:
    """A permanent error whose text happens to say "unavailable" (a tensor name, a parameter) is not retried."""
    exc = InferenceServerException(
        "input 'UNAVAILABLE_MASK' not found: unavailable", status="StatusCode.INVALID_ARGUMENT"
    )
    assert not is_transient(exc)


def test_transport_errors_are_transient_and_our_own_bugs_are_not() -> None:
    assert is_transient(ConnectionResetError("reset by peer"))
    assert is_transient(TimeoutError())
    assert not is_transient(ValueError("bad tensor"))
