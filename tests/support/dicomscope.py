"""OFFIS DICOMscope (Debian `dicomscope`, the DCMTK viewer built for presentation states) driven under Xvfb.

DICOMscope reads `DICOMscope.cfg` from its working folder; its study browser lists a DCMTK index database
(`index.dat`, written here with `dcmqridx`). The browser is a Swing tree: the driver selects a row with the
keyboard, finds the selected row in a screenshot (its highlight colour) and double-clicks it, which opens the
image - or, for a presentation state, the image it references with the presentation state applied - in the
Viewer tab. Screenshots are taken with ImageMagick's `import`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SYSTEM_CONFIG = Path("/etc/dcmtk/DICOMscope.cfg")
TOOLS = ("Xvfb", "dicomscope", "dcmqridx", "xdotool", "import")
SCREEN = (1600, 1200)
SELECTED = np.array([184, 207, 229])  # the Swing (Metal) tree's selection background


def require_dicomscope() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing or not SYSTEM_CONFIG.exists():
        pytest.skip(
            f"{', '.join(missing) or 'DICOMscope.cfg'} missing (Debian dicomscope xvfb xdotool imagemagick)"
        )


class DicomScope:
    """One DICOMscope on its own X display, its database holding ``files``."""

    def __init__(self, work_dir: Path, files: list[Path]) -> None:
        self.work_dir = work_dir
        self.files = files
        self.processes: list[subprocess.Popen[bytes]] = []
        self.env = dict(os.environ)

    def __enter__(self) -> DicomScope:
        db = self.work_dir / "db"
        db.mkdir(parents=True)
        copies = []
        for index, path in enumerate(self.files):
            copies.append(db / f"{index:03d}.dcm")
            shutil.copyfile(path, copies[-1])
        subprocess.run(["dcmqridx", str(db), *map(str, copies)], check=True, capture_output=True)
        config = SYSTEM_CONFIG.read_text()
        config = config.replace("/var/lib/dcmtk/db/READWRITE", str(db))
        config = config.replace("LogDirectory = log", f"LogDirectory = {self.work_dir / 'log'}")
        (self.work_dir / "log").mkdir()
        (self.work_dir / "DICOMscope.cfg").write_text(config)
        read, write = os.pipe()
        xvfb = subprocess.Popen(
            [
                "Xvfb",
                "-displayfd",
                str(write),
                "-screen",
                "0",
                f"{SCREEN[0]}x{SCREEN[1]}x24",
                "-nolisten",
                "tcp",
            ],
            pass_fds=(write,),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(write)
        self.processes.append(xvfb)
        with os.fdopen(read) as pipe:
            display = pipe.readline().strip()
        self.env["DISPLAY"] = f":{display}"
        self.log = (self.work_dir / "dicomscope.log").open("wb")
        self.processes.append(
            subprocess.Popen(
                ["dicomscope"], cwd=self.work_dir, env=self.env, stdout=self.log, stderr=subprocess.STDOUT
            )
        )
        self._xdotool("search", "--sync", "--name", "DICOMscope")
        self._wait_for_browser()
        return self

    def __exit__(self, *exc: object) -> None:
        for process in reversed(self.processes):
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        self.log.close()

    def _xdotool(self, *args: str) -> None:
        subprocess.run(["xdotool", *args], env=self.env, check=True, timeout=60, capture_output=True)

    def screenshot(self, path: Path | None = None) -> np.ndarray:
        target = path or self.work_dir / "screen.png"
        subprocess.run(["import", "-window", "root", str(target)], env=self.env, check=True, timeout=60)
        return np.asarray(Image.open(target).convert("RGB")).astype(np.int16)

    def _selected_row(self) -> tuple[int, int] | None:
        pixels = self.screenshot()
        band = np.all(np.abs(pixels[60:900, :800] - SELECTED) <= 6, axis=-1)
        rows = np.flatnonzero(band.sum(axis=1) > 20)
        if rows.size == 0:
            return None
        columns = np.flatnonzero(band[rows[rows.size // 2]])
        return int(columns.mean()), 60 + int(rows.mean())

    def _wait_for_browser(self, timeout_s: float = 90.0) -> None:
        """The tree shows once the database is read: "All Studies" is its first row, the study the second."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            time.sleep(2.0)
            self._click(300, 96)  # the study row, below "All Studies"
            if self._selected_row() is not None:
                return
        raise RuntimeError(f"DICOMscope's study browser did not show; see {self.work_dir / 'dicomscope.log'}")

    def _click(self, x: int, y: int, *, double: bool = False) -> None:
        self._xdotool(
            "mousemove", str(x), str(y), "click", "--repeat", "2" if double else "1", "--delay", "80", "1"
        )

    def expand(self, series: int) -> None:
        """Open every node of the one study's tree: study, then each of its ``series``."""
        keys = ["Home", "Down", "Right"]
        for _ in range(series):
            keys += ["Down", "Right", "Down"]  # the series, open it, its (one) instance
        self._xdotool("key", "--delay", "150", *keys)
        time.sleep(1.0)

    def open_row(self, row: int) -> None:
        """Open the browser's ``row``-th row (0 is "All Studies") in the Viewer tab."""
        self._click(37, 40)  # the Browser tab
        time.sleep(1.0)
        self._xdotool("key", "--delay", "150", "Home", *["Down"] * row)
        time.sleep(0.5)
        selected = self._selected_row()
        if selected is None:
            raise RuntimeError("no row of DICOMscope's browser is selected")
        self._click(*selected, double=True)
        time.sleep(8.0)  # loading and rendering a 1536 x 1536 image
