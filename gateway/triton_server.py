"""Start, probe and stop a real ``tritonserver`` from the ``nvidia-pytriton`` wheel, on loopback.

Used when no external Triton URL is configured. The wheel ships the server binary, the Python backend and one
backend stub per Python version; the stub finds ``python3`` on ``PATH`` and runs the models in that
environment, so this process's virtualenv ``bin/`` goes first on ``PATH``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from gateway.errors import ConfigError, InferenceUnavailable

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A currently free TCP port on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


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
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.work_dir / "tritonserver.log"
        self._log_file: IO[bytes] | None = None

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
        (``gateway/triton_onnx_runner.py``); every other folder is linked as it is.
        """
        target = self.work_dir / "serving_repository"
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        runner = Path(__file__).with_name("triton_onnx_runner.py")
        for folder in sorted(p for p in self.model_repository.iterdir() if (p / "config.pbtxt").is_file()):
            config = (folder / "config.pbtxt").read_text()
            if not _NATIVE_ONNX.search(config):
                (target / folder.name).symlink_to(folder, target_is_directory=True)
                continue
            shim = target / folder.name
            shutil.copytree(folder, shim, symlinks=False, ignore=shutil.ignore_patterns("__pycache__"))
            (shim / "config.pbtxt").write_text(_NATIVE_ONNX.sub('backend: "python"', config))
            for version in (p for p in shim.iterdir() if p.is_dir() and p.name.isdigit()):
                shutil.copy2(runner, version / "model.py")
        return target

    def start(self) -> TritonServer:
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
        backends = self._prepare_backends(install)
        self.grpc_port = self.grpc_port or free_port()
        self.http_port, self.metrics_port = free_port(), free_port()
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            filter(None, [str(install.libs), env.get("LD_LIBRARY_PATH", "")])
        )
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        cmd = [
            str(install.binary),
            f"--model-repository={self._serving_repository()}",
            f"--backend-directory={backends}",
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
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed in stop()
        self._log_file = log
        self.process = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

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

    def stop(self, timeout_s: float = 20.0) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            logger.info("stopping tritonserver (pid %d)", proc.pid)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("tritonserver did not stop in %.0fs; killing it", timeout_s)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


_NATIVE_ONNX = re.compile(
    r'^\s*(?:backend:\s*"onnxruntime"|platform:\s*"onnxruntime_onnx")\s*$', re.MULTILINE
)


def _missing_model_files(model_dir: Path) -> bool:
    """True when a model folder declares an ONNX file in its config that has not been built yet."""
    config = (model_dir / "config.pbtxt").read_text()
    if not (_NATIVE_ONNX.search(config) or '"onnx_file"' in config):
        return False
    return not any(model_dir.glob("*/*.onnx"))
