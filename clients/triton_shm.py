"""System shared memory for request tensors when Triton runs on the same host.

Instead of serialising a batch into the gRPC message (protobuf copies it several times on each side), the
client copies it once into a POSIX shared-memory region that Triton has mapped, and the request only names the
region. Regions are registered once and reused: a pool keeps free regions by size and hands each request one
that fits (sizes are powers of two from 1 MiB). Outputs stay in the gRPC answer: they are small and their size
is not known in advance (DETECTIONS has one row per finding).

A Triton in a container needs the host's ``/dev/shm`` (``--ipc=host``); where registration fails - a remote
Triton, no shared ``/dev/shm`` - the caller falls back to the gRPC payload.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import time
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_MIN_REGION = 1 << 20
_counter = itertools.count()
_SHM = Path("/dev/shm")
_OUR_REGION = re.compile(r"^gateway_\w+?_(?P<pid>\d+)_\d+$")
STALE_AFTER_S = 60.0  # a region of a process gone this long ago is nobody's
_swept = False


def remove_stale_regions(root: Path = _SHM, *, older_than_s: float = STALE_AFTER_S) -> list[str]:
    """Unlink the regions of gateway processes that died without closing them (SIGKILL, OOM): POSIX shared memory
    outlives its process, and a long-lived host would fill its /dev/shm. Only regions whose creator's PID is not
    running and that are older than ``older_than_s``; returns their names."""
    removed = []
    now = time.time()
    with contextlib.suppress(OSError):
        for path in root.iterdir():
            match = _OUR_REGION.match(path.name)
            if match is None or _alive(int(match.group("pid"))):
                continue
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime >= older_than_s:
                    path.unlink()
                    removed.append(path.name)
    if removed:
        logger.info("removed %d shared memory region(s) of gateway processes that are gone", len(removed))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@dataclass(eq=False)
class Region:
    name: str  # Triton's name for the region
    size: int
    memory: shared_memory.SharedMemory  # its key in /dev/shm is "/" + memory.name


def region_size(nbytes: int) -> int:
    """The pooled size for a request of ``nbytes``: the next power of two, at least 1 MiB."""
    size = _MIN_REGION
    while size < nbytes:
        size *= 2
    return size


class SharedMemoryPool:
    """Registered system shared-memory regions of one Triton endpoint, reused across requests."""

    def __init__(self, client: Any, *, tag: str) -> None:
        global _swept
        if not _swept:  # once per process, before this one adds its own
            _swept = True
            remove_stale_regions()
        self._client = client  # tritonclient.grpc.aio.InferenceServerClient
        self._tag = tag
        self._free: list[Region] = []
        self._all: list[Region] = []

    async def acquire(self, nbytes: int) -> Region:
        """A registered region of at least ``nbytes``; raises if Triton cannot map it (then use the payload)."""
        fitting = [r for r in self._free if r.size >= nbytes]
        if fitting:
            region = min(fitting, key=lambda r: r.size)
            self._free.remove(region)
            return region
        size = region_size(nbytes)
        serial = next(_counter)
        name = f"gateway-{self._tag}-{os.getpid()}-{serial}"
        memory = shared_memory.SharedMemory(
            f"gateway_{self._tag}_{os.getpid()}_{serial}", create=True, size=size
        )
        try:
            await self._client.register_system_shared_memory(name, f"/{memory.name}", size)
        except Exception:
            _destroy(memory)
            raise
        region = Region(name=name, size=size, memory=memory)
        self._all.append(region)
        logger.debug("registered shared memory region %s (%d MiB)", name, size >> 20)
        return region

    def write(self, region: Region, arrays: list[np.ndarray]) -> list[tuple[int, int]]:
        """Copy the arrays one after another into the region; returns (offset, nbytes) of each."""
        places = []
        offset = 0
        for array in arrays:
            view: np.ndarray = np.ndarray(array.shape, array.dtype, buffer=region.memory.buf, offset=offset)
            view[...] = array
            places.append((offset, array.nbytes))
            offset += array.nbytes
        return places

    def release(self, region: Region) -> None:
        self._free.append(region)

    def forget(self) -> None:
        """Drop every region after the server lost its registrations (it restarted); new ones are registered on
        the next request."""
        for region in self._all:
            _destroy(region.memory)
        self._all.clear()
        self._free.clear()

    async def close(self) -> None:
        for region in self._all:
            try:
                await self._client.unregister_system_shared_memory(region.name)
            except Exception as exc:  # Triton already gone: the regions die with it
                logger.debug("unregister %s: %s", region.name, exc)
            _destroy(region.memory)
        self._all.clear()
        self._free.clear()


def _destroy(memory: shared_memory.SharedMemory) -> None:
    memory.close()
    with contextlib.suppress(FileNotFoundError):
        memory.unlink()
