import subprocess
import sys

import pytest

from gateway.cli import build_parser, main


@pytest.mark.parametrize("command", [[], ["serve"], ["send"], ["echo"], ["resend"], ["token"], ["config"]])
def test_every_command_explains_itself(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: gateway" in text
    assert len(text.splitlines()) > 5


def test_serve_help_lists_the_documented_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in ("--port", "--ae-title", "--destination", "--data-dir", "--triton-url", "--config"):
        assert flag in text


def test_bad_destination_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--destination", "nonsense"])
    assert exit_info.value.code == 2
    assert "expected AET@host:port" in capsys.readouterr().err


def test_config_errors_are_reported_without_traceback(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[receiver]\nport = 'x'\n")
    assert main(["config", "--config", str(bad)]) == 2
    assert "receiver.port: expected an integer" in capsys.readouterr().err


def test_module_entry_point_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "DICOM AI inference gateway" in result.stdout


def test_port_in_use_is_a_clear_config_error() -> None:
    import socket

    from gateway.core.errors import ConfigError
    from gateway.ingest.receiver import check_port_free

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}.*--port"):
            check_port_free("127.0.0.1", port)


def test_privacy_scan_finds_an_identifier_in_a_log_line_or_file() -> None:
    import tempfile
    from pathlib import Path

    from gateway.demo.phantoms import PATIENT_ID, PATIENT_NAME
    from tests.conftest import identifier_leaks

    # Outside pytest's temporary folders, which the session-wide scan reads: this file leaks on purpose.
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "gateway.log").write_text(f"stored instance of {PATIENT_ID}\n")
        (root / "clean.log").write_text("stored instance 1.2.3\n")
        leaks = identifier_leaks([f"hello {PATIENT_NAME}", "nothing here"], root, {PATIENT_NAME, PATIENT_ID})
    assert sorted(v for _, v in leaks) == sorted([PATIENT_NAME, PATIENT_ID])
    assert not any("clean.log" in where for where, _ in leaks)


def test_privacy_scan_matches_whole_tokens_not_digits_inside_uids_or_numbers() -> None:
    from tests.conftest import identifier_leaks

    ids = {"99000", "19010101"}
    clean = [
        "study 1.2.826.0.1.3680043.8.498.990001234 stored",  # inside a UID
        "series 2.25.1901010155 done",
        "infer took 0.99000 s",  # a timing
        "queued 1990001 bytes",  # a longer number
    ]
    assert identifier_leaks(clean, None, ids) == []
    leaky = ["patient 99000 arrived", "born=19010101", "id:99000."]
    assert sorted(v for _, v in identifier_leaks(leaky, None, ids)) == ["19010101", "99000", "99000"]
