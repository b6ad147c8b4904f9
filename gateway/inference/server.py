"""Start, probe, supervise and stop a real ``tritonserver`` from the ``nvidia-pytriton`` wheel, on loopback.

Used when no external Triton URL is configured. The wheel ships the server binary, the Python backend and one
backend stub per Python version; the stub finds ``python3`` on ``PATH`` and runs the models in that
environment, so this process's virtualenv ``bin/`` goes first on ``PATH``.

The server runs under ``gateway.ops.child_guard``, which ties it (and its backend stubs) to this process's life: a
gateway that dies, even by SIGKILL, leaves no server behind for the next start to collide with. With
``supervise=True`` a server that exits unexpectedly is restarted on the same gRPC port with backoff (1 s,
doubling to 30 s; back to 1 s after a minute of good running), and each restart is logged and counted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import IO

from gateway.core.errors import ConfigError, InferenceUnavailable
from gateway.core.retry import Backoff
from gateway.inference.model_config import (
    as_python_backend,
    declares_onnx_file,
    read_model_config,
    runs_on_onnxruntime,
)

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
RESTART_BACKOFF_S = (1.0, 30.0)
STABLE_AFTER_S = 60.0


# Ports handed out for servers the gateway starts (and the tests' peers): chosen at random below the kernel's
# ephemeral range (32768-60999 by default), so that a port picked here and bound a moment later cannot meanwhile be
# given to some process's outgoing connection, nor to another picker's bind(0) - the race several test workers hit.
FREE_PORTS = (20000, 32000)
# Narrows that range for a process and the processes it starts ("first-last"): gives each of several processes
# picking at once (test workers, gateways on one host) ports of its own, or fits the ports to a firewall's rule.
PORT_RANGE_ENV = "GATEWAY_PORT_RANGE"
# A port handed out is not handed out again by this process while its taker may still be about to bind it.
_HANDED_OUT: dict[int, None] = {}
_HANDED_OUT_KEPT = 4096
_HANDED_OUT_LOCK = threading.Lock()


def _port_range() -> tuple[int, int]:
    value = os.environ.get(PORT_RANGE_ENV, "").strip()
    if not value:
        return FREE_PORTS
    first, _, last = value.partition("-")
    try:
        low, high = int(first), int(last)
    except ValueError:
        low, high = 0, 0
    if not 1024 <= low <= high <= 65535:
        raise ConfigError(
            f"{PORT_RANGE_ENV}={value!r} is not a port range: write first-last, e.g. 20000-23999 (1024-65535)"
        )
    return low, high


def free_port() -> int:
    """A TCP port on loopback that is free now and that this process has not handed out recently."""
    low, high = _port_range()
    with _HANDED_OUT_LOCK:
        port = 0
        for _ in range(200):
            candidate = random.randint(low, high)
            if candidate not in _HANDED_OUT and _bindable(candidate):
                port = candidate
                break
        while not port:  # that range is full or used up: the kernel's choice, never one handed out already
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((LOOPBACK, 0))
                candidate = int(sock.getsockname()[1])
            port = 0 if candidate in _HANDED_OUT else candidate
        _HANDED_OUT[port] = None
        while len(_HANDED_OUT) > _HANDED_OUT_KEPT:
            del _HANDED_OUT[next(iter(_HANDED_OUT))]
        return port


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


@dataclass(frozen=True, kw_only=True)
class TritonInstallation:
    binary: Path
    libs: Path
    backends: Path
    stub: Path

    @classmethod
    def from_wheel(cls) -> TritonInstallation:
        try:
            import pytriton
        except ImportError:
            raise ConfigError(
                "no Triton URL configured and the nvidia-pytriton wheel is not installed: "
                "run `make setup` or set [triton] url = 'host:port'"
            ) from None
        root = Path(pytriton.__file__).resolve().parent
        server = root / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        install = cls(
            binary=server / "bin" / "tritonserver",
            libs=root.parent / "nvidia_pytriton.libs",
            backends=server / "backends",
            stub=server / "python_backend_stubs" / version / "triton_python_backend_stub",
        )
        for path in (install.binary, install.libs, install.backends, install.stub):
            if not path.exists():
                raise ConfigError(f"incomplete nvidia-pytriton installation: {path} is missing")
        return install


class TritonServer:
    """A ``tritonserver`` child process bound to loopback on free ports."""

    def __init__(
        self,
        model_repository: Path,
        work_dir: Path,
        *,
        startup_timeout_s: float = 120.0,
        log_verbose: int = 0,
        grpc_port: int = 0,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.work_dir = Path(work_dir)
        self.startup_timeout_s = startup_timeout_s
        self.log_verbose = log_verbose
        self.grpc_port = grpc_port  # 0: a free port is picked at start
        self.http_port = 0
        self.metrics_port = 0
        self.process: subprocess.Popen[bytes] | None = (
            None  # the guard (gateway.ops.child_guard) around the server
        )
        self.log_path = self.work_dir / "tritonserver.log"
        self._log_file: IO[bytes] | None = None
        self._lifeline: int | None = None  # write end of the guard's pipe: closed when this process dies
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._lock = threading.Lock()
        self.restarts = 0
        self.last_exit = ""  # why the server last stopped unexpectedly
        self.on_restart: Callable[[], None] | None = (
            None  # called (supervisor thread) once a restart is ready
        )
        self.on_exit: Callable[[], None] | None = (
            None  # called (supervisor thread) as soon as the server exits unexpectedly
        )

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    def _prepare_backends(self, install: TritonInstallation) -> Path:
        target = self.work_dir / "backends"
        if not (target / "python" / "triton_python_backend_stub").exists():
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(install.backends, target)
            shutil.copy2(install.stub, target / "python" / "triton_python_backend_stub")
        return target

    def _serving_repository(self) -> Path:
        """The repository this server loads: the configured one, with native-ONNX folders run by the shim.

        Folders configured for Triton's ONNX Runtime backend get a Python-backend config and the generic runner
        (``model_repository/ensemble_steps/onnx_runner.py``); every other folder is linked as it is.
        """
        target = self.work_dir / "serving_repository"
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        # The runner is a file of the Triton-side package, copied as data: the gateway never imports it.
        runner = Path(str(resources.files("ensemble_steps").joinpath("onnx_runner.py")))
        for folder in sorted(p for p in self.model_repository.iterdir() if (p / "config.pbtxt").is_file()):
            config = read_model_config(folder)
            if not runs_on_onnxruntime(config):
                (target / folder.name).symlink_to(folder, target_is_directory=True)
                continue
            shim = target / folder.name
            shutil.copytree(folder, shim, symlinks=False, ignore=shutil.ignore_patterns("__pycache__"))
            (shim / "config.pbtxt").write_text(as_python_backend(config))
            for version in (p for p in shim.iterdir() if p.is_dir() and p.name.isdigit()):
                shutil.copy2(runner, version / "model.py")
        return target

    def start(self, *, supervise: bool = False) -> TritonServer:
        if not self.model_repository.is_dir():
            raise ConfigError(f"model repository {self.model_repository} does not exist")
        missing = [p for p in self.model_repository.glob("*/config.pbtxt") if _missing_model_files(p.parent)]
        if missing:
            raise ConfigError(
                f"model files are missing in {', '.join(str(p.parent.name) for p in missing)}: "
                "run `make models` (python scripts/build_models.py)"
            )
        install = TritonInstallation.from_wheel()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._install = install
        self._backends = self._prepare_backends(install)
        self._repository = self._serving_repository()
        self.grpc_port = self.grpc_port or free_port()
        self._stopping.clear()
        self._launch()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        if supervise:
            self._supervisor = threading.Thread(target=self._supervise, name="triton-supervisor", daemon=True)
            self._supervisor.start()
        return self

    def _launch(self) -> None:
        install = self._install
        self.http_port, self.metrics_port = free_port(), free_port()
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            filter(None, [str(install.libs), env.get("LD_LIBRARY_PATH", "")])
        )
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        cmd = [
            str(install.binary),
            f"--model-repository={self._repository}",
            f"--backend-directory={self._backends}",
            f"--grpc-address={LOOPBACK}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={LOOPBACK}",
            f"--http-port={self.http_port}",
            f"--metrics-address={LOOPBACK}",
            f"--metrics-port={self.metrics_port}",
            "--backend-config=python,shm-default-byte-size=67108864",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--log-verbose={self.log_verbose}",
        ]
        logger.info("starting tritonserver (grpc %s, log %s)", self.grpc_url, self.log_path)
        if self._log_file is None:
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed in stop()
        read_end, write_end = os.pipe()  # both non-inheritable; the guard gets the read end explicitly
        guard = [sys.executable, "-m", "gateway.ops.child_guard", str(read_end), "--", *cmd]
        try:
            self.process = subprocess.Popen(
                guard,
                env=env,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                pass_fds=(read_end,),
                start_new_session=True,
                cwd=Path(__file__).resolve().parents[2],
            )
        finally:
            os.close(read_end)
        self._close_lifeline()
        self._lifeline = write_end

    def _close_lifeline(self) -> None:
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None

    @property
    def server_pid(self) -> int | None:
        """The tritonserver process itself (the guard's child), when it runs."""
        guard = self.process
        if guard is None or guard.poll() is not None:
            return None
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == guard.pid:
                    return int(stat.parent.name)
            except (OSError, ValueError, IndexError):
                continue
        return None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _supervise(self) -> None:
        """Restart the server whenever it exits without being asked to, with backoff; reap every exit."""
        backoff = Backoff(*RESTART_BACKOFF_S)
        failures = 0
        started = time.monotonic()
        while not self._stopping.is_set():
            process = self.process
            if process is None:
                return
            code = process.wait()  # reaps the guard, which reaped the server: no zombie is left
            if self._stopping.is_set():
                return
            if time.monotonic() - started >= STABLE_AFTER_S:
                failures = 0  # it ran long enough: the next crash starts the backoff afresh
            failures += 1
            delay = backoff.delay(failures)
            with self._lock:
                self.restarts += 1
                self.last_exit = f"exit code {code}"
            if self.on_exit is not None:
                self.on_exit()  # the gate closes now, not at the next readiness probe
            logger.error(
                "tritonserver exited unexpectedly (%s); restart %d in %.0f s; log tail:\n%s",
                self.last_exit,
                self.restarts,
                delay,
                self.log_tail(10),
            )
            if self._stopping.wait(delay):
                return
            started = time.monotonic()
            try:
                with self._lock:
                    if self._stopping.is_set():
                        return
                    self._launch()
                self.wait_ready()
            except Exception as exc:
                logger.error("tritonserver restart failed: %s", str(exc).splitlines()[0])
                self._terminate(5.0)
                continue
            logger.info("tritonserver restarted on %s (restart %d)", self.grpc_url, self.restarts)
            if self.on_restart is not None:
                self.on_restart()

    def wait_ready(self) -> None:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + self.startup_timeout_s
        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise InferenceUnavailable(
                        f"tritonserver exited with code {self.process.returncode} during start-up; "
                        f"see {self.log_path}:\n{self.log_tail()}"
                    )
                try:
                    if client.is_server_ready(client_timeout=2.0):
                        logger.info("tritonserver ready on %s", self.grpc_url)
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.25)
        finally:
            client.close()
        raise InferenceUnavailable(
            f"tritonserver not ready after {self.startup_timeout_s:.0f}s; see {self.log_path}:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _terminate(self, timeout_s: float) -> None:
        proc = self.process
        if proc is not None and proc.poll() is None:
            server = self.server_pid
            logger.info("stopping tritonserver (pid %s)", server)
            proc.send_signal(signal.SIGTERM)  # the guard passes it on to the server's process group
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("tritonserver did not stop in %.0fs; killing it", timeout_s)
                for group in (server, proc.pid):
                    if group is not None:
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.killpg(group, signal.SIGKILL)
                proc.wait(timeout=5)
        self._close_lifeline()  # a guard that is still alive now sees end-of-file and takes the group down

    def stop(self, timeout_s: float = 20.0) -> None:
        self._stopping.set()
        with self._lock:
            self._terminate(timeout_s)
            self.process = None
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=timeout_s)
            self._supervisor = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _missing_model_files(model_dir: Path) -> bool:
    """True when a model folder declares an ONNX file in its config that has not been built yet."""
    if not declares_onnx_file(read_model_config(model_dir)):
        return False
    return not any(model_dir.glob("*/*.onnx"))
