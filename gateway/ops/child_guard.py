"""Run one child program so that it never outlives the gateway: ``python -m gateway.ops.child_guard FD -- CMD...``.

The gateway keeps the write end of a pipe and passes the read end (``FD``) to this guard. The guard starts
``CMD`` in a process group of its own and waits. When the pipe reports end-of-file - the gateway exited, however
it exited, SIGKILL included, because the kernel closes a dead process's descriptors - the guard stops the whole
group (SIGTERM, then SIGKILL after ``GRACE_S``), so the child and everything it started (Triton's Python-backend
stubs) go with it. When the child exits by itself the guard kills what is left of its group (orphaned stubs)
and exits with the child's status, which the gateway's supervisor sees and acts on. SIGTERM / SIGINT sent to the
guard are passed on to the group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

GRACE_S = 10.0


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _stop_group(child: subprocess.Popen[bytes]) -> None:
    _kill_group(child.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=GRACE_S)
    _kill_group(child.pid, signal.SIGKILL)


def _watch_parent(fd: int, child: subprocess.Popen[bytes]) -> None:
    """Block until the gateway's end of the pipe is closed, then take the child's group down."""
    while True:
        try:
            if not os.read(fd, 4096):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    _stop_group(child)
    os._exit(128 + signal.SIGTERM)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m gateway.ops.child_guard FD -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    fd = int(argv[0])
    child = subprocess.Popen(argv[2:], start_new_session=True)

    def forward(signum: int, frame: object) -> None:
        _kill_group(child.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    threading.Thread(target=_watch_parent, args=(fd, child), name="parent-watch", daemon=True).start()
    while True:
        try:
            code = child.wait()
            break
        except InterruptedError:
            continue
    time.sleep(0.2)  # let the group's other members notice their parent is gone
    _kill_group(child.pid, signal.SIGKILL)  # orphaned helpers (backend stubs) of a child that died
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
