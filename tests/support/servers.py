"""Real peers for the integration tests: Orthanc (the PACS), a webhook receiver, DCMTK's storescu."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from gateway.inference.server import free_port

LOOPBACK = "127.0.0.1"


def listening(port: int, *, timeout_s: float) -> bool:
    """Whether something accepts connections on the loopback ``port`` within ``timeout_s``."""
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex((LOOPBACK, port)) == 0:
                return True
        time.sleep(0.05)
    return False


def require_tool(name: str) -> str:
    import pytest

    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package; `make test` installs it as root)")
    return path


class Orthanc:
    """A real Orthanc PACS on free loopback ports with its own storage folder."""

    def __init__(
        self,
        work_dir: Path,
        *,
        aet: str = "ORTHANC",
        modalities: dict[str, list[Any]] | None = None,
        dicom_port: int = 0,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.extra = extra or {}  # more configuration (plugins and their sections)
        self.work_dir = work_dir
        self.aet = aet
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        self.modalities = modalities or {}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def start(self) -> Orthanc:
        binary = require_tool("Orthanc")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "gateway-tests",
            "StorageDirectory": str(self.work_dir / "db"),
            "IndexDirectory": str(self.work_dir / "db"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "Plugins": [],
            "DicomModalities": self.modalities,
            "StableAge": 1,
            **self.extra,
        }
        path = self.work_dir / "orthanc.json"
        path.write_text(json.dumps(config))
        env = dict(os.environ, TCP_NODELAY="1")
        log = open(self.work_dir / "orthanc.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen([binary, str(path)], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not start; see {self.work_dir / 'orthanc.log'}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return bytes(response.read())

    def post(self, path: str, body: bytes | str, content_type: str = "application/json") -> Any:
        data = body.encode() if isinstance(body, str) else body
        request = urllib.request.Request(
            self.url + path, data=data, method="POST", headers={"Content-Type": content_type}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def upload(self, paths: list[Path]) -> None:
        for path in paths:
            self.post("/instances", path.read_bytes(), "application/dicom")

    def series_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        found = self.post(
            "/tools/find", json.dumps({"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
        )
        if not found:
            return []
        return list(self.get(f"/studies/{found[0]}/series"))

    def instance_uids(self, study_uid: str) -> set[str]:
        found = self.post(
            "/tools/find",
            json.dumps({"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}),
        )
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in found or []}


class UpsWorklistManager:
    """The tests' independent UPS worklist manager (tests/support/ups/manager.js, dcmjs-dimse on Node.js) on a
    free loopback port; ``workitems()`` reads what it holds (it rewrites its JSON state after every change)."""

    FOLDER = Path(__file__).parent / "ups"

    def __init__(self, work_dir: Path, *, aet: str = "WORKLIST") -> None:
        self.aet = aet
        self.port = free_port()
        self.state = work_dir / "ups-state.json"
        self.log = work_dir / "ups-manager.log"
        self.process: subprocess.Popen[bytes] | None = None

    def workitems(self) -> dict[str, Any]:
        return dict(json.loads(self.state.read_text())) if self.state.exists() else {}

    def __enter__(self) -> UpsWorklistManager:
        import pytest

        node = require_tool("node")
        if not (self.FOLDER / "node_modules" / "dcmjs-dimse").exists():
            pytest.skip("dcmjs-dimse is not installed (`make test-peers` runs npm ci in tests/support/ups)")
        self.state.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [node, str(self.FOLDER / "manager.js"), "--port", str(self.port), "--aet", self.aet,
                 "--state", str(self.state)],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        if listening(self.port, timeout_s=20):
            return self
        self.__exit__()
        raise RuntimeError(f"the UPS worklist manager did not start: {self.log.read_text()[-2000:]}")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


class WebhookReceiver:
    """Collects JSON POSTs (the STAT webhook) on a loopback port."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        received = self.events

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server.server_address[1]}/stat"

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def storescu(
    paths: list[Path], *, port: int, calling_ae: str, called_ae: str = "AI_GATEWAY"
) -> subprocess.CompletedProcess[str]:
    binary = require_tool("storescu")
    env = dict(os.environ, TCP_NODELAY="1")
    cmd = [binary, "-aet", calling_ae, "-aec", called_ae, LOOPBACK, str(port), *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def wait_for(predicate: Any, *, timeout_s: float, interval_s: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@contextlib.contextmanager
def triton_paused(grpc_url: str) -> Iterator[None]:
    """The tritonserver serving ``grpc_url`` stopped (SIGSTOP) for the block: requests sent to it wait, so a test
    can hold an analysis in flight for as long as it needs, then continue it (SIGCONT)."""
    port = grpc_url.rsplit(":", 1)[1]
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"tritonserver") and f"--grpc-port={port}".encode() in args:
            pids.append(int(cmdline.parent.name))
    assert len(pids) == 1, f"tritonserver for {grpc_url}: found {pids}"
    os.kill(pids[0], signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pids[0], signal.SIGCONT)


def dciodvfy_errors(path: Path) -> list[str]:
    binary = require_tool("dciodvfy")
    result = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


class MllpListener:
    """A real MLLP listener that answers each received message per ``script``: "ACK", "NAK" or "SILENT".

    After the script runs out it keeps acknowledging. ``received`` holds every message that arrived.
    """

    def __init__(self, script: list[str] | None = None) -> None:
        import socketserver

        from clients.mllp import END, frame, unframe

        def read_frame(sock: Any) -> str:
            data = b""
            while END not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed before a complete frame")
                data += chunk
            return unframe(data)

        self.script = list(script or [])
        self.received: list[str] = []
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(10)
                try:
                    message = read_frame(self.request)
                except (OSError, ConnectionError):
                    return
                outer.received.append(message)
                action = outer.script.pop(0) if outer.script else "ACK"
                if action == "SILENT":
                    time.sleep(1.5)  # longer than the client's timeout in the tests
                    return
                control = message.split("\r")[0].split("|")[9]
                code = "AA" if action == "ACK" else "AE"
                ack = f"MSH|^~\\&|RIS|HOSPITAL|AI_GATEWAY|AI_GATEWAY|20260101000000||ACK|{control}A|P|2.5.1\rMSA|{code}|{control}"
                self.request.sendall(frame(ack))

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.server = Server((LOOPBACK, 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def __enter__(self) -> MllpListener:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class SmtpSink:
    """A real SMTP server (aiosmtpd) on a free loopback port that keeps every message it accepts."""

    def __init__(self) -> None:
        import email
        import email.policy

        from aiosmtpd.controller import Controller

        self.messages: list[email.message.EmailMessage] = []
        self.received_at: list[float] = []  # per message, when it was accepted (Unix s)
        outer = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
                outer.received_at.append(time.time())
                outer.messages.append(parsed)  # type: ignore[arg-type]
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname=LOOPBACK, port=self.port)

    def to(self, address: str) -> list[Any]:
        return [m for m in self.messages if m["To"] == address]

    def __enter__(self) -> SmtpSink:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


class WorklistSCP:
    """DCMTK's ``wlmscpfs``: a real Modality Worklist SCP answering C-FIND from worklist files (one per item,
    ``<dir>/<AE title>/*.wl``), on a free loopback port."""

    def __init__(self, work_dir: Path, *, aet: str = "RIS_MWL") -> None:
        self.aet = aet
        self.folder = work_dir / aet
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "lockfile").touch()  # wlmscpfs answers only for a folder with a lockfile
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def add_item(self, name: str, **attributes: Any) -> Path:
        """A worklist item: a scheduled CT step with these top-level attributes (keyword = value)."""
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, generate_uid

        item = Dataset()
        item.SpecificCharacterSet = "ISO_IR 100"
        item.PatientName = "MWL^TEST"
        item.PatientID = "MWL-PAT-1"
        item.PatientBirthDate = ""
        item.PatientSex = "O"
        item.StudyInstanceUID = generate_uid()
        item.RequestedProcedureID = "RP1"
        item.RequestedProcedureDescription = "CT head"
        item.RequestedProcedurePriority = "ROUTINE"
        item.ReferringPhysicianName = ""
        step = Dataset()
        step.ScheduledStationAETitle = "CT1"
        step.ScheduledProcedureStepStartDate = "20261202"
        step.ScheduledProcedureStepStartTime = "1000"
        step.Modality = "CT"
        step.ScheduledPerformingPhysicianName = ""
        step.ScheduledProcedureStepDescription = "CT head"
        step.ScheduledProcedureStepID = "SPS1"
        item.ScheduledProcedureStepSequence = [step]
        for keyword, value in attributes.items():
            setattr(item, keyword, value)
        item.file_meta = FileMetaDataset()
        item.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        item.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.31"
        item.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = self.folder / f"{name}.wl"
        item.save_as(path, enforce_file_format=True)
        return path

    def __enter__(self) -> WorklistSCP:
        binary = require_tool("wlmscpfs")
        self.process = subprocess.Popen(
            [binary, "-dfp", str(self.folder.parent), "--single-process", "-ll", "warn", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if listening(self.port, timeout_s=10):
            return self
        self.__exit__()
        raise RuntimeError("wlmscpfs did not start listening")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


PIXELMED_JAR = "/usr/share/java/pixelmed.jar"
PIXELMED_JVM_FLAGS = [
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
]


def pixelmed_sr_validation(path: Path) -> str:
    """Output of PixelMed's DicomSRValidator (it exits 0 even on failure, so callers read the text)."""
    import pytest

    java = require_tool("java")
    if not Path(PIXELMED_JAR).exists():
        pytest.skip("PixelMed is not installed (Debian pixelmed-apps; `make test` installs it as root)")
    cmd = [
        java,
        *PIXELMED_JVM_FLAGS,
        "-cp",
        PIXELMED_JAR,
        "com.pixelmed.validate.DicomSRValidator",
        str(path),
    ]
    for _ in range(
        2
    ):  # a JVM that could not run (memory, on a busy CI machine) prints no validation: once more
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        out = result.stdout + result.stderr
        if "validation complete" in out.lower():
            break
    return out


def tool_output(*cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    require_tool(cmd[0])
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=120, cwd=cwd)


def http_json(url: str, *, method: str = "GET", token: str = "", body: Any = None) -> tuple[int, Any]:
    """(status, decoded JSON or text) of an HTTP request; error statuses are returned, not raised."""
    import urllib.error

    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw, status = response.read(), response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()
