"""``free_port``: the ports handed out for servers the gateway (and the tests) start on loopback."""

from __future__ import annotations

import random
import socket

import pytest

from gateway.inference import server
from gateway.inference.server import PORT_RANGE_ENV, free_port


def _free_block(size: int) -> int:
    """The first port of ``size`` consecutive ports that are free on loopback now, inside the picker's range."""
    for _ in range(200):
        first = random.randint(server.FREE_PORTS[0], server.FREE_PORTS[1] - size)
        socks = []
        try:
            for port in range(first, first + size):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise AssertionError("no block of free ports found")


def test_a_port_is_not_handed_out_twice_while_its_taker_has_yet_to_bind_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A caller picks a port and binds it later (a test picked the gateway's DICOM port, then started Orthanc, which
    # picked its own two - and one was the same port, still unbound: the gateway then could not listen; seen in CI).
    monkeypatch.delenv(PORT_RANGE_ENV, raising=False)
    first = _free_block(10)
    monkeypatch.setattr(server, "FREE_PORTS", (first, first + 9))
    picked = [free_port() for _ in range(10)]
    assert len(set(picked)) == 10, picked
    # Once the range is used up, the kernel's choice (still a different, free port) rather than a repeat.
    assert free_port() not in picked


def test_the_range_can_be_narrowed_for_a_process_and_its_children(monkeypatch: pytest.MonkeyPatch) -> None:
    # Several processes picking at once (test workers, the servers they start) each get a range of their own.
    first = _free_block(50)
    monkeypatch.setenv(PORT_RANGE_ENV, f"{first}-{first + 49}")
    assert all(first <= free_port() <= first + 49 for _ in range(20))


@pytest.mark.parametrize("value", ["20000", "30000-20000", "x-y", "0-10", "20000-70000"])
def test_a_malformed_range_is_refused_with_what_to_write(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(PORT_RANGE_ENV, value)
    with pytest.raises(server.ConfigError, match=PORT_RANGE_ENV):
        free_port()
