from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config.settings import DATABASE_URL_ENV, default_model_repository
from tests.support.postgres import PostgresCluster, postgres_cluster

# The shared real-data folder sits next to the repository; GATEWAY_REAL_DATA overrides the location.
REAL_DATA = Path(
    os.environ.get("GATEWAY_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "real")
)


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real DICOM test data not found at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(scope="session")
def model_repository() -> Path:
    repo = default_model_repository()
    if not any(repo.glob("*/1/model.onnx")):
        pytest.fail("ONNX models are not built: run `make models` (python scripts/build_models.py)")
    return repo


@pytest.fixture(scope="session")
def triton(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real tritonserver from the nvidia-pytriton wheel, shared by the session; yields its gRPC URL."""
    from gateway.inference.server import TritonServer

    server = TritonServer(model_repository, tmp_path_factory.mktemp("triton"), startup_timeout_s=180)
    server.start()
    try:
        yield server.grpc_url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A real PostgreSQL cluster on a free loopback port, shared by the session."""
    with postgres_cluster() as cluster:
        yield cluster


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--database",
        choices=["sqlite", "postgresql"],
        default="sqlite",
        help="the system of record of every gateway a test starts without naming one: SQLite in its data folder "
        "(the default), or a new database per test on a throwaway PostgreSQL cluster (GATEWAY_DATABASE_URL)",
    )


@pytest.fixture(autouse=True)
def _gateway_database(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.config.getoption("--database") == "postgresql":
        cluster: PostgresCluster = request.getfixturevalue("postgres")
        monkeypatch.setenv(DATABASE_URL_ENV, cluster.create_database())
    else:
        monkeypatch.delenv(DATABASE_URL_ENV, raising=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each backend: an SQLite file, and a new database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gateway.db'}"
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    return cluster.create_database()


# -- ports: each pytest-xdist worker (and every server it starts) picks loopback ports from a range of its own ----


def _port_range_of_this_worker() -> None:
    """Workers picking ports from one range could pick the same port between one's pick and its bind."""
    from gateway.inference.server import FREE_PORTS, PORT_RANGE_ENV

    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if (
        not (worker.startswith("gw") and worker[2:].isdigit() and count.isdigit())
        or PORT_RANGE_ENV in os.environ
    ):
        return
    size = (FREE_PORTS[1] - FREE_PORTS[0] + 1) // int(count)
    first = FREE_PORTS[0] + int(worker[2:]) * size
    os.environ[PORT_RANGE_ENV] = f"{first}-{first + size - 1}"


# -- privacy: no patient identifier in any log of the test run ---------------------------------------------------

_LOG_RECORDS: list[str] = []


class _Capture(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _LOG_RECORDS.append(self.format(record))


def pytest_configure(config: pytest.Config) -> None:
    _port_range_of_this_worker()
    handler = _Capture(level=logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))


def _identifiers() -> set[str]:
    """Patient names, IDs and birth dates of every test input: the phantoms and the shared real data."""
    from gateway.demo.phantoms import PATIENT_BIRTH_DATE, PATIENT_ID, PATIENT_NAME

    values = {PATIENT_NAME, PATIENT_NAME.replace("^", " "), PATIENT_ID, PATIENT_BIRTH_DATE}
    import pydicom

    from tests.support.corpus import package_roots

    roots = [REAL_DATA] if REAL_DATA.is_dir() else []
    roots += [root for _, root in package_roots()]  # the real-world corpus sends these too
    for root in roots:
        for path in root.rglob("*.dcm"):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:  # deliberately broken test files
                continue
            for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
                value = str(ds.get(keyword, "") or "").strip()
                if len(value) >= 5:  # shorter values match unrelated text by chance
                    values.add(value)
    return values


def _token_pattern(identifiers: set[str]) -> re.Pattern[str] | None:
    """One regex matching any identifier as a whole token.

    A token boundary is anything but a letter, digit or dot, so a numeric patient ID such as ``99000`` is found in
    ``patient 99000`` but not inside a UID (``1.2.840.99000123``), a timing (``0.99000``) or a longer number, which
    would otherwise fail the run by chance.
    """
    if not identifiers:
        return None
    alternatives = "|".join(re.escape(v) for v in sorted(identifiers, key=len, reverse=True))
    return re.compile(rf"(?<![A-Za-z0-9.])(?:{alternatives})(?![A-Za-z0-9])")


def identifier_leaks(lines: list[str], root: Path | None, identifiers: set[str]) -> list[tuple[str, str]]:
    """(where, identifier) for every identifier found, as a token, in the log lines or in log files under ``root``."""
    pattern = _token_pattern(identifiers)
    if pattern is None:
        return []
    leaks = [(f"log record: {line[:160]}", m) for line in lines for m in set(pattern.findall(line))]
    if root is not None:
        for path in Path(root).rglob("*"):
            if path.is_file() and (path.suffix == ".log" or path.name == "audit.jsonl"):
                text = path.read_text(errors="replace")
                leaks += [(str(path), m) for m in set(pattern.findall(text))]
    return leaks


# Leaks reported by pytest-xdist workers, gathered by the controller as each worker finishes.
_WORKER_LEAKS: list[tuple[str, str]] = []


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist, on the controller: keep what the finished worker found in its log records."""
    _WORKER_LEAKS.extend((where, value) for where, value in node.workeroutput.get("privacy_leaks", []))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when a patient identifier of the test data appears in any log line or log file.

    Under pytest-xdist each worker checks its own log records and hands what it found to the controller, which
    adds the log files of every worker (they lie under its base temporary folder) and fails the run."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: its records only; the controller reads the files
        workeroutput["privacy_leaks"] = identifier_leaks(_LOG_RECORDS, None, _identifiers())
        return
    factory = getattr(session.config, "_tmp_path_factory", None)
    leaks = identifier_leaks(_LOG_RECORDS, factory.getbasetemp() if factory else None, _identifiers())
    leaks += _WORKER_LEAKS
    if leaks:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"PRIVACY: {len(leaks)} patient identifier(s) found in logs:", red=True)
            for where, value in leaks[:20]:
                reporter.write_line(f"  {value!r} in {where}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
